"""All self-attention of the model goes through `self_attention`.

q is already L2-normalised and multiplied by the learned per-head scale, so the softmax scale is 1.
Shapes: q (B, H, Lq, D); k, v (B, H, Lk, D) = the whole KV cache visible to this scale (earlier scales
and the scale itself, unmasked). B is 2x the image batch when CFG is on (cond rows first).

A `plan` (see sparvar/sparse.py) decides per (layer, scale) whether attention is dense, CSLA or CS4A;
`plan=None` means dense everywhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# "sdpa" lets PyTorch pick; the others pin SDPA kernels (for benchmarks). "flash", "efficient" and "math" are one
# kernel each. "cudnn" prefers cuDNN and takes FlashAttention-2 for the shapes cuDNN declines (it has no kernel for a
# single query token, i.e. the first scale); bench/e2e.py records which scales cuDNN took.
SDPA_KERNELS = ("flash", "cudnn", "efficient", "math")
DENSE_BACKENDS = ("reference", "sdpa", *SDPA_KERNELS)


REFERENCE_SCORE_BYTES = 256 << 20  # fp32 scores held at once; the rest of the heads wait their turn


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain softmax(q k^T) v in fp32 with an optional boolean keep-mask broadcastable to (B, H, Lq, Lk).

    A few heads at a time: a whole 1024^2 last scale at once would hold GBs of fp32 scores (HART-0.7b scale 13:
    2 x 24 x 4,096 x 9,750 x 4 B = 7.7 GB, times the softmax's temporaries)."""
    B, H, Lq, _ = q.shape
    heads = max(1, REFERENCE_SCORE_BYTES // max(1, B * Lq * k.shape[-2] * 4))
    if heads >= H:
        return _reference_attention(q, k, v, mask)
    per_head_mask = mask is not None and mask.dim() == 4 and mask.shape[1] == H
    return torch.cat([_reference_attention(q[:, h:h + heads], k[:, h:h + heads], v[:, h:h + heads],
                                           mask[:, h:h + heads] if per_head_mask else mask)
                      for h in range(0, H, heads)], dim=1)


def _reference_attention(q, k, v, mask):
    scores = q.float() @ k.float().transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)
    if backend == "reference":
        return reference_attention(q, k, v)
    if backend in SDPA_KERNELS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernels = {"flash": [SDPBackend.FLASH_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION],
                   "efficient": [SDPBackend.EFFICIENT_ATTENTION], "math": [SDPBackend.MATH]}[backend]
        with sdpa_kernel(kernels, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, scale=1.0)
    raise ValueError(f"unknown dense attention backend {backend!r}; expected one of {DENSE_BACKENDS}")


def self_attention(q, k, v, *, layer: int, scale: int, plan=None, backend: str = "sdpa") -> torch.Tensor:
    """Attention of scale `scale`'s queries in layer `layer` over the visible KV cache."""
    if plan is not None:
        out = plan.attend(q, k, v, layer=layer, scale=scale)
        if out is not None:  # None: the plan keeps this (layer, scale) dense
            return out
    return dense_attention(q, k, v, backend)
