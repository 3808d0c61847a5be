"""Running a HART onnxruntime engine: the runner and tokenizer that sparvar.hart.generate.generate_hart drives.

An engine directory (export/hart_step.py names its units) holds:

    manifest.json
    export/    text.onnx  step_00..step_{S-1}.onnx  diffusion_condition.onnx  denoise.onnx
               next_input_00..next_input_{S-1}.onnx  decode.onnx  weights.bin (shared, deduplicated)  codebook.npy
    optimize/  the same graphs after checks and shape inference (what runs), weights.bin (a hard link)
    build/     onnxruntime.json (session settings)

`OrtHartRunner` implements the `HartRunner` protocol (begin / step / diffusion_condition / denoise_step) on the
text, step, condition and denoise graphs (a SparVAR engine's CS4A decision state travels between the step graphs
like the K/V); `OrtHartTokenizer` stands in for the HartVQDecoder the loop uses
(`quantize.embedding.weight`, `quantize.next_autoregressive_input`, `decode`) on the next-input and decode
graphs. Sampling, guidance, the generator and f_hat accumulation order stay in the one loop.

Engines are built for classifier-free guidance (2B rows). An unguided run (cfg 0) still runs the 2B rows and
returns the conditional half: the rows are independent, so those logits are the unguided model's.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..engine import EngineError
from ..runtime import check_engine_request, engine_unit
from .config import HartConfig
from .diffusion import guidance_weights, respaced_schedule
from .generate import paired_condition


def _numpy(t: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> np.ndarray:
    return t.detach().to("cpu", dtype).numpy()


class OrtHartRunner:
    """HartRunner on ONNX Runtime: keeps the text outputs (prefix, cond, RoPE tables), the growing K/V, the CS4A
    state and the last hidden state as named arrays between graphs."""

    device = torch.device("cpu")

    def __init__(self, engine_dir: str, manifest: dict, cfg: HartConfig):
        self.cfg, self.manifest = cfg, manifest
        self.num_scales = len(manifest["schedule"])
        self.batch = manifest["spec"]["batch"]
        self.text = engine_unit(engine_dir, manifest, "text")
        self.steps = [engine_unit(engine_dir, manifest, f"step_{k:02d}") for k in range(self.num_scales)]
        self.condition = engine_unit(engine_dir, manifest, "diffusion_condition")
        self.denoise = engine_unit(engine_dir, manifest, "denoise")
        self.num_denoise_steps = respaced_schedule(cfg.diffusion).num_steps
        self.values: dict | None = None

    def begin(self, features: torch.Tensor, mask: torch.Tensor, guided: bool) -> None:
        B, L, D = self.batch, self.cfg.text_len, self.cfg.text_dim
        check_engine_request(self.manifest, features.shape[0], guided)  # the batch is the engine's, the prompts the caller's
        if tuple(features.shape) != (B, L, D):
            raise EngineError(f"text features {tuple(features.shape)}: this engine takes ({B}, {L}, {D}) (pad or "
                              f"truncate the prompt to {L} text slots)")
        if tuple(mask.shape) != (B, L) or mask.dtype != torch.bool:
            raise EngineError(f"text mask must be bool ({B}, {L}), got {mask.dtype} {tuple(mask.shape)}")
        self.guided = guided
        self.values = self.text({"text_features": _numpy(features), "text_mask": _numpy(mask, None)})
        self.last_scale = -1

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.guided else x[: self.batch]  # unguided: the conditional rows

    def step(self, scale: int, inputs: torch.Tensor | None) -> torch.Tensor:
        if self.values is None:
            raise EngineError("call begin(features, mask, guided) before step")
        if scale != self.last_scale + 1:
            raise EngineError(f"scales run in order from 0 (the K/V grow scale by scale): expected scale "
                              f"{self.last_scale + 1}, got {scale}")
        if (scale == 0) != (inputs is None):
            raise ValueError(f"scale {scale}: inputs must be None exactly at scale 0 (the text prefix is its input)")
        if inputs is not None:
            self.values["codes"] = _numpy(inputs)
        out = self.steps[scale](self.values)
        for i in range(self.cfg.depth):  # the next scale's past = this past + this scale's K/V
            for kv in ("k", "v"):
                new, past = out.pop(f"new_{kv}.{i}"), self.values.get(f"past_{kv}.{i}")
                self.values[f"past_{kv}.{i}"] = new if past is None else np.concatenate([past, new], axis=2)
        logits = torch.from_numpy(out.pop("logits"))
        self.values.update(out)  # the last scale's hidden state; the CS4A decision scale's selections and caches
        self.last_scale = scale
        return self._rows(logits)

    def diffusion_condition(self, codes: torch.Tensor) -> torch.Tensor:
        if self.values is None or self.last_scale != self.num_scales - 1:
            raise EngineError(f"diffusion_condition needs the last scale's hidden states (scale {self.num_scales - 1});"
                              f" the last step run was scale {None if self.values is None else self.last_scale}")
        out = self.condition({"hidden": self.values["hidden"], "codes": _numpy(codes)})
        return self._rows(torch.from_numpy(out["diffusion_cond"]))

    def denoise_step(self, x: torch.Tensor, k: int, cond: torch.Tensor, cfg_scale: float,
                     noise: torch.Tensor | None) -> torch.Tensor:
        if not 0 <= k < self.num_denoise_steps:
            raise ValueError(f"diffusion step {k} out of range [0, {self.num_denoise_steps})")
        cond = paired_condition(x, cond, cfg_scale)
        if k > 0 and (noise is None or noise.shape != x.shape):
            raise ValueError(f"step {k} needs noise of shape {tuple(x.shape)}, got "
                             f"{None if noise is None else tuple(noise.shape)}")
        noise = torch.zeros_like(x) if k == 0 else noise  # the last step adds none
        out = self.denoise({"x": _numpy(x), "diffusion_cond": _numpy(cond, None),
                            "noise": _numpy(noise), "step": np.array(k, dtype=np.int64),
                            "guidance": guidance_weights(cfg_scale).numpy()})
        return torch.from_numpy(out["x_prev"])


class _OrtQuantizer:
    """HartVQDecoder.quantize as the loop uses it: the codebook, and the residual accumulation per scale."""

    def __init__(self, engine_dir: str, manifest: dict, cfg: HartConfig):
        path = os.path.join(engine_dir, manifest["stages"]["export"]["info"].get("codebook", "export/codebook.npy"))
        if not os.path.isfile(path):
            raise EngineError(f"{engine_dir}: no codebook ({os.path.relpath(path, engine_dir)}); rebuild the engine")
        codebook = torch.from_numpy(np.load(path))
        if tuple(codebook.shape) != (cfg.vocab_size, cfg.latent_dim):
            raise EngineError(f"{path}: codebook {tuple(codebook.shape)} is not {cfg.name}'s "
                              f"({cfg.vocab_size}, {cfg.latent_dim}); rebuild the engine")
        self.embedding = torch.nn.Embedding.from_pretrained(codebook)
        self.patch_nums = cfg.patch_nums
        self.units = [engine_unit(engine_dir, manifest, f"next_input_{k:02d}") for k in range(len(cfg.patch_nums))]

    def next_autoregressive_input(self, si: int, patch_nums: tuple[int, ...], f_hat: torch.Tensor,
                                  h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(patch_nums) != self.patch_nums:
            raise EngineError(f"patch_nums {tuple(patch_nums)} are not the engine's {self.patch_nums}")
        out = self.units[si]({"f_hat": _numpy(f_hat), "h": _numpy(h)})
        f_hat = torch.from_numpy(out["f_hat_next"])
        return f_hat, (torch.from_numpy(out["next_input"]) if "next_input" in out else f_hat)


class OrtHartTokenizer:
    """Stands in for sparvar.hart.tokenizer.HartVQDecoder in generate_hart (fp32, CPU)."""

    def __init__(self, engine_dir: str, manifest: dict, cfg: HartConfig):
        self.quantize = _OrtQuantizer(engine_dir, manifest, cfg)
        self.unit = engine_unit(engine_dir, manifest, "decode")

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """(B, Cvae, P, P) -> (B, 3, H, W) image in [-1, 1]."""
        return torch.from_numpy(self.unit({"f_hat": _numpy(f_hat)})["image"])


def load_hart_engine(engine_dir: str, manifest: dict, cfg: HartConfig) -> tuple[OrtHartRunner, OrtHartTokenizer]:
    """The runner and tokenizer of a checked HART onnxruntime engine (sparvar.runtime.load_engine_pipeline checks
    the manifest, files and compatibility first)."""
    if manifest["spec"]["backend"] != "onnxruntime":
        raise EngineError(f"{engine_dir} is a {manifest['spec']['backend']} engine: `sparvar generate` and `serve` run "
                          "HART engines on onnxruntime and torch-cuda only (TensorRT-RTX plans are built to check the "
                          "graphs, not run by sparvar); build with --backend onnxruntime or torch-cuda")
    if (manifest.get("model_config") or {}).get("family") != "hart":
        raise EngineError(f"{engine_dir} is not a HART engine (model {manifest['spec']['model']}); rebuild it")
    return OrtHartRunner(engine_dir, manifest, cfg), OrtHartTokenizer(engine_dir, manifest, cfg)


def load_hart_engine_pipeline(engine_dir: str, manifest: dict, cfg: HartConfig, schedule, skip_last: int = 0):
    """A HartPipeline running a HART engine; sparvar.runtime.load_engine_pipeline has checked the manifest format,
    the files' digests, the caller's expectations and the schedule."""
    from .generate import HartPipeline

    if manifest["spec"]["backend"] == "torch-cuda":
        from .cuda_engine import load_hart_cuda_pipeline

        return load_hart_cuda_pipeline(engine_dir, manifest, cfg, schedule, skip_last)
    runner, tokenizer = load_hart_engine(engine_dir, manifest, cfg)
    return HartPipeline(cfg, schedule, runner, tokenizer, random_weights=manifest["spec"]["weights"] is None,
                        skip_last=skip_last)
