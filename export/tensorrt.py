"""TensorRT (>= 10.6) engines with the sparvar plugins: build on the GPU that will run them, inspect, run.

TensorRT is not installable in this project's environments (its PyPI wheels download from a vendor index that
cannot be reached), so nothing here has run yet; every path is written against the documented API and tested by
tests/test_tensorrt.py where TensorRT exists.

Plugin APIs (one per process; both under the `sparvar` namespace):
  "qdp" (default): tensorrt.plugin definitions from plugins/<op>.py - JIT impl, or AOT PTX with aot=True;
  "v3":            the IPluginV3 classes of plugins/pluginv3.py (also what TensorRT-RTX uses).

Engine directories hold weight-stripped plans (STRIP_PLAN + REFIT_IDENTICAL, export/trt_build.py): `load_engine`
refits each unit from the directory's one shared weights file. One timing cache (build/timing.cache) is shared
by the builds of all units, so layers the units have in common are timed once.
"""
from __future__ import annotations

import os

import onnx

from export.custom_ops import custom_nodes
from export.trt_build import (DYNAMIC_RANGE, BuildReport, add_dynamic_profile, builder_plugin_nodes, check_inspected,
                              deserialize, engine_unit, inspect_engine, layer_type_counts, make_logger, parse_onnx,
                              plugin_layers, set_weights_mode, text_range, weights_record)

PLUGIN_APIS = ("qdp", "v3")


def load_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError("TensorRT not installed (`import tensorrt` failed)") from e
    return trt


def register(plugin_api: str):
    """Register the sparvar plugins with TensorRT's registry through `plugin_api`; returns the plugin classes to
    expect in layers (None for QDP, whose classes belong to tensorrt.plugin)."""
    trt = load_tensorrt()
    if plugin_api == "qdp":
        from plugins.qdp import register_qdp_plugins

        register_qdp_plugins()
        return None
    if plugin_api == "v3":
        from plugins.pluginv3 import plugin_classes, register_plugins

        register_plugins(trt)
        return [plugin_classes(trt)[0]]
    raise ValueError(f"unknown plugin API {plugin_api!r}; expected one of {PLUGIN_APIS}")


def mark_aot(model: onnx.ModelProto, aot: bool) -> onnx.ModelProto:
    """Set the QDP `aot` attribute of every sparvar node: 1 where `aot` is asked for and the AOT kernel takes the node
    (its op in sparvar.kernels.aot.AOT_OPS; q bf16/fp16 with a head dim and tiles the kernel has), else 0: the JIT
    implementation, which takes everything. The ONNX parser turns it into a strict request for that implementation,
    so asking an AOT kernel for a node it refuses failed the whole build inside TensorRT. Every op defines both, and
    a node without the attribute makes TensorRT (>= 10.9) refuse to choose: its plugin creator raises "has both AOT
    and JIT implementations" unless the network says which it prefers."""
    from sparvar.kernels.aot import AOT_OPS

    value_types = _value_types(model) if aot else {}
    for node in custom_nodes(model):
        kept = [a for a in node.attribute if a.name != "aot"]
        use = aot and node.op_type in AOT_OPS and _aot_takes(node, value_types)
        del node.attribute[:]
        node.attribute.extend(kept + [onnx.helper.make_attribute("aot", int(use))])
    return model


def _value_types(model: onnx.ModelProto) -> dict[str, tuple[int, tuple]]:
    """name -> (ONNX element type, shape with None where unknown) of the graph's initializers and of the values that
    shape inference types."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    out = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        t = value.type.tensor_type
        if t.elem_type:
            out[value.name] = (t.elem_type, tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim))
    for init in graph.initializer:  # constants (the layouts' index tensors): their own dims, whatever value_info says
        out[init.name] = (init.data_type, tuple(init.dims))
    return out


def _aot_takes(node: onnx.NodeProto, value_types: dict) -> bool:
    """Whether the op's AOT kernel takes this node (unknown q type: assumed so, as every exported bf16/fp16 graph).
    CSLAAttention's tile is in its attributes; CSLATileAttention's is q_rows' second dim, which must be known (a
    constant of the graph, as in every exported step) and one the kernel has."""
    from sparvar.kernels.csla import HEAD_DIMS, TILE_SIZES

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "CSLATileAttention":
        q_rows = value_types.get(node.input[3])
        if q_rows is None or len(q_rows[1]) != 2 or q_rows[1][1] not in TILE_SIZES:
            return False
    elif attrs.get("block_m") not in TILE_SIZES or attrs.get("block_n") not in TILE_SIZES:
        return False
    q_type = value_types.get(node.input[0])
    if q_type is None:
        return True
    elem, shape = q_type
    head_dim = shape[-1] if shape else None
    return (elem in (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16)
            and (head_dim is None or head_dim in HEAD_DIMS))


def build_engine(model: onnx.ModelProto | str, *, plugin_api: str = "qdp", aot: bool = False, weights: str = "strip",
                 inspect: bool = True, dynamic_range=DYNAMIC_RANGE, timing_cache: str | None = None) -> BuildReport:
    """Parse, check plugin layers, build (strongly typed: dtypes come from the graph), inspect the engine.

    weights: "strip" (the plan holds no weights: refit before running, `run_engine(refit_from=...)`) or "embed".
    timing_cache: a file to read the timing cache from (if it exists) and write it back to, extended by this build.
    """
    trt = load_tensorrt()
    if aot and plugin_api != "qdp":
        raise ValueError("aot=True needs plugin_api='qdp' (AOT kernels are a tensorrt.plugin feature)")
    classes = register(plugin_api)
    path = model if isinstance(model, str) else None
    if path is not None:
        model = onnx.load(path, load_external_data=False)
    model = mark_aot(model, aot) if plugin_api == "qdp" else model
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network, parser, ready = parse_onnx(trt, builder, model, logger, network_flags=flags, path=path)
    layers = plugin_layers(trt, network, ready, plugin_classes=classes)
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    set_weights_mode(trt, config, weights)
    cache = None
    if timing_cache is not None:
        known = b""
        if os.path.exists(timing_cache):
            with open(timing_cache, "rb") as f:
                known = f.read()
        cache = config.create_timing_cache(known)
        if not config.set_timing_cache(cache, False):  # False: a cache from another device/version is an error
            raise RuntimeError(f"TensorRT refused the timing cache {timing_cache}: " + "; ".join(logger.errors()))
    add_dynamic_profile(builder, network, config, dynamic_range)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine:\n  " + "\n  ".join(logger.errors()))
    if cache is not None:
        tmp = f"{timing_cache}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(bytes(cache.serialize()))
        os.replace(tmp, timing_cache)
    report = BuildReport(bytes(serialized), layers, builder_plugin_nodes(logger), layer_type_counts(trt, network),
                         weights=weights)
    if inspect:
        report.inspector = inspect_engine(trt, report.engine, logger)
        check_inspected(report.inspector, list(layers))
    return report


def run_engine(engine_bytes: bytes, feeds: dict, plugin_api: str = "qdp", refit_from: str | None = None) -> dict:
    """Run a built engine once on CUDA torch tensors `feeds` (name -> tensor); returns name -> output tensor.

    refit_from: the ONNX file (external data beside it) a weight-stripped engine takes its weights from.
    """
    trt = load_tensorrt()
    register(plugin_api)  # deserialization looks the plugin creators up
    logger = make_logger(trt)
    return run_loaded(deserialize(trt, engine_bytes, logger, refit_from=refit_from), feeds, logger)


def run_loaded(engine, feeds: dict, logger=None) -> dict:
    """Run a deserialized (and, if stripped, refit) engine once on CUDA torch tensors `feeds`; waits for it. The
    binding is the generation runner's (sparvar.trt_runtime.TrtUnit)."""
    import torch

    from sparvar.trt_runtime import TrtUnit

    try:
        outputs = TrtUnit(load_tensorrt(), engine, "engine")(feeds)
    except Exception as e:
        if logger is not None and logger.errors():
            raise RuntimeError(f"{e}: " + "; ".join(logger.errors())) from e
        raise
    torch.cuda.current_stream().synchronize()
    return outputs


def gpu_identity() -> dict | None:
    """This machine's CUDA GPU (device 0) as {"name", "compute_capability"}, None without one. A TensorRT plan runs
    only on the GPU model it was built for: part of the build stage's cache key, and checked at load."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def check_built_for_this_gpu(engine_dir: str, build_info: dict) -> None:
    """EngineError naming both GPUs if the directory's plans were built for another GPU than this machine's."""
    from sparvar.engine import EngineError

    here = gpu_identity()
    if "gpu" not in build_info:
        raise EngineError(f"{engine_dir}: its build does not record the GPU its TensorRT plans were built for (an "
                          "older sparvar); rebuild the engine here (sparvar engine build)")
    built = build_info["gpu"]
    if built != here:
        def describe(gpu):
            return "no GPU" if gpu is None else f"{gpu['name']} (compute capability {gpu['compute_capability']})"

        raise EngineError(f"{engine_dir}: its TensorRT plans were built for {describe(built)}, and this machine has "
                          f"{describe(here)}; rebuild the engine here (sparvar engine build)")


def build_engine_dir(ctx, out: str) -> dict:
    """The `build` stage for backend tensorrt: one weight-stripped engine per exported unit, for this machine's GPU,
    all refit at load from the directory's shared weights; one timing cache across the units (build/timing.cache)."""
    dynamic_range = text_range(ctx.cfg.text_maxlen)
    cache = os.path.join(out, "timing.cache")
    units = {}
    for name, unit in ctx.info["units"].items():
        onnx_path = os.path.join(ctx.out_dir, unit["file"])
        report = build_engine(onnx_path, dynamic_range=dynamic_range, weights="strip", timing_cache=cache)
        engine_file = f"{name}.engine"
        with open(os.path.join(out, engine_file), "wb") as f:
            f.write(report.engine)
        units[name] = {"engine": f"build/{engine_file}", **weights_record(onnx_path, ctx.out_dir, "strip"),
                       **report.summary()}
        ctx.log(f"[engine]   {name}: {len(report.engine) / 2**20:.1f} MiB, {len(report.plugin_layers)} sparvar plugin "
                f"layers, weights {units[name]['weights']}")
    from plugins.spec import PLUGIN_CODE_VERSION

    return {"tensorrt": {"plugin_code": PLUGIN_CODE_VERSION, "plugin_api": "qdp", "weights": "strip",
                         "timing_cache": "build/timing.cache",
                         "gpu": gpu_identity(), "units": units}}


def load_engine(engine_dir: str, unit: str, plugin_api: str = "qdp", manifest: dict | None = None):
    """The ICudaEngine of one unit of a tensorrt engine directory, its weights refit from the directory's shared
    weights file (the plans are stripped). `plugin_api` must be the one the directory was built with. The directory
    is checked first (trt_build.checked_manifest; pass its `manifest` to load several units on one check)."""
    paths = engine_unit(engine_dir, unit, "tensorrt", manifest)
    built_with = paths["info"]["plugin_api"]
    if plugin_api != built_with:
        raise ValueError(f"{engine_dir} was built with plugin API {built_with!r}, not {plugin_api!r}")
    check_built_for_this_gpu(engine_dir, paths["info"])
    trt = load_tensorrt()
    register(plugin_api)  # deserialization looks the plugin creators up
    with open(paths["engine"], "rb") as f:
        plan = f.read()
    return deserialize(trt, plan, make_logger(trt), refit_from=paths["refit_onnx"])
