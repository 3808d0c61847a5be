"""Running built engines: the runners that the generation loop (sparvar/generate.py) drives.

`load_engine_pipeline(dir)` checks the manifest (format, files, compatibility) and returns a Pipeline whose
runner executes the engine's graphs; sampling, CFG, code accumulation and resampling stay in the one loop.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

from .engine import EngineError, EngineSpec, build_engine, check_compatible, engine_info, read_manifest, verify_files

_NP = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64, "bool": np.bool_}


class OrtUnit:
    """One exported unit in an ONNX Runtime session, fed and read by I/O name."""

    def __init__(self, engine_dir: str, unit: dict):
        import onnxruntime as ort

        path = os.path.join(engine_dir, unit["file"])
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.inputs = [s["name"] for s in unit["inputs"]]
        self.outputs = [s["name"] for s in unit["outputs"]]
        self.dtypes = {s["name"]: s["dtype"] for s in unit["inputs"]}
        self.graph_inputs = {i.name for i in self.session.get_inputs()}  # the exporter drops unused inputs

    def __call__(self, values: dict) -> dict:
        feed = {}
        for name in self.inputs:
            if name not in self.graph_inputs:
                continue
            if name not in values:
                raise EngineError(f"engine input {name!r} was not produced by an earlier unit")
            feed[name] = np.ascontiguousarray(values[name], dtype=_NP[self.dtypes[name]])
        return dict(zip(self.outputs, self.session.run(self.outputs, feed)))


class OrtRunner:
    """Runs text + per-scale step graphs; keeps the KV cache and CS4A state as named arrays between scales."""

    device = torch.device("cpu")

    def __init__(self, engine_dir: str, manifest: dict):
        units = manifest["stages"]["optimize"]["info"]["units"]
        self.text = OrtUnit(engine_dir, units["text"])
        self.steps = [OrtUnit(engine_dir, units[f"step_{k:02d}"]) for k in range(len(manifest["schedule"]))]
        self.depth = manifest["model_config"]["depth"]
        self.batch = manifest["spec"]["batch"]

    def begin(self, features, lengths, guided: bool):
        if not guided:
            raise EngineError("engines are built with classifier-free guidance (cond + uncond batch); use cfg != 1")
        if features.shape[0] != self.batch:
            raise EngineError(f"engine was built for batch {self.batch}, got {features.shape[0]} prompts")
        self.values = self.text({"text_features": features.numpy(), "text_lengths": lengths.numpy()})

    def step(self, scale: int, codes):
        if codes is not None:
            self.values["codes"] = codes.float().numpy()
        out = self.steps[scale](self.values)
        for i in range(self.depth):  # grow the cache: the next scale's past = this past + this scale's K/V
            for kv in ("k", "v"):
                new = out.pop(f"new_{kv}.{i}")
                past = self.values.get(f"past_{kv}.{i}")
                self.values[f"past_{kv}.{i}"] = new if past is None else np.concatenate([past, new], axis=2)
        logits = torch.from_numpy(out.pop("logits"))
        self.values.update(out)  # CS4A selections and residual caches of the decision scale
        return logits


class OrtDecoder:
    def __init__(self, engine_dir: str, manifest: dict, cfg):
        from . import vae as vae_lib

        self.unit = OrtUnit(engine_dir, manifest["stages"]["optimize"]["info"]["units"]["decode"])
        self.codebook_dim = cfg.vae.codebook_dim
        self.patchify = cfg.vae.spatial_patchify
        self._bits_to_codes = vae_lib.bits_to_codes

    def bits_to_codes(self, bits):
        return self._bits_to_codes(bits, self.codebook_dim)

    def decode(self, latent):
        return torch.from_numpy(self.unit({"latent": latent.float().numpy()})["image"])


def load_engine_pipeline(engine_dir: str, skip_last: int = 0, **expected):
    """A Pipeline running the engine in engine_dir; `expected` (model=, resolution=, ...) must match its spec."""
    from .config import get_config
    from .pipeline import Pipeline
    from .schedule import get_schedule

    manifest = read_manifest(engine_dir)
    verify_files(engine_dir, manifest)
    check_compatible(manifest, engine_dir, **expected)
    spec = manifest["spec"]
    cfg = get_config(spec["model"])
    schedule = get_schedule(spec["resolution"], spec["aspect"], model=spec["model"])
    if [list(g) for g in schedule.grids] != manifest["schedule"]:
        raise EngineError(f"{engine_dir}: its schedule differs from this sparvar's {spec['resolution']} schedule; rebuild it")
    backend = spec["backend"]
    if getattr(cfg, "family", "infinity") == "hart":  # its own runner protocol and loop (sparvar/hart/runtime.py)
        from .hart.runtime import load_hart_engine_pipeline

        return load_hart_engine_pipeline(engine_dir, manifest, cfg, schedule, skip_last)
    if backend == "onnxruntime":
        runner, decoder = OrtRunner(engine_dir, manifest), OrtDecoder(engine_dir, manifest, cfg)
    elif backend == "torch-cuda":
        from .cuda_engine import load_cuda_engine

        runner, decoder = load_cuda_engine(engine_dir, manifest)
    else:
        raise EngineError(f"{engine_dir} is a {backend} engine; this machine's runtime runs onnxruntime and torch-cuda "
                          f"engines (TensorRT engines run through the TensorRT runtime, which is not installed here)")
    return Pipeline(cfg, schedule, runner, decoder, random_weights=spec["weights"] is None, skip_last=skip_last)


def spec_from_args(args) -> EngineSpec:
    dtype = args.dtype or ("fp32" if args.model in ("infinity-tiny", "hart-tiny") else "fp16")
    return EngineSpec(model=args.model, resolution=args.resolution, aspect=args.aspect, attention=args.attention,
                      backend=args.backend, dtype=dtype, weights=args.weights, vae=args.vae)


def build_engine_from_args(args) -> dict:
    spec = spec_from_args(args)
    engine_dir = args.engine_dir or spec.default_dir()
    manifest = build_engine(spec, engine_dir, force=args.force, log=lambda m: print(m, file=sys.stderr))
    print(engine_info(engine_dir))
    return manifest


def print_engine_info(engine_dir: str) -> None:
    print(engine_info(engine_dir))


def verify_engine(engine_dir: str) -> None:
    manifest = read_manifest(engine_dir)
    verify_files(engine_dir, manifest)
    print(f"{engine_dir}: manifest format {manifest['format_version']}, "
          f"{sum(len(s['files']) for s in manifest['stages'].values())} files verified")
