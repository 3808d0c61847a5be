import os

import pytest
import torch

from sparvar.checkpoint import CheckpointError
from sparvar.config import get_config
from sparvar.schedule import get_schedule
from sparvar.hart.checkpoint import (check_state_dict, load_checkpoint, load_model, official_buffers, official_key_shapes,
                                     save_official)
from sparvar.hart.model import build_model, rope_tables

TINY = get_config("hart-tiny")
BIG = get_config("hart-0.7b")

# Independent of our module tree: the official names (hart_transformer_t2i.py, basic_hart.py, diffloss.py) for
# attn_type = mlp_type = "llama", disable_aln = True, attn_l2_norm = False.
TOP_KEYS = {"word_embed.weight", "word_embed.bias", "context_embed.weight", "context_embed.bias", "lvl_embed.weight",
            "head_nm.ln_wo_grad.weight", "head_nm.ada_lin.1.weight", "head_nm.ada_lin.1.bias", "head.weight",
            "head.bias", "decoder_norm.weight"}
BLOCK_KEYS = {"attn.qkv_proj.weight", "attn.q_bias", "attn.v_bias", "attn.zero_k_bias", "attn.proj.weight",
              "attn.proj.bias", "ffn.gate_proj.weight", "ffn.up_proj.weight", "ffn.down_proj.weight", "ln_wo_grad.weight"}
DIFF_TOP = {"time_embed.mlp.0.weight", "time_embed.mlp.0.bias", "time_embed.mlp.2.weight", "time_embed.mlp.2.bias",
            "cond_embed.weight", "cond_embed.bias", "input_proj.weight", "input_proj.bias", "final_layer.linear.weight",
            "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}
DIFF_BLOCK = {"in_ln.weight", "in_ln.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
              "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"}


def expected_keys(cfg):
    keys = set(TOP_KEYS) | {f"diffloss.net.{k}" for k in DIFF_TOP}
    keys |= {f"blocks.{b}.{k}" for b in range(cfg.depth) for k in BLOCK_KEYS}
    keys |= {f"diffloss.net.res_blocks.{b}.{k}" for b in range(cfg.diffusion.depth) for k in DIFF_BLOCK}
    return keys


def param_count(cfg):
    """Parameters by formula from the config (zero_k_bias is a buffer, not a parameter)."""
    C, F, V, Z, T = cfg.width, cfg.mlp_dim, cfg.vocab_size, cfg.latent_dim, cfg.text_dim
    block = 3 * C * C + 2 * C + C * C + C + 3 * C * F + C
    top = Z * C + C + T * C + C + cfg.num_scales * C + C + 2 * C * C + 2 * C + C * V + V + C
    W = cfg.diffusion.width
    diff_block = 2 * W + 2 * (W * W + W) + 3 * W * W + 3 * W
    diff = (256 * W + W + W * W + W) + (C * W + W) + (Z * W + W) + cfg.diffusion.depth * diff_block \
        + (W * 2 * Z + 2 * Z) + (W * 2 * W + 2 * W)
    return cfg.depth * block + top + diff, diff


def test_hart_07b_official_keys_and_parameter_count():
    shapes = official_key_shapes(BIG)  # meta device
    assert set(shapes) == expected_keys(BIG) and len(shapes) == 311
    assert shapes["blocks.23.attn.qkv_proj.weight"] == (4608, 1536)
    assert shapes["blocks.0.ffn.gate_proj.weight"] == (4096, 1536) and shapes["head.weight"] == (4096, 1536)
    assert shapes["context_embed.weight"] == (1536, 1536) and shapes["word_embed.weight"] == (1536, 32)
    assert shapes["lvl_embed.weight"] == (14, 1536) and shapes["diffloss.net.cond_embed.weight"] == (1024, 1536)
    model = build_model(BIG, init="meta")
    total = sum(p.numel() for p in model.parameters())
    diff = sum(p.numel() for p in model.diffloss.parameters())
    assert (total, diff) == param_count(BIG)
    # HART.md: about 0.73B including the ~37M diffusion MLP
    assert total == 729_663_552 and 36e6 < diff < 38e6


def tiny_logits(model, seed=0):
    schedule = get_schedule(256, model="hart-tiny")
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, TINY.text_len, TINY.text_dim, generator=g)
    with torch.no_grad():
        text = model.encode_text(features, torch.tensor([6, 16]))
        ropes = rope_tables(schedule, TINY.head_dim, text.positions)
        cache = model.new_cache(text.batch, schedule)
        out = []
        for scale in range(4):
            cache.offset = schedule.offsets[scale]
            codes = None if scale == 0 else torch.randn(2, schedule.lengths[scale], TINY.latent_dim, generator=g)
            out.append(model.step(model.scale_input(scale, codes, text), scale, text, cache, ropes[scale]))
    return out


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_roundtrip_gives_identical_logits(tmp_path, suffix):
    model = build_model(TINY, seed=3)
    path = str(tmp_path / f"llm{suffix}")
    save_official(model, path)  # with the official lvl_1L / attn_bias_for_masking buffers
    loaded = load_model(TINY, path)
    other = build_model(TINY, seed=4)
    load_checkpoint(other, path)
    for got in (loaded, other):
        for a, b in zip(tiny_logits(model), tiny_logits(got)):
            assert torch.equal(a, b)
    assert not hasattr(loaded, "attn_bias_for_masking") and "lvl_1L" not in loaded.state_dict()


def test_folder_layout_and_ema(tmp_path):
    folder = tmp_path / "llm"
    folder.mkdir()
    save_official(build_model(TINY, seed=1), str(folder / "model.safetensors"), with_buffers=False)
    save_official(build_model(TINY, seed=2), str(folder / "ema_model.bin"))
    plain, ema = load_model(TINY, str(folder), ema=False), load_model(TINY, str(folder), ema=True)
    assert torch.equal(plain.head.weight, build_model(TINY, seed=1).head.weight)
    assert torch.equal(ema.head.weight, build_model(TINY, seed=2).head.weight)
    # by default the EMA weights when the folder has them (official sample.py: use_ema=True), else the others
    assert torch.equal(load_model(TINY, str(folder)).head.weight, ema.head.weight)
    os.rename(folder / "ema_model.bin", tmp_path / "ema_model.bin")
    assert torch.equal(load_model(TINY, str(folder)).head.weight, plain.head.weight)
    os.rename(tmp_path / "ema_model.bin", folder / "ema_model.bin")
    os.remove(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="a folder without weights"):
        load_model(TINY, str(folder), ema=False)
    for index in ('{"metadata": {}}', "{not json", '{"weight_map": ["a"]}'):  # a shard index that is not one
        (folder / "model.safetensors.index.json").write_text(index)
        with pytest.raises(CheckpointError, match="model.safetensors.index.json is not a shard index"):
            load_model(TINY, str(folder), ema=False)


def test_strict_errors_name_missing_extra_and_misshaped_keys():
    sd = {k: torch.zeros(v) for k, v in official_key_shapes(TINY).items()}
    sd.update(official_buffers(TINY))
    check_state_dict(sd, TINY)  # complete: accepted, buffers included (lvl_1L holds integers)
    assert not sd["lvl_1L"].dtype.is_floating_point
    del sd["blocks.1.ffn.up_proj.weight"]
    sd["blocks.0.attn.scale_mul_1H11"] = torch.zeros(1, TINY.heads, 1, 1)  # a cosine-attention checkpoint's key
    sd["head.weight"] = torch.zeros(TINY.vocab_size + 1, TINY.width)
    sd["attn_bias_for_masking"] = torch.zeros(1, 1, 10, 10)
    with pytest.raises(CheckpointError) as e:
        check_state_dict(sd, TINY)
    msg = str(e.value)
    assert "hart-tiny" in msg
    assert "missing (1)" in msg and "blocks.1.ffn.up_proj.weight" in msg
    assert "unexpected (1)" in msg and "blocks.0.attn.scale_mul_1H11" in msg
    assert "wrong shape (2)" in msg and f"head.weight: checkpoint (65, {TINY.width}) != expected (64, {TINY.width})" in msg
    assert "attn_bias_for_masking: checkpoint (1, 1, 10, 10) != expected (1, 1, 545, 545)" in msg


def test_checkpoint_of_another_size_is_refused(tmp_path):
    path = str(tmp_path / "tiny.safetensors")
    save_official(build_model(TINY, seed=0), path, with_buffers=False)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_model(get_config("hart-0.7b"), path, dtype=torch.bfloat16)
