"""TensorRT-RTX engines with the sparvar plugins, built on any machine (no GPU needed) for chosen GPU generations.

TensorRT-RTX (PyPI tensorrt-rtx-cu13-libs / -bindings, import name tensorrt_rtx_bindings) shares TensorRT's
network API, ONNX parser and IPluginV3 Python plugin interfaces, and compiles for a list of compute capabilities
without a device. Its runtime supports SM 8.0, 8.6, 8.9 and 12.x (not the H100's 9.0), so here engines are built
and checked, never run; the plugins' enqueue (plugins/pluginv3.py) is what a supported GPU would execute.

    report = build_engine(onnx_model, compute_capabilities=("SM80", "SM89"))
    report.engine          # serialized engine bytes
    report.plugin_layers   # every sparvar node -> its plugin layer (checked, see export/trt_build.py)

Facts found while writing this (TensorRT-RTX 1.7.1.116):
  - Its ONNX parser prefers a registered plugin over a model-local function of the same name, but inlines the
    function when no plugin is registered - so the reference bodies are stripped before parsing (a missing
    plugin must be an error, not a silent fallback).
  - When it imports a plugin node it dlopen()s "libtensorrt_rtx.so", which the wheel ships only as
    "libtensorrt_rtx.so.1"; without the unversioned name the parse calls std::terminate. `load_trt_rtx` adds the
    link next to the library (the parser's RPATH is $ORIGIN).
  - The Python bindings have no INetworkDefinition.add_plugin_v3: plugins enter networks through the parser.
  - Without a GPU the runtime cannot deserialize an engine, so the engine inspector is unavailable here; the
    builder's verbose graph listing and the engine bytes are checked instead.
  - A weight-stripped plan (STRIP_PLAN + REFIT_IDENTICAL; export/trt_build.py) can only be built on a GPU that
    TensorRT-RTX runs on, for that one GPU: any refittable build (REFIT, REFIT_IDENTICAL, STRIP_PLAN, or marked
    weights with REFIT_INDIVIDUAL) JIT-compiles and loads kernels through the CUDA driver. Seen on 1.7.1.116:
    without libcuda.so.1 it fails in Myelin's graph_jit.cpp (CHECK(status == CUDA_SUCCESS)); on an H100 (driver
    580) it fails for SM80 with "CUDA error 222 loading a module", and for SM80+SM89 with
    CHECK(sm_vers_.size() == 1). Plain builds take a "legacy CPU-only mode" and work anywhere. So elsewhere
    `build_engine_dir` builds plans that embed their weights and records that in the manifest (`weights:
    embedded` and the reason).
  - Timing caches are no-ops in TensorRT-RTX since 1.2 (its bindings warn so), and reusing one ITimingCache for a
    second builder crashed 1.7.1 (SIGSEGV): the RTX builds keep no timing cache.
"""
from __future__ import annotations

import ctypes
import os

import onnx

from export.trt_build import (DYNAMIC_RANGE, WEIGHT_MODES, BuildReport, add_dynamic_profile, builder_plugin_nodes,
                              check_build, check_inspected, deserialize, engine_unit, inspect_engine, layer_type_counts,
                              make_logger, parse_onnx, plugin_layers, set_weights_mode, text_range, weights_record)
from plugins.spec import NAMESPACE

COMPUTE_CAPABILITIES = ("SM80", "SM89")  # A100/RTX 30xx and RTX 40xx/L40; the H100 (9.0) is not a TensorRT-RTX target


def load_trt_rtx():
    """Import tensorrt_rtx_bindings, making sure its ONNX parser can load the runtime library by its plain name."""
    try:
        import tensorrt_rtx_bindings as trt
        import tensorrt_rtx_libs
    except ImportError as e:
        raise ImportError("TensorRT-RTX is not installed: pip install tensorrt-rtx-cu13-libs==1.7.1.116 "
                          "tensorrt-rtx-cu13-bindings==1.7.1.116") from e
    libs = os.path.dirname(tensorrt_rtx_libs.__file__)
    link = os.path.join(libs, "libtensorrt_rtx.so")
    if os.path.exists(os.path.join(libs, "libtensorrt_rtx.so.1")) and not os.path.exists(link):
        try:
            os.symlink("libtensorrt_rtx.so.1", link)
        except FileExistsError:  # another process made it between our check and now
            pass
        except OSError as e:
            raise RuntimeError(f"TensorRT-RTX's ONNX parser needs {link}; create it with "
                               f"`ln -s libtensorrt_rtx.so.1 {link}` ({e})") from e
    return trt


RUNTIME_CAPABILITIES = {(8, 0): "SM80", (8, 6): "SM86", (8, 9): "SM89", (12, 0): "SM120", (12, 1): "SM121"}


def local_compute_capability() -> tuple[str | None, str]:
    """(this machine's GPU as a TensorRT-RTX target name, "") if TensorRT-RTX runs on it, else (None, why not)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None, "no CUDA driver (libcuda.so.1) on this machine"
    status = driver.cuInit(0)
    if status != 0:
        return None, f"the CUDA driver does not initialise here (cuInit returned {status})"
    device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if driver.cuDeviceGet(ctypes.byref(device), 0) != 0:
        return None, "no CUDA device on this machine"
    driver.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    driver.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # ..._MINOR
    name = RUNTIME_CAPABILITIES.get((major.value, minor.value))
    if name is None:
        return None, (f"its GPU (compute capability {major.value}.{minor.value}) is not one TensorRT-RTX runs on "
                      f"({', '.join(f'{a}.{b}' for a, b in RUNTIME_CAPABILITIES)})")
    return name, ""


def cannot_strip_weights(compute_capabilities=None) -> str | None:
    """Why this machine cannot build a weight-stripped TensorRT-RTX plan for `compute_capabilities` (None: for its
    own GPU), or None if it can: that needs a GPU TensorRT-RTX runs on, and the plan targets exactly that GPU."""
    local, why = local_compute_capability()
    if local is None:
        return why
    if compute_capabilities is not None and tuple(compute_capabilities) != (local,):
        return f"a stripped plan targets exactly this machine's GPU ({local}), not {list(compute_capabilities)}"
    return None


def _compute_capability(trt, name: str):
    members = trt.ComputeCapability.__members__
    if name not in members or name in ("NONE", "CURRENT"):
        raise ValueError(f"unknown compute capability {name!r}; TensorRT-RTX targets "
                         f"{[m for m in members if m.startswith('SM')]}")
    return members[name]


def build_engine(model: onnx.ModelProto | str, *, compute_capabilities=COMPUTE_CAPABILITIES,
                 dynamic_range=DYNAMIC_RANGE, weights: str | None = None, inspect: bool = False,
                 verbose: bool = False) -> BuildReport:
    """Parse `model` (a ModelProto or a path; external data is read next to the path), attach the sparvar plugins,
    build one engine for all `compute_capabilities`, and check that every sparvar node is one of our plugin layers.

    weights: "strip" (the plan holds no weights; refit at load, see `load_engine`), "embed", or None: "strip" where
    this machine can build a stripped plan for `compute_capabilities` (`cannot_strip_weights`), else "embed";
    `report.weights` says which.
    inspect=True also deserializes the engine and checks the engine inspector's layer list (needs a GPU that
    TensorRT-RTX supports; raises RuntimeError elsewhere).
    """
    from plugins import pluginv3

    if weights is None:
        weights = "embed" if cannot_strip_weights(compute_capabilities) else "strip"
    if weights not in WEIGHT_MODES:
        raise ValueError(f"unknown weights mode {weights!r}; expected one of {WEIGHT_MODES} or None")
    if weights == "strip" and (reason := cannot_strip_weights(compute_capabilities)):
        raise RuntimeError(f"TensorRT-RTX builds a weight-stripped plan only on a GPU it runs on, for that GPU alone "
                           f"({reason}); build with weights='embed' here")
    trt = load_trt_rtx()
    pluginv3.register_plugins(trt)
    first_error = len(pluginv3.ERRORS)
    path = model if isinstance(model, str) else None
    if path is not None:
        model = onnx.load(path, load_external_data=False)
    logger = make_logger(trt, echo_severity=trt.ILogger.Severity.VERBOSE if verbose else None)
    builder = trt.Builder(logger)
    network, parser, ready = parse_onnx(trt, builder, model, logger, path=path)
    layers = plugin_layers(trt, network, ready, plugin_classes=[pluginv3.plugin_classes(trt)[0]])

    config = builder.create_builder_config()
    config.num_compute_capabilities = len(compute_capabilities)
    for i, cc in enumerate(compute_capabilities):
        config.set_compute_capability(_compute_capability(trt, cc), i)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    set_weights_mode(trt, config, weights)
    add_dynamic_profile(builder, network, config, dynamic_range)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT-RTX failed to build the engine:\n  "
                           + "\n  ".join(pluginv3.ERRORS[first_error:] + logger.errors()))
    report = BuildReport(bytes(serialized), layers, builder_plugin_nodes(logger), layer_type_counts(trt, network),
                         weights=weights)
    check_build(report, sorted({info["op_type"] for info in layers.values()}) + ([NAMESPACE] if layers else []))
    if inspect:
        report.inspector = inspect_engine(trt, report.engine, logger)
        check_inspected(report.inspector, list(layers))
    return report


def weights_plan() -> tuple[str, tuple[str, ...], str]:
    """(weights mode, target compute capabilities, why not stripped or "") of a build on this machine: stripped
    plans for the local GPU where TensorRT-RTX runs on it, else plans for COMPUTE_CAPABILITIES with their weights.
    Part of the build stage's cache key: the same ONNX builds different plans on different machines."""
    local, reason = local_compute_capability()
    if local:
        return "strip", (local,), ""
    return "embed", COMPUTE_CAPABILITIES, f"TensorRT-RTX builds weight-stripped plans only on a GPU it runs on: {reason}"


def check_plans_run_here(engine_dir: str, build_info: dict) -> None:
    """For weight-stripped plans, which target exactly the GPU of their build: EngineError naming both GPUs where this
    machine's differs, instead of TensorRT-RTX's deserialisation log. (Embedded plans name their targets; TensorRT-RTX
    itself says whether one runs here.)"""
    from sparvar.engine import EngineError

    if build_info.get("weights") != "strip":
        return
    local, reason = local_compute_capability()
    targets = build_info.get("compute_capabilities", [])
    if local is None:
        raise EngineError(f"{engine_dir}: its plans were built for {', '.join(targets)}, and {reason}; rebuild the "
                          "engine where it runs")
    if local not in targets:
        raise EngineError(f"{engine_dir}: its plans were built for {', '.join(targets)}, and this machine's GPU is "
                          f"{local}; rebuild the engine here")


def build_engine_dir(ctx, out: str) -> dict:
    """The `build` stage for backend tensorrt-rtx: one engine per exported unit.

    On a GPU TensorRT-RTX runs on: weight-stripped plans for that GPU, every unit refit at load from the one shared
    weights file. Elsewhere (this project's CPU machines, the H100): plans for COMPUTE_CAPABILITIES that embed their
    weights; the manifest says so and why.
    """
    dynamic_range = text_range(ctx.cfg.text_maxlen)
    weights, targets, reason = weights_plan()
    if reason:
        ctx.log(f"[engine]   weights embedded in every plan ({reason})")
    units = {}
    for name, unit in ctx.info["units"].items():
        onnx_path = os.path.join(ctx.out_dir, unit["file"])
        report = build_engine(onnx_path, compute_capabilities=targets, dynamic_range=dynamic_range, weights=weights)
        engine_file = f"{name}.engine"
        with open(os.path.join(out, engine_file), "wb") as f:
            f.write(report.engine)
        units[name] = {"engine": f"build/{engine_file}", **weights_record(onnx_path, ctx.out_dir, weights),
                       **report.summary()}
        ctx.log(f"[engine]   {name}: {len(report.engine) / 2**20:.1f} MiB, {len(report.plugin_layers)} sparvar plugin "
                f"layers, weights {units[name]['weights']}")
    from plugins.spec import PLUGIN_CODE_VERSION

    return {"tensorrt_rtx": {"plugin_code": PLUGIN_CODE_VERSION,
                             "compute_capabilities": list(targets), "dynamic_range": list(dynamic_range),
                             "weights": weights, "weights_note": reason or None,
                             "timing_cache": "none (timing caches are no-ops in TensorRT-RTX >= 1.2)", "units": units}}


def load_engine(engine_dir: str, unit: str, manifest: dict | None = None):
    """The ICudaEngine of one unit of a tensorrt-rtx engine directory, weights refit from the directory's shared
    weights where the plan was stripped. Needs a GPU that TensorRT-RTX runs on (SM 8.0, 8.6, 8.9, 12.x). The
    directory is checked first (trt_build.checked_manifest; pass its `manifest` to load several units on one check)."""
    from plugins import pluginv3

    paths = engine_unit(engine_dir, unit, "tensorrt-rtx", manifest)
    check_plans_run_here(engine_dir, paths["info"])
    trt = load_trt_rtx()
    pluginv3.register_plugins(trt)  # Python plugins are not serialized: deserialization looks the creators up
    with open(paths["engine"], "rb") as f:
        plan = f.read()
    return deserialize(trt, plan, make_logger(trt), refit_from=paths["refit_onnx"])
