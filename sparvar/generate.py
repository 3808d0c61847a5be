"""The generation loop: scale by scale, sample bits, accumulate codes, feed the next scale.

The loop is the same whatever runs the transformer step (eager torch, an ONNX Runtime engine, a CUDA-graph
engine): a *runner* exposes `begin(features, lengths)` and `step(scale, codes) -> logits`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import EAGER, BlockOps, Infinity, rope_tables
from .schedule import Schedule
from .vae import latent_to_tokens, tokens_to_latent


def finite_number(value) -> bool:
    """An int or float (not a bool) that is finite; an int beyond float's range is not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


# The largest guidance scale either family takes (official defaults: 4 for Infinity, 4.5 for HART): far beyond any
# use, and below where the float32 guided logits overflow (HART's at ~3e38 gave NaN: a black image, or a traceback)
MAX_CFG = 1e4


@dataclass(frozen=True)
class Sampling:
    cfg: float = 4.0  # classifier-free guidance on the logits: cfg*cond + (1-cfg)*uncond
    tau: float = 1.0  # temperature
    top_k: int = 0  # per bit there are only two choices: 1 = greedy, 0 or 2 = no top-k
    top_p: float = 0.97  # keeps a bit value only if its probability exceeds 1 - top_p

    def __post_init__(self):
        for name in ("cfg", "tau", "top_p"):  # NaN passes every comparison below and samples all-zero bits
            value = getattr(self, name)
            if not finite_number(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0 <= self.cfg <= MAX_CFG:  # as HART's: guidance away from the prompt is no sampling the official models do
            raise ValueError(f"cfg must be in [0, {MAX_CFG:g}], got {self.cfg}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.top_k not in (0, 1, 2):
            raise ValueError(f"top_k must be 0, 1 or 2 for bitwise sampling, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")

    @property
    def guided(self) -> bool:
        return self.cfg != 1.0


class SeededRows:
    """The random numbers of one generation of `rows` prompts.

    seed: an int, one stream for the whole batch (what `sparvar generate` and the fidelity benchmark draw), or one
    seed per row, each row its own stream: row i then draws exactly what a one-prompt generation seeded with seeds[i]
    draws, whatever shares its batch (what a server batching requests needs). Every draw has the rows first: shape[0]
    is a multiple of `rows`, and row i owns the i-th block of it."""

    def __init__(self, seed, rows: int, device):
        self.device = torch.device(device)

        def is_seed(s) -> bool:  # an int of any kind (numpy's too), never a bool or a float
            return isinstance(s, numbers.Integral) and not isinstance(s, bool)

        self.per_row = not is_seed(seed)
        if self.per_row and not (isinstance(seed, (list, tuple)) and len(seed) == rows and all(map(is_seed, seed))):
            raise ValueError(f"give one int seed, or one int seed per prompt row ({rows}), got {seed!r}")
        seeds = list(seed) if self.per_row else [seed]
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        self.rows = rows

    def _blocks(self, shape) -> list[tuple[torch.Generator, tuple]]:
        if not self.per_row:
            return [(self.generators[0], tuple(shape))]
        if shape[0] % self.rows:
            raise ValueError(f"a draw of shape {tuple(shape)} does not split into {self.rows} rows")
        return [(g, (shape[0] // self.rows, *shape[1:])) for g in self.generators]

    def rand(self, shape) -> torch.Tensor:
        return torch.cat([torch.rand(s, generator=g, device=self.device) for g, s in self._blocks(shape)])

    def randn(self, shape) -> torch.Tensor:
        return torch.cat([torch.randn(s, generator=g, device=self.device) for g, s in self._blocks(shape)])

    def exponential(self, shape) -> torch.Tensor:
        return torch.cat([torch.empty(s, device=self.device).exponential_(generator=g) for g, s in self._blocks(shape)])

    def multinomial(self, probs: torch.Tensor) -> torch.Tensor:
        """One index per row of probs (N, V) (rows first, as every draw), shape (N, 1)."""
        blocks = self._blocks(probs.shape)
        parts = probs.split(blocks[0][1][0])  # one part per block (the whole of probs for one stream)
        return torch.cat([torch.multinomial(p, num_samples=1, replacement=True, generator=g)
                          for (g, _), p in zip(blocks, parts)])


def sample_bits(logits: torch.Tensor, sampling: Sampling, generator: SeededRows) -> torch.Tensor:
    """logits (B, n, 2*bits), adjacent (l0, l1) per bit -> bits (B, n, bits) in {0, 1} (float).

    Equals the official sampler (softmax over the 2 values, top-k/top-p, multinomial) in distribution:
    p = sigmoid(l1 - l0). Its top-p sorts the values ascending and removes those whose running sum is <= 1 - top_p,
    never the last: of two values only the smaller can go (bit 0 at a tie), so below top_p 0.5 it is greedy.
    """
    pair = logits.float().unflatten(-1, (-1, 2))
    # the difference first: a tiny tau overflowed l0 / tau and l1 / tau to inf, and inf - inf is NaN (bit 0 always)
    p1 = torch.sigmoid((pair[..., 1] - pair[..., 0]) / sampling.tau)
    if sampling.top_k == 1:
        return (p1 > 0.5).float()
    if sampling.top_p > 0:
        # the smaller probability goes when it is <= 1 - top_p; the larger one (bit 1 at a tie) is then certain
        drop = torch.minimum(p1, 1.0 - p1) <= 1.0 - sampling.top_p
        p1 = torch.where(drop, (p1 >= 0.5).float(), p1)
    u = generator.rand(p1.shape)
    return (u < p1).float()


def resample(latent: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Official inference resampling: trilinear on a (B, C, 1, h, w) view, for both up- and downsampling."""
    return F.interpolate(latent.unsqueeze(2), size=(1, *size), mode="trilinear").squeeze(2)


def check_runner_skip(runner, schedule: Schedule, skip_last: int) -> int:
    """The runner must run every scale a loop skipping its last `skip_last` runs (ValueError otherwise, before any
    scale runs): a SparVAR plan made to skip more makes no decision for scales it thought skipped (it would fail at
    the first of them), and a graph runner made to skip more has no graphs for them. Made to skip less is allowed:
    correct, only the work for the skipped scales (a CS4A decision, graphs) is wasted. Returns the scales the loop
    runs."""
    run_scales = schedule.run_scales(skip_last)
    plan = getattr(runner, "plan", None)
    if plan is not None and getattr(plan, "skip_last", 0) > skip_last:
        raise ValueError(f"the runner's SparVAR plan was made to skip the last {plan.skip_last} scales; this loop "
                         f"skips {skip_last}: make the plan for skip_last={skip_last}")
    if getattr(runner, "run_scales", run_scales) < run_scales:
        raise ValueError(f"the runner runs {runner.run_scales} scales; this loop runs {run_scales} "
                         f"(skip_last={skip_last})")
    return run_scales


@dataclass
class Generation:
    image: torch.Tensor  # (B, 3, H, W) in [0, 1]
    bits: list[torch.Tensor]  # per scale (B, n, bits)
    summed_codes: torch.Tensor  # (B, C, H, W) latent the decoder saw


def check_text_lengths(features: torch.Tensor, lengths: torch.Tensor) -> None:
    """ValueError unless lengths holds one real-token count in [1, L] per row of features (B, L, D)."""
    B, L = features.shape[:2]
    if not isinstance(lengths, torch.Tensor) or lengths.dtype == torch.bool or lengths.is_floating_point() or \
            lengths.is_complex():  # 3.5 real tokens: torch's mask counted 4, the engines' int64 cast 3
        raise ValueError(f"text lengths must be an integer tensor, got {getattr(lengths, 'dtype', type(lengths).__name__)}")
    if tuple(lengths.shape) != (B,) or bool((lengths < 1).any() or (lengths > L).any()):
        raise ValueError(f"text lengths must be {B} values in [1, {L}], got {lengths.tolist()}")


def generate(runner, decoder, schedule: Schedule, features: torch.Tensor, lengths: torch.Tensor,
             sampling: Sampling = Sampling(), seed: int | list[int] = 0, skip_last: int = 0, progress=None) -> Generation:
    """Generate one image per prompt row; seed: one for the batch, or one per row (SeededRows).

    runner: begin(features, lengths, guided) / step(scale, codes) -> logits (2B or B, n, 2*bits)
    decoder: .codebook_dim, .patchify, bits_to_codes(bits) -> codes, decode(latent) -> image in [-1, 1]
    skip_last: run the transformer on all but the last N scales and decode the upsampled running sum.
    """
    run_scales = check_runner_skip(runner, schedule, skip_last)
    B = features.shape[0]
    check_text_lengths(features, lengths)  # every runner's (the torch runner took 0, past L, or a count unlike B)
    patch = 2 if decoder.patchify else 1
    final = (schedule.final_grid[0] * patch, schedule.final_grid[1] * patch)
    runner.begin(features, lengths, sampling.guided)
    generator = SeededRows(seed, B, runner.device)
    summed = None
    codes = None  # the input of the next scale; scale 0 starts from the text's <sos> token
    all_bits = []
    for scale in range(run_scales):
        h, w = schedule.grids[scale]
        logits = runner.step(scale, codes)
        if sampling.guided:
            cond, uncond = logits[:B], logits[B:]
            logits = sampling.cfg * cond + (1 - sampling.cfg) * uncond
        bits = sample_bits(logits, sampling, generator)
        all_bits.append(bits)
        latent = tokens_to_latent(decoder.bits_to_codes(bits), h, w, decoder.patchify)
        up = resample(latent, final)
        summed = up if summed is None else summed + up
        if scale + 1 < run_scales:
            nh, nw = schedule.grids[scale + 1]
            codes = latent_to_tokens(resample(summed, (nh * patch, nw * patch)), decoder.patchify)
        if progress is not None:
            progress(scale, run_scales)
    image = decoder.decode(summed).add(1).div(2).clamp(0, 1)
    return Generation(image=image, bits=all_bits, summed_codes=summed)


class TorchRunner:
    """Runs the eager torch model; the reference every engine is compared against."""

    def __init__(self, model: Infinity, schedule: Schedule, plan=None, backend: str = "sdpa", ops: BlockOps = EAGER):
        self.model, self.schedule, self.plan, self.backend, self.ops = model, schedule, plan, backend, ops
        self.device = model.pos_start.device
        self.ropes = [r.to(self.device) for r in rope_tables(schedule, model.cfg.head_dim)]

    @torch.no_grad()
    def begin(self, features, lengths, guided: bool):
        self.text = self.model.encode_text(features.to(self.device), lengths.to(self.device), guided)
        self.cache = self.model.new_cache(self.text.batch, self.schedule)
        if self.plan is not None:
            self.plan.reset()

    @torch.no_grad()
    def step(self, scale: int, codes):
        self.cache.offset = self.schedule.offsets[scale]
        tokens = self.model.scale_input(scale, codes, self.text)
        return self.model.step(tokens, scale, self.text, self.cache, self.ropes[scale], self.plan, self.backend, self.ops)
