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
    subpixel_interleave(y)     the sub-pixel upsampling convolution's four phase outputs (sparvar.vae.upsample_conv)
                               placed in the 2x grid: one read, one write

All take (B, C, H, W) tensors in bf16, fp16 or fp32. residual_add takes channels_last (NHWC) or contiguous
NCHW, x and h in the same format; upsample_nearest_2x and subpixel_interleave take channels_last, which is what the
decoder runs in (subpixel_interleave's input holds 4C channels: up to MAX_CHANNELS / 4 = 1,024 output channels). The
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


def subpixel_interleave_reference(y: torch.Tensor) -> torch.Tensor:
    """y (B, 4C, H+1, W+1), the phases (a, b) in channel blocks 2a+b, phase (a, b) of output pixel (i, j) at
    y[..., i + a, j + b] -> out (B, C, 2H, 2W), out[..., 2i+a, 2j+b] = that value; in y's memory format."""
    B, C4, H1, W1 = y.shape
    C, H, W = C4 // 4, H1 - 1, W1 - 1
    channels_last = y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    out = torch.empty((B, C, 2 * H, 2 * W), dtype=y.dtype, device=y.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for a in (0, 1):
        for b in (0, 1):
            out[:, :, a::2, b::2] = y[:, (2 * a + b) * C:(2 * a + b + 1) * C, a:a + H, b:b + W]
    return out


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

    @triton.jit
    def _subpixel_interleave_kernel(y_ptr, out_ptr, H, W, C, P, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """BLOCK_P output pixels (raster order over B x 2H x 2W, channels-last) x all channels: output pixel
        (2i+a, 2j+b) is channel block 2a+b of y's pixel (i+a, j+b) (y: B x (H+1) x (W+1) x 4C)."""
        p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]
        c = tl.arange(0, BLOCK_C)[None, :]
        ox = p % (2 * W)
        oy = (p // (2 * W)) % (2 * H)
        b = p // (4 * H * W)
        a, bx = oy % 2, ox % 2
        src = ((b * (H + 1) + oy // 2 + a) * (W + 1) + ox // 2 + bx) * (4 * C) + (2 * a + bx) * C + c
        m = (p < P) & (c < C)
        tl.store(out_ptr + p * C + c, tl.load(y_ptr + src, mask=m, other=0.0), mask=m)


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
    check_device(name, x, hint="use upsample_nearest_2x_reference elsewhere")
    return _launch_2x(_upsample_nearest_2x_kernel, x, *x.shape)


def _launch_2x(kernel, src: torch.Tensor, B: int, C: int, H: int, W: int) -> torch.Tensor:
    """Run a per-pixel kernel writing a channels_last (B, C, 2H, 2W) output from src; returns the output."""
    out = torch.empty((B, C, 2 * H, 2 * W), dtype=src.dtype, device=src.device, memory_format=torch.channels_last)
    block_c = triton.next_power_of_2(C)
    block_p = max(1, (256 if interpreting() else UPSAMPLE_TILE) // block_c)
    P = B * 4 * H * W
    with launch_device(src):
        kernel[(triton.cdiv(P, block_p),)](src, out, H, W, C, P, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=8)
    return out


def subpixel_interleave(y: torch.Tensor) -> torch.Tensor:
    """subpixel_interleave_reference for a channels_last y (B, 4C, H+1, W+1); channels_last out (B, C, 2H, 2W)."""
    name = "subpixel_interleave"
    require_triton(name)
    check_image(name, "y", y)
    B, C4, H1, W1 = y.shape
    if C4 % 4 or H1 < 2 or W1 < 2:
        raise ValueError(f"{name}: y must be (B, 4C, H+1, W+1) with H, W >= 1, got {tuple(y.shape)}")
    if not y.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"{name}: y must be dense channels_last (NHWC), got strides {y.stride()}; "
                         "use subpixel_interleave_reference for other layouts")
    check_device(name, y, hint="use subpixel_interleave_reference elsewhere")
    return _launch_2x(_subpixel_interleave_kernel, y, B, C4 // 4, H1 - 1, W1 - 1)
