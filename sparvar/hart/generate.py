"""HART's generation loop (official autoregressive_infer_cfg) over a runner, and the eager torch runner.

The loop is the same whatever runs the transformer (eager torch, an ONNX Runtime engine): it owns the sampling,
the one torch.Generator, the tokenizer's f_hat accumulation and the diffusion noise; a *runner* owns the model
state (text prefix, KV cache, RoPE tables, the last scale's hidden states) and is tensor-in / tensor-out:

    runner.begin(features, mask, guided)           # features (B, text_len, text_dim) fp32, mask (B, text_len) bool
    logits = runner.step(0, None)                  # (R, 1, V) fp32 from the last text slot; R = 2B guided, else B
    logits = runner.step(si, inputs)               # inputs (B, pn_si^2, Cvae) fp32 -> (R, pn_si^2, V) fp32
    cond = runner.diffusion_condition(codes)       # after the last step: (B, n_last, Cvae) -> (R, n_last, C)
    x = runner.denoise_step(x, k, cond, s, noise)  # x (N, Cvae), cond (R/B * N, C) with N = B * n_last; k = 7 .. 0

Per scale si (official order): logits -> CFG ramp t = cfg * si / (SN - 1) and top-k sampling from the one
generator (sparvar.hart.sampling.sample_scale) -> codes h -> `tokenizer.quantize.next_autoregressive_input`
(f_hat, and the next scale's input, area-downsampled f_hat). After the last scale the residual diffusion head
adds the continuous part the codebook cannot express: its condition is decoder_norm(last hidden +
word_embed(codebook[indices])), pure noise is denoised in `num_sampling_steps` IDDPM steps with CFG on eps at the
last scale's t, scaled by vae_scale, and added to the last scale's codes before they enter f_hat (no Phi there).
f_hat is decoded to the image.

Differences from the official loop, each on purpose:
- All randomness (multinomial draws, more_smooth's gumbel noise, the diffusion noise) comes from ONE explicit
  generator seeded with `seed`, on the runner's device; the official diffusion noise uses the global RNG.
- Unguided runs (sampling.cfg == 0: every t is 0) skip the unconditional rows (R = B); the official code always
  runs 2B rows, whose unconditional half then has no effect on the result.
- `skip_last` (SparVAR's scale skipping): the transformer runs on all but the last N scales and f_hat is
  decoded as the run scales left it. f_hat lives on the final grid from the first scale on (each scale's codes
  are upsampled into it), so it decodes at full resolution; the missing scales' detail is simply absent. No
  diffusion residual then: its condition is the last scale's hidden states and sampled codes, which were never
  computed, and the residual only refines the last scale's codes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from ..generate import SeededRows, check_runner_skip
from ..schedule import Schedule
from .config import HartConfig
from .diffusion import denoise_step, respaced_schedule
from .model import HART, rope_tables
from .sampling import HartSampling, guidance_scale, sample_scale
from .tokenizer import HartVQDecoder


class HartRunner(Protocol):
    """What the generation loop needs from whatever runs the HART transformer and its diffusion head.

    R below is 2B when `begin` was told `guided` (rows [conditional; unconditional], the latter a zero text
    context), else B. Every tensor is on `device`; logits are fp32.
    """

    device: torch.device
    cfg: HartConfig  # the model's config (the loop reads its diffusion step count and vae_scale)

    def begin(self, features: torch.Tensor, mask: torch.Tensor, guided: bool) -> None:
        """Start a prompt batch: features (B, text_len, text_dim) fp32, mask (B, text_len) bool (True = real
        token; it sets the text RoPE positions). Resets the KV cache (and a SparVAR plan's state)."""

    def step(self, scale: int, inputs: torch.Tensor | None) -> torch.Tensor:
        """Run scale `scale` (called for 0, 1, ... in order). inputs: None at scale 0 (the text prefix is the
        input), else (B, pn^2, Cvae) fp32, the quantizer's next-scale input before word_embed (shared by the CFG
        rows). Returns fp32 logits (R, n, V); n = 1 at scale 0 (the last text slot), pn^2 after."""

    def diffusion_condition(self, codes: torch.Tensor) -> torch.Tensor:
        """After the last scale's step: codes (B, n_last, Cvae) fp32, the codebook vectors of the sampled indices
        -> (R, n_last, C) condition decoder_norm(last hidden + word_embed(codes))."""

    def denoise_step(self, x: torch.Tensor, k: int, cond: torch.Tensor, cfg_scale: float,
                     noise: torch.Tensor | None) -> torch.Tensor:
        """One respaced IDDPM step k (num_sampling_steps - 1 down to 0) of the diffusion head (sparvar.hart.
        diffusion.denoise_step): x (N, Cvae) fp32 in units of latent / vae_scale, cond (R/B * N, C) = the
        condition flattened row-major (all conditional rows first), eps guided as (1 + s) eps_c - s eps_u with
        s = cfg_scale (0 when unguided), noise (N, Cvae) fp32 (None at k = 0, which adds none). -> (N, Cvae) fp32."""


@dataclass
class HartGeneration:
    image: torch.Tensor  # (B, 3, H, W) in [0, 1]
    indices: list[torch.Tensor]  # per run scale (B, pn^2) int64 codebook indices
    f_hat: torch.Tensor  # (B, Cvae, P, P) the decoder's input
    residual: torch.Tensor | None  # (B, P*P, Cvae) fp32 diffusion residual in latent units; None if skipped


@torch.no_grad()
def generate_hart(runner: HartRunner, tokenizer: HartVQDecoder, schedule: Schedule, features: torch.Tensor,
                  mask: torch.Tensor, sampling: HartSampling = HartSampling(), seed: int | list[int] = 0, skip_last: int = 0,
                  progress: Callable[[int, int], None] | None = None) -> HartGeneration:
    """Generate one image per prompt row (features (B, text_len, text_dim), mask (B, text_len) bool)."""
    SN = schedule.num_scales
    run_scales = check_runner_skip(runner, schedule, skip_last)
    if schedule.prefix_len is None:
        raise ValueError("not a HART schedule (no text prefix): use get_schedule(..., model=<hart model>)")
    patch_nums = tuple(h for h, _ in schedule.grids)
    codebook = tokenizer.quantize.embedding.weight  # (V, Cvae)
    if codebook.device != torch.device(runner.device):
        raise ValueError(f"tokenizer on {codebook.device} but runner on {runner.device}: put both on one device")
    B, Cvae, P = features.shape[0], codebook.shape[1], patch_nums[-1]

    runner.begin(features, mask, sampling.guided)
    generator = SeededRows(seed, B, runner.device)
    f_hat = codebook.new_zeros(B, Cvae, P, P)
    inputs, indices, residual = None, [], None
    for si in range(run_scales):
        pn = patch_nums[si]
        logits = runner.step(si, inputs)  # (R, pn^2, V)
        idx, codes = sample_scale(logits, si, SN, sampling, generator, codebook)  # (B, n), (B, n, Cvae) fp32
        indices.append(idx)
        if si == SN - 1:  # official: tokens = codes + diffusion residual, conditioned on the hard codes
            residual = diffusion_residual(runner, F.embedding(idx, codebook.float()),
                                          guidance_scale(si, SN, sampling.cfg), generator)
            codes = codes + residual
        h = codes.transpose(1, 2).reshape(B, Cvae, pn, pn).to(codebook.dtype)
        f_hat, nxt = tokenizer.quantize.next_autoregressive_input(si, patch_nums, f_hat, h)
        inputs = nxt.flatten(2).transpose(1, 2).float()  # (B, pn_next^2, Cvae); f_hat itself after the last
        if progress is not None:
            progress(si, run_scales)
    image = tokenizer.decode(f_hat).float().add(1).div(2)  # decode clamps to [-1, 1]
    return HartGeneration(image=image, indices=indices, f_hat=f_hat, residual=residual)


def diffusion_residual(runner: HartRunner, codes: torch.Tensor, t: float, generator: SeededRows) -> torch.Tensor:
    """The last scale's continuous residual (B, n, Cvae) fp32 in latent units, as official DiffLoss.sample:
    pure noise (N, Cvae), N = B * n, denoised step by step with CFG scale t on eps, times vae_scale."""
    diffusion = runner.cfg.diffusion
    B, n, Cvae = codes.shape
    cond = runner.diffusion_condition(codes)  # (R, n, C)
    cond = cond.reshape(-1, cond.shape[-1])  # (R/B * N, C), official reshape(bs * seq_len, -1)
    # Official quirk (DiffLoss.sample): cfg == 1.0 means "unguided", i.e. guidance scale 0 on the conditional rows.
    cfg_scale = 0.0 if t == 1.0 else float(t)
    randn = lambda: generator.randn((B * n, Cvae))  # noqa: E731 (rows first: row b's n tokens are its own draws)
    x = randn()  # the noisiest step's sample
    for k in reversed(range(respaced_schedule(diffusion).num_steps)):
        x = runner.denoise_step(x, k, cond, cfg_scale, randn() if k > 0 else None)
    return (x * diffusion.vae_scale).view(B, n, Cvae)


class HartTorchRunner:
    """Runs the eager torch HART; the reference every HART engine is compared against."""

    def __init__(self, model: HART, schedule: Schedule, plan=None, backend: str = "sdpa"):
        if schedule.prefix_len != model.cfg.text_len or tuple(h for h, _ in schedule.grids) != model.cfg.patch_nums:
            raise ValueError(f"schedule {schedule.grids} (prefix {schedule.prefix_len}) is not {model.cfg.name}'s: "
                             "use get_schedule(..., model=<hart model>)")
        self.model, self.schedule, self.plan, self.backend = model, schedule, plan, backend
        self.cfg = model.cfg
        self.device = model.word_embed.weight.device
        self.diffusion_schedule = respaced_schedule(model.cfg.diffusion)

    @torch.no_grad()
    def begin(self, features, mask, guided: bool):
        self.text = self.model.encode_text(features.to(self.device), mask.to(self.device), guided)
        # RoPE follows each row's text length, so the tables are per prompt batch
        self.ropes = [r.to(self.device) for r in rope_tables(self.schedule, self.cfg.head_dim, self.text.positions)]
        self.cache = self.model.new_cache(self.text.batch, self.schedule)
        self.hidden, self.last_scale = None, -1
        if self.plan is not None:
            self.plan.reset()

    @torch.no_grad()
    def step(self, scale: int, inputs):
        if scale != self.last_scale + 1:
            raise ValueError(f"scales run in order from 0 after begin (the KV cache fills scale by scale): expected "
                             f"scale {self.last_scale + 1}, got {scale}")
        if (scale == 0) != (inputs is None):
            raise ValueError(f"scale {scale}: inputs must be None exactly at scale 0 (the text prefix is its input)")
        self.cache.offset = self.schedule.offsets[scale]
        tokens = self.model.scale_input(scale, inputs, self.text)
        logits, self.hidden = self.model.step(tokens, scale, self.text, self.cache, self.ropes[scale], self.plan,
                                              self.backend, return_hidden=True)
        self.last_scale = scale
        return logits

    @torch.no_grad()
    def diffusion_condition(self, codes):
        if self.last_scale != self.schedule.num_scales - 1:
            raise ValueError(f"diffusion_condition needs the last scale's hidden states (scale "
                             f"{self.schedule.num_scales - 1}); the last step run was scale {self.last_scale}")
        return self.model.diffusion_condition(self.hidden, codes)

    @torch.no_grad()
    def denoise_step(self, x, k: int, cond, cfg_scale: float, noise):
        cond = paired_condition(x, cond, cfg_scale)
        return denoise_step(self.model.diffloss.net, x, k, cond, cfg_scale, noise, self.diffusion_schedule)


def paired_condition(x: torch.Tensor, cond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """The diffusion net always runs [conditional; unconditional] rows: an unguided condition (one row per token of x,
    guidance 0) stands in for both halves; a guided one must already have both."""
    if cond.shape[0] == x.shape[0]:
        if cfg_scale != 0:
            raise ValueError(f"unguided condition rows with cfg_scale {cfg_scale}: guidance needs [cond; uncond]")
        cond = torch.cat([cond, cond])
    if cond.shape[0] != 2 * x.shape[0]:
        raise ValueError(f"cond has {cond.shape[0]} rows for {x.shape[0]} tokens: expected {x.shape[0]} "
                         f"(unguided) or {2 * x.shape[0]} (guided)")
    return cond


def hart_sampling(model_cfg: HartConfig, cfg: float | None = None, tau: float | None = None, top_k: int | None = None,
                  top_p: float | None = None) -> HartSampling:
    """HartSampling from the options of the CLI or a served request (None keeps the official default); errors name
    the option as both spell it (tau, top_k), like Sampling's own. Needs only the config: the CLI checks the options
    before any weights load."""
    if tau is not None:
        raise ValueError(f"tau: {model_cfg.name} samples without a temperature (official HART); drop it")
    if top_k is not None:
        raise ValueError(f"top_k: {model_cfg.name} uses the official top-k schedule (600 before scale 7, then "
                         "300); drop it")
    options = {"cfg": cfg, "top_p": top_p}
    return HartSampling(**{k: v for k, v in options.items() if v is not None})


class HartPipeline:
    """HART's text-to-image pipeline, with sparvar.pipeline.Pipeline's interface (create, text_features, sampling,
    generate); `Pipeline.create` returns one for a HART model. An engine runner plugs in through the constructor."""

    def __init__(self, cfg: HartConfig, schedule: Schedule, runner: HartRunner, tokenizer: HartVQDecoder,
                 random_weights: bool, skip_last: int = 0):
        check_runner_skip(runner, schedule, skip_last)
        self.cfg, self.schedule, self.runner, self.tokenizer = cfg, schedule, runner, tokenizer
        self.random_weights, self.skip_last = random_weights, skip_last
        self.text_encoders: dict = {}  # directory -> loaded Qwen2 encoder, loaded once per pipeline

    @classmethod
    def create(cls, model: str, resolution: int | None = None, aspect: str = "1:1", weights: str | None = None,
               vae: str | None = None, device="cpu", dtype=torch.float32, attention: str = "dense", skip_last: int = 0,
               seed: int = 0) -> "HartPipeline":
        """weights: the official `llm/` folder or a weight file; vae: the official tokenizer file; neither: random."""
        from ..config import get_config
        from ..pipeline import make_plan
        from ..schedule import get_schedule
        from .checkpoint import load_model
        from .model import build_model
        from .tokenizer import build_hart_vq, load_hart_vq

        cfg = get_config(model)
        if not isinstance(cfg, HartConfig):
            raise ValueError(f"{model} is not a HART model")
        schedule = get_schedule(resolution or cfg.default_resolution, aspect, model=model)
        if (weights is None) != (vae is None):
            raise ValueError("give both transformer weights and tokenizer weights, or neither (random weights)")
        if weights is None:
            net = build_model(cfg, device=device, dtype=dtype, seed=seed)
        else:
            net = load_model(cfg, weights, device, dtype)
        # The tokenizer stays fp32: f_hat accumulates over every scale (official: fp32 weights, autocast on convs only).
        tokenizer = (build_hart_vq(cfg.vq, seed=0, device=device) if vae is None else load_hart_vq(vae, cfg.vq, device))
        runner = HartTorchRunner(net, schedule, make_plan(cfg, schedule, attention, skip_last=skip_last), backend="sdpa")
        return cls(cfg, schedule, runner, tokenizer, weights is None, skip_last)

    def text_features(self, prompts: list[str], t5: str | None = None, embeddings: str | None = None,
                      allow_hashed: bool = False, qwen: str | None = None):
        """prompts -> features (B, text_len, text_dim), mask (B, text_len) from the one source the caller names."""
        from ..pipeline import check_text_sources
        from .text import Qwen2TextEncoder, hashed_hart_embeddings, load_hart_embeddings

        check_text_sources(self.cfg, t5=t5, qwen=qwen, embeddings=embeddings, real_weights=not allow_hashed,
                           prompts=None if embeddings else prompts)
        if embeddings:
            return load_hart_embeddings(embeddings, self.cfg)
        if self.cfg.text_encoder == "hashed":  # the model's own text encoder (check_text_sources refused --qwen)
            return hashed_hart_embeddings(prompts, self.cfg)
        if qwen:
            if qwen not in self.text_encoders:
                self.text_encoders[qwen] = Qwen2TextEncoder(qwen, self.cfg, device=self.runner.device)
            return self.text_encoders[qwen](prompts)
        return hashed_hart_embeddings(prompts, self.cfg)  # random weights, no text source

    def sampling(self, cfg: float | None = None, tau: float | None = None, top_k: int | None = None,
                 top_p: float | None = None) -> HartSampling:
        return hart_sampling(self.cfg, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p)

    def generate(self, features, mask, sampling: HartSampling = HartSampling(), seed: int | list[int] = 0,
                 progress=None) -> HartGeneration:
        return generate_hart(self.runner, self.tokenizer, self.schedule, features, mask, sampling, seed,
                             self.skip_last, progress)
