"""The stages of `sparvar engine build`: export -> optimize -> build.

Each stage writes only into `<engine>/<stage>/` and returns a small info dict for the manifest.
`stage_key_inputs` lists everything a stage's output depends on; sparvar/engine.py hashes it into the key.
"""
from __future__ import annotations

import dataclasses
import contextlib
import io
import warnings
import inspect
import json
import os
from dataclasses import dataclass, field

import torch

from export.step import TEXT_LEN, DecodeUnit, StepUnit, TextUnit, decode_io, text_io

WEIGHTS_FILE = "weights.bin"  # one external-data file shared by every graph of the engine
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXPORT_CODE_VERSION = 5  # bump when the exported graphs change for the same inputs (2: per-block ada, text_bias, gathered CSLA body; 3: float32 RoPE positions; 4: CSLA windows per key scale, CS4A bands as the authors place them; 5: graphs cleaned by custom_ops.fold_and_clean, not onnxscript's rewrite rules)


@dataclass
class StageContext:
    spec: object  # sparvar.engine.EngineSpec
    out_dir: str
    versions: dict
    log: object = print
    info: dict = field(default_factory=dict)

    @property
    def cfg(self):
        from sparvar.config import get_config

        return get_config(self.spec.model)

    @property
    def schedule(self):
        from sparvar.schedule import get_schedule

        return get_schedule(self.spec.resolution, self.spec.aspect, model=self.spec.model)

    def policy(self):
        if self.spec.attention != "sparvar":
            return None
        from sparvar.sparse import default_policy

        return default_policy(self.spec.model, self.schedule, **self.spec.policy_overrides())


def weights_identity(spec) -> dict:
    """Digests of the weight files (or the random seed): an engine is rebuilt when its weights change."""
    from sparvar.checkpoint import check_checkpoint_file, checkpoint_digest
    from sparvar.engine import weight_files_of

    if spec.weights is None:
        return {"weights": f"random:{spec.seed}"}
    files = weight_files_of(spec.model, spec.weights)
    check_checkpoint_file(spec.vae)
    return {"weights": [checkpoint_digest(f) for f in files], "vae": checkpoint_digest(spec.vae)}


# The tools each stage's artefacts depend on (tool_versions' keys): a version in a key rebuilds its stage when it
# changes, so a stage holds only its own. torch-cuda writes no graph: its export and optimize depend on no ONNX tool.
GRAPH_TOOLS = ("torch", "onnx", "onnxscript", "onnx-ir")
BUILD_TOOLS = {"onnxruntime": ("onnxruntime",), "tensorrt": ("tensorrt", "triton", "torch"),  # QDP plugins run Triton
               "tensorrt-rtx": ("tensorrt-rtx-cu13-bindings", "triton", "torch"),  # IPluginV3 plugins, Triton kernels
               "torch-cuda": ("torch", "triton")}


def stage_key_inputs(stage: str, ctx: StageContext) -> dict:
    spec = ctx.spec
    graphs = spec.backend != "torch-cuda"
    if stage == "export":
        policy = ctx.policy()
        return {"config": dataclasses.asdict(ctx.cfg), "grids": ctx.schedule.grids, "rope_grid": ctx.schedule.rope_grid,
                "policy": policy.record() if policy else None, "dtype": spec.dtype, "batch": spec.batch,
                "opset": spec.opset, "code": EXPORT_CODE_VERSION, "backend_family": _graph_flavour(spec.backend),
                **weights_identity(spec), **{k: ctx.versions.get(k) for k in (GRAPH_TOOLS if graphs else ())}}
    if stage == "optimize":
        return {k: ctx.versions.get(k) for k in (("onnx", "onnxscript") if graphs else ())}
    if stage == "build":
        key = {"backend": spec.backend, **{k: ctx.versions.get(k) for k in BUILD_TOOLS[spec.backend]}}
        if spec.backend == "torch-cuda":  # 1: the stored SparVAR plan (before: only CSLA lists); 2: checkpoint record; 3: plan records its policy
            key["torch_cuda_plan"] = 3
        if spec.backend in ("tensorrt", "tensorrt-rtx"):
            from plugins.spec import PLUGIN_CODE_VERSION

            key["plugin_code"] = PLUGIN_CODE_VERSION
            key["trt_build_record"] = 2  # 2: the build info records plugin_code (checked at load)
        if spec.backend == "tensorrt":  # a plan runs only on the GPU model it was built for
            from export.tensorrt import gpu_identity

            key["gpu"] = gpu_identity()
        if spec.backend == "tensorrt-rtx":  # stripped for the local GPU or embedded for all targets: a different plan
            from export.trt_rtx import weights_plan

            weights, targets, _ = weights_plan()
            key["trt_rtx_plan"] = {"weights": weights, "compute_capabilities": list(targets)}
        return key
    raise ValueError(f"unknown stage {stage!r}")


def _graph_flavour(backend: str) -> str:
    # TensorRT-family engines take the custom SparVAR nodes without their reference bodies (plugins replace them);
    # torch-cuda exports no graph at all, so its export stage must never stand in for another backend's
    if backend == "torch-cuda":
        return "none"
    return "plugin" if backend in ("tensorrt", "tensorrt-rtx") else "reference"


def run_stage(stage: str, ctx: StageContext) -> dict:
    return {"export": run_export, "optimize": run_optimize, "build": run_build}[stage](ctx)


def refresh_skipped_info(stage: str, ctx: StageContext, info: dict) -> dict:
    """The info of a stage skipped as unchanged, with what depends on where the inputs are rather than on what they
    hold brought up to date: a torch-cuda build's checkpoint record names the spec's files by path and stat, and the
    keys hash their content, so checkpoints moved (or touched) since the last build keep the key but not the record.
    Kept as it was, the load check would look for the old paths. Cheap: the export key has hashed them already."""
    if "checkpoints" not in info:
        return info
    from sparvar.engine import checkpoint_record

    return {**info, "checkpoints": checkpoint_record(dataclasses.asdict(ctx.spec))}


def describe(ctx: StageContext) -> dict:
    policy = ctx.policy()
    return {"model_config": dataclasses.asdict(ctx.cfg), "schedule": [list(g) for g in ctx.schedule.grids],
            "policy": policy.record() if policy else None, "units": ctx.info.get("units", {}),
            "export_code": EXPORT_CODE_VERSION}  # the runtime refuses graphs another exporter wrote (stage keys hash it)


# ------------------------------------------------------------------------------------------------ export
def _load_model_and_decoder(ctx: StageContext):
    from sparvar.checkpoint import load_model
    from sparvar.model import build_model
    from sparvar.pipeline import build_decoder

    spec, cfg = ctx.spec, ctx.cfg
    dtype = DTYPES[spec.dtype]
    if getattr(cfg, "family", "infinity") == "hart":
        from export.hart_step import load_hart_model_and_vq

        return load_hart_model_and_vq(spec, cfg, dtype)
    model = (build_model(cfg, dtype=dtype, seed=spec.seed) if spec.weights is None
             else load_model(cfg, spec.weights, "cpu", dtype))
    decoder = build_decoder(cfg, spec.vae, "cpu", torch.float32)
    return model, decoder


def _export_unit(module, inputs, outputs, sample_args, shared, path: str, opset: int, flavour: str | None = None,
                 max_text_len: int = 512):
    """torch.onnx (dynamo) export of one unit; with SparVAR (`flavour` set) its attention becomes sparvar nodes."""
    text_len = torch.export.Dim("text_len", min=1, max=max_text_len)
    dynamic = tuple({i: text_len for i, d in enumerate(s.shape) if d == TEXT_LEN} or None for s in inputs)
    if any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(module.forward).parameters.values()):
        dynamic = (dynamic,)  # forward(*args): torch.export sees one tuple argument
    # the exporter narrates every pass on stdout and warns about internals: keep the build log to our stages
    from export.custom_ops import export_program

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = export_program(module, tuple(sample_args), flavour=flavour, opset=opset,
                                 input_names=[s.name for s in inputs], output_names=[s.name for s in outputs],
                                 dynamic_shapes=dynamic)
    shared.add_model(program.model, path)


def _sample(spec_list, named: dict, text_len: int):
    """Sample arguments in I/O order: known values by name, the rest zeros of the right shape and dtype."""
    out = []
    for s in spec_list:
        if s.name in named:
            out.append(named[s.name])
        else:
            out.append(torch.zeros(s.concrete(text_len), dtype=getattr(torch, s.dtype)))
    return out


def run_export(ctx: StageContext) -> dict:
    from export.weights import SharedWeights

    spec, cfg, schedule = ctx.spec, ctx.cfg, ctx.schedule
    out = os.path.join(ctx.out_dir, "export")
    os.makedirs(out, exist_ok=True)
    if spec.backend == "torch-cuda":  # runs the torch model itself: no graphs to export
        return {"units": {}}
    model, decoder = _load_model_and_decoder(ctx)
    plan, flavour = None, None
    if spec.attention == "sparvar":
        from export.custom_ops import export_plan

        flavour = _graph_flavour(spec.backend)
        plan = export_plan(ctx.policy(), schedule, cfg.depth, flavour=flavour)
    shared = SharedWeights(os.path.join(out, WEIGHTS_FILE))
    try:  # the file is closed whatever a unit's export raises (the stage's temp directory is removed after)
        units, extra = _export_units(ctx, model, decoder, plan, flavour, shared, out)
    finally:
        shared.close()
    return {"units": units, "shared_weights": shared.summary(), **extra}


def _export_units(ctx: StageContext, model, decoder, plan, flavour, shared, out: str) -> tuple[dict, dict]:
    """Export every unit of the model into `out`, its weights into `shared`: (units, extra build info)."""
    spec, cfg, schedule = ctx.spec, ctx.cfg, ctx.schedule
    dtype = DTYPES[spec.dtype]
    units = {}

    def export_and_share(name, module, inputs, outputs, args):
        _export_unit(module, inputs, outputs, args, shared, os.path.join(out, f"{name}.onnx"), spec.opset, flavour,
                     cfg.text_maxlen)
        units[name] = {"file": f"export/{name}.onnx", "inputs": [s.as_dict() for s in inputs],
                       "outputs": [s.as_dict() for s in outputs]}
        ctx.log(f"[engine]   exported {name}")

    if getattr(cfg, "family", "infinity") == "hart":  # static shapes, its own units (export/hart_step.py)
        from export.hart_step import export_hart_units

        return units, export_hart_units(model, decoder, schedule, spec.batch, export_and_share, out, plan)
    text_len = 4
    t_in, t_out = text_io(cfg, spec.batch, dtype)
    text_args = [torch.randn(spec.batch, text_len, cfg.text_dim), torch.full((spec.batch,), text_len)]
    export_and_share("text", TextUnit(model), t_in, t_out, text_args)
    with torch.no_grad():
        named = dict(zip((s.name for s in t_out), TextUnit(model)(*text_args)))
    for scale in range(schedule.num_scales):
        unit = StepUnit(model, schedule, scale, spec.batch, plan)
        export_and_share(f"step_{scale:02d}", unit, unit.inputs, unit.outputs, _sample(unit.inputs, named, text_len))
    d_in, d_out = decode_io(cfg, schedule, spec.batch)
    export_and_share("decode", DecodeUnit(decoder), d_in, d_out, _sample(d_in, {}, text_len))
    return units, {}


# ------------------------------------------------------------------------------------------------ optimize
def run_optimize(ctx: StageContext) -> dict:
    """Check every graph (onnx.checker with external data, shape inference) and record node counts."""
    import shutil

    import onnx

    src, dst = os.path.join(ctx.out_dir, "export"), os.path.join(ctx.out_dir, "optimize")
    os.makedirs(dst, exist_ok=True)
    counts = {}
    for name, unit in ctx.info["units"].items():
        path = os.path.join(ctx.out_dir, unit["file"])
        onnx.checker.check_model(path, full_check=False)
        graph = onnx.load(path, load_external_data=False)
        inferred = onnx.shape_inference.infer_shapes(graph, data_prop=True)
        ops: dict[str, int] = {}
        for node in inferred.graph.node:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            ops[key] = ops.get(key, 0) + 1
        onnx.save(inferred, os.path.join(dst, f"{name}.onnx"))
        counts[name] = {"nodes": len(inferred.graph.node), "ops": ops}
        ctx.log(f"[engine]   {name}: {len(inferred.graph.node)} nodes, custom: "
                f"{ {k: v for k, v in ops.items() if '::' in k} or 'none'}")
    if not ctx.info["units"]:
        return {"units": {}, "node_counts": {}}
    # graphs reference the shared weights by a path relative to themselves: a hard link keeps one copy on disk
    try:
        os.link(os.path.join(src, WEIGHTS_FILE), os.path.join(dst, WEIGHTS_FILE))
    except OSError:
        shutil.copyfile(os.path.join(src, WEIGHTS_FILE), os.path.join(dst, WEIGHTS_FILE))
    units = {n: {**u, "file": f"optimize/{n}.onnx"} for n, u in ctx.info["units"].items()}
    return {"units": units, "node_counts": counts}


# ------------------------------------------------------------------------------------------------ build
def check_backend_available(backend: str) -> None:
    """ImportError naming what to install, before any stage runs, for a backend whose builder is not importable here
    (the export alone takes minutes on the large models)."""
    if backend == "tensorrt":
        from export.tensorrt import gpu_identity
        from plugins.qdp import load_trtp

        load_trtp()  # engine directories build with the QDP plugins: TensorRT >= 10.6
        if gpu_identity() is None:
            raise ImportError("TensorRT builds a plan for the GPU it runs on, and this machine has no CUDA GPU")
    elif backend == "tensorrt-rtx":
        from export.trt_rtx import load_trt_rtx

        load_trt_rtx()


def run_build(ctx: StageContext) -> dict:
    backend = ctx.spec.backend
    out = os.path.join(ctx.out_dir, "build")
    os.makedirs(out, exist_ok=True)
    if backend == "onnxruntime":
        return _build_onnxruntime(ctx, out)
    if backend == "tensorrt-rtx":
        from export.trt_rtx import build_engine_dir

        return build_engine_dir(ctx, out)
    if backend == "tensorrt":
        from export.tensorrt import build_engine_dir

        return build_engine_dir(ctx, out)
    if backend == "torch-cuda":
        return _build_torch_cuda(ctx, out)
    raise ValueError(f"unknown backend {backend!r}")


def _build_onnxruntime(ctx: StageContext, out: str) -> dict:
    """Load every graph into an ONNX Runtime session (proves it runs here) and record the session settings."""
    import onnxruntime as ort

    settings = {"providers": ["CPUExecutionProvider"], "graph_optimization_level": "ORT_ENABLE_ALL"}
    for name, unit in ctx.info["units"].items():
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        ort.InferenceSession(os.path.join(ctx.out_dir, unit["file"]), opts, providers=settings["providers"])
    with open(os.path.join(out, "onnxruntime.json"), "w") as f:
        json.dump(settings, f, indent=2)
    return {"onnxruntime": settings}


def _build_torch_cuda(ctx: StageContext, out: str) -> dict:
    """The GPU engine's own artefact: the SparVAR plan's CSLA layouts and CS4A geometries, precomputed here and
    loaded by the runtime (sparvar.engine.load_engine_plan, by the path recorded relative to the engine directory),
    so that it runs exactly the layouts this build made. The weights come from the spec (checkpoint or seed) when the
    engine is loaded."""
    from sparvar.engine import checkpoint_record

    checkpoints = checkpoint_record(dataclasses.asdict(ctx.spec))  # what load checks the spec's files against
    if ctx.spec.attention != "sparvar":
        return {"torch_cuda": {"sparse_plan": None}, "checkpoints": checkpoints}
    from sparvar.pipeline import make_plan

    path = os.path.join(out, "sparse_plan.safetensors")
    names = make_plan(ctx.cfg, ctx.schedule, "sparvar", **ctx.spec.policy_overrides()).save(path)
    return {"torch_cuda": {"sparse_plan": os.path.relpath(path, ctx.out_dir), "tensors": names},
            "checkpoints": checkpoints}
