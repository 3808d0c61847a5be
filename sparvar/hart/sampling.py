"""HART's token sampling rules as pure functions (official autoregressive_infer_cfg and
hart/modules/networks/utils.py sample_with_top_k_top_p_ / gumbel_softmax_with_rng).

Per scale si of num_scales (14 for hart-0.7b):
- Guidance ramp: ratio = si / (num_scales - 1) inside the official scale loop; the last scale (the official
  "maskgit" stage, after the loop) reuses the ratio the loop left behind, (num_scales - 2) / (num_scales - 1).
  t = cfg * ratio: 0 at si = 0 (unguided), cfg * 12/13 (about 4.15 for cfg 4.5) at the last of 14 scales. The
  residual diffusion head takes the same last-scale t for its CFG on eps (sparvar.hart.diffusion).
- Logits over the 4096 codebook entries: (1 + t) * cond - t * uncond, rows [cond; uncond] as the model runs them.
- top-k 600 for si < 7, then 300: the official loop hard-codes these and ignores its own top_k argument.
  top-p is off (0). No temperature.
- One multinomial draw per token from an explicit torch.Generator.
- more_smooth (official sample.py / app.py default True; off here: official issue #14, FID needs it off): the
  code vector is a soft mix of the codebook, gumbel-softmax over the top-k/top-p *filtered* logits scaled by
  (1 + ratio), tau = max(0.27 * (1 - 0.95 * ratio), 0.005). Its gumbel noise comes from the same generator right
  after the multinomial draw (the official order), so the sampled indices do not depend on the flag.

Scale 0's logits are those of the last text slot only (official logits[:, [-1]]): the model's step returns that
single row (sparvar.hart.model), so every function here sees (rows, n, V) whatever the scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..generate import MAX_CFG, SeededRows


@dataclass(frozen=True)
class HartSampling:
    cfg: float = 4.5  # guidance at the ramp's end: t = cfg * ratio (sample.py / app.py default)
    top_k_coarse: int = 600  # top-k at scales si < fine_from (0 = off)
    top_k_fine: int = 300  # top-k at scales si >= fine_from, the last (maskgit) stage included (0 = off)
    fine_from: int = 7
    top_p: float = 0.0  # nucleus mass kept (0 = off, as official)
    more_smooth: bool = False  # gumbel-softmax codebook mix instead of the sampled entry (issue #14: off for FID)

    def __post_init__(self):
        if not (isinstance(self.cfg, (int, float)) and math.isfinite(self.cfg) and 0 <= self.cfg <= MAX_CFG):
            raise ValueError(f"cfg must be a finite number in [0, {MAX_CFG:g}], got {self.cfg!r}")
        for name in ("top_k_coarse", "top_k_fine", "fine_from"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 <= self.top_p <= 1.0):
            raise ValueError(f"top_p must be in [0, 1] (0 = off), got {self.top_p!r}")
        if not isinstance(self.more_smooth, bool):
            raise ValueError(f"more_smooth must be a bool, got {self.more_smooth!r}")

    @property
    def guided(self) -> bool:
        """With cfg 0 every t is 0 and the unconditional rows never matter, so a runner may skip them."""
        return self.cfg != 0

    def top_k(self, si: int) -> int:
        return self.top_k_coarse if si < self.fine_from else self.top_k_fine


def guidance_ratio(si: int, num_scales: int) -> float:
    """The official per-scale ratio: si / (num_scales - 1), the last scale reusing the one before it."""
    if num_scales < 2:
        raise ValueError(f"a HART schedule has at least 2 scales, got {num_scales}")
    if not 0 <= si < num_scales:
        raise ValueError(f"scale index {si} out of range for {num_scales} scales")
    return min(si, num_scales - 2) / (num_scales - 1)


def guidance_scale(si: int, num_scales: int, cfg: float) -> float:
    """t at scale si: logits (and the diffusion head's eps, at the last scale) = (1 + t) cond - t uncond."""
    return cfg * guidance_ratio(si, num_scales)


def smooth_tau(ratio: float) -> float:
    """more_smooth's gumbel-softmax temperature (official, after MaskGIT)."""
    return max(0.27 * (1 - ratio * 0.95), 0.005)


def guide_logits(logits: torch.Tensor, t: float) -> torch.Tensor:
    """logits (2B, n, V) rows [cond; uncond] -> (B, n, V) = (1 + t) * cond - t * uncond."""
    if logits.ndim != 3 or logits.shape[0] % 2:
        raise ValueError(f"guided logits must be (2B, n, V) with rows [cond; uncond], got {tuple(logits.shape)}")
    cond, uncond = logits.chunk(2, dim=0)
    return (1 + t) * cond - t * uncond


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits (..., V) -> a copy with the removed entries at -inf, as official sample_with_top_k_top_p_.

    top-k keeps every entry >= the k-th largest (ties at the boundary survive, as official); k >= V keeps all
    (HART-tiny's 64-entry codebook under the official 600/300). top-p drops, in ascending order, the entries whose
    cumulative probability stays <= 1 - top_p; the most likely entry always stays.
    """
    if top_k < 0 or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_k must be >= 0 and top_p in [0, 1], got top_k={top_k}, top_p={top_p}")
    V = logits.shape[-1]
    logits = logits.clone()
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        ascending, order = logits.sort(dim=-1, descending=False)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False
        logits.masked_fill_(drop.scatter(-1, order, drop), -torch.inf)
    return logits


def sample_scale(logits: torch.Tensor, si: int, num_scales: int, sampling: HartSampling, generator: SeededRows,
                 codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale's tokens: logits -> (indices (B, n) int64, code vectors (B, n, Cvae) float32).

    logits: (2B, n, V) rows [cond; uncond] when sampling.guided, else the B conditional rows.
    codebook: (V, Cvae), the VQ embedding. The code vectors are codebook[indices], or the gumbel-softmax mix under
    more_smooth. Indices always come from the multinomial draw (the diffusion head's condition uses them).
    """
    V = logits.shape[-1]
    if codebook.ndim != 2 or codebook.shape[0] != V:
        raise ValueError(f"codebook must be (V={V}, Cvae), got {tuple(codebook.shape)}")
    if generator.device.type != logits.device.type:  # sparvar.generate.SeededRows: one stream, or one per row
        raise ValueError(f"generator on {generator.device} but logits on {logits.device}: create the generator on "
                         "the logits' device")
    ratio = guidance_ratio(si, num_scales)
    logits = logits.float()
    if sampling.guided:
        logits = guide_logits(logits, sampling.cfg * ratio)
    logits = filter_top_k_top_p(logits, sampling.top_k(si), sampling.top_p)  # (B, n, V)
    B, n, _ = logits.shape
    probs = logits.softmax(dim=-1).view(B * n, V)
    indices = generator.multinomial(probs).view(B, n)
    if not sampling.more_smooth:
        return indices, F.embedding(indices, codebook.float())
    gumbel = -generator.exponential(logits.shape).log()
    weights = ((logits * (1 + ratio) + gumbel) / smooth_tau(ratio)).softmax(dim=-1)  # (B, n, V)
    return indices, weights @ codebook.float()
