"""The element-wise glue of an Infinity block as Triton kernels: one pass over memory where eager torch (and
torch.compile with dynamic shapes) made several.

Their torch references are the model's own functions in sparvar/model.py (`modulate`, `gated_residual`,
`residual_layer_norm`, `residual_modulate`, `attention_inputs`, `linear_gelu`); `triton_block_ops()` returns these
kernels as a `sparvar.model.BlockOps`, which the torch-cuda engine runs inside its CUDA graphs.

Why (bench/results/profile_h200.json, 2B, scale 12, per block): torch.compile's dynamic-shape kernels for the
cosine q/k + RoPE took 0.47 ms and the LayerNorm + AdaLN modulation 0.11 ms, against 0.03 ms and 0.015 ms of
memory traffic at the H200's bandwidth; the KV-cache append and the residual adds were more passes again.

    residual_norm(x, y=None, gate=None, weight=, bias=, scale=, shift=)   x' = x + [gate *] y; out = norm(x')
        (LayerNorm, AdaLN modulation or RMSNorm; optionally FP8 rows with their scales for the next GEMM)
    qkv_rope(qkv, scale_mul, rope, k_out, v_out)                          cosine q/k + RoPE; k, v into the cache
    qkv_rope_half(qkv, q_scale, rope, k_out, v_out)                       HART: RoPE by halves, per-row tables
    swiglu(gate, up)                                                      HART's MLP activation

HART's references are its own functions in sparvar/hart/model.py (`attention_inputs`, `swiglu`, `rms_norm`).

Rounding follows the references step by step (each bf16 rounding where eager torch rounds), so results differ
from them only in the order of the fp32 reductions.
"""
from __future__ import annotations

import torch

from sparvar.fp8 import FP8, Fp8Rows
from sparvar.kernels.csla import HAS_TRITON, check_device, interpreting, launch_device, require_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from sparvar.kernels.fp8 import store_quantized_row

DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # fp32: the engine's checks against an fp32 model
NORM_NONE, NORM_AFFINE, NORM_MODULATE, NORM_RMS = 0, 1, 2, 3


# ------------------------------------------------------------------------------------------------ kernels
if HAS_TRITON:

    @triton.jit
    def _residual_norm_kernel(x_ptr, y_ptr, gate_ptr, x_out_ptr, out_ptr, w_ptr, b_ptr, s_ptr,
                              rows_per_batch, C, gate_stride, w_stride, b_stride, eps,
                              HAS_Y: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr, QUANT: tl.constexpr,
                              BLOCK_C: tl.constexpr):
        """One row of C channels: optional (gated) residual add, then optional LayerNorm (affine or AdaLN) or
        RMSNorm (weight); with
        QUANT the normalised row is stored quantised to FP8 (out_ptr) with its fp32 scale (s_ptr), as
        sparvar.fp8.quantize_rows_ref would quantise the rounded output: the next GEMM's input, without the
        bf16 write and re-read in between."""
        row = tl.program_id(0).to(tl.int64)
        batch = row // rows_per_batch
        cols = tl.arange(0, BLOCK_C)
        m = cols < C
        dtype = x_ptr.dtype.element_ty  # out_ptr may be FP8 (QUANT)
        x = tl.load(x_ptr + row * C + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_Y:
            y = tl.load(y_ptr + row * C + cols, mask=m, other=0.0).to(tl.float32)
            if GATED:  # x + (y * gate).to(dtype): the product is rounded before the add, as in eager torch
                g = tl.load(gate_ptr + batch * gate_stride + cols, mask=m, other=0.0).to(tl.float32)
                y = (y * g).to(dtype).to(tl.float32)
            x = (x + y).to(dtype)
            tl.store(x_out_ptr + row * C + cols, x, mask=m)
            x = x.to(tl.float32)
        if NORM == 3:  # RMSNorm (sparvar.model.rms_norm): weight (C,)
            w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
            out = x * tl.rsqrt(tl.sum(x * x, axis=0) / C + eps) * w
        elif NORM != 0:
            mean = tl.sum(x, axis=0) / C
            diff = tl.where(m, x - mean, 0.0)
            var = tl.sum(diff * diff, axis=0) / C
            normed = diff * tl.rsqrt(var + eps)
            if NORM == 1:  # nn.LayerNorm: weight, bias (C,)
                w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
                b = tl.load(b_ptr + cols, mask=m, other=0.0).to(tl.float32)
                out = normed * w + b
            else:  # AdaLN modulation: scale, shift per batch row, fp32
                s = tl.load(w_ptr + batch * w_stride + cols, mask=m, other=0.0)
                b = tl.load(b_ptr + batch * b_stride + cols, mask=m, other=0.0)
                out = normed * (s + 1.0) + b
        if NORM != 0:
            if QUANT:
                out = tl.where(m, out.to(dtype).to(tl.float32), 0.0)  # the reference quantises the rounded output
                store_quantized_row(out, out_ptr + row * C, s_ptr, row, cols, m)
            else:
                tl.store(out_ptr + row * C + cols, out.to(dtype), mask=m)

    @triton.jit
    def _rope_pairs(x, cos, sin, BLOCK_T: tl.constexpr, D: tl.constexpr):
        """Rotate adjacent pairs (x[2i], x[2i+1]) of each row by angle i: the model's `apply_rope`."""
        even, odd = tl.split(tl.reshape(x, (BLOCK_T, D // 2, 2)))
        return tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (BLOCK_T, D))

    @triton.jit
    def _qkv_rope_kernel(qkv_ptr, q_ptr, k_ptr, v_ptr, n, H,
                         s_qkv_b, s_qkv_t, s_q_b, s_q_h, s_q_t, s_k_b, s_k_h, s_k_t, s_v_b, s_v_h, s_v_t,
                         scale_ptr, rope_ptr,
                         D: tl.constexpr, BLOCK_T: tl.constexpr):
        """BLOCK_T tokens of one (batch row, head): unit q times the head's temperature and unit k, both rotated,
        and v, from the fused projection's output (B, n, 3, H, D) to q and the KV cache."""
        pid_t = tl.program_id(0)
        b = tl.program_id(1) // H
        h = tl.program_id(1) % H
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        tm = (t < n)[:, None]
        d = tl.arange(0, D)[None, :]
        half = tl.arange(0, D // 2)[None, :]
        dtype = q_ptr.dtype.element_ty
        src = qkv_ptr + b.to(tl.int64) * s_qkv_b + t[:, None].to(tl.int64) * s_qkv_t + h * D + d
        cos = tl.load(rope_ptr + t[:, None] * (D // 2) + half, mask=tm, other=0.0)
        sin = tl.load(rope_ptr + (n + t[:, None]) * (D // 2) + half, mask=tm, other=0.0)

        q = tl.load(src, mask=tm, other=0.0).to(tl.float32)
        q = q / tl.maximum(tl.sqrt(tl.sum(q * q, axis=1)), 1e-12)[:, None]  # F.normalize
        q = _rope_pairs(q * tl.load(scale_ptr + h), cos, sin, BLOCK_T, D)
        tl.store(q_ptr + b * s_q_b + h * s_q_h + t[:, None].to(tl.int64) * s_q_t + d, q.to(dtype), mask=tm)

        k = tl.load(src + H * D, mask=tm, other=0.0).to(tl.float32)
        k = _rope_pairs(k / tl.maximum(tl.sqrt(tl.sum(k * k, axis=1)), 1e-12)[:, None], cos, sin, BLOCK_T, D)
        tl.store(k_ptr + b * s_k_b + h * s_k_h + t[:, None].to(tl.int64) * s_k_t + d, k.to(dtype), mask=tm)

        v = tl.load(src + 2 * H * D, mask=tm, other=0.0)
        tl.store(v_ptr + b * s_v_b + h * s_v_h + t[:, None].to(tl.int64) * s_v_t + d, v, mask=tm)

    @triton.jit
    def _rope_halves(lo, hi, cos_ptr, sin_ptr, rows, half, tm, D: tl.constexpr):
        """x * cos + rotate_half(x) * sin for x = [lo | hi] with full-width (cos, sin) rows: HART's `apply_rope`."""
        cos_lo = tl.load(cos_ptr + rows + half, mask=tm, other=0.0)
        cos_hi = tl.load(cos_ptr + rows + D // 2 + half, mask=tm, other=0.0)
        sin_lo = tl.load(sin_ptr + rows + half, mask=tm, other=0.0)
        sin_hi = tl.load(sin_ptr + rows + D // 2 + half, mask=tm, other=0.0)
        return lo * cos_lo - hi * sin_lo, hi * cos_hi + lo * sin_hi

    @triton.jit
    def _qkv_rope_half_kernel(qkv_ptr, q_ptr, k_ptr, v_ptr, n, H,
                              s_qkv_b, s_qkv_t, s_q_b, s_q_h, s_q_t, s_k_b, s_k_h, s_k_t, s_v_b, s_v_h, s_v_t,
                              rope_ptr, q_scale, B,
                              D: tl.constexpr, BLOCK_T: tl.constexpr):
        """BLOCK_T tokens of one (batch row, head): q and k rotated by halves with this row's (cos, sin) tables, q
        times the softmax scale (rounded after the rotation, as the reference), from the fused projection's output
        (B, n, 3, H, D) to q and the KV cache."""
        pid_t = tl.program_id(0)
        b = tl.program_id(1) // H
        h = tl.program_id(1) % H
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        tm = (t < n)[:, None]
        half = tl.arange(0, D // 2)[None, :]
        dtype = q_ptr.dtype.element_ty
        src = qkv_ptr + b.to(tl.int64) * s_qkv_b + t[:, None].to(tl.int64) * s_qkv_t + h * D + half
        rows = (b.to(tl.int64) * n + t[:, None]) * D  # rope (2, B, n, D): cos at [0, b, t], sin at [1, b, t]
        sin_ptr = rope_ptr + B * n * D
        q_dst = q_ptr + b * s_q_b + h * s_q_h + t[:, None].to(tl.int64) * s_q_t + half
        k_dst = k_ptr + b * s_k_b + h * s_k_h + t[:, None].to(tl.int64) * s_k_t + half
        v_dst = v_ptr + b * s_v_b + h * s_v_h + t[:, None].to(tl.int64) * s_v_t + half

        lo, hi = _rope_halves(tl.load(src, mask=tm, other=0.0).to(tl.float32),
                              tl.load(src + D // 2, mask=tm, other=0.0).to(tl.float32), rope_ptr, sin_ptr, rows, half,
                              tm, D)
        lo = (lo.to(dtype).to(tl.float32) * q_scale).to(dtype)
        hi = (hi.to(dtype).to(tl.float32) * q_scale).to(dtype)
        tl.store(q_dst, lo, mask=tm)
        tl.store(q_dst + D // 2, hi, mask=tm)

        lo, hi = _rope_halves(tl.load(src + H * D, mask=tm, other=0.0).to(tl.float32),
                              tl.load(src + H * D + D // 2, mask=tm, other=0.0).to(tl.float32), rope_ptr, sin_ptr,
                              rows, half, tm, D)
        tl.store(k_dst, lo.to(dtype), mask=tm)
        tl.store(k_dst + D // 2, hi.to(dtype), mask=tm)

        tl.store(v_dst, tl.load(src + 2 * H * D, mask=tm, other=0.0), mask=tm)
        tl.store(v_dst + D // 2, tl.load(src + 2 * H * D + D // 2, mask=tm, other=0.0), mask=tm)

    @triton.jit
    def _swiglu_kernel(gate_ptr, up_ptr, out_ptr, numel, BLOCK: tl.constexpr):
        """silu(gate) * up, each rounded to the dtype where eager torch rounds (silu's output, then the product)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        dtype = out_ptr.dtype.element_ty
        g = tl.load(gate_ptr + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + offs, mask=m, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        tl.store(out_ptr + offs, (s * u).to(dtype), mask=m)


# ------------------------------------------------------------------------------------------------ wrappers
def _per_batch(name: str, label: str, t: torch.Tensor, B: int, C: int) -> int:
    """A (B, 1, C) / (B, C) per-batch-row vector with contiguous channels: its batch stride."""
    if (t.dim() not in (2, 3) or t.shape[0] != B or t.shape[-1] != C or any(d != 1 for d in t.shape[1:-1])
            or t.stride(-1) != 1):
        raise ValueError(f"{name}: {label} must hold one contiguous row of {C} channels per batch row ({B}), "
                         f"got shape {tuple(t.shape)}, strides {t.stride()}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name}: {label} must be float32 (the AdaLN output), got {t.dtype}")
    return t.stride(0)


def residual_norm(x: torch.Tensor, y: torch.Tensor | None = None, gate: torch.Tensor | None = None, *,
                  weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, eps: float = 1e-6,
                  rms: bool = False, quantize: bool = False):
    """x (B, n, C) contiguous (bf16, fp16 or fp32). With y: x' = x + y (gate (B, 1, C) fp32: x + (y * gate)), else x' = x.
    Norm: affine LayerNorm (weight, bias (C,)), AdaLN modulation (scale, shift (B, 1, C) fp32), RMSNorm (rms=True,
    weight (C,), no bias: sparvar.model.rms_norm), or none.
    Returns (x', normed) with either None when not computed (x' is None without y; normed None without a norm);
    with quantize, normed is sparvar.fp8.Fp8Rows: the normalised rows in FP8 with per-row scales."""
    name = "residual_norm"
    require_triton(name)
    if x.dim() != 3 or not x.is_contiguous() or x.dtype not in DTYPES:
        raise ValueError(f"{name}: x must be a contiguous (B, n, C) bf16/fp16/fp32 tensor, got {tuple(x.shape)} {x.dtype}")
    B, n, C = x.shape
    if C == 0:  # a norm over no channels is undefined (its statistics and FP8 scales would be left unwritten)
        raise ValueError(f"{name}: x has no channels (shape {tuple(x.shape)})")
    if y is not None and (y.shape != x.shape or y.dtype != x.dtype or not y.is_contiguous()):
        raise ValueError(f"{name}: y must be contiguous like x {tuple(x.shape)} {x.dtype}, got {tuple(y.shape)} {y.dtype}")
    if gate is not None and y is None:
        raise ValueError(f"{name}: a gate needs y")
    if rms:
        if weight is None or bias is not None or scale is not None or shift is not None:
            raise ValueError(f"{name}: RMSNorm (rms=True) takes a weight only")
        norm = NORM_RMS
    elif (weight is None) != (bias is None) or (scale is None) != (shift is None) or (weight is not None and scale is not None):
        raise ValueError(f"{name}: give weight and bias (LayerNorm), or scale and shift (AdaLN), or neither")
    else:
        norm = NORM_AFFINE if weight is not None else NORM_MODULATE if scale is not None else NORM_NONE
    if y is None and norm == NORM_NONE:
        raise ValueError(f"{name}: nothing to compute (no y, no norm)")
    if quantize and norm == NORM_NONE:
        raise ValueError(f"{name}: quantize applies to the normalised output; give a norm")
    gate_stride = _per_batch(name, "gate", gate, B, C) if gate is not None else 0
    if norm in (NORM_AFFINE, NORM_RMS):
        for label, t in (("weight", weight), ("bias", bias))[: 2 if norm == NORM_AFFINE else 1]:
            if t.shape != (C,) or not t.is_contiguous():
                raise ValueError(f"{name}: {label} must be contiguous ({C},), got {tuple(t.shape)}")
        w_stride = b_stride = 0
    elif norm == NORM_MODULATE:
        w_stride, b_stride = _per_batch(name, "scale", scale, B, C), _per_batch(name, "shift", shift, B, C)
        weight, bias = scale, shift
    else:
        w_stride = b_stride = 0
    check_device(name, x, hint="use sparvar.model's functions elsewhere", y=y, gate=gate, weight=weight, bias=bias)
    x_out = torch.empty_like(x) if y is not None else None
    out = torch.empty(x.shape, dtype=FP8 if quantize else x.dtype, device=x.device) if norm != NORM_NONE else None
    row_scale = torch.empty((B * n, 1), dtype=torch.float32, device=x.device) if quantize else None
    if x.numel():
        block = triton.next_power_of_2(C)
        dummy = x
        with launch_device(x):
            _residual_norm_kernel[(B * n,)](
                x, y if y is not None else dummy, gate if gate is not None else dummy, x_out if x_out is not None else dummy,
                out if out is not None else dummy, weight if weight is not None else dummy,
                bias if bias is not None else dummy, row_scale if quantize else dummy, n, C, gate_stride, w_stride,
                b_stride, float(eps), HAS_Y=y is not None, GATED=gate is not None, NORM=norm, QUANT=bool(quantize),
                BLOCK_C=block, num_warps=4 if block <= 2048 else 8)
    if quantize:
        return x_out, Fp8Rows(out.view(B * n, C), row_scale, x.shape)
    return x_out, out


def _check_attention_inputs(name: str, qkv: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor):
    """Checks shared by the attention-input kernels: the fused projection's output (B, n, 3C) and the KV-cache
    slots (B, H, n, D) it fills. Returns B, n, H, D."""
    require_triton(name)
    if qkv.dim() != 3 or not qkv.is_contiguous() or qkv.dtype not in DTYPES:
        raise ValueError(f"{name}: qkv must be a contiguous (B, n, 3C) bf16/fp16/fp32 tensor, got {tuple(qkv.shape)} {qkv.dtype}")
    if k_out.dim() != 4:
        raise ValueError(f"{name}: k_out must be (B, H, n, D), got {tuple(k_out.shape)}")
    B, n, C3 = qkv.shape
    _, H, _, D = k_out.shape
    if C3 != 3 * H * D or k_out.shape != (B, H, n, D) or v_out.shape != k_out.shape:
        raise ValueError(f"{name}: qkv (B, n, 3*H*D) = {tuple(qkv.shape)} does not match k_out {tuple(k_out.shape)} / "
                         f"v_out {tuple(v_out.shape)}")
    if k_out.dtype != qkv.dtype or v_out.dtype != qkv.dtype or k_out.stride(3) != 1 or v_out.stride(3) != 1:
        raise ValueError(f"{name}: k_out / v_out must be {qkv.dtype} with a contiguous head dim")
    if D % 2 or D & (D - 1):
        raise ValueError(f"{name}: head dim must be a power of two, got {D}")
    return B, n, H, D


def _launch_attention_inputs(kernel, qkv: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor, *args) -> torch.Tensor:
    """Run an attention-input kernel over (token tiles, B*H); `args` are its own trailing arguments. Returns q
    (B, H, n, D) stored token-major (B, n, H, D), so that attention's output reshapes to (B, n, C) without a copy."""
    B, n, _ = qkv.shape
    _, H, _, D = k_out.shape
    q = torch.empty((B, n, H, D), dtype=qkv.dtype, device=qkv.device).transpose(1, 2)
    if qkv.numel():
        block_t = 16 if interpreting() else max(16, min(4096 // D, triton.next_power_of_2(n)))  # 32 fp32 per thread
        with launch_device(qkv):
            kernel[(triton.cdiv(n, block_t), B * H)](
                qkv, q, k_out, v_out, n, H, qkv.stride(0), qkv.stride(1),
                q.stride(0), q.stride(1), q.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
                v_out.stride(0), v_out.stride(1), v_out.stride(2), *args, D=D, BLOCK_T=block_t, num_warps=4)
    return q


def qkv_rope(qkv: torch.Tensor, scale_mul: torch.Tensor, rope: torch.Tensor, k_out: torch.Tensor,
             v_out: torch.Tensor) -> torch.Tensor:
    """qkv (B, n, 3C) contiguous, the fused projection's output; scale_mul (H,) per-head temperature (any float dtype); rope
    (2, n, D/2) fp32 (cos, sin). Writes unit k and v, rotated as the model does, into k_out / v_out (B, H, n, D)
    (any strides with the head dim contiguous: the KV cache's slot for this scale) and returns q (B, H, n, D),
    stored token-major (B, n, H, D) so that attention's output reshapes to (B, n, C) without a copy."""
    name = "qkv_rope"
    B, n, H, D = _check_attention_inputs(name, qkv, k_out, v_out)
    if rope.shape != (2, n, D // 2) or rope.dtype != torch.float32 or not rope.is_contiguous():
        raise ValueError(f"{name}: rope must be contiguous float32 (2, {n}, {D // 2}), got {tuple(rope.shape)} {rope.dtype}")
    if scale_mul.numel() != H or not scale_mul.is_floating_point():
        raise ValueError(f"{name}: scale_mul must hold {H} floating-point values, got {tuple(scale_mul.shape)} {scale_mul.dtype}")
    scale_mul = scale_mul.reshape(H).float()  # exact: eager multiplies fp32 q by it (type promotion)
    check_device(name, qkv, hint="use sparvar.model.attention_inputs elsewhere", scale_mul=scale_mul, rope=rope,
                 k_out=k_out, v_out=v_out)
    return _launch_attention_inputs(_qkv_rope_kernel, qkv, k_out, v_out, scale_mul, rope)


def qkv_rope_half(qkv: torch.Tensor, q_scale: float, rope: torch.Tensor, k_out: torch.Tensor,
                  v_out: torch.Tensor) -> torch.Tensor:
    """HART's attention inputs (reference: sparvar.hart.model.attention_inputs without unit q/k). qkv (B, n, 3C)
    contiguous, the fused projection's output; q_scale the softmax scale; rope (2, B, n, D) fp32 (cos, sin) per batch
    row. Writes k (rotated) and v into k_out / v_out (B, H, n, D) (head dim contiguous: the KV cache's slot) and
    returns q (B, H, n, D), rotated and scaled, stored token-major (B, n, H, D)."""
    name = "qkv_rope_half"
    B, n, H, D = _check_attention_inputs(name, qkv, k_out, v_out)
    if rope.shape != (2, B, n, D) or rope.dtype != torch.float32 or not rope.is_contiguous():
        raise ValueError(f"{name}: rope must be contiguous float32 (2, {B}, {n}, {D}), got {tuple(rope.shape)} {rope.dtype}")
    if isinstance(q_scale, torch.Tensor) or not isinstance(q_scale, (int, float)) or not q_scale > 0:
        raise ValueError(f"{name}: q_scale must be a positive Python float (the softmax scale), got {q_scale!r}")
    check_device(name, qkv, hint="use sparvar.hart.model.attention_inputs elsewhere", rope=rope, k_out=k_out, v_out=v_out)
    return _launch_attention_inputs(_qkv_rope_half_kernel, qkv, k_out, v_out, rope, float(q_scale), B)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in one pass (reference: sparvar.hart.model.swiglu)."""
    name = "swiglu"
    require_triton(name)
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dtype not in DTYPES:
        raise ValueError(f"{name}: gate and up must have one shape and float dtype, got {tuple(gate.shape)} {gate.dtype} "
                         f"and {tuple(up.shape)} {up.dtype}")
    if not gate.is_contiguous() or not up.is_contiguous():
        raise ValueError(f"{name}: gate and up must be contiguous")
    check_device(name, gate, hint="use sparvar.hart.model.swiglu elsewhere", up=up)
    out = torch.empty_like(gate)
    if gate.numel():
        block = 1024
        with launch_device(gate):
            _swiglu_kernel[(triton.cdiv(gate.numel(), block),)](gate, up, out, gate.numel(), BLOCK=block, num_warps=4)
    return out


def triton_block_ops():
    """These kernels as the model's BlockOps (see sparvar.model): what the torch-cuda engine runs."""
    from sparvar.attention import engine_cross_attention
    from sparvar.kernels.absorbed import engine_absorbed_cross_attention
    from sparvar.model import BlockOps, KVCache, linear as cublas_linear

    def modulate(x, scale, shift, eps):
        return residual_norm(x, scale=scale, shift=shift, eps=eps)[1]

    def gated_residual(x, y, gamma):
        return residual_norm(x, y, gamma)[0]

    def residual_layer_norm(x, y, gamma, weight, bias, eps):
        return residual_norm(x, y, gamma, weight=weight, bias=bias, eps=eps)

    def residual_modulate(x, y, scale, shift, eps):
        return residual_norm(x, y, scale=scale, shift=shift, eps=eps)

    def gated_residual_modulate(x, y, gamma, scale, shift, eps):
        return residual_norm(x, y, gamma, scale=scale, shift=shift, eps=eps)

    def attention_inputs(qkv, heads, scale_mul, rope, kv, layer):
        if not isinstance(kv, KVCache):
            raise TypeError(f"the Triton attention inputs write into a preallocated KVCache, got {type(kv).__name__}")
        k_new, v_new, k_all, v_all = kv.slot(layer, qkv.shape[1])
        return qkv_rope(qkv, scale_mul, rope, k_new, v_new), k_all, v_all

    def ffn(fc1, fc2, x):
        return cublas_linear(fc2, linear_gelu_epilogue(fc1, x))

    return BlockOps(modulate=modulate, gated_residual=gated_residual, residual_layer_norm=residual_layer_norm,
                    residual_modulate=residual_modulate, gated_residual_modulate=gated_residual_modulate,
                    attention_inputs=attention_inputs, linear=cublas_linear, ffn=ffn, cross_attention=engine_cross_attention,
                    absorbed_cross_attention=engine_absorbed_cross_attention)


def triton_quantizing_norms():
    """The four norms of BlockOps with their outputs quantised to FP8 in the same pass (sparvar.fp8.Fp8Rows):
    what the FP8 linears take when the next GEMM is theirs (sparvar.fp8.with_fp8_linears)."""
    from sparvar.model import BlockOps

    def modulate(x, scale, shift, eps):
        return residual_norm(x, scale=scale, shift=shift, eps=eps, quantize=True)[1]

    def residual_layer_norm(x, y, gamma, weight, bias, eps):
        return residual_norm(x, y, gamma, weight=weight, bias=bias, eps=eps, quantize=True)

    def residual_modulate(x, y, scale, shift, eps):
        return residual_norm(x, y, scale=scale, shift=shift, eps=eps, quantize=True)

    def gated_residual_modulate(x, y, gamma, scale, shift, eps):
        return residual_norm(x, y, gamma, scale=scale, shift=shift, eps=eps, quantize=True)

    return BlockOps(modulate=modulate, residual_layer_norm=residual_layer_norm, residual_modulate=residual_modulate,
                    gated_residual_modulate=gated_residual_modulate)


def linear_gelu_epilogue(layer, x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(layer(x)) with the GELU in cuBLASLt's epilogue: the hidden activation is written once (the
    separate GELU read and wrote all of it again). GELU is applied to the fp32 accumulator, before rounding."""
    shape = x.shape
    out = torch._addmm_activation(layer.bias, x.reshape(-1, shape[-1]), layer.weight.t(), use_gelu=True)
    return out.view(*shape[:-1], layer.weight.shape[0])
