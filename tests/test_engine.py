"""The onnxruntime engine end to end on infinity-tiny: build stages, cache keys, bad engines, parity with torch."""
import json
import os
import shutil
import time

import pytest
import torch

from sparvar.cli import main
from sparvar.config import get_config
from sparvar.engine import EngineError, EngineSpec, build_engine, read_manifest, verify_files
from sparvar.generate import Sampling
from sparvar.pipeline import Pipeline, build_decoder
from sparvar.runtime import load_engine_pipeline
from sparvar.text import hashed_embeddings

CFG_TINY = get_config("infinity-tiny")

pytestmark = pytest.mark.filterwarnings("ignore")
QUIET = lambda *a, **k: None  # noqa: E731
# `engines` (conftest.py): infinity-tiny onnxruntime engines, dense and sparvar, built once per test session


def _features():
    return hashed_embeddings(["a red car"], 64, 32)


@pytest.mark.parametrize("attention", ["dense", "sparvar"])
def test_engine_generation_equals_torch_path(engines, attention):
    """Same seed -> bit-identical tokens at every scale, and the same image (fp32)."""
    features, lengths = _features()
    sampling = Sampling(cfg=3.0)
    engine = load_engine_pipeline(engines[attention])
    torch_pipe = Pipeline.create("infinity-tiny", resolution=256, attention=attention)
    a = engine.generate(features, lengths, sampling, seed=7)
    b = torch_pipe.generate(features, lengths, sampling, seed=7)
    for k, (x, y) in enumerate(zip(a.bits, b.bits)):
        assert torch.equal(x, y), f"scale {k}: tokens differ"
    torch.testing.assert_close(a.image, b.image, atol=1e-4, rtol=0)


def teacher_forced_logits(runner, reference, schedule):
    """Two infinity-tiny runners begun on the same prompt, then stepped scale by scale on the same random codes (not
    their own samples): yields (scale, runner's logits, reference's logits)."""
    features, lengths = _features()
    runner.begin(features, lengths, True)
    reference.begin(features, lengths, True)
    g = torch.Generator().manual_seed(0)
    codes = None
    for k in range(schedule.num_scales):
        yield k, runner.step(k, codes), reference.step(k, codes)
        if k + 1 < schedule.num_scales:
            codes = torch.randn(1, schedule.lengths[k + 1], CFG_TINY.bits, generator=g) * 0.25


def test_engine_step_logits_match_torch(engines):
    """Per-scale onnxruntime vs torch logits, teacher forced with the same codes."""
    from sparvar.generate import TorchRunner
    from sparvar.model import build_model
    from sparvar.pipeline import make_plan
    from sparvar.runtime import OrtRunner
    from sparvar.schedule import get_schedule

    schedule = get_schedule(256)
    model = build_model(CFG_TINY)
    torch_runner = TorchRunner(model, schedule, make_plan(model.cfg, schedule, "sparvar"))
    ort_runner = OrtRunner(engines["sparvar"], read_manifest(engines["sparvar"]))
    worst = 0.0
    for _, a, b in teacher_forced_logits(ort_runner, torch_runner, schedule):
        worst = max(worst, (a - b).abs().nan_to_num(nan=float("inf")).max().item())  # NaN: inf, not lost
    assert worst < 1e-4, worst


def test_unchanged_stages_are_skipped_and_changed_rebuilt(engines, tmp_path):
    path = str(tmp_path / "e")
    logs = []
    spec = EngineSpec(model="infinity-tiny", resolution=256, attention="dense")  # the `engines` fixture's dense one
    shutil.copytree(engines["dense"], path)  # a fresh build of it (the fixture's, ~35 s of CI), copied
    m1 = read_manifest(path)
    m2 = build_engine(spec, path, log=logs.append)
    assert sum("skipped" in line for line in logs) == 3
    assert all(m1["stages"][s]["key"] == m2["stages"][s]["key"] for s in m1["stages"])
    assert m1["stages"]["export"]["files"] == m2["stages"]["export"]["files"]
    logs.clear()
    other_seed = EngineSpec(model="infinity-tiny", resolution=256, seed=1)
    m3 = build_engine(other_seed, path, log=logs.append)
    assert not any("skipped" in line for line in logs), "new weights must redo every stage"
    assert m3["stages"]["export"]["key"] != m2["stages"]["export"]["key"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")], "no temporary directory left behind"


def test_what_loading_can_refuse_cheaply_it_refuses_before_hashing_the_files(engines, monkeypatch):
    """Hashing every file takes minutes at 8B: an option or spec the engine cannot run is refused before it."""
    import sparvar.runtime as runtime

    def hashing(*args):
        raise AssertionError("hashed the engine's files before a check that needs none")

    monkeypatch.setattr(runtime, "verify_files", hashing)
    with pytest.raises(ValueError, match="skip_last must be in"):
        load_engine_pipeline(engines["dense"], skip_last=99)
    with pytest.raises(EngineError, match="built for model='infinity-tiny'"):
        load_engine_pipeline(engines["dense"], model="infinity-2b")
    with pytest.raises(AssertionError, match="hashed"):  # a runnable request does hash them
        load_engine_pipeline(engines["dense"])


def test_a_spec_records_what_a_later_request_will_name(engines):
    """No --resolution means the model's own, recorded as that number (it was None, and a later --resolution 256
    for the same engine was refused); an aspect is compared as the template it names, not as typed."""
    from sparvar.engine import check_compatible

    assert EngineSpec(model="infinity-tiny", resolution=None).resolution == 256
    assert EngineSpec(model="hart-tiny", resolution=None).default_dir().startswith("engines/hart-tiny-256-")
    manifest = read_manifest(engines["dense"])  # built 1:1 at 256
    check_compatible(manifest, "e", resolution=256, aspect="1.0")
    manifest["spec"]["aspect"] = "16:9"
    check_compatible(manifest, "e", aspect="7:4")  # both snap to h/w 1.75
    with pytest.raises(EngineError, match="built for aspect='16:9', not '1:1'"):
        check_compatible(manifest, "e", aspect="1:1")


def test_corrupt_missing_foreign_and_newer_engines_are_refused(engines, tmp_path):
    path = str(tmp_path / "copy")
    shutil.copytree(engines["dense"], path)
    # wrong model / resolution / attention
    with pytest.raises(EngineError, match="built for model='infinity-tiny', not 'infinity-2b'"):
        load_engine_pipeline(path, model="infinity-2b")
    with pytest.raises(EngineError, match="attention='dense', not 'sparvar'"):
        load_engine_pipeline(path, attention="sparvar")
    # a corrupt graph
    manifest = read_manifest(path)
    rel = next(iter(manifest["stages"]["optimize"]["files"]))
    with open(os.path.join(path, rel), "ab") as f:
        f.write(b"x")
    with pytest.raises(EngineError, match="corrupt"):
        verify_files(path, manifest)
    # a missing file
    os.remove(os.path.join(path, rel))
    with pytest.raises(EngineError, match="missing"):
        load_engine_pipeline(path)
    # a manifest from a newer sparvar
    manifest["format_version"] = 99
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(EngineError, match="newer sparvar"):
        read_manifest(path)
    # not an engine at all
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EngineError, match="not a sparvar engine"):
        read_manifest(str(empty))


@pytest.mark.parametrize("content,message", [
    (b"[1, 2]", "not a sparvar engine manifest \\(a JSON list\\)"),
    (b'{"format_version": FMT}', "is incomplete"),
    (b'{"format_version": FMT, "spec": {}, "stages": {"export": {"files": {}}}}', "is incomplete"),
    (b'{"format_version": true, "spec": {}, "stages": {}}', "has no format_version"),
    (b"\xff\xfe\x00binary", "is corrupt"),
])
def test_malformed_manifests_are_refused_by_name(tmp_path, content, message):
    """A manifest that parses but is not one, or is not text, is an EngineError naming the file, not a traceback."""
    from sparvar.engine import FORMAT_VERSION

    path = tmp_path / "e"
    path.mkdir()
    (path / "manifest.json").write_bytes(content.replace(b"FMT", str(FORMAT_VERSION).encode()))
    with pytest.raises(EngineError, match=message) as e:
        read_manifest(str(path))
    assert "manifest.json" in str(e.value)


@pytest.mark.parametrize("drop", [("spec", "model"), ("spec", "batch"), ("schedule",), ("model_config",), ("created",),
                                  ("versions",), ("stages", "build", "seconds"), ("stages", "optimize", "info")])
def test_a_manifest_missing_what_loading_reads_is_refused_by_name(engines, tmp_path, drop):
    """Fields the runners read (the spec's, the schedule, the model config): missing, an EngineError naming them
    before anything loads, not a KeyError deep in a runner."""
    path = str(tmp_path / "e")
    shutil.copytree(engines["sparvar"], path)
    manifest = read_manifest(path)
    parent = manifest
    for key in drop[:-1]:
        parent = parent[key]
    del parent[drop[-1]]
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(EngineError, match=f"incomplete or foreign \\(no {'.'.join(drop)}\\); rebuild"):
        load_engine_pipeline(path)
    assert main(["engine", "info", path]) == 1  # `engine info` too: an error naming them, not a KeyError


def test_a_manifest_without_its_graph_units_is_refused_by_name(engines, tmp_path):
    """What one backend's stage records (onnxruntime's graph units): missing, an EngineError, not a KeyError."""
    path = str(tmp_path / "e")
    shutil.copytree(engines["dense"], path)
    manifest = read_manifest(path)
    del manifest["stages"]["optimize"]["info"]["units"]
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(EngineError, match="records no optimize units: incomplete or foreign"):
        load_engine_pipeline(path)


def test_a_rebuild_never_deletes_files_the_engine_did_not_write(engines, tmp_path, monkeypatch):
    """The build swaps the whole directory: an image generated into it or a folder of notes is refused by name, kept,
    and no stage runs (the rebuild would have skipped every stage and deleted them)."""
    import export.stages as stages

    path = tmp_path / "e"
    shutil.copytree(engines["dense"], path)
    (path / "cat.png").write_bytes(b"mine")
    (path / "notes").mkdir()
    (path / "notes" / "todo.txt").write_text("precious")
    monkeypatch.setitem(stages.__dict__, "run_stage", lambda stage, ctx: pytest.fail("no stage may run"))
    spec = EngineSpec(model="infinity-tiny", resolution=256, attention="dense")
    for force in (False, True):
        with pytest.raises(EngineError, match=r"holds files the engine did not write \(cat.png, notes/todo.txt\)"):
            build_engine(spec, str(path), force=force, log=QUIET)
    assert (path / "cat.png").read_bytes() == b"mine" and (path / "notes" / "todo.txt").read_text() == "precious"
    verify_files(str(path), read_manifest(str(path)))
    # a manifest that cannot be read names no files: what lies outside the stages' folders is kept all the same
    (path / "manifest.json").write_text("{")
    with pytest.raises(EngineError, match=r"holds files the engine did not write \(cat.png, notes/todo.txt\)"):
        build_engine(spec, str(path), log=QUIET)
    assert (path / "cat.png").read_bytes() == b"mine"


MANIFEST_CHANGES = {
    "export_code": lambda m: m.update(export_code=-1),
    "depth": lambda m: m["model_config"].update(depth=m["model_config"]["depth"] + 1),
    "schedule": lambda m: m["schedule"].__setitem__(-1, [1, 1]),
    "model": lambda m: m["spec"].update(model="infinity-foo"),
    # a graph missing from the manifest: a KeyError when the runner was made
    "no step graph": lambda m: m["stages"]["optimize"]["info"]["units"].pop("step_01"),
    # values of the wrong kind, or ones no build accepts: a TypeError in `engine info` or `serve`, or a batch "1"
    # that no request matched
    "batch as text": lambda m: m["spec"].update(batch="1"),
    "unknown attention": lambda m: m["spec"].update(attention="foo"),
    "seed as text": lambda m: m["spec"].update(seed="x"),
    "flat schedule": lambda m: m.update(schedule=[1, 2, 3]),
}


@pytest.mark.parametrize("change", sorted(MANIFEST_CHANGES))
def test_verify_refuses_what_loading_refuses(engines, tmp_path, capsys, change):
    """`engine verify` says what loading would: an engine of another exporter, architecture, schedule or an unknown
    model, a manifest without a graph the generation runs or with values no build writes, fails it (it had checked
    only the files, and passed engines `generate` then refused or crashed on); `engine info` names the problem too."""
    path = str(tmp_path / "e")
    shutil.copytree(engines["dense"], path)
    manifest = read_manifest(path)
    MANIFEST_CHANGES[change](manifest)
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    assert main(["engine", "verify", path]) == 1
    with pytest.raises(EngineError, match="rebuild"):
        load_engine_pipeline(path)
    capsys.readouterr()
    assert main(["engine", "info", path]) in (0, 1)  # info describes what it can read; never a traceback
    if change in ("batch as text", "seed as text", "flat schedule"):
        assert "rebuild the engine" in capsys.readouterr().err


def test_engine_commands_name_a_file_given_as_the_engine(tmp_path, capsys):
    path = tmp_path / "engine.onnx"
    path.write_bytes(b"")
    assert main(["engine", "info", str(path)]) == 1
    assert "is a file, not an engine directory" in capsys.readouterr().err


def test_build_never_replaces_a_directory_that_is_not_an_engine(tmp_path, monkeypatch):
    """The build swaps the whole engine directory in: a folder holding anything but an engine is refused before any
    work, and so is a file; `.` is resolved first (renaming '.' itself fails only after the whole build)."""
    import export.stages as stages

    monkeypatch.setitem(stages.__dict__, "run_stage", lambda stage, ctx: pytest.fail("no stage may run"))
    spec = EngineSpec(model="infinity-tiny", resolution=256, attention="dense")
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.txt").write_text("precious")
    with pytest.raises(EngineError, match="not empty and is not an engine directory"):
        build_engine(spec, str(mine), log=QUIET)
    assert (mine / "chapter1.txt").read_text() == "precious"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(EngineError, match="exists and is not a directory"):
        build_engine(spec, str(tmp_path / "afile"), log=QUIET)
    monkeypatch.chdir(mine)
    with pytest.raises(EngineError, match="not empty and is not an engine directory"):
        build_engine(spec, ".", log=QUIET)


def test_a_torch_cuda_build_never_reuses_another_backends_export(engines, tmp_path):
    """torch-cuda exports no graphs: switching an engine directory between it and onnxruntime must redo the export
    (reusing it left an onnxruntime engine with no graphs that still verified)."""
    path = str(tmp_path / "e")
    shutil.copytree(engines["dense"], path)
    logs = []
    # dense: a torch-cuda SparVAR engine takes no fp32, and the spec must be alike in all else
    spec = EngineSpec(model="infinity-tiny", resolution=256, attention="dense", backend="torch-cuda")
    manifest = build_engine(spec, path, log=logs.append)
    assert not any("skipped" in line for line in logs), logs
    assert manifest["stages"]["export"]["info"]["units"] == {}
    assert manifest["stages"]["export"]["key"] != read_manifest(engines["dense"])["stages"]["export"]["key"]


def test_interrupted_build_leaves_old_engine_intact(engines, tmp_path, monkeypatch):
    path = str(tmp_path / "e")
    shutil.copytree(engines["dense"], path)
    before = read_manifest(path)
    import export.stages as stages

    def boom(ctx):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(stages, "run_build", boom)
    monkeypatch.setitem(stages.__dict__, "run_stage", lambda stage, ctx: boom(ctx))
    with pytest.raises(KeyboardInterrupt):
        build_engine(EngineSpec(model="infinity-tiny", resolution=256, seed=5), path, log=QUIET)
    assert read_manifest(path) == before
    verify_files(path, before)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_weights_are_stored_once(engines):
    manifest = read_manifest(engines["dense"])
    shared = manifest["stages"]["export"]["info"]["shared_weights"]
    from sparvar.model import build_model

    n_bytes = 4 * sum(p.numel() for p in build_model(CFG_TINY).parameters())  # fp32 transformer
    n_bytes += 4 * sum(p.numel() for p in build_decoder(CFG_TINY, None, "cpu", torch.float32).module.parameters())
    # 7 step graphs + text + decode all reference one file of about one copy of the weights (+ RoPE tables); without
    # the sharing it would be several copies (~45 MB against ~12.5 MB)
    assert shared["deduplicated"] > 6 * 30
    assert shared["bytes"] < 1.2 * n_bytes


def test_graphs_carry_sparvar_nodes_with_reference_bodies(engines):
    import onnx

    manifest = read_manifest(engines["sparvar"])
    counts = manifest["stages"]["optimize"]["info"]["node_counts"]
    last = counts["step_06"]["ops"]
    assert any(k.startswith("sparvar::CSLA") for k in last), last
    assert any(k.startswith("sparvar::CS4A") for k in last), last
    decide = counts["step_04"]["ops"]
    assert any("Decide" in k for k in decide), decide
    graph = onnx.load(os.path.join(engines["sparvar"], "optimize", "step_06.onnx"), load_external_data=False)
    assert {f.name for f in graph.functions} >= {"CSLAAttention", "CS4AAttentionCached"}
    assert not any(k.startswith("sparvar::") for k in counts["step_03"]["ops"]), "scales before the decision stay dense"


def test_torch_cuda_engine_builds_without_graphs_and_needs_a_gpu_to_run(tmp_path):
    path = str(tmp_path / "cuda")
    manifest = build_engine(EngineSpec(model="infinity-tiny", resolution=256, attention="sparvar", backend="torch-cuda",
                                       dtype="bf16"), path, log=QUIET)
    assert manifest["stages"]["export"]["info"]["units"] == {}
    stored = manifest["stages"]["build"]["info"]["torch_cuda"]["tensors"]
    assert "csla.6.kv_indices" in stored and "cs4a.6.selected_group" in stored  # every sparse scale's layout, geometry
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="torch-cuda engine and needs a CUDA GPU"):
            load_engine_pipeline(path)


def test_verify_reads_a_torch_cuda_plan_without_triton_and_loading_names_it(tmp_path, monkeypatch):
    """`engine verify` checks a torch-cuda engine's stored plan with no GPU, so with no triton either (it had asked
    for the Triton ops and died in a RuntimeError traceback); loading for the kernels names what is missing."""
    from sparvar import kernels
    from sparvar.engine import load_engine_plan
    from sparvar.runtime import verify_engine

    path = str(tmp_path / "cuda")
    manifest = build_engine(EngineSpec(model="infinity-tiny", resolution=256, attention="sparvar", backend="torch-cuda",
                                       dtype="bf16"), path, log=QUIET)
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    verify_engine(path)
    with pytest.raises(EngineError, match="needs the triton package"):
        load_engine_plan(path, manifest)


def test_an_engine_generate_cannot_run_is_refused_before_its_files_are_hashed(engines, tmp_path, monkeypatch):
    from sparvar import runtime

    path = str(tmp_path / "trt")
    shutil.copytree(engines["dense"], path)
    manifest = read_manifest(path)
    manifest["spec"]["backend"] = "tensorrt"
    with open(os.path.join(path, "manifest.json"), "w") as fh:
        json.dump(manifest, fh)
    hashed = []
    monkeypatch.setattr(runtime, "verify_files", lambda *a: hashed.append(a))
    if torch.cuda.is_available():  # then what is missing here is TensorRT
        import importlib.util

        if importlib.util.find_spec("tensorrt") is not None:
            pytest.skip("this machine has a GPU and TensorRT: it would run the engine")
        problem = r"is a tensorrt engine, and TensorRT not installed \(`import tensorrt` failed\)"
    else:
        problem = "is a tensorrt engine: its plans run on a CUDA GPU, and this machine has none"
    with pytest.raises(EngineError, match=problem):
        load_engine_pipeline(path)
    assert hashed == []


def test_torch_cuda_engine_runs_the_plan_its_build_stored(tmp_path):
    """The runtime's plan is the stored one, equal to the policy's; a plan file that does not fit is refused."""
    from sparvar.engine import load_engine_plan

    path = str(tmp_path / "cuda")
    manifest = build_engine(EngineSpec(model="infinity-tiny", resolution=256, attention="sparvar", backend="torch-cuda",
                                       dtype="bf16"), path, log=QUIET)
    stored = load_engine_plan(path, manifest, backend="reference")
    fresh = Pipeline.create("infinity-tiny", resolution=256, attention="sparvar").runner.plan
    assert stored.describe() == fresh.describe()
    skipping = load_engine_plan(path, manifest, backend="reference", skip_last=2)  # generate/serve --skip-last 2
    assert stored.decides and not skipping.decides and skipping.skip_last == 2
    assert not Pipeline.create("infinity-tiny", resolution=256, attention="sparvar", skip_last=2).runner.plan.decides
    for s, layout in fresh.csla_layouts.items():
        assert torch.equal(stored.csla_layouts[s].kv_indices, layout.kv_indices)
        assert torch.equal(stored.csla_layouts[s].kv_num_blocks, layout.kv_num_blocks)
    for s, geometry in fresh.cs4a_geometries.items():
        selection = torch.randint(0, 40, (2, 2, geometry.num_decision_groups, geometry.topk), dtype=torch.int32)
        assert torch.equal(stored.cs4a_geometries[s].key_indices(selection), geometry.key_indices(selection))
    # and the plan the runtime holds decides like the fresh one (reference ops, the same q/k/v)
    scale = fresh.policy.sparse_scales[-1]
    n, kv = fresh.schedule.lengths[scale], fresh.schedule.kv_len(scale)
    q, k = torch.randn(2, 2, n, 32), torch.randn(2, 2, kv, 32)
    layer = fresh.num_layers - 1  # a CSLA layer
    torch.testing.assert_close(stored.attend(q, k, k, layer=layer, scale=scale), fresh.attend(q, k, k, layer=layer, scale=scale),
                               atol=0, rtol=0)

    dense = build_engine(EngineSpec(model="infinity-tiny", resolution=256, attention="dense", backend="torch-cuda",
                                    dtype="bf16"), str(tmp_path / "dense"), log=QUIET)
    assert load_engine_plan(str(tmp_path / "dense"), dense) is None
    old = json.loads(json.dumps(manifest))
    del old["stages"]["build"]["info"]["torch_cuda"]["sparse_plan"]
    with pytest.raises(EngineError, match="no stored SparVAR plan.*rebuild"):
        load_engine_plan(path, old)
    other = json.loads(json.dumps(manifest))
    other["spec"]["resolution"] = 512  # a plan for another schedule
    with pytest.raises(EngineError, match="does not fit this sparvar.*rebuild"):
        load_engine_plan(path, other)


def flip_last_byte(path: str) -> None:
    """Change a file's content in place, keeping its size (a flipped bit of its last tensor)."""
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 1
    with open(path, "wb") as f:
        f.write(data)


def test_torch_cuda_engine_refuses_checkpoints_changed_since_its_build(tmp_path, monkeypatch):
    """A torch-cuda engine reads its weights from the spec's checkpoints at load: it records them at build (absolute
    paths, digests) and refuses changed or missing ones; a touched file with the same bytes is still accepted."""
    from sparvar.engine import check_checkpoints

    root = os.path.join(os.path.dirname(__file__), "..", "weights")
    for name in ("infinity-cifar.safetensors", "infinity-cifar-tokenizer.safetensors"):
        shutil.copy(os.path.join(root, name), tmp_path / name)
    monkeypatch.chdir(tmp_path)  # relative paths, as typed on a command line
    path = str(tmp_path / "cuda")
    spec = EngineSpec(model="infinity-cifar", resolution=64, backend="torch-cuda", dtype="bf16",
                      weights="infinity-cifar.safetensors", vae="infinity-cifar-tokenizer.safetensors")
    manifest = build_engine(spec, path, log=QUIET)
    weights = str(tmp_path / "infinity-cifar.safetensors")
    assert manifest["spec"]["weights"] == weights  # loads the same file from any working directory
    check_checkpoints(path, manifest)
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # copied or touched: the digest decides
    check_checkpoints(path, manifest)
    flip_last_byte(weights)
    with pytest.raises(EngineError, match="infinity-cifar.safetensors changed since the engine was built; rebuild"):
        check_checkpoints(path, manifest)
    flip_last_byte(weights)  # the same bytes again
    check_checkpoints(path, manifest)
    os.remove(tmp_path / "infinity-cifar-tokenizer.safetensors")
    with pytest.raises(EngineError, match="tokenizer.safetensors is missing"):
        check_checkpoints(path, manifest)
    del manifest["stages"]["build"]["info"]["checkpoints"]
    with pytest.raises(EngineError, match="does not record the checkpoints"):
        check_checkpoints(path, manifest)


def test_a_sharded_checkpoint_is_recorded_and_keyed_shard_by_shard(tmp_path):
    """Infinity-8B's official weights are a folder of shards: the build keys its export on every shard's content and
    the torch-cuda engine records each shard, so a changed shard is refused at load and rebuilds the export."""
    from safetensors.torch import load_file

    from sparvar.checkpoint import from_official_name
    from sparvar.config import get_config
    from sparvar.engine import check_checkpoints
    from sparvar.model import build_model
    from test_checkpoint import write_shards

    root = os.path.join(os.path.dirname(__file__), "..", "weights")
    cfg = get_config("infinity-cifar")
    model = build_model(cfg)
    model.load_state_dict({from_official_name(k, cfg): v for k, v in
                           load_file(os.path.join(root, "infinity-cifar.safetensors")).items()})
    shards = write_shards(model, tmp_path / "weights", parts=2)
    spec = EngineSpec(model="infinity-cifar", resolution=64, backend="torch-cuda", dtype="bf16",
                      weights=str(tmp_path / "weights"), vae=os.path.join(root, "infinity-cifar-tokenizer.safetensors"))
    path = str(tmp_path / "cuda")
    manifest = build_engine(spec, path, log=QUIET)
    recorded = manifest["stages"]["build"]["info"]["checkpoints"]
    assert sorted(recorded) == sorted([str(tmp_path / "weights" / f) for f in shards] + [os.path.abspath(spec.vae)])
    check_checkpoints(path, manifest)
    flip_last_byte(str(tmp_path / "weights" / sorted(shards)[1]))
    with pytest.raises(EngineError, match="model-00002-of-00002.safetensors changed since the engine was built"):
        check_checkpoints(path, manifest)
    logged = []
    build_engine(spec, path, log=logged.append)
    assert [m for m in logged if "skipped" in m] == [], logged  # every stage rebuilt: the export key saw the shard


def test_a_rebuild_after_the_checkpoints_moved_records_where_they_are_now(tmp_path, capsys, monkeypatch):
    """The stage keys hash the checkpoints' content, so moving them keeps every key and the rebuild skips every
    stage; the build's checkpoint record (paths and stats) must still follow the files, or the load check looks for
    the old paths and tells the user to rebuild, which changed nothing."""
    from sparvar.engine import check_checkpoints

    root = os.path.join(os.path.dirname(__file__), "..", "weights")
    os.makedirs(tmp_path / "a")
    names = ("infinity-cifar.safetensors", "infinity-cifar-tokenizer.safetensors")
    for name in names:
        shutil.copy(os.path.join(root, name), tmp_path / "a" / name)
    path = str(tmp_path / "cuda")

    def spec(folder):
        return EngineSpec(model="infinity-cifar", resolution=64, backend="torch-cuda", dtype="bf16",
                          weights=str(tmp_path / folder / names[0]), vae=str(tmp_path / folder / names[1]))

    build_engine(spec("a"), path, log=QUIET)
    assert main(["engine", "verify", path]) == 0
    assert "2 checkpoints unchanged since the build" in capsys.readouterr().out
    os.replace(tmp_path / "a", tmp_path / "b")
    assert main(["engine", "verify", path]) == 1  # what loading would say, without loading
    assert "infinity-cifar.safetensors is missing; restore it or rebuild" in capsys.readouterr().err
    logged = []
    manifest = build_engine(spec("b"), path, log=logged.append)
    assert sum("skipped" in m for m in logged) == 3  # same content: nothing rebuilt
    assert sorted(manifest["stages"]["build"]["info"]["checkpoints"]) == sorted(str(tmp_path / "b" / n) for n in names)
    check_checkpoints(path, read_manifest(path))
    assert main(["engine", "verify", path]) == 0
    # the same recorded files, but the spec now selects others (a HART llm/ folder that gained a model.safetensors)
    import sparvar.engine as engine

    selects = engine.checkpoint_files
    monkeypatch.setattr(engine, "checkpoint_files", lambda spec: [str(tmp_path / "b" / "model.safetensors"),
                                                                   *selects(spec)[1:]])
    with pytest.raises(EngineError, match="its spec now selects the checkpoint files .*model.safetensors.*rebuild"):
        check_checkpoints(path, read_manifest(path))


def test_a_rebuild_that_changes_nothing_keeps_the_very_files(engines, tmp_path):
    """Skipped stages link their files into the new directory: a server that loaded the engine (its sessions keyed by
    inode) keeps running through a rebuild that changed nothing, and shared weights stay one file on disk."""
    from sparvar.runtime import SESSIONS

    path = str(tmp_path / "e")
    spec = EngineSpec(model="infinity-tiny", resolution=256, attention="dense")  # the `engines` fixture's dense one
    # that engine's files hard-linked here (a copy that keeps the build's shared weights one file; nothing below
    # writes into a file in place, which is what this test checks)
    shutil.copytree(engines["dense"], path, copy_function=os.link)
    weights = [os.path.join(path, stage, "weights.bin") for stage in ("export", "optimize")]
    before = {rel: os.stat(os.path.join(path, rel)).st_ino for rel in _engine_files(path)}
    assert os.stat(weights[0]).st_ino == os.stat(weights[1]).st_ino
    pipe = load_engine_pipeline(path)
    features, lengths = pipe.text_features(["a red car"], allow_hashed=True)
    first = pipe.generate(features, lengths, Sampling(cfg=3.0), seed=1).image
    budget, SESSIONS.budget = SESSIONS.budget, 1  # every step reopens its session, checking the file by inode
    try:
        logs = []
        build_engine(spec, path, log=logs.append)
        assert sum("skipped" in m for m in logs) == 3
        assert {rel: os.stat(os.path.join(path, rel)).st_ino for rel in _engine_files(path)} == before
        assert torch.equal(pipe.generate(features, lengths, Sampling(cfg=3.0), seed=1).image, first)
    finally:
        SESSIONS.budget = budget
    # the session's engine shares these files' inodes: a write into one in place would change it for every later
    # test, so it is caught here rather than as someone else's failure
    verify_files(engines["dense"], read_manifest(engines["dense"]))


def _engine_files(path):
    return sorted(rel for stage in read_manifest(path)["stages"].values() for rel in stage["files"])


def test_building_into_a_symlinked_engine_directory_replaces_its_target(tmp_path):
    """A symlink as the engine directory: the build swaps in the directory it points to, so the link shows the new
    engine and nothing is left beside it (renaming the link itself would leave the target stale and an unremovable
    `.old-*` link behind)."""
    target, link = tmp_path / "engines" / "tiny", tmp_path / "link"
    os.makedirs(target)
    os.symlink(target, link)
    spec = EngineSpec(model="infinity-tiny", resolution=256, attention="dense", backend="torch-cuda", dtype="bf16")
    first = build_engine(spec, str(link), log=QUIET)
    assert os.path.islink(link) and read_manifest(str(link))["created"] == first["created"]
    second = build_engine(spec, str(link), force=True, log=QUIET)
    assert os.path.islink(link) and read_manifest(str(target)) == json.loads(json.dumps(second, default=str))
    # beside the target only its build lock (an empty file: removing it could let two builds hold two locks)
    assert sorted(os.listdir(tmp_path)) == ["engines", "link"]
    assert sorted(os.listdir(tmp_path / "engines")) == [".tiny.lock", "tiny"]


def test_an_engine_another_exporter_wrote_is_refused(engines, tmp_path):
    """Engines are checked file by file, and their graphs' inputs and outputs are the exporter's: a manifest from
    another export code (an older sparvar with the same format) is refused at load, not run."""
    path = str(tmp_path / "e")
    shutil.copytree(engines["dense"], path)
    manifest = read_manifest(path)
    assert manifest["export_code"] == __import__("export.stages", fromlist=["x"]).EXPORT_CODE_VERSION
    load_engine_pipeline(path)
    for stale in (manifest["export_code"] - 1, None):
        manifest["export_code"] = stale
        with open(os.path.join(path, "manifest.json"), "w") as f:
            json.dump(manifest, f)
        with pytest.raises(EngineError, match="exported by another sparvar .*rebuild"):
            load_engine_pipeline(path)


def test_an_engine_built_for_another_sparvar_policy_is_refused_by_load_and_verify(engines, tmp_path, monkeypatch, capsys):
    """The graphs (onnxruntime) and the stored plan (torch-cuda) hold the policy of their build. After this sparvar's
    preset changed (here CS4A's layer split), loading and `engine verify` refuse both, naming the field (onnxruntime
    loaded the old graphs, and verify passed the torch-cuda engine that loading refused). A dense engine whose record
    claims a policy, or a manifest without the record, is refused too; verify reads a torch-cuda plan as loading does."""
    import sparvar.sparse as sparse

    path, dense, cuda = (str(tmp_path / name) for name in ("e", "d", "cuda"))
    shutil.copytree(engines["sparvar"], path)
    shutil.copytree(engines["dense"], dense)
    build_engine(EngineSpec(model="infinity-tiny", resolution=256, attention="sparvar", backend="torch-cuda",
                            dtype="bf16"), cuda, log=QUIET)
    assert main(["engine", "verify", path]) == 0 and main(["engine", "verify", cuda]) == 0
    layers = sparse.POLICY_PRESETS["infinity-tiny"]["cs4a_layers"]
    with monkeypatch.context() as m:
        m.setitem(sparse.POLICY_PRESETS, "infinity-tiny", {**sparse.POLICY_PRESETS["infinity-tiny"], "cs4a_layers": 1})
        with pytest.raises(EngineError, match=rf"built for another SparVAR policy \(cs4a_layers: stored {layers}, now 1\); "
                                              "rebuild"):
            load_engine_pipeline(path)
        for engine in (path, cuda):
            capsys.readouterr()
            assert main(["engine", "verify", engine]) == 1
            assert f"cs4a_layers: stored {layers}, now 1" in capsys.readouterr().err
    load_engine_pipeline(path)  # the preset back: current again

    def rewrite(engine, change):
        manifest = read_manifest(engine)
        change(manifest)
        with open(os.path.join(engine, "manifest.json"), "w") as f:
            json.dump(manifest, f)

    rewrite(dense, lambda m: m.update(policy=read_manifest(path)["policy"]))
    with pytest.raises(EngineError, match="another SparVAR policy \\(stored a SparVAR policy, now dense attention\\)"):
        load_engine_pipeline(dense)
    rewrite(dense, lambda m: m.pop("policy"))
    with pytest.raises(EngineError, match="records no SparVAR policy .*rebuild"):
        load_engine_pipeline(dense)
    rewrite(cuda, lambda m: m["stages"]["build"]["info"]["torch_cuda"].pop("sparse_plan"))
    capsys.readouterr()
    assert main(["engine", "verify", cuda]) == 1
    assert "no stored SparVAR plan" in capsys.readouterr().err


def test_verify_refuses_tensorrt_plans_built_for_another_gpu(engines, tmp_path, capsys, monkeypatch):
    """`engine verify` checks what loading a TensorRT directory checks: plans built for another GPU model are named
    (verify had passed them, and only load refused). The manifest is an onnxruntime engine's, made to read as a
    TensorRT build's (TensorRT cannot be installed here)."""
    import export.tensorrt as tensorrt

    path = str(tmp_path / "e")
    shutil.copytree(engines["sparvar"], path)
    manifest = read_manifest(path)
    manifest["spec"].update(backend="tensorrt", dtype="fp16")
    h100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    from plugins.spec import PLUGIN_CODE_VERSION

    manifest["stages"]["build"]["info"] = {"tensorrt": {"gpu": h100, "units": {}, "plugin_code": PLUGIN_CODE_VERSION}}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    monkeypatch.setattr(tensorrt, "gpu_identity", lambda: {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"})
    assert main(["engine", "verify", path]) == 1
    assert "NVIDIA H100 80GB HBM3" in capsys.readouterr().err
    monkeypatch.setattr(tensorrt, "gpu_identity", lambda: h100)
    assert main(["engine", "verify", path]) == 0


def test_abandoned_temporary_builds_of_the_directory_are_removed(tmp_path):
    """A build killed with SIGKILL leaves its .tmp-<dir>-<pid>; the next build of that directory, holding the build
    lock, removes every such leftover (no other build of it can be running, whatever a process id says: ids repeat
    across containers) and leaves other names alone."""
    from sparvar.engine import remove_abandoned_builds

    names = [".tmp-e-12", ".old-e-12", f".tmp-e-{os.getpid()}", ".tmp-other-12", ".tmp-e-x", "e"]
    for name in names:
        (tmp_path / name).mkdir()
    remove_abandoned_builds(str(tmp_path), "e")
    assert sorted(os.listdir(tmp_path)) == sorted([".tmp-other-12", ".tmp-e-x", "e"])


def test_a_second_build_of_a_directory_waits_for_the_first(engines, tmp_path):
    """Two builds into one directory: the second waits on the first's lock, then finds every stage unchanged (without
    the lock it could link files the first had just replaced, under the old digests)."""
    import threading

    from sparvar.engine import build_lock

    path = str(tmp_path / "e")
    shutil.copytree(engines["dense"], path)
    logs, done = [], threading.Event()
    with build_lock(str(tmp_path), "e"):
        second = threading.Thread(target=lambda: (build_engine(EngineSpec(model="infinity-tiny", resolution=256,
                                                                          attention="dense"), path, log=logs.append),
                                                  done.set()))
        second.start()
        for _ in range(200):  # until it is waiting
            if logs:
                break
            time.sleep(0.05)
        assert logs and "another build of" in logs[0] and "waiting for it" in logs[0] and not done.is_set()
    second.join(120)
    assert done.is_set() and sum("skipped" in line for line in logs) == 3
    assert sorted(os.listdir(tmp_path)) == [".e.lock", "e"]


def test_files_written_into_the_directory_during_a_rebuild_are_kept(engines, tmp_path, monkeypatch):
    """The build checks for the user's files at its start; one written while it runs moves into the new engine at the
    same path instead of being deleted with the old one. One where the new engine has a file of its own stops the
    swap: the old engine stays, complete."""
    from export import stages

    path = str(tmp_path / "e")
    shutil.copytree(engines["dense"], path)
    run_stage = stages.run_stage

    def meanwhile(stage, context):  # the user writes into the engine directory while a stage runs
        if stage == "build":
            os.makedirs(os.path.join(path, "notes"), exist_ok=True)
            with open(os.path.join(path, "notes", "a.txt"), "w") as f:
                f.write("mine")
        return run_stage(stage, context)

    monkeypatch.setattr(stages, "run_stage", meanwhile)
    logs = []
    build_engine(EngineSpec(model="infinity-tiny", resolution=256, attention="dense"), path, force=True, log=logs.append)
    assert open(os.path.join(path, "notes", "a.txt")).read() == "mine"
    assert any("kept 1 file(s) written into" in line for line in logs)
    verify_files(path, read_manifest(path))
    os.remove(os.path.join(path, "notes", "a.txt"))

    def clash(stage, context):  # the user's file where the new engine (stood in for) has one of its own
        out = run_stage(stage, context)
        if stage == "build":
            for root in (path, context.out_dir):
                os.makedirs(os.path.join(root, "notes"), exist_ok=True)
                with open(os.path.join(root, "notes", "b.txt"), "w") as f:
                    f.write("x")
        return out

    before = read_manifest(path)["created"]
    monkeypatch.setattr(stages, "run_stage", clash)
    with pytest.raises(EngineError, match=r"files were written into it during the build \(notes/b.txt\)"):
        build_engine(EngineSpec(model="infinity-tiny", resolution=256, attention="dense"), path, force=True, log=QUIET)
    assert read_manifest(path)["created"] == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith((".tmp", ".old"))]


def test_specs_the_backends_cannot_build_are_refused_up_front():
    with pytest.raises(ValueError, match="onnxruntime engines run fp32 or fp16"):
        EngineSpec(model="infinity-tiny", resolution=256, dtype="bf16")
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        EngineSpec(model="infinity-tiny", resolution=256, dtype="int8")
    for batch in (0, True):  # True had passed as 1 and failed deep in the export, in torch's words
        with pytest.raises(ValueError, match="batch must be an int >= 1"):
            EngineSpec(model="infinity-tiny", resolution=256, batch=batch)
    for opset in (17, "18", True):
        with pytest.raises(ValueError, match="opset must be an int >= 18"):
            EngineSpec(model="infinity-tiny", resolution=256, opset=opset)
    with pytest.raises(ValueError, match="seed must be an int, got 1.5"):
        EngineSpec(model="infinity-tiny", resolution=256, seed=1.5)
    assert EngineSpec(model="infinity-tiny", resolution=256, opset=20, seed=3).opset == 20


def test_runner_checks_what_the_export_dropped_and_what_changed_on_disk(engines, tmp_path):
    """The exported text graph lost the model's length checks: the runner does them. A stale architecture is refused
    by name, and a graph rebuilt on disk after load is never opened as if it were the loaded one."""
    from sparvar.runtime import SESSIONS, OrtRunner

    path = str(tmp_path / "e")
    shutil.copytree(engines["dense"], path)
    manifest = read_manifest(path)
    runner = OrtRunner(path, manifest)
    f = torch.zeros(1, CFG_TINY.text_maxlen + 1, CFG_TINY.text_dim)
    with pytest.raises(EngineError, match=f"L <= {CFG_TINY.text_maxlen}"):
        runner.begin(f, torch.tensor([3]), True)
    with pytest.raises(EngineError, match=r"text lengths must be 1 values in \[1, 4\], got \[0\]"):
        runner.begin(f[:, :4], torch.tensor([0]), True)
    # a rebuilt graph under the loaded engine: its session is not opened
    key = runner.text.key
    SESSIONS.sessions.pop(key, None)  # closed (memory pressure), to be reopened on next use
    os.utime(SESSIONS.graphs[key].path, ns=(0, 10**9))
    with pytest.raises(EngineError, match="changed on disk since its engine was loaded"):
        SESSIONS.session(key)
    # another architecture under the same model name
    manifest["model_config"]["depth"] += 1
    with open(os.path.join(path, "manifest.json"), "w") as fh:
        json.dump(manifest, fh)
    with pytest.raises(EngineError, match="another infinity-tiny config .*depth"):
        load_engine_pipeline(path)


def test_a_build_killed_mid_swap_gets_its_old_engine_back(engines, tmp_path):
    """Killed between moving the old engine aside and the new one in: the next build puts the old one back instead of
    deleting the only complete copy."""
    import subprocess
    import sys

    from sparvar.engine import remove_abandoned_builds

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    shutil.copytree(engines["dense"], tmp_path / f".old-e-{dead}")
    remove_abandoned_builds(str(tmp_path), "e")
    assert sorted(os.listdir(tmp_path)) == ["e"]
    verify_files(str(tmp_path / "e"), read_manifest(str(tmp_path / "e")))


def test_the_shared_weights_file_is_hashed_once_per_pass(engines, monkeypatch):
    """The graphs' weights file is hard-linked into the export and optimize stages (4 GB at 2B): loading verified it
    twice. One verification hashes each file (inode) once."""
    import sparvar.engine as engine

    hashed = []
    real = engine.file_sha256
    monkeypatch.setattr(engine, "file_sha256", lambda path: hashed.append(os.path.basename(path)) or real(path))
    manifest = read_manifest(engines["dense"])
    engine.verify_files(engines["dense"], manifest)
    recorded = [os.path.basename(rel) for stage in manifest["stages"].values() for rel in stage["files"]]
    assert recorded.count("weights.bin") == 2 and hashed.count("weights.bin") == 1
    assert sorted(set(hashed)) == sorted(set(recorded))


def test_engine_info_describes_the_engine(engines, capsys):
    from sparvar.cli import main

    assert main(["engine", "info", engines["sparvar"]]) == 0
    out = capsys.readouterr().out
    assert "model infinity-tiny  resolution 256 (1:1)  attention sparvar  backend onnxruntime  dtype fp32" in out
    assert "weights random (seed 0)" in out and "schedule 1x1 2x2 4x4" in out
    manifest = read_manifest(engines["sparvar"])
    for stage in ("export", "optimize", "build"):
        rec = manifest["stages"][stage]
        assert f"stage {stage:8s} key {rec['key']}  {len(rec['files'])} files" in out


def test_a_failed_export_closes_the_shared_weights_file(tmp_path, monkeypatch):
    """A unit whose export raises leaves no open handle on the (removed) weights file behind it."""
    import export.stages as stages
    from export.weights import SharedWeights

    opened = []
    real_init = SharedWeights.__init__

    def tracking_init(self, path):
        real_init(self, path)
        opened.append(self)

    monkeypatch.setattr(SharedWeights, "__init__", tracking_init)
    monkeypatch.setattr(stages, "_export_unit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("export failed")))
    with pytest.raises(RuntimeError, match="export failed"):
        build_engine(EngineSpec(model="infinity-tiny", resolution=256), str(tmp_path / "e"), log=QUIET)
    assert len(opened) == 1 and opened[0].file.closed
    assert not os.path.exists(tmp_path / "e")


def test_a_graph_record_without_its_file_or_io_is_named(engines):
    """engine_unit checks the record as well as its presence (a record without its file was a KeyError)."""
    import copy

    from sparvar.runtime import engine_unit

    manifest = read_manifest(engines["dense"])
    assert engine_unit(engines["dense"], manifest, "text").inputs == ["text_features", "text_lengths"]
    for broken in ("file", "inputs"):
        changed = copy.deepcopy(manifest)
        changed["stages"]["optimize"]["info"]["units"]["text"].pop(broken)
        with pytest.raises(EngineError, match="has no usable 'text' graph in its manifest"):
            engine_unit(engines["dense"], changed, "text")


# ------------------------------------------------------------------------------------------------ CSLA query tiles
def test_query_tile_option_is_checked_and_named():
    spec = EngineSpec(model="infinity-tiny", resolution=256, attention="sparvar", csla_query_tile="4x4")
    assert spec.policy_overrides() == {"csla_query_tile": (4, 4)}
    assert spec.default_dir() == os.path.join("engines", "infinity-tiny-256-sparvar-tiles4x4-onnxruntime")
    assert EngineSpec(model="infinity-tiny", resolution=256, attention="sparvar").policy_overrides() == {}
    assert EngineSpec(model="infinity-tiny", resolution=256, attention="sparvar", csla_query_tile="04x4").default_dir() \
        == spec.default_dir()  # one spelling per tile
    for kwargs, message in ((dict(attention="dense", csla_query_tile="4x4"), "give --attention sparvar"),
                            (dict(attention="dense", csla_query_tile="3x3"), "holds 9 queries"),
                            (dict(attention="sparvar", csla_query_tile="4*4"), "'<rows>x<cols>'"),
                            (dict(attention="sparvar", csla_query_tile="\uff14x4"), "'<rows>x<cols>'")):
        with pytest.raises(ValueError, match=message):
            EngineSpec(model="infinity-tiny", resolution=256, **kwargs)
    with pytest.raises(ValueError, match="for Infinity models only, not hart-tiny"):
        EngineSpec(model="hart-tiny", resolution=None, attention="sparvar", csla_query_tile="4x4")


def test_an_engine_built_before_the_query_tile_option_stays_current(engines, tmp_path):
    """A manifest without csla_query_tile (every engine built before it existed) reads as raster blocks, and a build
    of the same spec skips every stage; the export key holds the policy as it was before the field existed."""
    import dataclasses

    from export import stages
    from sparvar.sparse import default_policy

    spec = EngineSpec(model="infinity-tiny", resolution=256, attention="sparvar")
    context = stages.StageContext(spec=spec, out_dir=str(tmp_path), versions={})
    before = {k: v for k, v in dataclasses.asdict(default_policy("infinity-tiny", context.schedule)).items()
              if k != "csla_query_tile"}
    assert stages.stage_key_inputs("export", context)["policy"] == before
    path = str(tmp_path / "old")
    shutil.copytree(engines["sparvar"], path)
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    assert "csla_query_tile" not in manifest["spec"]  # written as a sparvar from before the option wrote it
    assert read_manifest(path)["spec"]["csla_query_tile"] is None
    logs = []
    build_engine(EngineSpec(model="infinity-tiny", resolution=256, attention="sparvar"), path, log=logs.append)
    assert sum("skipped" in line for line in logs) == 3, logs


def test_onnxruntime_engine_with_query_tiles_runs_the_tile_nodes_as_torch_does(tmp_path):
    """--csla-query-tile 4x4: the CSLA layers export as CSLATileAttention nodes with their reference bodies, and the
    engine's per-scale logits match the torch path with the same policy (teacher forced)."""
    import onnx

    from sparvar.generate import TorchRunner
    from sparvar.model import build_model
    from sparvar.pipeline import make_plan
    from sparvar.runtime import OrtRunner
    from sparvar.schedule import get_schedule

    path = str(tmp_path / "tiles")
    manifest = build_engine(EngineSpec(model="infinity-tiny", resolution=256, attention="sparvar",
                                       csla_query_tile="4x4"), path, log=QUIET)
    ops = manifest["stages"]["optimize"]["info"]["node_counts"]["step_06"]["ops"]
    assert "sparvar::CSLATileAttention" in ops and "sparvar::CSLAAttention" not in ops, ops
    graph = onnx.load(os.path.join(path, "optimize", "step_06.onnx"), load_external_data=False)
    assert "CSLATileAttention" in {f.name for f in graph.functions}
    schedule = get_schedule(256)
    features, lengths = _features()
    model = build_model(CFG_TINY)
    ort_runner = OrtRunner(path, read_manifest(path))
    torch_runner = TorchRunner(model, schedule, make_plan(model.cfg, schedule, "sparvar", csla_query_tile=(4, 4)))
    raster_runner = TorchRunner(model, schedule, make_plan(model.cfg, schedule, "sparvar"))
    for runner in (ort_runner, torch_runner, raster_runner):
        runner.begin(features, lengths, True)
    g = torch.Generator().manual_seed(0)
    codes, worst, apart = None, 0.0, 0.0
    for k in range(schedule.num_scales):
        a, b, c = ort_runner.step(k, codes), torch_runner.step(k, codes), raster_runner.step(k, codes)
        worst = max(worst, (a - b).abs().nan_to_num(nan=float("inf")).max().item())
        apart = max(apart, (b - c).abs().max().item())
        if k + 1 < schedule.num_scales:
            codes = torch.randn(1, schedule.lengths[k + 1], CFG_TINY.bits, generator=g) * 0.25
    assert worst < 1e-4, worst
    assert apart > 1e-3, "the tiles' logits should differ from the raster blocks' (other keys attended)"


def test_torch_cuda_engine_stores_the_query_tile_plan(tmp_path):
    from sparvar.csla import TileLayout
    from sparvar.engine import engine_info, load_engine_plan

    path = str(tmp_path / "cuda-tiles")
    manifest = build_engine(EngineSpec(model="infinity-tiny", resolution=256, attention="sparvar", backend="torch-cuda",
                                       dtype="bf16", csla_query_tile="4x4"), path, log=QUIET)
    stored = load_engine_plan(path, manifest, backend="reference")
    assert all(isinstance(layout, TileLayout) and layout.tile == (4, 4) for layout in stored.csla_layouts.values())
    assert "CSLA query tiles 4x4" in engine_info(path)
    with open(os.path.join(path, "manifest.json")) as f:  # a value no build writes: refused by name, once
        manifest = json.load(f)
    manifest["spec"]["csla_query_tile"] = "3x3"
    with pytest.raises(EngineError, match=r"its manifest's spec is not one sparvar builds \(CSLA query tile 3x3") as e:
        load_engine_plan(path, manifest, backend="reference")
    assert "stored SparVAR plan" not in str(e.value)


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt-rtx", "tensorrt", "torch-cuda"])
def test_each_stage_key_holds_the_versions_of_the_tools_its_artefacts_depend_on(backend, monkeypatch):
    """A tool's new version rebuilds the stages built with it and no other: an onnxruntime engine's build no longer
    reruns for a new Triton or TensorRT, a TensorRT plan for a new onnxruntime, a torch-cuda engine (no graphs)
    for a new onnx; each backend's own tools still rebuild it."""
    from export import stages
    from sparvar.engine import BACKENDS

    assert set(stages.BUILD_TOOLS) == set(BACKENDS)
    if backend == "tensorrt":  # its build key holds the GPU its plans run on
        monkeypatch.setattr("export.tensorrt.gpu_identity", lambda: None)
    tools = ("torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "tensorrt", "tensorrt-rtx-cu13-bindings", "triton")
    spec = EngineSpec(model="infinity-tiny", resolution=256, attention="dense", backend=backend,
                      dtype="bf16" if backend == "torch-cuda" else "fp32")

    def keys(versions):
        context = stages.StageContext(spec=spec, out_dir="unused", versions=versions)
        return {stage: stages.stage_key_inputs(stage, context) for stage in ("export", "optimize", "build")}

    base = keys({tool: "1.0" for tool in tools})
    rebuilt = {tool: [stage for stage, key in keys({**{t: "1.0" for t in tools}, tool: "2.0"}).items()
                      if key != base[stage]] for tool in tools}
    graphs = [] if backend == "torch-cuda" else ["export"]
    expected = {"torch": graphs + ["build"] if backend != "onnxruntime" else ["export"],
                "onnx": graphs + ["optimize"] * bool(graphs), "onnxscript": graphs + ["optimize"] * bool(graphs),
                "onnx-ir": graphs, "onnxruntime": ["build"] * (backend == "onnxruntime"),
                "tensorrt": ["build"] * (backend == "tensorrt"),
                "tensorrt-rtx-cu13-bindings": ["build"] * (backend == "tensorrt-rtx"),
                "triton": ["build"] * (backend != "onnxruntime")}
    assert rebuilt == expected
