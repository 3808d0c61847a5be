"""Running built engines: the runners that the generation loop (sparvar/generate.py) drives.

`load_engine_pipeline(dir)` checks the manifest (format, files, compatibility) and returns a Pipeline whose
runner executes the engine's graphs; sampling, CFG, code accumulation and resampling stay in the one loop.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

from .engine import (EngineError, EngineSpec, build_engine, check_checkpoints, check_compatible, check_model_config,
                     check_spec_values, engine_info, load_engine_plan, read_manifest, stage_info, verify_files)
from .generate import check_text_lengths

_NP = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64, "bool": np.bool_}


_FLOAT16 = {10, 16}  # onnx TensorProto FLOAT16, BFLOAT16: the CPU kernels run them in fp32 (2x the bytes)


class GraphInfo:
    """What the runtime needs from one engine graph without loading its weights: its inputs and the external
    weights it uses (checked against the files, so a missing or truncated weights.bin is a clear error)."""

    def __init__(self, path: str):
        import onnx

        graph = onnx.load(path, load_external_data=False).graph
        initializers = {t.name for t in graph.initializer}
        self.path = path
        self.inputs = {i.name for i in graph.input} - initializers  # the exporter drops unused inputs
        base, needed, tensors, weight_bytes = os.path.dirname(path), {}, set(), 0
        for t in graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            location = os.path.normpath(os.path.join(base, info["location"]))
            offset, length = int(info.get("offset", 0)), int(info["length"])
            needed[location] = max(needed.get(location, 0), offset + length)
            if (location, offset, length) not in tensors:
                tensors.add((location, offset, length))
                weight_bytes += length * (2 if t.data_type in _FLOAT16 else 1)
        for location, end in needed.items():
            if not os.path.isfile(location):
                raise EngineError(f"{path}: its weights file {location} is missing; rebuild the engine")
            size = os.path.getsize(location)
            if size < end:
                raise EngineError(f"{path}: its weights file {location} has {size} bytes, the graph reads up to byte "
                                  f"{end} (truncated or from another build); rebuild the engine")
        # a session's own weight memory: onnxruntime converts fp16 weights to fp32 and pre-packs MatMul/Gemm weights,
        # per session (3.6 GiB for a HART-0.7b step graph of 1.3 GiB of fp16 weights: 1.4x the fp32 bytes)
        self.session_bytes = int(1.5 * weight_bytes) + (16 << 20)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


class SessionPool:
    """The ONNX Runtime sessions of this process, opened when their graph first runs and closed least recently used
    first when the memory they hold would pass `budget` bytes (default: half the memory available at the first use).

    One session per graph cannot share weights with the others on the CPU execution provider: each converts its fp16
    weights to fp32 and pre-packs its MatMul/Gemm weights into memory of its own, and the Python API has no shared
    pre-packed weights container (disabling pre-packing changes the results' bits; handing every session the same
    weights buffer with `add_external_initializers` saves nothing — measured, bench/results/engine_memory_cpu.json).
    Opening all 13-33 graphs of an engine at once held (weights x graphs); the pool holds what fits. Graphs that run
    once per image (the scale steps) cost their session creation once per image either way.
    """

    def __init__(self, budget: int | None = None):
        self.budget = budget
        self.sessions: dict = {}  # key -> (session, bytes), least recently used first
        self.graphs: dict = {}  # key -> GraphInfo
        self.opened = 0  # sessions created, for tests and diagnostics

    @staticmethod
    def _key(path: str):
        # a rebuilt graph at the same path is another graph; so is one whose shared weights file was rewritten
        from export.stages import WEIGHTS_FILE

        stats = [os.stat(p) for p in (path, os.path.join(os.path.dirname(path), WEIGHTS_FILE)) if os.path.exists(p)]
        return os.path.realpath(path), *((st.st_ino, st.st_mtime_ns, st.st_size) for st in stats)

    def graph(self, path: str) -> tuple:
        if not os.path.isfile(path):
            raise EngineError(f"engine graph {path} is missing; rebuild the engine")
        key = self._key(path)
        if key not in self.graphs:
            self.graphs[key] = GraphInfo(path)
        return key, self.graphs[key]

    def held_bytes(self) -> int:
        return sum(b for _, b in self.sessions.values())

    def session(self, key):
        import onnxruntime as ort

        if key in self.sessions:
            self.sessions[key] = self.sessions.pop(key)  # most recently used
            return self.sessions[key][0]
        if self.budget is None:
            self.budget = _available_memory() // 2
        info = self.graphs[key]
        if self._key(info.path) != key:  # sessions reopen lazily: never from a graph rebuilt since the engine loaded
            raise EngineError(f"{info.path} changed on disk since its engine was loaded; load the engine again")
        while self.sessions and self.held_bytes() + info.session_bytes > self.budget:
            del self.sessions[next(iter(self.sessions))]  # close the least recently used
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # no arena: an idle session would keep its largest run's activations (GBs at a 1024² last scale) for good
        opts.enable_cpu_mem_arena = False
        session = ort.InferenceSession(info.path, opts, providers=["CPUExecutionProvider"])
        self.sessions[key] = (session, info.session_bytes)
        self.opened += 1
        return session


SESSIONS = SessionPool()  # the process's pool: every engine unit (Infinity and HART) runs through it


class OrtUnit:
    """One exported unit run by ONNX Runtime, fed and read by I/O name; its session comes from the pool."""

    def __init__(self, engine_dir: str, unit: dict, pool: SessionPool | None = None):
        self.pool = pool or SESSIONS
        self.key, info = self.pool.graph(os.path.join(engine_dir, unit["file"]))
        self.inputs = [s["name"] for s in unit["inputs"]]
        self.outputs = [s["name"] for s in unit["outputs"]]
        self.dtypes = {s["name"]: s["dtype"] for s in unit["inputs"]}
        self.graph_inputs = info.inputs

    @property
    def session(self):
        return self.pool.session(self.key)

    def __call__(self, values: dict) -> dict:
        feed = {}
        for name in self.inputs:
            if name not in self.graph_inputs:
                continue
            if name not in values:
                raise EngineError(f"engine input {name!r} was not produced by an earlier unit")
            feed[name] = np.ascontiguousarray(values[name], dtype=_NP[self.dtypes[name]])
        return dict(zip(self.outputs, self.session.run(self.outputs, feed)))


def check_engine_request(manifest: dict, prompts: int, guided: bool) -> None:
    """What an engine runs per generation, from its (checked) manifest, or an EngineError: exported graphs
    (onnxruntime, TensorRT, TensorRT-RTX) have a static batch (spec.batch prompts; Infinity's with the CFG rows, so
    guided only). torch-cuda engines capture graphs for any batch, guided or not. The runners ask at each generation
    (`serve` answers a client with the message: it names no path), `sparvar generate` before the engine loads (its
    files hash for minutes at 8B)."""
    spec = manifest["spec"]
    if spec["backend"] == "torch-cuda":
        return
    if prompts != spec["batch"]:
        raise EngineError(f"the engine was built for {spec['batch']} prompt(s) per generation, got {prompts}: give "
                          f"{spec['batch']} prompts, or build an engine with --batch {prompts}")
    if not guided and manifest["model_config"].get("family", "infinity") == "infinity":
        raise EngineError(f"Infinity {spec['backend']} engines are built with classifier-free guidance (cond + uncond "
                          "batch); use cfg != 1, or a torch-cuda engine")


def engine_unit(engine_dir: str, manifest: dict, name: str) -> OrtUnit:
    """The exported graph `name` of an onnxruntime engine, or an EngineError: a manifest without it (or with a
    record missing its file and I/O lists) failed as a KeyError when the runner was made."""
    units = stage_info(engine_dir, manifest, "optimize", "units")
    unit = units.get(name) if isinstance(units, dict) else None
    if not (isinstance(unit, dict) and isinstance(unit.get("file"), str)
            and all(isinstance(unit.get(io), list) and all(isinstance(t, dict) and {"name", "dtype"} <= t.keys()
                                                           for t in unit[io]) for io in ("inputs", "outputs"))):
        raise EngineError(f"{engine_dir} has no usable '{name}' graph in its manifest: incomplete, or an engine of "
                          f"another model family or sparvar; rebuild it")
    return OrtUnit(engine_dir, unit)


class OrtIO:
    """How the ONNX Runtime runners load units and pass values: numpy arrays on the CPU. The generation protocol
    (UnitRunner, UnitDecoder) is the same for every exported engine; sparvar.trt_runtime.TrtIO runs it on TensorRT
    plans with CUDA tensors."""

    device = torch.device("cpu")

    def load_unit(self, engine_dir: str, manifest: dict, name: str):
        return engine_unit(engine_dir, manifest, name)

    def array(self, t: torch.Tensor):
        """A torch tensor as this runner's units take it."""
        return t.numpy()

    @staticmethod
    def grow(past, new):
        """The next scale's past K/V: this past + this scale's, along the tokens of (batch, heads, tokens, dim)."""
        return np.concatenate([past, new], axis=2)

    def tensor(self, a) -> torch.Tensor:
        """A unit's output as the generation loop takes it."""
        return torch.from_numpy(a)


class UnitRunner:
    """Runs text + per-scale step units; keeps the KV cache and CS4A state as named values between scales. The units
    and values are those of the I/O mixin it is combined with (OrtIO, sparvar.trt_runtime.TrtIO)."""

    def __init__(self, engine_dir: str, manifest: dict):
        self.text = self.load_unit(engine_dir, manifest, "text")
        self.steps = [self.load_unit(engine_dir, manifest, f"step_{k:02d}") for k in range(len(manifest["schedule"]))]
        self.manifest = manifest
        self.depth = manifest["model_config"]["depth"]
        self.text_maxlen, self.text_dim = manifest["model_config"]["text_maxlen"], manifest["model_config"]["text_dim"]
        self.batch = manifest["spec"]["batch"]

    def begin(self, features, lengths, guided: bool):
        check_engine_request(self.manifest, features.shape[0], guided)
        # the model's own checks did not survive the export (a dynamic text length is declared up to the maximum)
        B, L, D = features.shape
        if L > self.text_maxlen or D != self.text_dim:
            raise EngineError(f"text features {tuple(features.shape)}: this engine takes (B, L <= {self.text_maxlen}, "
                              f"{self.text_dim})")
        try:
            check_text_lengths(features, lengths)
        except ValueError as e:
            raise EngineError(str(e)) from None
        self.values = self.text({"text_features": self.array(features), "text_lengths": self.array(lengths)})

    def step(self, scale: int, codes):
        if codes is not None:
            self.values["codes"] = self.array(codes.float())
        out = self.steps[scale](self.values)
        for i in range(self.depth):  # grow the cache: the next scale's past = this past + this scale's K/V
            for kv in ("k", "v"):
                new = out.pop(f"new_{kv}.{i}")
                past = self.values.get(f"past_{kv}.{i}")
                self.values[f"past_{kv}.{i}"] = new if past is None else self.grow(past, new)
        logits = self.tensor(out.pop("logits"))
        self.values.update(out)  # CS4A selections and residual caches of the decision scale
        return logits


class UnitDecoder:
    """The exported tokenizer decoder, its unit and values those of the I/O mixin it is combined with."""

    def __init__(self, engine_dir: str, manifest: dict, cfg):
        from . import vae as vae_lib

        self.unit = self.load_unit(engine_dir, manifest, "decode")
        self.codebook_dim = cfg.vae.codebook_dim
        self.patchify = cfg.vae.spatial_patchify
        self._bits_to_codes = vae_lib.bits_to_codes

    def bits_to_codes(self, bits):
        return self._bits_to_codes(bits, self.codebook_dim)

    def decode(self, latent):
        return self.tensor(self.unit({"latent": self.array(latent.float())})["image"])


class OrtRunner(OrtIO, UnitRunner):
    """An onnxruntime engine's text and step graphs."""


class OrtDecoder(OrtIO, UnitDecoder):
    """An onnxruntime engine's decoder graph."""


def check_engine_code(engine_dir: str, manifest: dict):
    """The engine against this sparvar: a model and schedule it knows, graphs of its exporter, traced from its
    architecture with its SparVAR policy. EngineError naming the first difference (a stale or foreign engine); returns (cfg, schedule)."""
    from export.stages import EXPORT_CODE_VERSION

    from .config import get_config
    from .schedule import get_schedule
    from .sparse import default_policy, policy_changes

    spec = manifest["spec"]
    try:
        cfg = get_config(spec["model"])
        schedule = get_schedule(spec["resolution"], spec["aspect"], model=spec["model"])
    except ValueError as e:
        raise EngineError(f"{engine_dir} was built for something this sparvar does not know ({e}); rebuild it") from None
    if manifest.get("export_code") != EXPORT_CODE_VERSION:  # the graphs' inputs and outputs are this exporter's
        raise EngineError(f"{engine_dir} was exported by another sparvar (export code {manifest.get('export_code')}, "
                          f"this sparvar runs {EXPORT_CODE_VERSION}); rebuild the engine")
    spec_values = check_spec_values(engine_dir, manifest)  # what a build accepts (read_manifest checked the kinds of values)
    check_model_config(engine_dir, manifest, cfg)  # traced from this architecture
    if [list(g) for g in schedule.grids] != manifest["schedule"]:
        raise EngineError(f"{engine_dir}: its schedule differs from this sparvar's {spec['resolution']} schedule; rebuild it")
    # the graphs (or the stored plan) hold the policy of their build: one this sparvar has since changed (a preset's
    # windows, its layer split) would run stale sparsity without a shape error
    policy = (default_policy(spec["model"], schedule, **spec_values.policy_overrides())
              if spec["attention"] == "sparvar" else None)
    recorded = manifest.get("policy", "absent")
    if recorded is not None and not isinstance(recorded, dict):
        raise EngineError(f"{engine_dir}: its manifest records no SparVAR policy (a dict, or null for dense attention): "
                          "incomplete or foreign; rebuild the engine")
    changed = policy_changes(recorded, policy)
    if changed:
        raise EngineError(f"{engine_dir} was built for another SparVAR policy ({changed}); rebuild the engine")
    return cfg, schedule


def onnxruntime_parts(engine_dir: str, manifest: dict, cfg):
    """The runner and decoder of an onnxruntime engine: every graph the generation runs, found in the manifest
    with its weights file (sessions open later, at first use)."""
    if getattr(cfg, "family", "infinity") == "hart":
        from .hart.runtime import load_hart_engine

        return load_hart_engine(engine_dir, manifest, cfg)
    return OrtRunner(engine_dir, manifest), OrtDecoder(engine_dir, manifest, cfg)


def load_engine_pipeline(engine_dir: str, skip_last: int = 0, **expected):
    """A Pipeline running the engine in engine_dir; `expected` (model=, resolution=, ...) must match its spec."""
    from .pipeline import Pipeline

    manifest = read_manifest(engine_dir)
    check_compatible(manifest, engine_dir, **expected)
    spec = manifest["spec"]
    cfg, schedule = check_engine_code(engine_dir, manifest)
    schedule.run_scales(skip_last)  # checked before any weights load (a server would fail every request)
    # last of the checks: it hashes every file (tens of GB at 8B), which a wrong resolution or option need not wait for
    backend = spec["backend"]
    hart = getattr(cfg, "family", "infinity") == "hart"
    if hart and backend not in ("onnxruntime", "torch-cuda"):  # before the hashing below, which takes minutes
        raise EngineError(f"{engine_dir} is a HART {backend} engine: sparvar runs HART engines built for onnxruntime "
                          f"and torch-cuda ({backend} HART plans are built to check that the graphs and plugins "
                          "build); build with --backend onnxruntime or torch-cuda")
    if backend in ("tensorrt", "tensorrt-rtx"):  # a GPU, TensorRT (-RTX) and the plans' GPU: before the hashing too
        from .trt_runtime import check_trt_runs_here

        check_trt_runs_here(engine_dir, manifest)
    verify_files(engine_dir, manifest)
    if hart:  # its own runner protocol and loop (sparvar/hart/runtime.py)
        from .hart.runtime import load_hart_engine_pipeline

        return load_hart_engine_pipeline(engine_dir, manifest, cfg, schedule, skip_last)
    if backend == "onnxruntime":
        runner, decoder = onnxruntime_parts(engine_dir, manifest, cfg)
    elif backend == "torch-cuda":
        from .cuda_engine import load_cuda_engine

        runner, decoder = load_cuda_engine(engine_dir, manifest, skip_last)
    else:  # tensorrt, tensorrt-rtx
        from .trt_runtime import load_trt_parts

        runner, decoder = load_trt_parts(engine_dir, manifest, cfg)
    return Pipeline(cfg, schedule, runner, decoder, random_weights=spec["weights"] is None, skip_last=skip_last)


def spec_from_args(args) -> EngineSpec:
    # torch-cuda: bf16, the models' training dtype, the one benchmarked and one the SparVAR kernels take; other
    # backends: fp32 for tiny models (exact tests on CPU), else fp16
    default = ("bf16" if args.backend == "torch-cuda" else "fp32" if args.model in ("infinity-tiny", "hart-tiny")
               else "fp16")
    dtype = args.dtype or default
    return EngineSpec(model=args.model, resolution=args.resolution, aspect=args.aspect or EngineSpec.aspect,
                      attention=args.attention or EngineSpec.attention, backend=args.backend, dtype=dtype,
                      weights=args.weights, vae=args.vae, fp8=getattr(args, "fp8", False), batch=getattr(args, "batch", 1),
                      csla_query_tile=getattr(args, "csla_query_tile", None))


def build_engine_from_args(args) -> dict:
    spec = spec_from_args(args)
    engine_dir = args.engine_dir or spec.default_dir()
    manifest = build_engine(spec, engine_dir, force=args.force, log=lambda m: print(m, file=sys.stderr))
    print(engine_info(engine_dir))
    return manifest


def print_engine_info(engine_dir: str) -> None:
    print(engine_info(engine_dir))


def verify_engine(engine_dir: str) -> None:
    """What loading would check of the directory, without loading: the engine against this sparvar
    (check_engine_code), every file against the manifest, a torch-cuda engine's stored SparVAR plan and, where it
    reads its weights from the spec's checkpoints, those against the build's record; a TensorRT (-RTX) engine's plans
    against this machine's GPU. EngineError naming the first problem."""
    manifest = read_manifest(engine_dir)
    backend = manifest["spec"]["backend"]
    cfg, _ = check_engine_code(engine_dir, manifest)  # what loading refuses before it reads a file
    verify_files(engine_dir, manifest)
    checked = ""
    if backend == "onnxruntime":  # every graph a generation runs is in the manifest
        onnxruntime_parts(engine_dir, manifest, cfg)
    if backend == "torch-cuda":  # its stored plan, as loading reads it (no GPU needed), and its checkpoints
        load_engine_plan(engine_dir, manifest, backend="reference")  # the stored layouts, whatever runs them
        if manifest["spec"]["weights"] is not None:
            check_checkpoints(engine_dir, manifest)
            checked = f", its {len(manifest['stages']['build']['info']['checkpoints'])} checkpoints unchanged since the build"
    if backend in ("tensorrt", "tensorrt-rtx"):  # this sparvar's plugin code; plans built for this GPU
        from .trt_runtime import check_plans_suit_here

        check_plans_suit_here(engine_dir, manifest)
    print(f"{engine_dir}: manifest format {manifest['format_version']}, "
          f"{sum(len(s['files']) for s in manifest['stages'].values())} files verified{checked}")
