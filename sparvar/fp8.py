"""FP8 (e4m3) linears for the torch-cuda engine, an opt-in precision (`sparvar engine build --fp8`).

Weights are quantised once, one fp32 scale per output channel; activations per row, on the fly. The product is
cuBLASLt's FP8 GEMM (`torch._scaled_mm`, fp32 accumulation, both scales and the bias applied in its epilogue).
On the H200 it runs the 2B/8B block linears 1.5-1.7x faster than bf16 from 2,048 rows up, and no faster at 512
rows or fewer (bench/results/step_parts_2b_h200.json); so only scales of at least `min_tokens` tokens per image use
it (1,024: scales 9-12 at 1024², 2,048 rows and up with CFG), and the small scales, bound by kernel count, keep
bf16. The threshold is per image, not per batch, so that which scales change does not depend on the batch size:
an FP8 error at an early scale changes which bits are sampled and so the whole image (fidelity_fp8.json).

This changes the model's numbers (each FP8 GEMM is ~2.6% off in relative norm on random data): fidelity is
measured against the fp32 dense model (the eager reference) by bench/fidelity.py (variants `fp8`, `sparvar_fp8`).
On the CPU the same function is computed from the dequantised operands (FP8 values and their scales are exact in
fp32), which is how that benchmark runs without a GPU.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import block_linears

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_AMAX = 1e-12  # an all-zero row quantises to zeros with a tiny scale instead of dividing by zero
DEFAULT_MIN_TOKENS = 1024  # 2B/8B: scales 9-12 at 1024² (32², 40², 48², 64² tokens per image)


def quantize_rows_ref(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> FP8 values (..., K) and fp32 scales (..., 1) with x ~ values * scales: each row's absolute
    maximum maps to the largest FP8 value (448), rounding to nearest. With gelu, of gelu_tanh(x) (in x's dtype)."""
    if gelu:
        x = F.gelu(x, approximate="tanh")
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(MIN_AMAX)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_rows(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows_ref in one Triton pass on a GPU; the reference elsewhere."""
    if x.is_cuda:
        from .kernels.fp8 import quantize_rows_triton

        return quantize_rows_triton(x, gelu=gelu)
    return quantize_rows_ref(x, gelu=gelu)


@dataclasses.dataclass
class Fp8Rows:
    """An activation already quantised for an FP8 GEMM: values (M, K) FP8 and scales (M, 1) fp32 of the rows of a
    tensor of `shape` (..., K). A norm that feeds an FP8 linear produces it directly (one pass instead of the
    norm's bf16 output and a second pass that quantises it)."""

    values: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size

    @classmethod
    def of(cls, x: torch.Tensor) -> "Fp8Rows":
        return cls(*quantize_rows(x.reshape(-1, x.shape[-1])), x.shape)


@dataclasses.dataclass
class Fp8Weight:
    values: torch.Tensor  # (N, K) FP8
    scale: torch.Tensor  # (1, N) fp32, one per output channel

    @classmethod
    def of(cls, weight: torch.Tensor) -> "Fp8Weight":
        values, scale = quantize_rows_ref(weight.detach())
        return cls(values.contiguous(), scale.reshape(1, -1).contiguous())


def fp8_matmul(q: torch.Tensor, q_scale: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:
    """(q * q_scale) @ (w.values * w.scale)^T + bias for q (M, K) FP8 and q_scale (M, 1) fp32, fp32 accumulation."""
    if q.is_cuda:
        return torch._scaled_mm(q, w.values.t(), scale_a=q_scale, scale_b=w.scale, bias=bias, out_dtype=out_dtype)
    out = (q.float() * q_scale) @ (w.values.float() * w.scale.t()).t()
    return (out if bias is None else out + bias.float()).to(out_dtype)


class Fp8Linears:
    """The block linears of a model in FP8 at scales of at least `min_tokens` tokens; `linear`, `ffn` and the three
    norms have the signatures of sparvar.model.BlockOps' and defer to `base` for other layers and smaller scales.

    At those scales the norms hand their outputs on quantised (Fp8Rows): each feeds only an FP8 linear (the norm
    before attention feeds the qkv projection, the one before cross-attention its query projection, the one before
    the FFN fc1). `quantizing` computes them in one pass (the Triton norms); by default the base norm's output is
    quantised after it. cross_attention=False leaves the cross-attention's projections, and so its input, to `base`
    (for an engine that absorbs them into the text, sparvar.model.AbsorbedText)."""

    def __init__(self, model: nn.Module, min_tokens: int, base, quantizing=None, cross_attention: bool = True):
        if min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
        self.min_tokens, self.base, self.cross_attention = min_tokens, base, cross_attention
        self.quantizing = quantizing if quantizing is not None else _QuantizeAfter(base)
        self.weights: dict[nn.Module, Fp8Weight] = {}
        for block in model.blocks:
            for layer in block_linears(block):
                if not cross_attention and layer in (block.ca.mat_q, block.ca.proj):
                    continue
                if layer.weight.shape[1] % 16 or layer.weight.shape[0] % 16:
                    raise ValueError(f"FP8 GEMMs need dimensions divisible by 16, got a {tuple(layer.weight.shape)} linear")
                self.weights[layer] = Fp8Weight.of(layer.weight)

    def _in_fp8(self, x) -> bool:
        return x.shape[-2] >= self.min_tokens  # x (B, n, C): n tokens per image

    def _fp8(self, layer, x) -> Fp8Weight | None:
        w = self.weights.get(layer)
        return w if w is not None and self._in_fp8(x) else None

    def _rows(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        return (x.values, x.scale) if isinstance(x, Fp8Rows) else quantize_rows(x.reshape(-1, x.shape[-1]))

    def linear(self, layer, x, bias: torch.Tensor | None = None) -> torch.Tensor:
        w = self._fp8(layer, x)
        if w is None:
            if isinstance(x, Fp8Rows):
                raise TypeError(f"an FP8-quantised activation reached a bf16 linear {tuple(layer.weight.shape)}")
            return self.base.linear(layer, x, bias)
        out = fp8_matmul(*self._rows(x), w, layer.bias if bias is None else bias, layer.weight.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    def ffn(self, fc1, fc2, x) -> torch.Tensor:
        w1, w2 = self._fp8(fc1, x), self._fp8(fc2, x)
        if w1 is None or w2 is None:
            return self.base.ffn(fc1, fc2, x)
        dtype = fc1.weight.dtype
        hidden = fp8_matmul(*self._rows(x), w1, fc1.bias, dtype)
        # cuBLASLt's FP8 GEMM has no GELU epilogue here; the GELU goes into fc2's input quantisation instead, which
        # reads the hidden activation once (a separate GELU read and wrote all of it again, the largest tensor)
        out = fp8_matmul(*quantize_rows(hidden, gelu=True), w2, fc2.bias, dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    def modulate(self, x, scale, shift, eps):
        ops = self.quantizing if self._in_fp8(x) else self.base
        return ops.modulate(x, scale, shift, eps)

    def residual_layer_norm(self, x, y, gamma, weight, bias, eps):
        # its output is the cross-attention's input (sparvar.model.Block): FP8 rows only for an FP8 query projection
        ops = self.quantizing if self.cross_attention and self._in_fp8(x) else self.base
        return ops.residual_layer_norm(x, y, gamma, weight, bias, eps)

    def residual_modulate(self, x, y, scale, shift, eps):
        ops = self.quantizing if self._in_fp8(x) else self.base
        return ops.residual_modulate(x, y, scale, shift, eps)

    def gated_residual_modulate(self, x, y, gamma, scale, shift, eps):
        ops = self.quantizing if self._in_fp8(x) else self.base
        return ops.gated_residual_modulate(x, y, gamma, scale, shift, eps)


class _QuantizeAfter:
    """The base norms, their normalised outputs quantised afterwards (a second pass; the CPU's path)."""

    def __init__(self, base):
        self.base = base

    def modulate(self, x, scale, shift, eps):
        return Fp8Rows.of(self.base.modulate(x, scale, shift, eps))

    def residual_layer_norm(self, x, y, gamma, weight, bias, eps):
        x, normed = self.base.residual_layer_norm(x, y, gamma, weight, bias, eps)
        return x, Fp8Rows.of(normed)

    def residual_modulate(self, x, y, scale, shift, eps):
        x, normed = self.base.residual_modulate(x, y, scale, shift, eps)
        return x, Fp8Rows.of(normed)

    def gated_residual_modulate(self, x, y, gamma, scale, shift, eps):
        x, normed = self.base.gated_residual_modulate(x, y, gamma, scale, shift, eps)
        return x, Fp8Rows.of(normed)


def with_fp8_linears(ops, model: nn.Module, min_tokens: int = DEFAULT_MIN_TOKENS, quantizing=None,
                     cross_attention: bool = True):
    """`ops` (a sparvar.model.BlockOps) with the model's block linears in FP8 at scales of >= `min_tokens` tokens;
    `quantizing`: norms that output Fp8Rows in one pass (sparvar.kernels.pointwise.triton_quantizing_norms).
    cross_attention=False keeps the cross-attention's two projections (and its input) in the model's dtype: an
    engine that absorbs them into the text (sparvar.model.AbsorbedText) runs neither, and a prompt too long to
    absorb then runs them as the bf16 engine does, so the FP8 engine's numbers are one thing whatever the prompt."""
    fp8 = Fp8Linears(model, min_tokens, ops, quantizing, cross_attention)
    return dataclasses.replace(ops, linear=fp8.linear, ffn=fp8.ffn, modulate=fp8.modulate,
                               residual_layer_norm=fp8.residual_layer_norm, residual_modulate=fp8.residual_modulate,
                               gated_residual_modulate=fp8.gated_residual_modulate)
