"""TensorRT (QDP and IPluginV3) engines with the sparvar plugins, the plugins' device runtime, and AOT compilation.

TensorRT tests skip with "TensorRT not installed" where it is missing (everywhere in this project so far); the
device-runtime test needs a CUDA GPU; the AOT compile test needs Triton (no GPU: it compiles PTX for SM80).
"""
import os
import subprocess
import sys

import numpy as np
import onnx
import onnx.helper as oh
import pytest
import torch

from export.custom_ops import export_model
from plugins import RUNS, SPECS, cs4a
from plugins.spec import Tactic, available_tactics, run_on_stream, sparse_ops, torch_view
from tests.test_custom_ops import D, GROUP, OneOp, _inputs


@pytest.fixture
def tensorrt():
    return pytest.importorskip("tensorrt", reason="TensorRT not installed")


def _requires_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none is available on this machine")


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def weighty_graph(folder, rows: int = 512, hidden: int = 1024) -> tuple[str, int, tuple]:
    """x @ W1 -> relu -> @ W2, its 2*rows*hidden float32 weights (4 MiB by default) in one external-data file beside
    the graph, as in an engine directory. Returns (graph path, weight bytes, (W1, W2))."""
    g = np.random.default_rng(0)
    w1 = (g.standard_normal((rows, hidden)) / np.sqrt(rows)).astype(np.float32)
    w2 = (g.standard_normal((hidden, rows)) / np.sqrt(hidden)).astype(np.float32)
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, rows])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, rows])
    nodes = [oh.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), oh.make_node("Relu", ["h"], ["r"], name="relu"),
             oh.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    graph = oh.make_graph(nodes, "weighty", [x], [y], initializer=[onnx.numpy_helper.from_array(w1, "W1"),
                                                                  onnx.numpy_helper.from_array(w2, "W2")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "weighty.onnx")
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=1024)
    return path, w1.nbytes + w2.nbytes, (w1, w2)


def test_weighty_graph_keeps_its_weights_outside_the_graph(tmp_path):
    path, nbytes, _ = weighty_graph(str(tmp_path))
    assert os.path.getsize(tmp_path / "weights.bin") == nbytes and os.path.getsize(path) < 4096


@pytest.mark.gpu
@pytest.mark.parametrize("op", sorted(SPECS))
def test_qdp_jit_engine_matches_the_reference(tensorrt, op):
    from export.tensorrt import build_engine, run_engine

    _requires_gpu()
    tensors = _inputs()
    module = OneOp(op).eval()
    model = export_model(module, tensors, flavour="plugin")
    report = build_engine(model, plugin_api="qdp", weights="embed")
    assert [info["op_type"] for info in report.plugin_layers.values()] == [op]
    assert report.inspector is not None
    names = [i.name for i in model.graph.input]
    feeds = dict(zip(("q", "k", "v", "key_idx", "o_cache"), (t.cuda() for t in tensors)))
    got = run_engine(report.engine, {n: feeds[n] for n in names}, plugin_api="qdp")
    for out, want in zip((got[o.name] for o in model.graph.output), _as_tuple(module(*tensors))):
        torch.testing.assert_close(out.cpu(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("op", ["CS4AAttention", "CS4AAttentionCached"])
def test_cs4a_plugins_survive_the_uninitialised_indices_of_tactic_timing(op):
    """TensorRT times tactics on inputs it never wrote: the plugins' CS4A must not index outside the keys with them
    (a fault there ends the build), and real, in-range selections give the op's own result."""
    from sparvar.sparse import get_sparse_ops

    q, k, v, key_idx, o_cache = _inputs()
    inputs = [q, k, v, key_idx] + ([o_cache] if op == "CS4AAttentionCached" else [])
    reference = get_sparse_ops("reference")
    (got,) = RUNS[op](inputs, {"group_size": GROUP}, reference)
    torch.testing.assert_close(got, reference.cs4a(q, k, v, key_idx, GROUP, inputs[4] if len(inputs) == 5 else None))
    garbage = torch.randint(-2**31, 2**31 - 1, key_idx.shape, dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    (out,) = RUNS[op]([q, k, v, garbage] + inputs[4:], {"group_size": GROUP}, reference)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_csla_plugin_survives_the_uninitialised_layout_of_tactic_timing():
    """As CS4A's key_idx: TensorRT times the CSLA plugin on block counts and indices it never wrote. Out-of-range ones
    must not index outside the keys (the reference raised IndexError; on a GPU a fault ends the build), and a real
    layout gives the op's own result."""
    from sparvar.sparse import get_sparse_ops
    from tests.test_custom_ops import _layout

    q, k, v, _, _ = _inputs()
    layout = _layout()
    attrs = {"block_m": layout.block_m, "block_n": layout.block_n}
    reference = get_sparse_ops("reference")
    (got,) = RUNS["CSLAAttention"]([q, k, v, layout.kv_num_blocks, layout.kv_indices], attrs, reference)
    torch.testing.assert_close(got, reference.csla(q, k, v, layout), atol=0, rtol=0)
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(-2**31, 2**31 - 1, layout.kv_num_blocks.shape, dtype=torch.int32, generator=g)
    indices = torch.randint(-2**31, 2**31 - 1, layout.kv_indices.shape, dtype=torch.int32, generator=g)
    (out,) = RUNS["CSLAAttention"]([q, k, v, counts, indices], attrs, reference)
    assert out.shape == q.shape


def test_every_sparvar_node_says_which_qdp_implementation_to_use():
    """Every op defines a JIT and an AOT implementation, and TensorRT >= 10.9 refuses to pick one for a node without
    the `aot` attribute: each node gets 1 where AOT is asked for and its op has a kernel, else 0."""
    from export.tensorrt import mark_aot

    def marks(model):
        return [oh.get_attribute_value(a) for n in model.graph.node if n.domain == "sparvar" for a in n.attribute
                if a.name == "aot"]

    for aot in (False, True):
        for op in sorted(SPECS):  # fp32, head dim 8: no AOT kernel takes these nodes, CSLA's included
            model = mark_aot(export_model(OneOp(op).eval(), _inputs(), flavour="plugin"), aot)
            assert marks(model) and set(marks(model)) == {0}, (op, aot)
    # what the AOT kernel takes (bf16, head dim 64, 16x32 tiles) gets it where asked; the same node in fp32 not
    tensors = tuple(torch.randn(1, 2, n, 64).bfloat16() for n in (100, 200, 200))
    for dtype, want in ((torch.bfloat16, [1]), (torch.float32, [0])):
        model = export_model(CslaOnly(100, 200).eval(), tuple(t.to(dtype) for t in tensors), flavour="plugin")
        assert marks(mark_aot(model, True)) == want and marks(mark_aot(model, False)) == [0]
    # CSLATileAttention: its tile is q_rows' second dim, a constant of the graph (16 slots for 4x4 tiles)
    tiles = TilesOnly()
    tensors = tuple(torch.randn(1, 2, n, 64).bfloat16() for n in (tiles.layout.q_len, tiles.layout.kv_len,
                                                                   tiles.layout.kv_len))
    for dtype, want in ((torch.bfloat16, [1]), (torch.float32, [0])):
        model = export_model(tiles.eval(), tuple(t.to(dtype) for t in tensors), flavour="plugin")
        assert [n.op_type for n in model.graph.node if n.domain == "sparvar"] == ["CSLATileAttention"]
        assert marks(mark_aot(model, True)) == want and marks(mark_aot(model, False)) == [0]
    # q_rows of a tile the kernel lacks (12 slots; the node's own check refuses it too): the JIT implementation
    from onnx import numpy_helper

    graph = model.graph
    node = next(n for n in graph.node if n.domain == "sparvar")
    at = next(i for i, t in enumerate(graph.initializer) if t.name == node.input[3])
    twelve = numpy_helper.from_array(tiles.layout.q_rows[:, :12].numpy(), node.input[3])
    graph.initializer.pop(at)
    graph.initializer.insert(at, twelve)
    kept = [v for v in graph.value_info if v.name != node.input[3]]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    assert marks(mark_aot(model, True)) == [0]


def test_tensorrt_plans_are_tied_to_the_gpu_they_were_built_for(monkeypatch):
    """A TensorRT plan runs only on the GPU model it was built for: the build stage's cache key holds the GPU (an
    engine directory copied to another machine is rebuilt), and loading one built elsewhere names both GPUs."""
    import export.tensorrt as ttrt
    from export import stages
    from sparvar.engine import EngineError

    h100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    l4 = {"name": "NVIDIA L4", "compute_capability": "8.9"}
    ctx = type("Ctx", (), {"spec": type("Spec", (), {"backend": "tensorrt"})(), "versions": {"tensorrt": "10.9"}})()
    keys = []
    for gpu in (h100, l4):
        monkeypatch.setattr(ttrt, "gpu_identity", lambda gpu=gpu: gpu)
        keys.append(stages.stage_key_inputs("build", ctx))
        ttrt.check_built_for_this_gpu("eng", {"gpu": gpu})  # built here: loads
    assert [k["gpu"] for k in keys] == [h100, l4]
    with pytest.raises(EngineError, match=r"built for NVIDIA H100 80GB HBM3 \(compute capability 9.0\), and this "
                                          r"machine has NVIDIA L4 .*rebuild"):
        ttrt.check_built_for_this_gpu("eng", {"gpu": h100})
    with pytest.raises(EngineError, match="does not record the GPU"):
        ttrt.check_built_for_this_gpu("eng", {"plugin_api": "qdp"})
    monkeypatch.setattr(ttrt, "gpu_identity", lambda: None)
    with pytest.raises(EngineError, match="this machine has no GPU"):
        ttrt.check_built_for_this_gpu("eng", {"gpu": h100})


def test_plans_are_rebuilt_when_the_plugins_or_tensorrt_change(monkeypatch):
    """A plan bakes in the plugins' fields and tactics, and deserialises only with the TensorRT that built it: the build
    key follows PLUGIN_CODE_VERSION, and TensorRT's version is found without the `tensorrt` meta-package (tensorrt-cu12
    wheels) or any distribution (an apt install: the module's own __version__)."""
    import importlib.metadata as md
    import sys
    import types

    import export.tensorrt as ttrt
    import plugins.spec
    from export import stages
    from sparvar.engine import tool_versions

    monkeypatch.setattr(ttrt, "gpu_identity", lambda: {"name": "NVIDIA H100", "compute_capability": "9.0"})
    ctx = type("Ctx", (), {"spec": type("Spec", (), {"backend": "tensorrt"})(), "versions": {"tensorrt": "10.9"}})()
    before = stages.stage_key_inputs("build", ctx)
    monkeypatch.setattr(plugins.spec, "PLUGIN_CODE_VERSION", plugins.spec.PLUGIN_CODE_VERSION + 1)
    assert stages.stage_key_inputs("build", ctx) != before

    real = md.version

    def version(dist, wheels):
        if dist in wheels:
            return wheels[dist]
        if dist.startswith("tensorrt") and not dist.startswith("tensorrt-rtx"):
            raise md.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(md, "version", lambda dist: version(dist, {"tensorrt-cu12": "10.13.0"}))
    assert tool_versions()["tensorrt"] == "10.13.0"
    monkeypatch.setattr(md, "version", lambda dist: version(dist, {}))
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.9.0.34"))
    assert tool_versions()["tensorrt"] == "10.9.0.34"


class CslaOnly(torch.nn.Module):
    """CSLAAttention as the AOT kernel takes it: bf16, head dim 64, blocks of 16 x 32 queries x keys."""

    def __init__(self, lq: int, lk: int):
        super().__init__()
        from sparvar.csla import block_layout_from_mask

        mask = torch.rand(lq, lk, generator=torch.Generator().manual_seed(1)) < 0.2
        mask[:, 0] = True  # every query keeps a key
        self.layout = block_layout_from_mask(mask, 16, 32)

    def forward(self, q, k, v):
        from export.custom_ops import sparse_ops as custom_sparse_ops  # the ops that export as sparvar nodes

        return custom_sparse_ops().csla(q, k, v, self.layout)


class TilesOnly(torch.nn.Module):
    """CSLATileAttention over 4x4 query tiles of infinity-tiny's scale 6 (16 x 16 queries)."""

    def __init__(self):
        super().__init__()
        from sparvar.csla import csla_tile_layout
        from sparvar.schedule import get_schedule

        self.layout = csla_tile_layout(get_schedule(256, model="infinity-tiny"), 6, 3, (1, 3, 5), (4, 4))

    def forward(self, q, k, v):
        from export.custom_ops import sparse_ops as custom_sparse_ops

        return custom_sparse_ops().csla(q, k, v, self.layout)


@pytest.mark.gpu
def test_qdp_aot_engine_matches_the_reference(tensorrt):
    from export.tensorrt import build_engine, run_engine

    _requires_gpu()
    g = torch.Generator().manual_seed(0)
    tensors = tuple(torch.randn(1, 2, n, 64, generator=g).bfloat16() for n in (100, 200, 200))
    module = CslaOnly(100, 200).eval()
    model = export_model(module, tensors, flavour="plugin")
    report = build_engine(model, plugin_api="qdp", aot=True, weights="embed")
    got = run_engine(report.engine, dict(zip(("q", "k", "v"), (t.cuda() for t in tensors))))
    want = module(*(t.float() for t in tensors))  # the reference in fp32 on the same bf16 values
    torch.testing.assert_close(got[model.graph.output[0].name].cpu().float(), want, rtol=0, atol=2e-2)


@pytest.mark.gpu
def test_ipluginv3_engine_matches_the_reference(tensorrt):
    _requires_gpu()
    # one plugin API per process (QDP and IPluginV3 register the same names), so this runs in its own interpreter
    code = (
        "import torch\n"
        "from export.custom_ops import export_model\n"
        "from export.tensorrt import build_engine, run_engine\n"
        "from tests.test_custom_ops import OneOp, _inputs\n"
        "t = _inputs(); m = OneOp('CS4ADecide').eval(); model = export_model(m, t, flavour='plugin')\n"
        "r = build_engine(model, plugin_api='v3', weights='embed')\n"
        "got = run_engine(r.engine, {'q': t[0].cuda(), 'k': t[1].cuda(), 'v': t[2].cuda()}, plugin_api='v3')\n"
        "for o, w in zip(model.graph.output, m(*t)): torch.testing.assert_close(got[o.name].cpu(), w, rtol=0, atol=1e-5)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.gpu
def test_stripped_engine_is_small_and_refits_from_the_shared_weights(tensorrt, tmp_path):
    from export.tensorrt import build_engine, run_engine

    _requires_gpu()
    path, nbytes, (w1, w2) = weighty_graph(str(tmp_path))
    cache = str(tmp_path / "timing.cache")
    stripped = build_engine(path, weights="strip", timing_cache=cache)
    embedded = build_engine(path, weights="embed", timing_cache=cache)
    assert stripped.weights == "strip" and len(stripped.engine) < 0.25 * nbytes
    assert len(embedded.engine) >= nbytes  # the copy a per-scale engine would carry
    assert os.path.getsize(cache) > 0
    x = torch.randn(4, w1.shape[0])
    want = torch.relu(x @ torch.from_numpy(w1)) @ torch.from_numpy(w2)
    got = run_engine(stripped.engine, {"x": x.cuda()}, refit_from=path)["y"].cpu()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)  # TF32 matmuls allowed


@pytest.fixture(scope="module")
def tiny_trt_engine(tmp_path_factory):
    """infinity-tiny at 256 with SparVAR attention through `sparvar engine build --backend tensorrt` (a GPU and
    TensorRT needed: skipped otherwise)."""
    pytest.importorskip("tensorrt", reason="TensorRT not installed")
    _requires_gpu()
    from sparvar.engine import EngineSpec, build_engine as build_engine_dir

    path = str(tmp_path_factory.mktemp("trt") / "tiny")
    return path, build_engine_dir(EngineSpec(model="infinity-tiny", resolution=256, attention="sparvar",
                                             backend="tensorrt"), path, log=lambda *a, **k: None)


@pytest.mark.gpu
def test_engine_dir_units_are_stripped_share_one_timing_cache_and_load(tiny_trt_engine):
    from export.tensorrt import load_engine

    path, manifest = tiny_trt_engine
    info = manifest["stages"]["build"]["info"]["tensorrt"]
    assert os.path.getsize(os.path.join(path, "build", "timing.cache")) > 0
    for name, unit in info["units"].items():
        assert unit["weights"] == "stripped, refit from optimize/weights.bin"
        engine = load_engine(path, name)
        assert engine.num_io_tensors == len(manifest["units"][name]["inputs"]) + len(manifest["units"][name]["outputs"])


def assert_plans_run_as_onnxruntime(plans_dir: str, ort_dir: str) -> None:
    """The generation loop on a TensorRT (-RTX) engine directory against the onnxruntime engine of the same spec
    (infinity-tiny, 256, fp32): per-scale logits teacher forced with the same codes, then a whole generation through
    `load_engine_pipeline`. (TensorRT may run fp32 matmuls in TF32: hence the tolerance.)"""
    from sparvar.engine import read_manifest
    from sparvar.generate import Sampling
    from sparvar.runtime import OrtRunner, load_engine_pipeline
    from sparvar.schedule import get_schedule
    from sparvar.trt_runtime import TrtRunner
    from tests.test_engine import _features, teacher_forced_logits

    schedule = get_schedule(256)
    plans, ort = TrtRunner(plans_dir, read_manifest(plans_dir)), OrtRunner(ort_dir, read_manifest(ort_dir))
    for k, got, want in teacher_forced_logits(plans, ort, schedule):
        assert got.is_cuda and got.shape == want.shape
        torch.testing.assert_close(got.float().cpu(), want.float(), atol=2e-2, rtol=2e-2, msg=f"scale {k}")
    features, lengths = _features()
    result = load_engine_pipeline(plans_dir).generate(features, lengths, Sampling(cfg=3.0), seed=0)
    assert result.image.shape == (1, 3, 256, 256) and bool(result.image.isfinite().all())
    assert len(result.bits) == schedule.num_scales


@pytest.mark.gpu
def test_plans_run_the_generation_loop_as_onnxruntime_does(tiny_trt_engine, engines):
    assert_plans_run_as_onnxruntime(tiny_trt_engine[0], engines["sparvar"])


@pytest.mark.gpu
@pytest.mark.parametrize("tactic", list(Tactic))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_views_run_each_op_on_an_external_stream(dtype, tactic):
    """What enqueue/impl do with TensorRT's raw pointers: zero-copy views, the op on the given stream, copy-out."""
    _requires_gpu()
    # the Triton kernels' smallest head dim and CS4A group; the reference takes the small shapes of the ONNX tests
    head_dim, group = (64, 16) if tactic == Tactic.TRITON else (D, GROUP)
    dtype_name = str(dtype).removeprefix("torch.")
    if tactic not in available_tactics(dtype_name, head_dim, {"group_size": group}):
        pytest.skip(f"tactic {tactic.name} is not offered for {dtype_name} inputs (the Triton kernels take bf16/fp16)")
    q, k, v, key_idx, o_cache = (t.cuda() for t in _inputs(dtype, head_dim=head_dim, group=group))
    by_name = {"q": q, "k": k, "v": v, "key_idx": key_idx, "o_cache": o_cache}
    stream = torch.cuda.Stream()
    for name in ("CS4AAttentionCached", "CS4ADecide"):
        spec = SPECS[name]
        inputs = [by_name[p.name] for p in spec.inputs]
        attrs = {"group_size": group, "topk": 12, "sink_len": 4} if name == "CS4ADecide" else {"group_size": group}
        want = RUNS[name](inputs, attrs, sparse_ops(Tactic.REFERENCE))
        views = [torch_view(t.data_ptr(), tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in inputs]
        assert all(a.data_ptr() == b.data_ptr() and a.dtype == b.dtype for a, b in zip(views, inputs))
        outputs = [torch.full_like(w, -7) for w in want]
        out_views = [torch_view(t.data_ptr(), tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in outputs]
        run_on_stream(spec, RUNS[name], views, out_views, attrs, int(tactic), stream.cuda_stream)
        stream.synchronize()
        for got, ref in zip(outputs, want):
            if tactic == Tactic.REFERENCE:
                torch.testing.assert_close(got, ref, rtol=0, atol=0)
            elif got.is_floating_point():  # a kernel's accumulation order differs from the reference's
                torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
            else:  # selections: top-k ties may order differently only if scores tie; random inputs do not
                torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_triton_tactic_is_offered_only_for_inputs_the_kernels_take(monkeypatch):
    """TensorRT times every tactic a plugin offers: offering Triton for an fp32 graph or an unsupported head dim
    would fail the build, so those get the reference alone (as the GPU run of the test above showed)."""
    import sparvar.sparse
    from plugins import qdp

    monkeypatch.setattr(sparvar.sparse, "get_sparse_ops", lambda backend: None)  # as where the Triton backend exists
    both, reference = [Tactic.TRITON, Tactic.REFERENCE], [Tactic.REFERENCE]
    assert available_tactics("bfloat16", 128) == both and available_tactics("float16", 64) == both
    assert available_tactics() == both and available_tactics("bfloat16", -1) == both  # not known yet
    assert available_tactics("float32", 128) == reference
    assert available_tactics("bfloat16", 8) == reference
    assert available_tactics("bfloat16", 128, {"group_size": 192}) == both  # the 2B/8B policy's CS4A groups
    assert available_tactics("bfloat16", 128, {"group_size": 8}) == reference
    assert available_tactics("bfloat16", 128, {"block_m": 64, "block_n": 64}) == both
    assert available_tactics("bfloat16", 128, {"block_m": 64, "block_n": 8}) == reference

    class Desc:  # what tensorrt.plugin hands autotune: a numeric shape, -1 where dynamic (tensorrt.plugin.Shape)
        def __init__(self, head_dim):
            self.shape = (2, 16, -1, head_dim)

    class Trtp:
        @staticmethod
        def AutoTuneCombination(types, layout, tactics):
            return types.split(", ")[0], layout, tactics

    spec = SPECS["CSLAAttention"]
    for head_dim, half in ((128, both), (8, reference), (-1, both)):
        combos = qdp.autotune_combinations(Trtp, spec, Desc(head_dim), {"block_m": 64, "block_n": 64})
        assert combos == [("FP32", "LINEAR", [int(t) for t in reference]),
                          ("FP16|BF16", "LINEAR", [int(t) for t in half])], head_dim


def test_without_triton_only_the_reference_tactic_is_offered(monkeypatch):
    """CPU torch wheels bring no triton: the Triton backend then raises RuntimeError, and offering its tactic anyway
    failed every fp16 TensorRT-RTX build with SparVAR nodes ("negative number of custom tactics")."""
    import sparvar.kernels

    monkeypatch.setattr(sparvar.kernels, "HAS_TRITON", False)
    assert available_tactics("bfloat16", 128) == [Tactic.REFERENCE]
    assert available_tactics("float16", 64, {"group_size": 16}) == [Tactic.REFERENCE]


def test_aot_compile_checks_the_triton_abi_for_sm80():
    triton = pytest.importorskip("triton", reason="Triton not installed")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from plugins.aot import AotKernel, compile_aot, signature
    from plugins.spec import IntDims

    @triton.jit
    def scale_q(q, k, v, key_idx, n, out, BLOCK: tl.constexpr):  # TensorRT order: inputs, scalars, outputs
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + i, tl.load(q + i, mask=i < n) * 2, mask=i < n)

    spec = cs4a.SPEC
    kernel = AotKernel(scale_q, ("n",), {"BLOCK": 128}, num_warps=4, num_stages=1,
                       grid=lambda s, d: (d.cdiv(s["q"][0] * s["q"][1] * s["q"][2] * s["q"][3], 128), 1, 1),
                       scalars=lambda s, d: [s["q"][0] * s["q"][1] * s["q"][2] * s["q"][3]])
    dtypes = ["float16", "float16", "float16", "int32", "float16"]
    assert signature(spec, kernel, dtypes) == {"q": "*fp16", "k": "*fp16", "v": "*fp16", "key_idx": "*i32", "n": "i32",
                                               "out": "*fp16", "BLOCK": "constexpr"}
    compiled = compile_aot(spec, kernel, dtypes, target=GPUTarget("cuda", 80, 32))
    assert compiled.name == "scale_q" and compiled.threads == 128
    assert ".target sm_80" in compiled.ptx and f".entry {compiled.name}" in compiled.ptx
    sizes = {"q": [2, 2, 20, 8]}
    assert kernel.grid(sizes, IntDims()) == (5, 1, 1) and kernel.scalars(sizes, IntDims()) == [640]

    @triton.jit
    def wrong_order(q, k, v, n, key_idx, out, BLOCK: tl.constexpr):
        pass

    with pytest.raises(ValueError, match="scalars"):
        signature(spec, AotKernel(wrong_order, ("n",), {"BLOCK": 128}), dtypes)


def test_csla_plugin_keeps_the_triton_kernel_inside_the_keys_on_unordered_timing_layouts():
    """The Triton kernel masks only a row's last listed key block. A timing layout in range but out of order ([3, 0],
    the partial last block first) or with a block twice would read past K and V: the plugin counts a row's leading
    ascending blocks only. Run under Triton's interpreter, with NaN right after the keys and values."""
    from tests.triton_interpreter import run_interpreted

    out = run_interpreted("""
        import torch
        from plugins import csla
        from plugins.spec import Tactic, sparse_ops

        torch.manual_seed(0)
        B, H, Lq, Lk, D, bm, bn = 1, 2, 32, 100, 64, 16, 32  # 4 key blocks, the last one partial (100 % 32 = 4)

        def with_nan_after():
            flat = torch.full((B * H * Lk * D + bn * D,), float("nan"), dtype=torch.float16)
            flat[:B * H * Lk * D] = torch.randn(B * H * Lk * D).half()
            return flat[:B * H * Lk * D].view(B, H, Lk, D)

        q, k, v = torch.randn(B, H, Lq, D).half(), with_nan_after(), with_nan_after()
        nq = Lq // bm
        finite = []
        for row in ([0, 3], [3, 0], [3, 3], [1, 3]):
            idx = torch.tensor([row] * nq, dtype=torch.int32)
            (o,) = csla.run([q, k, v, torch.full((nq,), 2, dtype=torch.int32), idx], {"block_m": bm, "block_n": bn},
                            sparse_ops(Tactic.TRITON))
            finite.append(bool(torch.isfinite(o).all()))
        print("WORST", finite)
    """)
    assert out.split() == ["[True,", "True,", "True,", "True]"], out


def test_qdp_int_attributes_survive_tensorrt_plugins_rebuild_from_plugin_fields():
    """tensorrt.plugin's creator rebuilds each attribute from its plugin field, a 1-element array, by the function's
    annotation: `int(array([64]))` is an error since NumPy 2.4, so every op with an `int` attribute failed to parse
    and to load. Each registered function annotates them as int32 arrays, which the creator rebuilds by astype; this
    emulates that rebuild and runs the registered autotune on what it gives."""
    import inspect
    import typing

    from plugins import cs4a_decide, csla, csla_tiles

    registered: dict[str, dict] = {}

    def decorator(kind):
        def per_op(plugin_id):
            def keep(fn):
                registered.setdefault(plugin_id, {})[kind] = fn
                return fn
            return keep
        return per_op

    class Desc:
        def __init__(self, *shape):
            self.shape = shape

    fake = type("FakeTrtp", (), dict(TensorDesc=Desc, AutoTuneCombination=lambda *a: a, KernelLaunchParams=object,
                                     SymExprs=object, register=staticmethod(decorator("register")),
                                     autotune=staticmethod(decorator("autotune")), impl=staticmethod(decorator("impl")),
                                     aot_impl=staticmethod(decorator("aot_impl"))))
    for module in (csla, csla_tiles, cs4a, cs4a_decide):
        module.register_qdp(fake)
    assert sorted(pid.split("::")[1] for pid in registered) == sorted(SPECS)
    for plugin_id, functions in registered.items():
        spec = SPECS[plugin_id.split("::")[1]]
        assert set(functions) == {"register", "autotune", "impl", "aot_impl"}, plugin_id
        rebuilt = {}
        for kind, fn in functions.items():
            params = inspect.signature(fn).parameters
            for name in spec.attributes:
                annotation = params[name].annotation
                assert typing.get_origin(annotation) is np.ndarray, (plugin_id, kind, name, annotation)
                dtype = typing.get_args(typing.get_args(annotation)[1])[0]
                rebuilt[name] = np.array([16], dtype=np.int64).astype(dtype)  # what the creator hands over
        assert spec.parse_attrs(rebuilt) == {name: 16 for name in spec.attributes}
        inputs = [Desc(1, 2, 64, 64) for _ in spec.inputs]
        combinations = functions["autotune"](*inputs, **rebuilt, outputs=[])
        assert len(combinations) == 2 and all(c[1] == "LINEAR" for c in combinations), plugin_id
