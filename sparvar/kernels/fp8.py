"""Per-row FP8 quantisation of activations in one pass (reference: sparvar.fp8.quantize_rows_ref).

Eager torch takes four passes (abs, amax, divide, cast) and as many launches; the FP8 linears quantise every
input of a block's six GEMMs, so this is their overhead. One program per row: load, absolute maximum, scale,
round to e4m3 (round to nearest, saturating), store the values and the row's fp32 scale. With gelu (fc2's input)
the tanh GELU comes first, in the same pass: the FFN's hidden activation, the largest tensor of a block, is then
read once between the two FP8 GEMMs instead of being read and written again by a separate GELU.
"""
from __future__ import annotations

import torch

from sparvar.fp8 import FP8, FP8_MAX, MIN_AMAX
from sparvar.kernels.csla import HAS_TRITON, check_device, launch_device, require_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

if HAS_TRITON:
    _FP8_MAX = tl.constexpr(FP8_MAX)  # a jit function reads module globals only as constexprs
    _MIN_AMAX = tl.constexpr(MIN_AMAX)

    _GELU_K0 = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
    _GELU_K1 = tl.constexpr(0.044715)

    @triton.jit
    def gelu_tanh_f32(x):
        """F.gelu(x, approximate="tanh") in fp32; tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|) (no
        overflow for large |u|)."""
        u = _GELU_K0 * (x + _GELU_K1 * x * x * x)
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        return 0.5 * x * (1.0 + tl.where(u < 0, -t, t))

    @triton.jit
    def store_quantized_row(x, q_ptr, s_ptr, row, cols, m):
        """Quantise one fp32 row x (masked columns 0) as quantize_rows_ref does: its absolute maximum maps to the
        largest e4m3 value. Stores the FP8 values at q_ptr + row * len + cols and the fp32 scale at s_ptr + row."""
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), _MIN_AMAX) / _FP8_MAX
        q = tl.minimum(tl.maximum(x / scale, -_FP8_MAX), _FP8_MAX)
        tl.store(q_ptr + cols, q.to(q_ptr.dtype.element_ty), mask=m)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, BLOCK_K: tl.constexpr, GELU: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_K)
        m = cols < K
        x = tl.load(x_ptr + row * K + cols, mask=m, other=0.0)
        if GELU:  # rounded to x's dtype, as F.gelu's output is before the reference quantises it
            x = gelu_tanh_f32(x.to(tl.float32)).to(x_ptr.dtype.element_ty)
        store_quantized_row(x.to(tl.float32), q_ptr + row * K, s_ptr, row, cols, m)


def quantize_rows_triton(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) contiguous bf16/fp16/fp32 -> (FP8 e4m3 (M, K), fp32 scales (M, 1)) of x, or of gelu_tanh(x)."""
    name = "quantize_rows"
    require_triton(name)
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"{name}: x must be a contiguous (M, K) matrix, got shape {tuple(x.shape)}, strides {x.stride()}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{name}: x must be bf16, fp16 or fp32, got {x.dtype}")
    M, K = x.shape
    if K == 0:  # no values to scale by: the scales would be left unwritten
        raise ValueError(f"{name}: x has empty rows ({M}, 0); every row needs at least one value")
    check_device(name, x, hint="use sparvar.fp8.quantize_rows_ref elsewhere")
    q = torch.empty((M, K), dtype=FP8, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if x.numel():
        block = triton.next_power_of_2(K)
        with launch_device(x):
            _quantize_rows_kernel[(M,)](x, q, scale, K, BLOCK_K=block, GELU=bool(gelu),
                                        num_warps=min(16, max(4, block // 1024)))
    return q, scale
