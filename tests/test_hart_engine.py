"""HART onnxruntime engines on hart-tiny: every exported unit against the torch modules, the whole engine driven
by the one generation loop against the eager runner, cache keys, and refused engines."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from sparvar.config import get_config
from sparvar.engine import EngineError, EngineSpec, build_engine, read_manifest
from sparvar.hart.diffusion import denoise_step, respaced_schedule
from sparvar.hart.generate import HartTorchRunner
from sparvar.hart.model import build_model
from sparvar.hart.sampling import HartSampling
from sparvar.hart.text import hashed_hart_embeddings, lengths_to_mask
from sparvar.hart.tokenizer import build_hart_vq
from sparvar.runtime import OrtUnit, load_engine_pipeline
from sparvar.schedule import get_schedule

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore")
CFG = get_config("hart-tiny")
SPEC = EngineSpec(model="hart-tiny", resolution=CFG.default_resolution)
SPARVAR = EngineSpec(model="hart-tiny", resolution=CFG.default_resolution, attention="sparvar")
QUIET = lambda *a, **k: None  # noqa: E731


@pytest.fixture(scope="module")
def engine(hart_engine):  # SPEC, built once per session (conftest)
    spec = read_manifest(hart_engine)["spec"]
    assert (spec["model"], spec["resolution"], spec["attention"], spec["seed"]) == (
        SPEC.model, SPEC.resolution, SPEC.attention, SPEC.seed)
    return hart_engine


@pytest.fixture(scope="module")
def sparvar_engine(hart_sparvar_engine):  # SPARVAR, built once per session (conftest)
    assert read_manifest(hart_sparvar_engine)["spec"]["attention"] == SPARVAR.attention
    return hart_sparvar_engine


@pytest.fixture(scope="module")
def eager():
    """The torch model and tokenizer the random-weight engine was built from (HartPipeline.create's weights)."""
    return build_model(CFG, seed=SPEC.seed), build_hart_vq(CFG.vq, seed=0), get_schedule(SPEC.resolution, model=SPEC.model)


def _runners(engine, eager):
    from sparvar.hart.runtime import load_hart_engine

    model, vq, schedule = eager
    runner, tokenizer = load_hart_engine(engine, read_manifest(engine), CFG)
    return runner, tokenizer, HartTorchRunner(model, schedule)


def _text(prompts=("a red car",)):
    return hashed_hart_embeddings(list(prompts), CFG)


def _unit(engine, name):
    return OrtUnit(engine, read_manifest(engine)["stages"]["optimize"]["info"]["units"][name])


# ----------------------------------------------------------------------------------------------- units
def test_step_graphs_match_torch_logits_kv_and_hidden(engine, eager):
    """Teacher forced with the same random scale inputs: per-scale logits, the K/V the graphs hand on (the whole
    cache at the end), the last hidden state through diffusion_condition."""
    runner, _, reference = _runners(engine, eager)
    model, _, schedule = eager
    # two prompts of different lengths would need batch 2; one short prompt still puts pads in the prefix
    features, mask = _text()
    assert not mask.all(), "the prompt must leave pad slots (they shift the image RoPE positions)"
    runner.begin(features, mask, True)
    reference.begin(features, mask, True)
    g = torch.Generator().manual_seed(0)
    inputs = None
    for scale in range(schedule.num_scales):
        a, b = runner.step(scale, inputs), reference.step(scale, inputs)
        assert a.shape == b.shape == (2, 1 if scale == 0 else schedule.lengths[scale], CFG.vocab_size)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"scale {scale} logits")
        if scale + 1 < schedule.num_scales:
            inputs = torch.randn(1, schedule.lengths[scale + 1], CFG.latent_dim, generator=g)
    total = schedule.total_tokens
    for i in range(CFG.depth):
        torch.testing.assert_close(torch.from_numpy(runner.values[f"past_k.{i}"]), reference.cache.k[i, :, :, :total],
                                   atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(runner.values[f"past_v.{i}"]), reference.cache.v[i, :, :, :total],
                                   atol=2e-5, rtol=1e-4)
    codes = torch.randn(1, schedule.lengths[-1], CFG.latent_dim, generator=g)
    torch.testing.assert_close(runner.diffusion_condition(codes), reference.diffusion_condition(codes),
                               atol=2e-5, rtol=1e-4)


def test_text_graph_outputs_prefix_cond_and_per_row_rope(engine, eager):
    """RoPE follows the text length: the image tables of two prompt lengths differ, and each equals the eager one."""
    from sparvar.hart.model import rope_tables

    model, _, schedule = eager
    text = _unit(engine, "text")
    features, _ = _text()
    tables = []
    for length in (3, 9):
        mask = lengths_to_mask(torch.tensor([length]), CFG.text_len)
        out = text({"text_features": features.numpy(), "text_mask": mask.numpy()})
        ref = model.encode_text(features, mask, cfg_guidance=True)
        torch.testing.assert_close(torch.from_numpy(out["prefix"]), ref.prefix, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(out["cond"]), ref.cond, atol=1e-5, rtol=1e-5)
        for s, table in enumerate(rope_tables(schedule, CFG.head_dim, ref.positions)):
            torch.testing.assert_close(torch.from_numpy(out[f"rope.{s}"]), table, atol=1e-5, rtol=0)
        tables.append(out["rope.3"])
    assert not np.allclose(tables[0], tables[1]), "the image RoPE must move with the text length"


@pytest.mark.parametrize("cfg_scale", [0.0, 2.75])
def test_one_denoise_graph_serves_every_step(engine, eager, cfg_scale):
    """The step index is an input: all 8 steps of one graph equal the eager step with baked-in coefficients."""
    model, _, schedule = eager
    runner, _, _ = _runners(engine, eager)
    sched = respaced_schedule(CFG.diffusion)
    assert sched.num_steps == 8
    N = schedule.lengths[-1]
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(2 * N, CFG.width, generator=g)
    x = torch.randn(N, CFG.latent_dim, generator=g)
    for k in reversed(range(sched.num_steps)):
        noise = torch.randn(N, CFG.latent_dim, generator=g) if k > 0 else None
        got = runner.denoise_step(x, k, cond, cfg_scale, noise)
        with torch.no_grad():
            want = denoise_step(model.diffloss.net, x, k, cond, cfg_scale, noise, sched)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"step {k}")
        x = want
    with pytest.raises(ValueError, match="needs noise"):
        runner.denoise_step(x, 3, cond, cfg_scale, None)
    with pytest.raises(ValueError, match="out of range"):
        runner.denoise_step(x, 8, cond, cfg_scale, x)


def test_tokenizer_graphs_match_the_vq_decoder(engine, eager):
    """next_input per scale (Phi after bicubic up, area down) and decode, against HartVQDecoder."""
    _, tokenizer, _ = _runners(engine, eager)
    _, vq, schedule = eager
    torch.testing.assert_close(tokenizer.quantize.embedding.weight, vq.quantize.embedding.weight, atol=0, rtol=0)
    patch_nums = CFG.patch_nums
    g = torch.Generator().manual_seed(2)
    f_ort = f_ref = torch.zeros(1, CFG.latent_dim, patch_nums[-1], patch_nums[-1])
    for si, pn in enumerate(patch_nums):
        h = torch.randn(1, CFG.latent_dim, pn, pn, generator=g)
        f_ort, nxt_ort = tokenizer.quantize.next_autoregressive_input(si, patch_nums, f_ort, h)
        f_ref, nxt_ref = vq.quantize.next_autoregressive_input(si, patch_nums, f_ref, h)
        torch.testing.assert_close(f_ort, f_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(nxt_ort, nxt_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokenizer.decode(f_ref), vq.decode(f_ref), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("attention, sampling", [
    ("dense", HartSampling(cfg=4.5)), ("dense", HartSampling(cfg=0.0)), ("dense", HartSampling(cfg=3.0, more_smooth=True)),
    ("sparvar", HartSampling(cfg=4.5)), ("sparvar", HartSampling(cfg=0.0))],
    ids=["dense-guided", "dense-unguided", "dense-smooth", "sparvar-guided", "sparvar-unguided"])
def test_engine_generation_equals_torch_path(engine, sparvar_engine, attention, sampling):
    """The same loop over the engine and over the eager model (same attention): bit-identical indices at every
    scale, the same diffusion residual and image (fp32)."""
    from sparvar.pipeline import Pipeline

    features, mask = _text()
    path = engine if attention == "dense" else sparvar_engine
    a = load_engine_pipeline(path, model="hart-tiny", attention=attention).generate(features, mask, sampling, seed=7)
    b = Pipeline.create("hart-tiny", resolution=SPEC.resolution, attention=attention).generate(features, mask, sampling,
                                                                                                seed=7)
    assert len(a.indices) == len(b.indices) == CFG.num_scales
    for k, (x, y) in enumerate(zip(a.indices, b.indices)):
        assert torch.equal(x, y), f"scale {k}: tokens differ"
    # the 8 denoising steps amplify float rounding (ORT vs torch matmuls) a little; a residual is O(1)
    torch.testing.assert_close(a.residual, b.residual, atol=2e-3, rtol=0)
    torch.testing.assert_close(a.image, b.image, atol=1e-3, rtol=0)


def test_engine_skip_last_equals_torch_path(engine):
    """SparVAR's scale skipping through the engine: the run scales' tokens and the decoded f_hat as eager."""
    from sparvar.pipeline import Pipeline

    features, mask = _text()
    a = load_engine_pipeline(engine, skip_last=2).generate(features, mask, HartSampling(), seed=3)
    b = Pipeline.create("hart-tiny", resolution=SPEC.resolution, skip_last=2).generate(features, mask, HartSampling(),
                                                                                        seed=3)
    assert len(a.indices) == CFG.num_scales - 2 and a.residual is None
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))
    torch.testing.assert_close(a.image, b.image, atol=1e-4, rtol=0)


def test_runner_refuses_misuse(engine, eager):
    runner, _, _ = _runners(engine, eager)
    features, mask = _text()
    with pytest.raises(EngineError, match="begin"):
        runner.step(0, None)
    with pytest.raises(EngineError, match=r"^the engine was built for 1 prompt\(s\) per generation, got 2"):  # not about text slots
        runner.begin(torch.cat([features, features]), torch.cat([mask, mask]), True)
    with pytest.raises(EngineError, match="pad or truncate the prompt"):
        runner.begin(features[:, :-1], mask[:, :-1], True)
    with pytest.raises(EngineError, match="text mask must be bool"):
        runner.begin(features, mask.long(), True)
    runner.begin(features, mask, True)
    with pytest.raises(EngineError, match="expected scale 0, got 1"):
        runner.step(1, torch.zeros(1, 4, CFG.latent_dim))
    runner.step(0, None)
    with pytest.raises(EngineError, match="last scale's hidden states"):
        runner.diffusion_condition(torch.zeros(1, CFG.patch_nums[-1] ** 2, CFG.latent_dim))


# ----------------------------------------------------------------------------------------------- engine dirs
def test_engine_layout_and_shared_weights(engine, eager):
    manifest = read_manifest(engine)
    units = manifest["stages"]["optimize"]["info"]["units"]
    S = CFG.num_scales
    assert set(units) == ({"text", "diffusion_condition", "denoise", "decode"} | {f"step_{k:02d}" for k in range(S)}
                          | {f"next_input_{k:02d}" for k in range(S)})
    assert "export/codebook.npy" in manifest["stages"]["export"]["files"]
    assert "hidden" in [o["name"] for o in units[f"step_{S - 1:02d}"]["outputs"]]
    assert "hidden" not in [o["name"] for o in units[f"step_{S - 2:02d}"]["outputs"]]
    assert all("text_len" not in o["shape"] for u in units.values() for o in u["inputs"] + u["outputs"]), "static shapes"
    # 8 step graphs + text + condition share one copy of the transformer's weights
    model, vq, _ = eager
    n_bytes = 4 * (sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in vq.parameters()))
    shared = manifest["stages"]["export"]["info"]["shared_weights"]
    assert shared["deduplicated"] > (S - 1) * CFG.depth * 5
    assert shared["bytes"] < 1.2 * n_bytes


def test_rebuild_skips_unchanged_stages_and_redoes_changed(engine, tmp_path, monkeypatch):
    path = str(tmp_path / "e")
    shutil.copytree(engine, path)
    before = read_manifest(path)
    logs = []
    again = build_engine(SPEC, path, log=logs.append)
    assert sum("skipped" in line for line in logs) == 3, logs
    assert {s: r["key"] for s, r in again["stages"].items()} == {s: r["key"] for s, r in before["stages"].items()}
    # new weights (another seed) redo the export: stop at the first stage that runs, old engine left intact
    import export.stages as stages

    ran = []

    def stop(stage, ctx):
        ran.append(stage)
        raise KeyboardInterrupt("stop")

    monkeypatch.setitem(stages.__dict__, "run_stage", stop)
    with pytest.raises(KeyboardInterrupt):
        build_engine(EngineSpec(model="hart-tiny", resolution=SPEC.resolution, seed=1), path, log=QUIET)
    assert ran == ["export"]
    assert read_manifest(path)["stages"] == again["stages"]


def test_foreign_stale_and_unsupported_engines_are_refused(engine, tmp_path):
    path = str(tmp_path / "copy")
    shutil.copytree(engine, path)
    with pytest.raises(EngineError, match="built for model='hart-tiny', not 'infinity-tiny'"):
        load_engine_pipeline(path, model="infinity-tiny")
    # a stale engine: built for another hart-tiny config than this sparvar's
    manifest = read_manifest(path)
    manifest["model_config"]["depth"] = CFG.depth + 1
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(EngineError, match="another hart-tiny config .*depth"):
        load_engine_pipeline(path)
    # a graph missing from the manifest's units: not an engine this runtime can drive
    manifest["model_config"]["depth"] = CFG.depth
    del manifest["stages"]["optimize"]["info"]["units"]["denoise"]
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(EngineError, match="no usable 'denoise' graph"):
        load_engine_pipeline(path)
    with pytest.raises(ValueError, match="onnxruntime, torch-cuda and tensorrt-rtx backends so far"):
        EngineSpec(model="hart-tiny", resolution=SPEC.resolution, backend="tensorrt", dtype="bf16")


def test_torch_cuda_engine_builds_without_graphs(tmp_path):
    """The GPU engine: no graphs, the SparVAR plan precomputed (CSLA layouts, CS4A geometries with HART's sinks, as
    the runtime loads them); without a GPU, loading it says it needs one."""
    from sparvar.engine import load_engine_plan

    path = str(tmp_path / "cuda")
    manifest = build_engine(EngineSpec(model="hart-tiny", resolution=SPEC.resolution, attention="sparvar",
                                       backend="torch-cuda", dtype="bf16"), path, log=QUIET)
    assert manifest["stages"]["export"]["info"]["units"] == {}
    assert "csla.7.kv_indices" in manifest["stages"]["build"]["info"]["torch_cuda"]["tensors"]
    plan = load_engine_plan(path, manifest, backend="reference")
    assert plan.sink_len > 0 and all(g.sink_len == plan.sink_len for g in plan.cs4a_geometries.values())
    if torch.cuda.is_available():  # loaded and run by test_hart_cuda.py::test_engine_decode_is_fp16_and_graphed (gpu)
        return
    with pytest.raises(EngineError, match="torch-cuda engine and needs a CUDA GPU"):
        load_engine_pipeline(path)


def test_sparvar_engine_carries_sparvar_nodes_and_cs4a_state(sparvar_engine):
    """SparVAR goes through Infinity's custom-op path: dense below the decision scale, CS4A/CSLA nodes from it on,
    the decision scale's selections and residual caches handed on as graph outputs / inputs."""
    from sparvar.sparse import default_policy

    manifest = read_manifest(sparvar_engine)
    policy = default_policy("hart-tiny", get_schedule(SPEC.resolution, model="hart-tiny"))
    S, D = CFG.num_scales, policy.decision_scale
    counts = manifest["stages"]["optimize"]["info"]["node_counts"]
    units = manifest["stages"]["optimize"]["info"]["units"]
    for scale in range(S):
        ops = counts[f"step_{scale:02d}"]["ops"]
        custom = {k for k in ops if k.startswith("sparvar::")}
        assert bool(custom) == (scale >= D), (scale, custom)
        names = lambda io: {s["name"] for s in units[f"step_{scale:02d}"][io]}  # noqa: E731
        state = {f"cs4a_selected.{i}" for i in range(policy.cs4a_layers)}
        if scale == D:
            assert any("Decide" in k for k in custom) and state <= names("outputs")
        elif scale > D:
            assert any(k.startswith("sparvar::CS4A") for k in custom) and state <= names("inputs")
        if scale >= D and policy.cs4a_layers < CFG.depth:
            assert "sparvar::CSLAAttention" in custom


def test_official_weights_feed_the_export_and_its_key(eager, tmp_path):
    """An engine from official-layout checkpoints (an llm/ folder, a tokenizer file): the export loads exactly
    those weights, and the export key follows every weight file's content."""
    from safetensors.torch import save_file

    from export.stages import StageContext, stage_key_inputs
    from export.hart_step import load_hart_model_and_vq
    from sparvar.hart.checkpoint import save_official

    model, vq, _ = eager
    other = build_model(CFG, seed=5)
    llm, tokenizer = tmp_path / "llm", str(tmp_path / "tokenizer.safetensors")
    llm.mkdir()
    save_official(other, str(llm / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, tokenizer)
    spec = EngineSpec(model="hart-tiny", resolution=SPEC.resolution, weights=str(llm), vae=tokenizer)
    loaded, loaded_vq = load_hart_model_and_vq(spec, CFG, torch.float32)
    for (name, a), b in zip(loaded.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(torch.equal(a, b) for a, b in zip(loaded_vq.state_dict().values(), vq.state_dict().values()))

    def export_key():
        return stage_key_inputs("export", StageContext(spec=spec, out_dir=str(tmp_path), versions={}))

    before = export_key()
    from sparvar.checkpoint import checkpoint_digest

    assert before["weights"] == [checkpoint_digest(str(llm / "model.safetensors"))]  # the folder's weight files' digests
    save_official(model, str(llm / "model.safetensors"))  # same folder, new content
    assert export_key()["weights"] != before["weights"] and export_key()["vae"] == before["vae"]


def test_serves_a_hart_engine(sparvar_engine, tmp_path, capsys):
    """`sparvar serve`'s service over a HART engine: the image `sparvar generate --engine` writes for the same prompt
    and seed; the options official HART sampling does not have are a RequestError (HTTP 400) naming them."""
    import io

    import numpy as np
    from PIL import Image

    from sparvar.cli import main
    from sparvar.serve import GenerationService, RequestError

    service = GenerationService(sparvar_engine)
    png, _ = service.generate({"prompt": "a cat", "seed": 4, "cfg": 3.0})
    out = str(tmp_path / "cli.png")
    assert main(["generate", "--engine", sparvar_engine, "--prompt", "a cat", "--seed", "4", "--cfg", "3", "--out", out]) == 0
    capsys.readouterr()
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(Image.open(out)))
    for field, message in (("tau", "samples without a temperature"), ("top_k", "uses the official top-k schedule")):
        with pytest.raises(RequestError, match=f"^{field}: hart-tiny {message}"):  # the request's name, not a CLI flag
            service.generate({"prompt": "a cat", field: 1})
    assert service.info()["model"] == "hart-tiny" and service.served == 1
