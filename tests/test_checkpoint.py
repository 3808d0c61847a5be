import json
import os
import re

import pytest
import torch

from sparvar.checkpoint import (CheckpointError, check_state_dict, load_checkpoint, load_model, official_key_shapes,
                                save_official, to_official_name, weight_files)
from sparvar.config import get_config
from sparvar.model import build_model

TINY = get_config("infinity-tiny")

# Independent of our module tree: the official per-block and top-level names (INFINITY.md, official infinity.py).
BLOCK_KEYS = {
    "ada_gss", "sa.scale_mul_1H11", "sa.q_bias", "sa.v_bias", "sa.zero_k_bias", "sa.mat_qkv.weight", "sa.proj.weight",
    "sa.proj.bias", "ca.mat_q.weight", "ca.mat_q.bias", "ca.mat_kv.weight", "ca.v_bias", "ca.zero_k_bias",
    "ca.proj.weight", "ca.proj.bias", "ffn.fc1.weight", "ffn.fc1.bias", "ffn.fc2.weight", "ffn.fc2.bias",
    "ca_norm.weight", "ca_norm.bias",
}
TOP_KEYS = {
    "cfg_uncond", "pos_start", "text_norm.weight", "text_proj_for_sos.ca.mat_q", "text_proj_for_sos.ca.mat_kv.weight",
    "text_proj_for_sos.ca.v_bias", "text_proj_for_sos.ca.zero_k_bias", "text_proj_for_sos.ca.proj.weight",
    "text_proj_for_sos.ca.proj.bias", "text_proj_for_ca.0.weight", "text_proj_for_ca.0.bias", "text_proj_for_ca.2.weight",
    "text_proj_for_ca.2.bias", "lvl_embed.weight", "word_embed.weight", "word_embed.bias", "shared_ada_lin.1.weight",
    "shared_ada_lin.1.bias", "head_nm.ada_lin.1.weight", "head_nm.ada_lin.1.bias", "head.weight", "head.bias",
}


def expected_official_keys(depth, per_chunk):
    keys = set(TOP_KEYS)
    for b in range(depth):
        keys |= {f"block_chunks.{b // per_chunk}.module.{b % per_chunk}.{k}" for k in BLOCK_KEYS}
    return keys


@pytest.mark.parametrize("name,count,depth,per_chunk", [("infinity-2b", 694, 32, 4), ("infinity-8b", 862, 40, 5)])
def test_official_key_names_and_count(name, count, depth, per_chunk):
    shapes = official_key_shapes(get_config(name))  # meta device: no 8B allocation
    assert len(shapes) == count
    assert set(shapes) == expected_official_keys(depth, per_chunk)


def test_official_shapes_2b():
    s = official_key_shapes(get_config("infinity-2b"))
    assert s["cfg_uncond"] == (512, 2048)
    assert s["block_chunks.7.module.3.sa.mat_qkv.weight"] == (6144, 2048)
    assert s["block_chunks.0.module.0.sa.scale_mul_1H11"] == (1, 16, 1, 1)
    assert s["text_proj_for_sos.ca.mat_q"] == (1, 16, 128)
    assert s["head.weight"] == (64, 2048) and s["word_embed.weight"] == (2048, 32)
    assert s["lvl_embed.weight"] == (15, 2048) and s["block_chunks.0.module.0.ffn.fc1.weight"] == (8192, 2048)
    s8 = official_key_shapes(get_config("infinity-8b"))
    assert s8["head.weight"] == (112, 3584) and s8["text_proj_for_sos.ca.mat_q"] == (1, 16, 224)
    assert s8["block_chunks.7.module.4.ca.mat_kv.weight"] == (7168, 3584)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_roundtrip_through_official_names(tmp_path, suffix):
    model = build_model(TINY, seed=3)
    path = str(tmp_path / f"ckpt{suffix}")
    save_official(model, path)
    other = build_model(TINY, seed=4)
    load_checkpoint(other, path)
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    loaded = load_model(TINY, path)
    assert torch.equal(loaded.blocks[3].ffn.fc2.weight, model.blocks[3].ffn.fc2.weight)


def test_strict_errors_list_missing_unexpected_and_misshaped(tmp_path):
    sd = {k: torch.zeros(v) for k, v in official_key_shapes(TINY).items()}
    del sd["block_chunks.1.module.0.ffn.fc1.weight"]
    sd["block_chunks.0.module.0.sa.extra"] = torch.zeros(1)
    sd["cfg_uncond"] = torch.zeros(30, TINY.text_dim)  # the official loader would silently pad this
    with pytest.raises(CheckpointError) as e:
        check_state_dict(sd, TINY)
    msg = str(e.value)
    assert "missing (1)" in msg and "block_chunks.1.module.0.ffn.fc1.weight" in msg
    assert "unexpected (1)" in msg and "block_chunks.0.module.0.sa.extra" in msg
    assert "wrong shape (1)" in msg and "cfg_uncond: checkpoint (30, 64) != expected (32, 64)" in msg


def test_integer_weights_are_named_not_loaded():
    """Weights that are not floating point (a bad conversion) are named by key: they failed deep in load_state_dict
    ("Only Tensors of floating point ... can require gradients"), or were cast silently."""
    sd = {k: torch.zeros(v) for k, v in official_key_shapes(TINY).items()}
    sd["head.weight"] = sd["head.weight"].to(torch.int32)
    with pytest.raises(CheckpointError, match=r"not floating point \(1\):\n  head.weight: int32"):
        check_state_dict(sd, TINY)


def test_values_that_are_not_tensors_and_keys_that_are_not_strings_are_named():
    """A .pth pickles lists, floats and int keys too (weights_only allows them): they were an AttributeError or a
    TypeError traceback from the key check."""
    sd = {k: torch.zeros(v) for k, v in official_key_shapes(TINY).items()}
    sd["head.bias"] = sd["head.bias"].tolist()
    sd["cfg_uncond_scale"] = 1.5
    sd[0] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        check_state_dict(sd, TINY)
    assert "unexpected (2):\n  0\n  cfg_uncond_scale" in str(e.value)
    assert "not a tensor (2):\n  cfg_uncond_scale: float\n  head.bias: list" in str(e.value)
    assert "missing" not in str(e.value)  # head.bias is there, as something else


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = str(tmp_path / "tiny.safetensors")
    save_official(build_model(TINY), path)
    with pytest.raises(CheckpointError, match="this is an infinity-tiny checkpoint, not infinity-2b \\(give --model "
                                              "infinity-tiny\\)\ncheckpoint does not match infinity-2b"):
        load_model(get_config("infinity-2b"), path)
    from safetensors.torch import load_file

    legacy = str(tmp_path / "legacy.pth")  # torch < 1.6's format: it cannot be memory-mapped, and is read whole
    torch.save(load_file(path), legacy, _use_new_zipfile_serialization=False)
    load_model(TINY, legacy)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(TINY, str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_unreadable_checkpoints_are_named_not_tracebacks(tmp_path, suffix):
    """A truncated, empty or garbage file, or a directory, is a CheckpointError naming the path and what it is."""
    good = str(tmp_path / f"good{suffix}")
    save_official(build_model(TINY), good)
    data = open(good, "rb").read()
    for name, content in (("truncated", data[: len(data) // 2]), ("empty", b""), ("garbage", b"\x00not a checkpoint" * 9)):
        path = str(tmp_path / f"{name}{suffix}")
        with open(path, "wb") as f:
            f.write(content)
        with pytest.raises(CheckpointError, match=f"{name}{suffix} cannot be read as"):
            load_model(TINY, path)
    folder = tmp_path / f"folder{suffix}"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="a folder without weights"):
        load_model(TINY, str(folder))


def write_shards(model, folder, parts: int = 2) -> dict[str, list[str]]:
    """`model` as a Hugging Face save_pretrained folder of safetensors shards + index, under the official names (the
    layout of the official infinity_8b_weights)."""
    from safetensors.torch import save_file

    sd = {to_official_name(k, model.cfg): v.detach().contiguous() for k, v in model.state_dict().items()}
    keys = sorted(sd)
    shards = {f"model-{i + 1:05d}-of-{parts:05d}.safetensors": keys[i::parts] for i in range(parts)}
    folder.mkdir()
    for file, part in shards.items():
        save_file({k: sd[k] for k in part}, str(folder / file))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: f for f, part in shards.items() for k in part}}))
    return shards


def test_sharded_folder_loads(tmp_path):
    """Infinity-8B's official weights are a folder of shards (official run_infinity.py: checkpoint_type='torch_shard');
    the folder and its index file both load, and a shard that holds other keys than the index says is refused."""
    model = build_model(TINY, seed=5)
    folder = tmp_path / "infinity_8b_weights"
    shards = write_shards(model, folder, parts=3)
    assert weight_files(str(folder)) == [str(folder / f) for f in sorted(shards)]
    for path in (folder, folder / "model.safetensors.index.json"):
        loaded = load_model(TINY, str(path))
        for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), k
    good_index = (folder / "model.safetensors.index.json").read_text()
    index = json.loads(good_index)
    moved = shards["model-00001-of-00003.safetensors"][0]
    index["weight_map"][moved] = "model-00002-of-00003.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"present but not listed \\(1\\):\n  {re.escape(moved)}"):
        load_model(TINY, str(folder))
    (folder / "model.safetensors.index.json").write_text(good_index)
    os.remove(folder / "model-00003-of-00003.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint not found: .*model-00003-of-00003.safetensors"):
        load_model(TINY, str(folder))


def test_official_trainer_checkpoint_layout(tmp_path):
    """Official trainer checkpoints keep the transformer at ['trainer']['gpt_fsdp'] (run_infinity.py's default key), the
    EMA copy beside it; one that pickles its argparse args is refused with what to do, not a bare unpickling error."""
    import argparse

    model, ema = build_model(TINY, seed=1), build_model(TINY, seed=2)
    official = {to_official_name(k, TINY): v for k, v in model.state_dict().items()}
    official_ema = {to_official_name(k, TINY): v for k, v in ema.state_dict().items()}
    path = str(tmp_path / "ar-ckpt-giter001K-ep0-iter1000-last.pth")
    torch.save({"arch": "infinity_tiny", "epoch": 0, "iter": 1000,
                "trainer": {"gpt_fsdp": official, "gpt_ema_fsdp": official_ema}}, path)
    assert torch.equal(load_model(TINY, path).head.weight, model.head.weight)
    torch.save({"args": argparse.Namespace(model="infinity_tiny"), "trainer": {"gpt_fsdp": official}}, path)
    with pytest.raises(CheckpointError, match="official trainer checkpoint keeps its args.*save_slim_model"):
        load_model(TINY, path)


def test_loaded_parameters_are_aligned_on_the_cpu(tmp_path):
    """safetensors maps tensors at whatever byte offset the file holds them and the loaders keep what they are given
    (assign=True), so parameter_tensor copies those off a 64-byte boundary (oneDNN rounds unaligned weights
    differently); the model's parameters are then aligned and equal to the saved ones."""
    from safetensors.torch import save_file

    from sparvar.checkpoint import parameter_tensor, read_state_dict

    sd = {f"w{i}": torch.randn(7 + i, 3) for i in range(10)}  # odd sizes: most records start off a 64-byte boundary
    save_file(sd, str(tmp_path / "w.safetensors"))
    read = read_state_dict(str(tmp_path / "w.safetensors"))
    assert any(t.data_ptr() % 64 for t in read.values())  # what the file gives
    kept = {k: parameter_tensor(v, "cpu") for k, v in read.items()}
    assert all(kept[k].data_ptr() % 64 == 0 and torch.equal(kept[k], v) for k, v in sd.items())
    model = build_model(TINY)
    path = str(tmp_path / "tiny.safetensors")
    save_official(model, path)
    loaded = load_model(TINY, path)
    assert all(p.data_ptr() % 64 == 0 for p in loaded.parameters())
    assert all(torch.equal(p, q) for p, q in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_non_finite_weights_are_named_not_loaded():
    """A NaN or Inf in a weight (a corrupt download) is named by key with its count: it built an engine that made
    black or noise images with nothing naming the cause."""
    sd = {k: torch.zeros(v) for k, v in official_key_shapes(TINY).items()}
    sd["head.weight"][0, :3] = float("nan")
    sd["cfg_uncond"][1, 0] = float("-inf")
    with pytest.raises(CheckpointError, match=r"not finite \(2\):\n  cfg_uncond: 1 of \d+ values are NaN or Inf\n  "
                                              r"head.weight: 3 of \d+ values are NaN or Inf"):
        check_state_dict(sd, TINY)
    sd["head.weight"].zero_(), sd["cfg_uncond"].zero_()
    check_state_dict(sd, TINY)  # finite again: accepted
    for dtype in (torch.bfloat16, torch.float8_e5m2):  # a bf16 export; float8 has no min/max kernel of its own
        sd["head.weight"] = torch.zeros(sd["head.weight"].shape, dtype=dtype)
        check_state_dict(sd, TINY)
        sd["head.weight"][2, 1] = float("inf")
        with pytest.raises(CheckpointError, match=r"not finite \(1\):\n  head.weight: 1 of \d+ values"):
            check_state_dict(sd, TINY)
