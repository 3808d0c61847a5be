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
# single query token, i.e. the first scale); bench/e2e.py records which scales cuDNN took. "engine" (the torch-cuda
# engine's) is "cudnn" except for the smallest calls, which our dense Triton kernel runs (see ENGINE_SELF_MAX_Q).
SDPA_KERNELS = ("flash", "cudnn", "efficient", "math")
DENSE_BACKENDS = ("reference", "sdpa", "engine", *SDPA_KERNELS)

# Where cuDNN's fixed cost per call is most of the call, our dense Triton kernel is faster
# (bench/results/small_scales_h200.json: Infinity-2B and 8B at 1024^2, per call inside a CUDA graph):
# - self-attention of up to 144 query tokens per row (scales 0-5): 2.6-11.4 us, against cuDNN's 7.0-11.5 (FA2 5.5
#   at the first scale, which cuDNN declines); from 256 tokens on cuDNN is faster;
# - cross-attention over the 64-slot padded text for up to 1,024 query tokens (scales 0-9): 3.2-16.6 us, against
#   cuDNN's 4.1-22.5 with the padding bias (the kernel reads each row's real text length instead).
ENGINE_SELF_MAX_Q = 144
ENGINE_CROSS_MAX_Q = 1024
ENGINE_TILE = (64, 64)  # the tile measured there; fixed, as an autotuning pass cannot run inside a graph capture


REFERENCE_SCORE_BYTES = 256 << 20  # fp32 scores held at once; the rest of the heads wait their turn


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain softmax(q k^T) v in fp32 with an optional boolean keep-mask broadcastable to (B, H, Lq, Lk).

    A few heads at a time: a whole 1024^2 last scale at once would hold GBs of fp32 scores (HART-0.7b scale 13:
    2 x 24 x 4,096 x 9,750 x 4 B = 7.7 GB, times the softmax's temporaries)."""
    B, H, Lq, _ = q.shape
    heads = max(1, REFERENCE_SCORE_BYTES // max(1, B * Lq * k.shape[-2] * 4))
    if heads >= H:
        return _reference_attention(q, k, v, mask)
    # broadcasting aligns from the right: a mask's dim -3, if it has one of size H, is the heads' (3-D or 4-D)
    per_head_mask = mask is not None and mask.dim() >= 3 and mask.shape[-3] == H
    return torch.cat([_reference_attention(q[:, h:h + heads], k[:, h:h + heads], v[:, h:h + heads],
                                           mask.narrow(-3, h, min(heads, H - h)) if per_head_mask else mask)
                      for h in range(0, H, heads)], dim=1)


def _reference_attention(q, k, v, mask):
    scores = q.float() @ k.float().transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def _engine_kernel_takes(q: torch.Tensor, max_q: int) -> bool:
    from .kernels.csla import HAS_TRITON, kernels_take

    return HAS_TRITON and q.is_cuda and q.shape[2] <= max_q and kernels_take(q.dtype, q.shape[3])


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    if backend == "engine":
        if _engine_kernel_takes(q, ENGINE_SELF_MAX_Q):
            from .kernels.csla import dense_attention as triton_dense_attention

            return triton_dense_attention(q, k, v, block_m=ENGINE_TILE[0], block_n=ENGINE_TILE[1])
        backend = "cudnn"
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


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor,
                    key_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q (B, H, Lq, D) over the text's k, v (B, H, L, D), padding masked by the additive key_bias
    (B, 1, 1, L): 0 at real tokens, -inf at padding. key_lens (B,) int32 is the same mask as a count (the padding is
    a suffix), for kernels that take lengths; unused here."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)


def engine_cross_attention(q, k, v, key_bias, key_lens=None) -> torch.Tensor:
    """cross_attention for the torch-cuda engine: our dense kernel over each row's real text (key_lens) up to
    ENGINE_CROSS_MAX_Q query tokens, cuDNN (through SDPA) above."""
    if key_lens is not None and _engine_kernel_takes(q, ENGINE_CROSS_MAX_Q):
        from .kernels.csla import dense_attention as triton_dense_attention

        # cross-attention keeps SDPA's default softmax scale, 1/sqrt(D) (only self-attention's q carries its own)
        return triton_dense_attention(q, k, v, scale=q.shape[-1] ** -0.5, block_m=ENGINE_TILE[0],
                                      block_n=ENGINE_TILE[1], kv_lens=key_lens)
    return cross_attention(q, k, v, key_bias)


def self_attention(q, k, v, *, layer: int, scale: int, plan=None, backend: str = "sdpa") -> torch.Tensor:
    """Attention of scale `scale`'s queries in layer `layer` over the visible KV cache."""
    if plan is not None:
        out = plan.attend(q, k, v, layer=layer, scale=scale)
        if out is not None:  # None: the plan keeps this (layer, scale) dense
            return out
    return dense_attention(q, k, v, backend)
