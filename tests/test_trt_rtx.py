"""TensorRT-RTX: graphs with sparvar nodes parse, map every node to our IPluginV3 plugin and build for SM80/SM89
on this CPU-only machine; so does a whole tiny engine directory. (Engines cannot run here: no GPU, and TensorRT-RTX
does not run on the H100.)"""
import ctypes
import os

import onnx
import onnx.helper as oh
import pytest
import torch

from export.custom_ops import export_model
from plugins import SPECS
from plugins.spec import NAMESPACE

trt = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX not installed (pip install "
                          "tensorrt-rtx-cu13-libs==1.7.1.116 tensorrt-rtx-cu13-bindings==1.7.1.116)")

from export.trt_build import make_logger, parse_onnx, plugin_layers, ready_for_trt, weights_record  # noqa: E402
from export.trt_rtx import build_engine, load_engine, load_trt_rtx, local_compute_capability  # noqa: E402
from tests.test_custom_ops import EXPECTED_ATTRS, OneOp, _inputs  # noqa: E402
from tests.test_tensorrt import assert_plans_run_as_onnxruntime, weighty_graph  # noqa: E402

QUIET = lambda *a, **k: None  # noqa: E731


class WithDenseAround(torch.nn.Module):
    """A sparse op between ordinary layers, as in a transformer block."""

    def __init__(self, op):
        super().__init__()
        self.inner = OneOp(op)

    def forward(self, q, k, v, key_idx, o_cache):
        out = self.inner(q * 0.5, k, v, key_idx, o_cache)
        return tuple(o + 1 if o.is_floating_point() else o for o in out) if isinstance(out, tuple) else out.softmax(-1)


def _sparvar_nodes(model):
    return [n for n in model.graph.node if n.domain == NAMESPACE]


@pytest.mark.parametrize("op", sorted(SPECS))
def test_every_op_builds_as_our_plugin_for_sm80(op):
    model = export_model(WithDenseAround(op).eval(), _inputs(), flavour="plugin")
    report = build_engine(model, compute_capabilities=("SM80",))
    (name,) = [n.name for n in _sparvar_nodes(model)]
    assert list(report.plugin_layers) == [name]
    assert report.plugin_layers[name]["op_type"] == op
    assert report.plugin_layers[name]["attributes"] == EXPECTED_ATTRS[op]
    assert report.plugin_layers[name]["outputs"] == len(SPECS[op].outputs)
    assert name in report.builder_plugin_nodes  # the builder's own graph listing
    assert report.layer_types["PLUGIN_V3"] == 1 and len(report.layer_types) > 1  # the dense ops stay TensorRT layers
    assert op.encode() in report.engine and len(report.engine) > 1000


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_graph_builds_for_sm80_and_sm89(dtype):
    model = export_model(OneOp("CSLAAttention").eval(), _inputs(dtype), flavour="plugin")
    report = build_engine(model, compute_capabilities=("SM80", "SM89"))
    assert [info["op_type"] for info in report.plugin_layers.values()] == ["CSLAAttention"]


def test_reference_functions_are_stripped_so_the_plugin_is_taken():
    model = export_model(OneOp("CS4AAttentionCached").eval(), _inputs(), flavour="reference")
    assert {f.name for f in model.functions} >= {"CS4AAttentionCached"}
    report = build_engine(model, compute_capabilities=("SM80",))
    assert [info["op_type"] for info in report.plugin_layers.values()] == ["CS4AAttentionCached"]


def test_an_inlined_function_is_caught_and_a_missing_plugin_is_an_error():
    model = export_model(OneOp("CSLAAttention").eval(), _inputs(), flavour="reference")
    node = _sparvar_nodes(model)[0]
    node.op_type = "CSLAAttentionUnknown"  # no plugin of this name is registered; give it the body anyway
    body = next(f for f in model.functions if f.name == "CSLAAttention")
    body.name = "CSLAAttentionUnknown"
    trt_rtx = load_trt_rtx()
    logger = make_logger(trt_rtx)
    builder = trt_rtx.Builder(logger)
    # parsed as is, TensorRT-RTX inlines the local function: the check must refuse that network
    network = builder.create_network(0)
    parser = trt_rtx.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString())
    with pytest.raises(AssertionError, match="did not become one plugin layer"):
        plugin_layers(trt_rtx, network, model)
    # our parse strips the bodies first, so the same graph fails loudly instead
    with pytest.raises(RuntimeError, match="Plugin not found"):
        parse_onnx(trt_rtx, builder, model, logger)


def test_invalid_node_reports_the_plugin_check():
    q = oh.make_tensor_value_info("q", onnx.TensorProto.FLOAT, [1, 2, 20, 8])
    k = oh.make_tensor_value_info("k", onnx.TensorProto.FLOAT, [1, 2, 45, 8])
    v = oh.make_tensor_value_info("v", onnx.TensorProto.FLOAT, [1, 2, 45, 8])
    out = oh.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)
    num = oh.make_tensor("num", onnx.TensorProto.INT32, [2], [1, 1])  # 20 queries in blocks of 8 need 3 entries
    idx = oh.make_tensor("idx", onnx.TensorProto.INT32, [2, 1], [0, 0])
    node = oh.make_node("CSLAAttention", ["q", "k", "v", "num", "idx"], ["out"], domain=NAMESPACE, name="bad",
                        block_m=8, block_n=16, plugin_namespace=NAMESPACE)
    model = oh.make_model(oh.make_graph([node], "g", [q, k, v], [out], initializer=[num, idx]),
                          opset_imports=[oh.make_opsetid("", 18), oh.make_opsetid(NAMESPACE, 1)])
    with pytest.raises(RuntimeError, match="kv_num_blocks .* one entry per query block"):
        build_engine(model, compute_capabilities=("SM80",))


def test_unknown_compute_capability_is_rejected():
    model = export_model(OneOp("CS4AAttention").eval(), _inputs(), flavour="plugin")
    with pytest.raises(ValueError, match="unknown compute capability 'SM90'"):
        build_engine(model, compute_capabilities=("SM90",))


def test_tiny_model_last_scale_step_builds_with_all_sparse_layers_as_plugins():
    """A whole exported scale step (infinity-tiny, last scale: 2 CS4A + 2 CSLA layers) through TensorRT-RTX."""
    from export.custom_ops import export_plan
    from export.step import StepUnit
    from sparvar.config import get_config
    from sparvar.model import build_model
    from sparvar.schedule import get_schedule
    from sparvar.sparse import default_policy

    cfg, schedule = get_config("infinity-tiny"), get_schedule(256)
    policy = default_policy("infinity-tiny", schedule)
    model = build_model(cfg, dtype=torch.float32, seed=0).eval()
    scale = schedule.num_scales - 1
    unit = StepUnit(model, schedule, scale, 1, export_plan(policy, schedule, cfg.depth, flavour="plugin"))
    g = torch.Generator().manual_seed(0)
    args = []
    for s in unit.inputs:
        shape = s.concrete(4)
        if s.name.startswith("cs4a_selected"):  # a valid selection: ascending distinct positions of the decision KV
            kv = schedule.kv_len(policy.decision_scale)
            rows = [torch.randperm(kv, generator=g)[: shape[-1]].sort().values for _ in range(shape[0] * shape[1] * shape[2])]
            args.append(torch.stack(rows).view(shape).to(torch.int32))
        elif s.dtype == "bool":
            args.append(torch.ones(shape, dtype=torch.bool))
        else:
            args.append(torch.randn(shape, generator=g).to(getattr(torch, s.dtype)))
    graph = export_model(unit, tuple(args), flavour="plugin", opset=18, input_names=[s.name for s in unit.inputs],
                         output_names=[s.name for s in unit.outputs])  # cleaned as an engine's step graphs are
    report = build_engine(graph, compute_capabilities=("SM80",))
    kinds = sorted(info["op_type"] for info in report.plugin_layers.values())
    expected = sorted("CS4AAttentionCached" if policy.kind(layer, scale) == "cs4a" else "CSLAAttention"
                      for layer in range(cfg.depth))
    assert kinds == expected and set(kinds) == {"CS4AAttentionCached", "CSLAAttention"}
    assert sorted(report.builder_plugin_nodes) == sorted(report.plugin_layers)


# ------------------------------------------------------------------------------------------------ weights
def _needs_strippable_gpu() -> str:
    local, why = local_compute_capability()
    if local is None:
        pytest.skip(f"TensorRT-RTX builds weight-stripped plans only on a GPU it runs on: {why}")
    return local


def _needs_no_strippable_gpu():
    if local_compute_capability()[0] is not None:
        pytest.skip("this machine's GPU is one TensorRT-RTX runs on: it builds weight-stripped plans")


def test_stripped_plan_holds_no_weights(tmp_path):
    local = _needs_strippable_gpu()
    path, nbytes, _ = weighty_graph(str(tmp_path))
    stripped = build_engine(path, compute_capabilities=(local,), weights="strip")
    embedded = build_engine(path, compute_capabilities=(local,), weights="embed")
    assert stripped.weights == "strip" and len(stripped.engine) < 0.25 * nbytes
    assert len(embedded.engine) >= nbytes


def test_a_stripped_plan_targets_exactly_the_local_gpu(tmp_path):
    local = _needs_strippable_gpu()
    other = "SM80" if local != "SM80" else "SM89"
    path, _, _ = weighty_graph(str(tmp_path))
    with pytest.raises(RuntimeError, match="targets exactly this machine's GPU"):
        build_engine(path, compute_capabilities=(local, other), weights="strip")


def test_without_a_cuda_driver_tensorrt_rtx_cannot_build_a_stripped_plan(tmp_path):
    """The fact `cannot_strip_weights` relies on: if a later TensorRT-RTX builds stripped plans on a CPU-only
    machine, this fails, and the engine builder should strip everywhere."""
    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("a CUDA driver is present on this machine")
    except OSError:
        pass
    path, _, _ = weighty_graph(str(tmp_path))
    trt_rtx = load_trt_rtx()
    logger = make_logger(trt_rtx, echo_severity=trt_rtx.ILogger.Severity.INTERNAL_ERROR)
    builder = trt_rtx.Builder(logger)
    network = builder.create_network(0)
    parser = trt_rtx.OnnxParser(network, logger)
    assert parser.parse_from_file(path)
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt_rtx.ComputeCapability.SM80, 0)
    config.set_flag(trt_rtx.BuilderFlag.STRIP_PLAN)
    config.set_flag(trt_rtx.BuilderFlag.REFIT_IDENTICAL)
    assert builder.build_serialized_network(network, config) is None
    assert any("CUDA_SUCCESS" in e for e in logger.errors()), logger.errors()


def test_without_a_gpu_tensorrt_rtx_runs_on_strip_is_refused_and_the_default_embeds(tmp_path):
    _needs_no_strippable_gpu()
    path, nbytes, _ = weighty_graph(str(tmp_path))
    with pytest.raises(RuntimeError, match="weight-stripped plan only on a GPU it runs on"):
        build_engine(path, compute_capabilities=("SM80",), weights="strip")
    report = build_engine(path, compute_capabilities=("SM80",))
    assert report.weights == "embed"
    assert len(report.engine) >= nbytes  # each embedded plan carries a full copy: what stripping avoids


def test_weights_record_names_the_shared_file_to_refit_from(tmp_path):
    path, _, _ = weighty_graph(str(tmp_path / "optimize"))
    assert weights_record(path, str(tmp_path), "strip") == {"weights": "stripped, refit from optimize/weights.bin",
                                                           "refit_onnx": "optimize/weighty.onnx"}
    assert weights_record(path, str(tmp_path), "embed") == {"weights": "embedded"}
    with pytest.raises(ValueError, match="unknown weights mode 'copy'"):
        build_engine(path, compute_capabilities=("SM80",), weights="copy")


# ------------------------------------------------------------------------------------------------ engine directory
@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    """infinity-tiny at 256 with SparVAR attention through `sparvar engine build --backend tensorrt-rtx`."""
    from sparvar.engine import EngineSpec
    from sparvar.engine import build_engine as build_engine_dir

    path = str(tmp_path_factory.mktemp("trt_rtx") / "tiny-sparvar")
    spec = EngineSpec(model="infinity-tiny", resolution=256, attention="sparvar", backend="tensorrt-rtx")
    return path, build_engine_dir(spec, path, log=QUIET)


def test_engine_dir_maps_every_sparvar_node_of_every_unit_to_our_plugin(tiny_engine):
    path, manifest = tiny_engine
    build = manifest["stages"]["build"]["info"]["tensorrt_rtx"]
    counts = manifest["stages"]["optimize"]["info"]["node_counts"]
    assert set(build["units"]) == set(manifest["units"]) and len(build["units"]) == len(manifest["schedule"]) + 2
    per_unit = {}
    for name, unit in manifest["units"].items():
        graph = onnx.load(os.path.join(path, unit["file"]), load_external_data=False)
        assert not [f.name for f in graph.functions if f.domain == NAMESPACE]  # no reference body to fall back to
        nodes = _sparvar_nodes(ready_for_trt(graph))
        from_optimize = sum(n for op, n in counts[name]["ops"].items() if op.startswith(f"{NAMESPACE}::"))
        assert len(nodes) == from_optimize
        record = build["units"][name]
        assert sorted(record["plugin_layers"]) == sorted(n.name for n in nodes)
        assert all(record["plugin_layers"][n.name]["op_type"] == n.op_type for n in nodes)
        assert sorted(record["builder_plugin_nodes"]) == sorted(record["plugin_layers"])
        assert record["layer_types"].get("PLUGIN_V3", 0) == len(nodes)
        per_unit[name] = len(nodes)
    assert per_unit["text"] == 0 and per_unit["decode"] == 0
    steps = [n for name, n in per_unit.items() if name.startswith("step_")]
    assert sum(steps) > 0 and steps[-1] > 0  # the sparse scales are at the end of the schedule
    ops = {info["op_type"] for u in build["units"].values() for info in u["plugin_layers"].values()}
    assert {"CSLAAttention", "CS4AAttentionCached"} <= ops


def test_hart_engine_dir_builds_with_every_sparvar_node_as_our_plugin(tmp_path):
    """HART (static shapes, a text prefix in the KV): every unit parses and builds; the sparse scales' nodes, the
    decision's sink_len attribute included, become our plugin layers."""
    from sparvar.engine import EngineSpec
    from sparvar.engine import build_engine as build_engine_dir

    path = str(tmp_path / "hart-tiny")
    manifest = build_engine_dir(EngineSpec(model="hart-tiny", resolution=256, attention="sparvar",
                                           backend="tensorrt-rtx"), path, log=QUIET)
    build = manifest["stages"]["build"]["info"]["tensorrt_rtx"]
    assert set(build["units"]) == set(manifest["units"])
    for name, unit in manifest["units"].items():
        nodes = _sparvar_nodes(ready_for_trt(onnx.load(os.path.join(path, unit["file"]), load_external_data=False)))
        record = build["units"][name]
        assert sorted(record["plugin_layers"]) == sorted(n.name for n in nodes), name
        assert record["layer_types"].get("PLUGIN_V3", 0) == len(nodes)
        assert bool(nodes) == (name in ("step_05", "step_06", "step_07")), name  # sparse: the last 3 of 8 scales
        for n in nodes:
            if n.op_type == "CS4ADecide":  # the text prefix + 2^2 + 3^2 are CS4A sinks
                assert {a.name: oh.get_attribute_value(a) for a in n.attribute}["sink_len"] == 29
    from sparvar.engine import EngineError
    from sparvar.runtime import load_engine_pipeline

    with pytest.raises(EngineError, match="a HART tensorrt-rtx engine: sparvar runs HART engines built for onnxruntime"):
        load_engine_pipeline(path)


def test_engine_dir_records_where_the_weights_of_every_unit_are(tiny_engine):
    path, manifest = tiny_engine
    build = manifest["stages"]["build"]["info"]["tensorrt_rtx"]
    shared = manifest["stages"]["export"]["info"]["shared_weights"]
    local, reason = local_compute_capability()
    for name, record in build["units"].items():
        assert os.path.getsize(os.path.join(path, record["engine"])) == record["engine_bytes"]
        if local:
            assert record["weights"] == "stripped, refit from optimize/weights.bin"
            assert record["refit_onnx"] == manifest["units"][name]["file"]
        else:
            assert record["weights"] == "embedded"
    assert os.path.getsize(os.path.join(path, "optimize", "weights.bin")) == shared["bytes"]
    if local:
        assert build["weights"] == "strip" and build["weights_note"] is None and build["compute_capabilities"] == [local]
    else:
        assert build["weights"] == "embed" and reason in build["weights_note"]
        assert build["compute_capabilities"] == ["SM80", "SM89"]


def test_load_engine_names_bad_units_and_needs_a_gpu_tensorrt_rtx_runs_on(tiny_engine):
    path, _ = tiny_engine
    with pytest.raises(ValueError, match="unknown unit 'step_99'; .* has units"):
        load_engine(path, "step_99")
    _needs_no_strippable_gpu()
    with pytest.raises(RuntimeError, match="cannot deserialize the engine here"):
        load_engine(path, "step_00")


def test_load_engine_checks_the_directory_as_the_runtime_does(tiny_engine, tmp_path):
    """Before any plan is deserialised: a directory another exporter wrote, or with a corrupt file, is an EngineError
    naming it (load_engine had read only the manifest, and went on to TensorRT-RTX with either); one check serves
    several units; `engine verify` refuses stripped plans this machine's GPU cannot run, as loading does."""
    import json
    import shutil

    from export.trt_build import checked_manifest
    from sparvar.cli import main
    from sparvar.engine import EngineError, read_manifest

    path = str(tmp_path / "e")
    shutil.copytree(tiny_engine[0], path)
    manifest = checked_manifest(path, "tensorrt-rtx")
    with pytest.raises(ValueError, match="unknown unit 'step_99'"):  # the checked manifest, no second check
        load_engine(path, "step_99", manifest=manifest)
    with pytest.raises(EngineError, match="holds no tensorrt engines"):
        checked_manifest(path, "tensorrt")

    def rewrite(change):
        stored = read_manifest(path)
        change(stored)
        with open(os.path.join(path, "manifest.json"), "w") as f:
            json.dump(stored, f)

    plan = os.path.join(path, manifest["stages"]["build"]["info"]["tensorrt_rtx"]["units"]["step_00"]["engine"])
    data = bytearray(open(plan, "rb").read())
    data[-1] ^= 1
    open(plan, "wb").write(data)
    with pytest.raises(EngineError, match="step_00.engine of stage 'build' is corrupt"):
        load_engine(path, "step_00")
    data[-1] ^= 1
    open(plan, "wb").write(data)
    rewrite(lambda m: m.update(export_code=-1))
    with pytest.raises(EngineError, match="exported by another sparvar"):
        load_engine(path, "step_00")
    rewrite(lambda m: m.update(export_code=manifest["export_code"]))
    # plans of other plugin code: TensorRT-RTX would load them (the plugins' version string is unchanged)
    from plugins.spec import PLUGIN_CODE_VERSION

    build = lambda m: m["stages"]["build"]["info"]["tensorrt_rtx"]  # noqa: E731
    assert build(manifest)["plugin_code"] == PLUGIN_CODE_VERSION
    rewrite(lambda m: build(m).update(plugin_code=PLUGIN_CODE_VERSION - 1))
    with pytest.raises(EngineError, match=f"plugin code {PLUGIN_CODE_VERSION - 1}, and this sparvar's plugins are "
                                          f"version {PLUGIN_CODE_VERSION}; rebuild"):
        load_engine(path, "step_00")
    assert main(["engine", "verify", path]) == 1
    rewrite(lambda m: build(m).pop("plugin_code"))
    with pytest.raises(EngineError, match=r"no plugin code version \(an older sparvar\)"):
        checked_manifest(path, "tensorrt-rtx")
    rewrite(lambda m: build(m).update(plugin_code=PLUGIN_CODE_VERSION))
    _needs_no_strippable_gpu()
    rewrite(lambda m: m["stages"]["build"]["info"]["tensorrt_rtx"].update(weights="strip", compute_capabilities=["SM89"]))
    assert main(["engine", "verify", path]) == 1


def _needs_a_gpu_tensorrt_rtx_runs_on():
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) not in ((8, 0), (8, 6), (8, 9)) and major != 12:
        pytest.skip(f"TensorRT-RTX does not run on compute capability {major}.{minor}")


@pytest.mark.gpu
def test_load_engine_refits_and_exposes_the_unit_io(tiny_engine):
    _needs_a_gpu_tensorrt_rtx_runs_on()
    path, manifest = tiny_engine
    for name, unit in manifest["units"].items():
        engine = load_engine(path, name)
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        assert names == {s["name"] for s in unit["inputs"] + unit["outputs"]}


def test_a_stripped_plan_names_the_gpu_it_was_built_for(monkeypatch):
    """A weight-stripped plan runs only on the GPU of its build: another GPU, or none, is named before TensorRT-RTX
    tries to deserialise it; embedded plans are left to TensorRT-RTX."""
    import export.trt_rtx as trt_rtx
    from sparvar.engine import EngineError

    stripped = {"weights": "strip", "compute_capabilities": ["SM86"]}
    monkeypatch.setattr(trt_rtx, "local_compute_capability", lambda: ("SM86", ""))
    trt_rtx.check_plans_run_here("eng", stripped)
    monkeypatch.setattr(trt_rtx, "local_compute_capability", lambda: ("SM89", ""))
    with pytest.raises(EngineError, match="built for SM86, and this machine's GPU is SM89; rebuild"):
        trt_rtx.check_plans_run_here("eng", stripped)
    monkeypatch.setattr(trt_rtx, "local_compute_capability", lambda: (None, "no CUDA driver (libcuda.so.1)"))
    with pytest.raises(EngineError, match="built for SM86, and no CUDA driver"):
        trt_rtx.check_plans_run_here("eng", stripped)
    trt_rtx.check_plans_run_here("eng", {"weights": "embed", "compute_capabilities": ["SM80", "SM89"]})


def test_build_stage_key_changes_with_the_weights_plan(monkeypatch):
    """The same ONNX builds a stripped plan for the local GPU on one machine and embedded plans elsewhere: the build
    stage's cache key must tell them apart, or an engine dir copied between machines would skip a needed rebuild."""
    import export.trt_rtx as trt_rtx
    from export import stages

    ctx = type("Ctx", (), {"spec": type("Spec", (), {"backend": "tensorrt-rtx"})(), "versions": {"torch": "x"}})()
    monkeypatch.setattr(trt_rtx, "local_compute_capability", lambda: (None, "no CUDA driver"))
    embedded = stages.stage_key_inputs("build", ctx)
    assert embedded["trt_rtx_plan"] == {"weights": "embed", "compute_capabilities": ["SM80", "SM89"]}
    monkeypatch.setattr(trt_rtx, "local_compute_capability", lambda: ("SM89", ""))
    stripped = stages.stage_key_inputs("build", ctx)
    assert stripped["trt_rtx_plan"] == {"weights": "strip", "compute_capabilities": ["SM89"]}
    assert stripped != embedded


# ------------------------------------------------------------------------------------------------ running plans
def test_generating_through_plans_needs_a_gpu_and_says_so_before_hashing(tiny_engine, tmp_path, monkeypatch, capsys):
    """`sparvar generate --engine` on a tensorrt-rtx directory, on a machine without a GPU: the runtime names the
    problem before it hashes the directory (minutes at 8B) or deserialises a plan."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    import sparvar.runtime as runtime
    from sparvar.cli import main
    from sparvar.engine import EngineError

    path, _ = tiny_engine

    def hashed(*args, **kwargs):
        raise AssertionError("the files were hashed before the GPU was asked for")

    monkeypatch.setattr(runtime, "verify_files", hashed)
    with pytest.raises(EngineError, match="tensorrt-rtx engine: its plans run on a CUDA GPU, and this machine has none"):
        runtime.load_engine_pipeline(path)
    out = str(tmp_path / "x.png")
    assert main(["generate", "--engine", path, "--out", out]) == 1
    assert "its plans run on a CUDA GPU" in capsys.readouterr().err and not os.path.exists(out)


def test_plans_for_a_gpu_tensorrt_rtx_does_not_run_on_are_refused_before_hashing(tiny_engine, monkeypatch):
    """On an H100 (compute capability 9.0, which TensorRT-RTX's runtime refuses) the directory's embedded plans would
    fail in deserialisation, after minutes of hashing at 8B: the loader names the GPU first."""
    import export.trt_rtx
    import sparvar.runtime as runtime
    from sparvar.engine import EngineError

    def hashed(*args, **kwargs):
        raise AssertionError("the files were hashed before the GPU was checked")

    monkeypatch.setattr(runtime, "verify_files", hashed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    why = "its GPU (compute capability 9.0) is not one TensorRT-RTX runs on (8.0, 8.6, 8.9, 12.0)"
    monkeypatch.setattr(export.trt_rtx, "local_compute_capability", lambda: (None, why))
    with pytest.raises(EngineError, match=r"is a tensorrt-rtx engine, and its GPU \(compute capability 9.0\) is not"):
        runtime.load_engine_pipeline(tiny_engine[0])


@pytest.mark.gpu
def test_plans_run_the_generation_loop_as_onnxruntime_does(tiny_engine, engines):
    _needs_a_gpu_tensorrt_rtx_runs_on()
    assert_plans_run_as_onnxruntime(tiny_engine[0], engines["sparvar"])
