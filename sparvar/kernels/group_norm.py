"""GroupNorm (optionally fused with SiLU) for the BSQ tokenizer's decoder, in Triton: one read of x for the
statistics, one read and one write for the normalised output.

Why (bench/results/profile_h200_compiled_glue.json, 1024² decode on an H200, group "vae decode"): of 41 ms of
kernels, about 18 ms were GroupNorm + SiLU glue built from torch ops (sparvar.vae.split_group_norm, then F.silu,
35 times): a `mean` and a `linalg.vector_norm` reduction (two reads of x, 3.5 ms each), a broadcasting `addcmul`
(a read and a write, on torch's non-vectorised broadcast path: 8.8 ms), a separate SiLU (another read and write,
1.9 ms), and a handful of small launches for the statistics. Per normalisation of N elements of 2 bytes that was 12N bytes of
traffic; here it is 6N, in three launches:

    stats   grid (chunks, B)  each program sums x and x² per channel over a run of spatial tiles (fp32)
                              -> partial sums (2, B, chunks, C); about 4 programs per SM in all, so that a
                              batch-1 input fills the GPU (the native GroupNorm runs one block per (batch, group))
    finish  grid (G, B)       adds a group's partials in a fixed order (deterministic, no atomics) -> mean,
                              var, then per-channel fp32 scale / shift (2, B, C)
    apply   grid (tiles, B)   out = x * scale[b, c] + shift[b, c] [then SiLU] in fp32, rounded once to x's dtype

Numerics follow sparvar.vae.split_group_norm (the torch reference the tests compare against): statistics in
fp32 as var = max(E[x²] - E[x]², 0) (for bf16/fp16 inputs the rounding of x itself costs more than the
cancellation; for fp32 inputs the reference's two-pass var_mean is more exact, which only matters when
|mean| >> std), scale = weight * rsqrt(var + eps) and shift = bias - mean * scale kept in fp32, one rounding at
the end. With `silu=True` SiLU is applied to the fp32 normalised value before that rounding, whereas eager
`F.silu(norm(x))` applies it to the bf16-rounded norm output and rounds again: the fused result is the more
exact one and differs from eager by at most about one bf16 step.

x is (B, C, H, W) in bf16, fp16 or fp32, dense in channels_last (NHWC, what the decoder runs in) or contiguous
NCHW; the output has x's dtype and memory format. Forward only (no autograd).
"""
from __future__ import annotations

import functools
import math

import torch

from sparvar.kernels.csla import HAS_TRITON, INT32_MAX, check_device, interpreting, launch_device, require_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
STATS_TILE = 4096  # elements per stats tile (x and x² accumulate in registers across a chunk's tiles)
APPLY_TILE = 8192  # elements per apply program
FINISH_BLOCK_K = 64  # partial rows per step of the finishing reduction
MAX_CHANNELS = 4096  # a tile row holds every channel of one position
PROGRAMS_PER_SM = 4  # stats programs per SM: enough loads in flight, few partials to finish


# ------------------------------------------------------------------------------------------------ kernels
if HAS_TRITON:

    @triton.jit
    def _offsets(s, c, S, C, CHANNELS_LAST: tl.constexpr):
        """Element offsets within one batch row of spatial positions s (BLOCK_S, 1) and channels c (1, BLOCK_C)."""
        if CHANNELS_LAST:
            return s * C + c
        else:
            return c * S + s

    @triton.jit
    def _group_norm_stats_kernel(x_ptr, pre_bias_ptr, part_ptr, S, C, tiles_per_chunk, num_chunks, part_stride,
                                 CHANNELS_LAST: tl.constexpr, PRE_BIAS: tl.constexpr,
                                 BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        """Per-channel fp32 sums of x (+ pre_bias) and its square over spatial tiles [chunk * tiles_per_chunk, ...)
        of batch row b."""
        chunk = tl.program_id(0)
        b = tl.program_id(1)
        s_local = tl.arange(0, BLOCK_S)[:, None]
        c = tl.arange(0, BLOCK_C)[None, :]
        c_mask = c < C
        base = x_ptr + b.to(tl.int64) * S * C
        acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
        acc_sq = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
        if PRE_BIAS:
            pre_bias = tl.load(pre_bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        first = chunk * tiles_per_chunk
        for t in range(tiles_per_chunk):
            s = (first + t) * BLOCK_S + s_local
            m = (s < S) & c_mask
            v = tl.load(base + _offsets(s, c, S, C, CHANNELS_LAST), mask=m, other=0.0).to(tl.float32)
            if PRE_BIAS:
                v = tl.where(m, v + pre_bias, 0.0)
            acc += v
            acc_sq += v * v
        cols = tl.arange(0, BLOCK_C)
        out = part_ptr + (b * num_chunks + chunk) * C + cols  # partials (2, B, chunks, C): sums, then sums of squares
        tl.store(out, tl.sum(acc, axis=0), mask=cols < C)
        tl.store(out + part_stride, tl.sum(acc_sq, axis=0), mask=cols < C)

    @triton.jit
    def _group_norm_finish_kernel(part_ptr, w_ptr, b_ptr, pre_bias_ptr, ss_ptr, num_chunks, C, Cg, part_stride,
                                  ss_stride, n, eps, PRE_BIAS: tl.constexpr,
                                  BLOCK_K: tl.constexpr, BLOCK_CG: tl.constexpr):
        """One (group, batch row): its partial sums in a fixed order -> mean, var -> fp32 scale, shift per channel.
        With a pre-bias p the apply pass computes (x + p) * scale + shift' as x * scale + (shift' + p * scale)."""
        g = tl.program_id(0)
        b = tl.program_id(1)
        k = tl.arange(0, BLOCK_K)[:, None]
        j = tl.arange(0, BLOCK_CG)[None, :]
        c = g * Cg + j
        j_mask = j < Cg
        rows = part_ptr + b * num_chunks * C
        acc = tl.zeros((BLOCK_K, BLOCK_CG), dtype=tl.float32)
        acc_sq = tl.zeros((BLOCK_K, BLOCK_CG), dtype=tl.float32)
        for k0 in range(0, num_chunks, BLOCK_K):
            m = (k0 + k < num_chunks) & j_mask
            ptr = rows + (k0 + k) * C + c
            acc += tl.load(ptr, mask=m, other=0.0)
            acc_sq += tl.load(ptr + part_stride, mask=m, other=0.0)
        mean = tl.sum(tl.sum(acc, axis=1), axis=0) / n
        var = tl.maximum(tl.sum(tl.sum(acc_sq, axis=1), axis=0) / n - mean * mean, 0.0)
        rstd = tl.rsqrt(var + eps)
        cols = g * Cg + tl.arange(0, BLOCK_CG)
        cm = tl.arange(0, BLOCK_CG) < Cg
        scale = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32) * rstd
        shift = tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32) - mean * scale
        if PRE_BIAS:
            shift += tl.load(pre_bias_ptr + cols, mask=cm, other=0.0).to(tl.float32) * scale
        tl.store(ss_ptr + b * C + cols, scale, mask=cm)
        tl.store(ss_ptr + ss_stride + b * C + cols, shift, mask=cm)

    @triton.jit
    def _group_norm_apply_kernel(x_ptr, out_ptr, ss_ptr, S, C, ss_stride,
                                 CHANNELS_LAST: tl.constexpr, SILU: tl.constexpr,
                                 BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        """out = x * scale + shift [then SiLU] for BLOCK_S spatial positions x all channels of batch row b."""
        b = tl.program_id(1)
        s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)[:, None]
        c = tl.arange(0, BLOCK_C)[None, :]
        c_mask = c < C
        scale = tl.load(ss_ptr + b * C + c, mask=c_mask, other=0.0)
        shift = tl.load(ss_ptr + ss_stride + b * C + c, mask=c_mask, other=0.0)
        off = b.to(tl.int64) * S * C + _offsets(s, c, S, C, CHANNELS_LAST)
        m = (s < S) & c_mask
        y = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) * scale + shift
        if SILU:
            y = y / (1.0 + tl.exp(-y))  # torch's silu formula, here on the fp32 value
        tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------------ wrapper
@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _stats_chunks(S: int, block_s: int, B: int, device: torch.device) -> tuple[int, int]:
    """(tiles_per_chunk, chunks per batch row): about PROGRAMS_PER_SM programs per SM over all batch rows."""
    n_tiles = -(-S // block_s)
    programs = 4 if interpreting() else PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None
                                                                     else torch.cuda.current_device())
    per_batch = max(1, min(n_tiles, programs // B))
    tiles_per_chunk = -(-n_tiles // per_batch)
    return tiles_per_chunk, -(-n_tiles // tiles_per_chunk)


def check_image(name: str, label: str, x) -> None:
    """A decoder activation for a kernel: a non-empty 4-D (B, C, H, W) tensor of bf16, fp16 or fp32 with at most
    MAX_CHANNELS channels (TypeError/ValueError naming the problem)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: {label} must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name}: {label} must be bfloat16, float16 or float32, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name}: empty input, {label} has shape {tuple(x.shape)}")
    if x.shape[1] > MAX_CHANNELS:
        raise ValueError(f"{name}: {x.shape[1]} channels; at most {MAX_CHANNELS} are supported (a tile row holds all "
                         "channels)")


def _check(name: str, x, weight, bias, num_groups, eps) -> bool:
    """Validate the inputs (TypeError/ValueError naming the problem); True when x is channels_last."""
    check_image(name, "x", x)
    B, C, H, W = x.shape
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups <= 0 or C % num_groups:
        raise ValueError(f"{name}: num_groups must be a positive int dividing the {C} channels, got {num_groups!r}")
    for label, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != (C,) or not t.is_contiguous():
            raise ValueError(f"{name}: {label} must be contiguous ({C},) (one value per channel), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: {label} must be floating point, got {t.dtype}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"{name}: eps must be a finite non-negative float, got {eps!r}")
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    if not channels_last and not x.is_contiguous():
        raise ValueError(f"{name}: x must be dense in channels_last (NHWC) or contiguous NCHW memory format, got "
                         f"shape {tuple(x.shape)} with strides {x.stride()}; call .contiguous(memory_format=...) first")
    if C * H * W > INT32_MAX:
        raise ValueError(f"{name}: one batch row holds {C * H * W} elements, over 2**31 - 1; int32 offsets would overflow")
    if B > 65535:
        raise ValueError(f"{name}: batch {B} exceeds the launch grid limit 65535")
    check_device(name, x, hint="use torch.nn.functional.group_norm elsewhere", weight=weight, bias=bias)
    return channels_last


def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float = 1e-5,
               silu: bool = False, pre_bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.group_norm(x + pre_bias, num_groups, weight, bias, eps), then SiLU when `silu`, computed as described in the
    module docstring. x (B, C, H, W) bf16/fp16/fp32, channels_last or contiguous NCHW; weight, bias (C,) any float
    dtype; pre_bias None or (C,) per-channel values added to x in fp32 (the bias of the convolution that produced x,
    which then needs no pass of its own). Returns a new tensor of x's shape, dtype and memory format.
    Deterministic (no atomics); forward only."""
    name = "group_norm"
    require_triton(name)
    channels_last = _check(name, x, weight, bias, num_groups, eps)
    if pre_bias is not None:
        if not isinstance(pre_bias, torch.Tensor) or pre_bias.shape != (x.shape[1],) or not pre_bias.is_contiguous() \
                or not pre_bias.is_floating_point():
            raise ValueError(f"{name}: pre_bias must be None or a contiguous float ({x.shape[1]},) tensor, got "
                             f"{tuple(pre_bias.shape) if isinstance(pre_bias, torch.Tensor) else type(pre_bias).__name__}")
        check_device(name, x, pre_bias=pre_bias)
    B, C, H, W = x.shape
    S, G = H * W, num_groups
    block_c = triton.next_power_of_2(C)
    small = interpreting()  # small tiles there: the tests' inputs then span several tiles and chunks
    stats_s = max(1, (256 if small else STATS_TILE) // block_c)
    apply_s = max(1, (256 if small else APPLY_TILE) // block_c)
    tiles_per_chunk, chunks = _stats_chunks(S, stats_s, B, x.device)

    partials = torch.empty((2, B, chunks, C), dtype=torch.float32, device=x.device)
    scale_shift = torch.empty((2, B, C), dtype=torch.float32, device=x.device)
    out = torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    has_pre_bias = pre_bias is not None
    pre_bias = pre_bias if has_pre_bias else weight  # any pointer when PRE_BIAS is off: never read
    with launch_device(x):
        _group_norm_stats_kernel[(chunks, B)](
            x, pre_bias, partials, S, C, tiles_per_chunk, chunks, B * chunks * C,
            CHANNELS_LAST=channels_last, PRE_BIAS=has_pre_bias, BLOCK_S=stats_s, BLOCK_C=block_c, num_warps=8)
        _group_norm_finish_kernel[(G, B)](
            partials, weight, bias, pre_bias, scale_shift, chunks, C, C // G, B * chunks * C, B * C, float((C // G) * S),
            float(eps), PRE_BIAS=has_pre_bias, BLOCK_K=FINISH_BLOCK_K, BLOCK_CG=triton.next_power_of_2(C // G), num_warps=4)
        _group_norm_apply_kernel[(triton.cdiv(S, apply_s), B)](
            x, out, scale_shift, S, C, B * C,
            CHANNELS_LAST=channels_last, SILU=bool(silu), BLOCK_S=apply_s, BLOCK_C=block_c, num_warps=8)
    return out
