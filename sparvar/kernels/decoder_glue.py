"""The tokenizer decoder's element-wise passes around its cuDNN convolutions, in Triton.

Why (bench/results/profile_h200.json, group "vae decode", a 1024² decode on an H200, 26 ms): besides the
convolutions and the GroupNorms,
- 5.9 ms went to 42 conv-bias additions. PyTorch's cuDNN convolution writes its output, then adds the bias in
  a separate broadcast pass. At 1024² x 128 channels that pass reads and writes 0.5 GB. The decoder now runs its
  convolutions without bias and hands each bias to the next pass, which needs a pass of its own anyway: the next
  GroupNorm (`group_norm(..., pre_bias=)`), or the residual sum below.
- 2.8 ms went to 4 nearest 2x upsamplings (`upsample_nearest2d_nhwc`), about 10x their memory floor.

    residual_add(x, h, bias)   out = x + h + bias[c]: fp32 sum, one rounding (eager: conv + bias rounded, then
                               + x rounded again; this is the more exact one, at most about one step apart)
    upsample_nearest_2x(x)     each channels-last pixel copied to its 2x2 block: one read, one write

Both take (B, C, H, W) tensors in bf16, fp16 or fp32. residual_add takes channels_last (NHWC) or contiguous
NCHW, x and h in the same format; upsample_nearest_2x takes channels_last, which is what the decoder runs in. The
torch references beside them are what the tests compare against and what the decoder runs off the GPU path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparvar.kernels.csla import HAS_TRITON, check_device, interpreting, launch_device, require_triton
from sparvar.kernels.group_norm import check_image

if HAS_TRITON:
    import triton
    import triton.language as tl

ADD_BLOCK = 4096  # elements per residual_add program
UPSAMPLE_TILE = 8192  # output elements per upsample program (whole pixels: all channels of BLOCK_P positions)


# ------------------------------------------------------------------------------------------------ references
def residual_add_reference(x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x + h + bias (per channel) summed in fp32, rounded once to x's dtype, in x's memory format."""
    out = torch.add(x.float(), h.float()).add_(bias.float().view(1, -1, 1, 1))
    return out.to(x.dtype)


def upsample_nearest_2x_reference(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


# ------------------------------------------------------------------------------------------------ kernels
if HAS_TRITON:

    @triton.jit
    def _residual_add_kernel(x_ptr, h_ptr, bias_ptr, out_ptr, N, C, c_div, BLOCK: tl.constexpr):
        """out = x + h + bias[channel] over one flat block; channel = (offset // c_div) % C (c_div: 1 for NHWC,
        H*W for NCHW)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        c = (offs // c_div) % C
        y = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) + tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32)
        y += tl.load(bias_ptr + c, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _upsample_nearest_2x_kernel(x_ptr, out_ptr, H, W, C, P, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """BLOCK_P output pixels (raster order over B x 2H x 2W, channels-last) x all channels: a copy of the
        source pixel (oy // 2, ox // 2)."""
        p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
        c = tl.arange(0, BLOCK_C)[None, :]
        ox = p % (2 * W)
        oy = (p // (2 * W)) % (2 * H)
        b = p // (4 * H * W)
        src = ((b * H + oy // 2) * W + ox // 2) * C + c
        m = (p < P) & (c < C)
        tl.store(out_ptr + p * C + c, tl.load(x_ptr + src, mask=m, other=0.0), mask=m)


# ------------------------------------------------------------------------------------------------ wrappers
def residual_add(x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x + h + bias[c] (see residual_add_reference): x, h (B, C, H, W) of one dtype, shape and memory format
    (channels_last or contiguous NCHW); bias (C,) any float dtype. Returns a new tensor like x."""
    name = "residual_add"
    require_triton(name)
    check_image(name, "x", x)
    if not isinstance(h, torch.Tensor) or h.shape != x.shape or h.dtype != x.dtype or h.stride() != x.stride():
        raise ValueError(f"{name}: h must match x's shape, dtype and strides; got x {tuple(x.shape)} {x.dtype} "
                         f"{x.stride()}, h {getattr(h, 'shape', None)} {getattr(h, 'dtype', None)} "
                         f"{h.stride() if isinstance(h, torch.Tensor) else None}")
    B, C, H, W = x.shape
    if not isinstance(bias, torch.Tensor) or bias.shape != (C,) or not bias.is_floating_point() or not bias.is_contiguous():
        raise ValueError(f"{name}: bias must be a contiguous float ({C},) tensor, got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    if not channels_last and not x.is_contiguous():
        raise ValueError(f"{name}: x must be dense channels_last or contiguous NCHW, got strides {x.stride()}")
    check_device(name, x, hint="use residual_add_reference elsewhere", h=h, bias=bias)
    out = torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    N = x.numel()
    block = 256 if interpreting() else ADD_BLOCK
    with launch_device(x):
        _residual_add_kernel[(triton.cdiv(N, block),)](x, h, bias, out, N, C, 1 if channels_last else H * W, BLOCK=block,
                                                       num_warps=8)
    return out


def upsample_nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """F.interpolate(x, scale_factor=2, mode='nearest') for a channels_last (B, C, H, W) x; channels_last out."""
    name = "upsample_nearest_2x"
    require_triton(name)
    check_image(name, "x", x)
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"{name}: x must be dense channels_last (NHWC), got strides {x.stride()}; "
                         "use upsample_nearest_2x_reference for other layouts")
    B, C, H, W = x.shape
    check_device(name, x, hint="use upsample_nearest_2x_reference elsewhere")
    out = torch.empty((B, C, 2 * H, 2 * W), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    block_c = triton.next_power_of_2(C)
    block_p = max(1, (256 if interpreting() else UPSAMPLE_TILE) // block_c)
    P = B * 4 * H * W
    with launch_device(x):
        _upsample_nearest_2x_kernel[(triton.cdiv(P, block_p),)](x, out, H, W, C, P, BLOCK_P=block_p, BLOCK_C=block_c,
                                                               num_warps=8)
    return out
