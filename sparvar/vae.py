"""Infinity's BSQ tokenizer, decode side: sampled bits -> codes -> summed latent -> pixels in [-1, 1].

Architecture and parameter names follow the official `AutoEncoder.decoder` (flux-style conv decoder, 2D,
no attention, nearest-neighbour upsampling); our state dict keys are exactly the official `decoder.*` keys,
so an official tokenizer checkpoint loads by name. Only the decoder is built: the transformer predicts bits,
and the official BSQ quantizer has no parameters on the decode path (its projections are identities because
its input width equals its codebook width; its only state is the `lfq.mask` bit-weight buffer).

Latent layout: (B, codebook_dim, H, W) at the final grid, H = image_height / patch_size. With the 8B's
spatial patchify, one transformer token is a 2x2 block of 14-bit latent positions (56 bits per token).
"""
from __future__ import annotations

import functools
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, parameter_tensor, read_state_dict, select_state
from .config import VAEConfig

# Official tokenizer state dicts hold the whole AutoEncoder. These prefixes are the parts decode does not
# use: the encoder, and the BSQ quantizer's `lfq.mask` buffer, stored twice because the official model
# registers the same quantizer under two attribute names (`quantizer` and `quantize`).
IGNORED_PREFIXES = ("encoder.", "quantizer.", "quantize.")
_DECODER_PREFIX = "decoder."


def norm_groups(channels: int) -> int:
    """GroupNorm group count of the official `Normalize`: 32 groups, else 24, else unsupported."""
    if channels % 32 == 0:
        return 32
    if channels % 24 == 0:
        return 24
    raise ValueError(f"tokenizer GroupNorm needs a channel count divisible by 32 or 24, got {channels}")


def check_vae_config(cfg: VAEConfig) -> None:
    """Reject a VAEConfig the official decoder cannot build, with a message naming the field."""
    if not isinstance(cfg, VAEConfig):
        raise TypeError(f"expected a VAEConfig, got {type(cfg).__name__}")
    if cfg.codebook_dim <= 0:
        raise ValueError(f"{cfg.name}: codebook_dim must be positive, got {cfg.codebook_dim}")
    if cfg.num_res_blocks <= 0:
        raise ValueError(f"{cfg.name}: num_res_blocks must be positive, got {cfg.num_res_blocks}")
    if not cfg.ch_mult or any(m <= 0 for m in cfg.ch_mult):
        raise ValueError(f"{cfg.name}: ch_mult must be non-empty and positive, got {cfg.ch_mult}")
    if cfg.patch_size <= 0 or cfg.patch_size & (cfg.patch_size - 1):
        raise ValueError(f"{cfg.name}: patch_size must be a power of two, got {cfg.patch_size}")
    ups = cfg.patch_size.bit_length() - 1
    if ups > len(cfg.ch_mult) - 1:
        raise ValueError(f"{cfg.name}: patch_size {cfg.patch_size} needs {ups} upsamplings but ch_mult "
                         f"{cfg.ch_mult} has only {len(cfg.ch_mult) - 1} levels above the first")
    for m in (1, *cfg.ch_mult):
        try:
            norm_groups(cfg.ch * m)
        except ValueError as e:
            raise ValueError(f"{cfg.name}: ch={cfg.ch} x {m}: {e}") from None


# --- building blocks. The official code wraps every nn.Conv2d / nn.GroupNorm in a small module, so
# checkpoint keys read `<name>.conv.weight` / `<name>.norm.weight`; the wrappers below keep those names.


class Conv(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2)

    def forward(self, x):
        return self.conv(x)


def split_group_norm(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """F.group_norm computed with torch's generic reductions, statistics in fp32: the torch reference of the
    Triton GroupNorm (sparvar/kernels/group_norm.py), which tests compare against; no decode path runs it.

    Why it exists: the native CUDA GroupNorm runs one thread block per (batch, group) row, 32 blocks at batch 1,
    and took over half of a 1024x1024 decode on an H100; this split each row across the GPU, and the Triton
    kernels that replaced it keep its numerics (fp32 statistics and scale/shift, one rounding at the end).
    """
    B, C = x.shape[:2]
    G = norm.num_groups
    xg = x.unflatten(1, (G, C // G))  # (B, G, C/G, H, W)
    dims = (2, 3, 4)
    if x.dtype == torch.float32:
        var, mean = torch.var_mean(xg, dim=dims, correction=0)  # (B, G) each
    else:
        # fp32 accumulation without an fp32 copy of x. E[x^2] - E[x]^2 loses less than rounding x to
        # 8 or 11 mantissa bits already did.
        mean = xg.mean(dim=dims, dtype=torch.float32)
        n = (C // G) * x.shape[2] * x.shape[3]
        var = (torch.linalg.vector_norm(xg, dim=dims, dtype=torch.float32).square() / n - mean.square()).clamp_min(0)
    scale = norm.weight.float().view(G, C // G) * torch.rsqrt(var + norm.eps)[..., None]  # (B, G, C/G)
    shift = norm.bias.float().view(G, C // G) - mean[..., None] * scale
    # One fused pass computing in fp32 (scale, shift stay fp32: rounded to x's dtype they would cost
    # accuracy in proportion to |mean| / std), written in x's dtype and memory format.
    out = torch.empty_like(x)
    return torch.addcmul(shift.reshape(B, C, 1, 1), x, scale.reshape(B, C, 1, 1), out=out)


@functools.cache
def _triton_kernels():
    """The decoder's Triton kernels (group_norm, residual_add, upsample_nearest_2x, subpixel_interleave), or None
    without triton; imported on first CUDA use, so that CPU users never import triton."""
    from types import SimpleNamespace

    from .kernels import decoder_glue
    from .kernels.group_norm import HAS_TRITON, group_norm

    if not HAS_TRITON:
        return None
    return SimpleNamespace(group_norm=group_norm, residual_add=decoder_glue.residual_add,
                           upsample_nearest_2x=decoder_glue.upsample_nearest_2x,
                           subpixel_interleave=decoder_glue.subpixel_interleave)


def _fast_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the decoder's Triton kernels run here: CUDA inference in eager mode, triton installed.

    The native ops stay where they are fast, where a graph wants one node per op, or where autograd is needed
    (the kernels are forward only): CPU, torch.compile (Inductor splits the reduction itself), ONNX export and
    training; also without triton, and for dtypes the kernels do not take (fp64).
    """
    if (not x.is_cuda or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            or x.dtype not in (torch.bfloat16, torch.float16, torch.float32)):
        return False
    return _triton_kernels() is not None


def _kernel_for(x: torch.Tensor, weight: torch.Tensor):
    """The Triton GroupNorm where Norm runs it (see _fast_path), else None."""
    return _triton_kernels().group_norm if _fast_path(x, weight) else None


def _residual_add(x: torch.Tensor, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x + h + bias[c]: the residual sum with the convolutions' pending biases folded in (kernels/decoder_glue.py)."""
    from .kernels.decoder_glue import residual_add_reference

    if _fast_path(x, h) and h.stride() == x.stride():
        return _triton_kernels().residual_add(x, h, bias)
    return residual_add_reference(x, h, bias)


def _upsample_nearest_2x(x: torch.Tensor) -> torch.Tensor:
    from .kernels.decoder_glue import upsample_nearest_2x_reference

    if _fast_path(x, x) and x.is_contiguous(memory_format=torch.channels_last):
        return _triton_kernels().upsample_nearest_2x(x)
    return upsample_nearest_2x_reference(x)


# --- the decoder's passes as functions of plain nn modules, shared with HART's tokenizer (sparvar/hart/tokenizer.py),
# whose official checkpoint names the same modules without the wrappers.


def conv_without_bias(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) without its bias: the caller folds the bias into the pass that reads the output next (torch's cuDNN
    convolution adds a bias as a separate full pass over the output)."""
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding)


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = False, pre_bias: torch.Tensor | None = None):
    """GroupNorm of x + pre_bias (per channel: a convolution's bias left pending), then SiLU when `silu`: the
    decoder's F.silu(norm(conv(...))) as one call, which the Triton path fuses (the pre-bias added in fp32, SiLU on
    the fp32 normalised value, one rounding where eager rounds up to three times: closer to the fp32 result, and
    about one bf16 step from eager at most)."""
    kernel = _kernel_for(x, norm.weight)
    if kernel is not None:
        return kernel(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu=silu, pre_bias=pre_bias)
    if pre_bias is not None:
        x = x + pre_bias.to(x.dtype).view(1, -1, 1, 1)
    x = norm(x)
    return F.silu(x) if silu else x


def resnet_block(x: torch.Tensor, x_bias: torch.Tensor | None, norm1: nn.GroupNorm, conv1: nn.Conv2d,
                 norm2: nn.GroupNorm, conv2: nn.Conv2d, shortcut: nn.Conv2d | None = None) -> torch.Tensor:
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), x through the 1x1 `shortcut` when the width changes.

    No convolution here adds its own bias: conv1's goes into norm2, conv2's (and the shortcut's) into the residual
    sum. `x_bias` is the previous convolution's bias, still to be added to x (see upsample_conv)."""
    h = conv_without_bias(conv1, norm_silu(norm1, x, silu=True, pre_bias=x_bias))
    h = conv_without_bias(conv2, norm_silu(norm2, h, silu=True, pre_bias=conv1.bias))
    bias = conv2.bias.float()
    if shortcut is not None:
        bias = bias + shortcut.bias.float()
        if x_bias is not None:  # a 1x1 convolution has no padding, so shortcut(x + b) = shortcut(x) + W b
            bias = bias + shortcut.weight.flatten(1).float() @ x_bias.float()
        x = conv_without_bias(shortcut, x)
    elif x_bias is not None:
        bias = bias + x_bias.float()
    return _residual_add(x, h, bias)


# Where the decoder's Triton kernels run (_fast_path, channels_last), each 2x upsampling convolution whose weights
# were fixed (freeze_subpixel_weights: the engines' GraphedDecoder) runs in its sub-pixel form (upsample_conv).
# False: the official form there too (bench/decode.py's side-by-side row).
SUBPIXEL_UPSAMPLE = True


# Sub-pixel taps per output phase: rows (a, u) of 0/1 weights over the 3x3 kernel's rows (see subpixel_weight).
_PHASE_TAPS = ((1, 0, 0), (0, 1, 1),  # a = 0: input row i-1 <- kernel row 0; row i <- rows 1 + 2
               (1, 1, 0), (0, 0, 1))  # a = 1: input row i <- rows 0 + 1; row i+1 <- row 2


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 convolution's weight (C_out, C_in, 3, 3) -> the (4 C_out, C_in, 2, 2) weight of its sub-pixel form.

    A nearest 2x upsampling followed by the 3x3 convolution (padding 1) reads, for output pixel (2i+a, 2j+b),
    input rows {i-1, i} for a = 0 (kernel rows 1 and 2 both land on row i) and {i, i+1} for a = 1 (rows 0 and 1 on
    row i); columns alike with b. So phase (a, b) is a 2x2 convolution of the input whose taps are sums of the 3x3
    taps: 16 multiply-adds per input pixel and channel pair instead of 36. Block 2a+b of the result holds phase
    (a, b); over the input padded by 1, its output (i, j) sits at (i + a, j + b) (subpixel_interleave). The sums
    are taken in fp32 (exact for bf16/fp16 taps, TF32 or not) and rounded once to the weight's dtype: in bf16 one
    rounding more than the official form."""
    c_out, c_in = weight.shape[:2]
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    taps = torch.tensor(_PHASE_TAPS, dtype=w.dtype, device=w.device)
    summed = taps @ w @ taps.T  # (C_out, C_in, 4, 4): [2a + u, 2b + v]
    summed = summed.view(c_out, c_in, 2, 2, 2, 2).permute(2, 4, 0, 1, 3, 5)  # (a, b, C_out, C_in, u, v)
    return summed.reshape(4 * c_out, c_in, 2, 2).to(weight.dtype)


# conv -> its sub-pixel weight (channels_last), for the upsampling convolutions whose weights were fixed
_FROZEN_SUBPIXEL: "weakref.WeakKeyDictionary[nn.Conv2d, torch.Tensor]" = weakref.WeakKeyDictionary()


def freeze_subpixel_weights(model: nn.Module) -> int:
    """Fix the weights of `model`'s 2x upsampling convolutions (the modules' `upsampling_conv`: Upsample here, HART's
    Upsample2x) for inference: their sub-pixel weights are computed once, now, and upsample_conv runs them. As with
    the transformer's frozen weight functions, an engine's weights do not change: computed in every decode the
    weights cost 1.0-1.2 ms per 1024² decode on an H100 (two broadcast matmuls and copies per convolution,
    bench/results/decode_subpixel_percall_h100.json), about half of what the form gains. Calling this again
    recomputes them in place (the same tensors: graphs captured earlier read the new values). Returns how many."""
    count = 0
    for module in model.modules():
        conv = getattr(module, "upsampling_conv", None)
        if conv is None or not _subpixel_applies(conv):
            continue
        with torch.no_grad():
            weight = subpixel_weight(conv.weight.detach()).contiguous(memory_format=torch.channels_last)
            held = _FROZEN_SUBPIXEL.get(conv)
            if held is not None and (held.shape, held.dtype, held.device) == (weight.shape, weight.dtype, weight.device):
                with torch.inference_mode(held.is_inference()):  # one made under inference mode is updated there
                    held.copy_(weight)
            else:
                _FROZEN_SUBPIXEL[conv] = weight
        count += 1
    return count


def _subpixel_applies(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1)


def upsample_conv(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """conv(nearest 2x upsample of x) without its bias, and that bias: the next block adds it in its first passes.

    On the kernels' path (_fast_path, channels_last x), for a convolution whose weights were fixed
    (freeze_subpixel_weights), in its sub-pixel form (subpixel_weight): one 2x2 convolution to the four phases at the
    input's resolution, then one pass placing them in the 2x grid. 29% of a 1024² Infinity decode's FLOPs are these
    convolutions (2.86 of 9.85 TFLOP at 2B); this form does 16/36 of them, and its extra pass replaces the
    upsampling's."""
    frozen = _FROZEN_SUBPIXEL.get(conv)
    if (SUBPIXEL_UPSAMPLE and frozen is not None and frozen.dtype == conv.weight.dtype
            and frozen.device == conv.weight.device and _fast_path(x, conv.weight)
            and x.is_contiguous(memory_format=torch.channels_last)):
        phases = F.conv2d(x, frozen, None, 1, 1)  # (B, 4 C_out, H + 1, W + 1)
        return _triton_kernels().subpixel_interleave(phases.contiguous(memory_format=torch.channels_last)), conv.bias
    return conv_without_bias(conv, _upsample_nearest_2x(x)), conv.bias


class Norm(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups(channels), channels, eps=1e-6)

    def forward(self, x, silu: bool = False, pre_bias: torch.Tensor | None = None):
        return norm_silu(self.norm, x, silu, pre_bias)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = Norm(c_in)
        self.conv1 = Conv(c_in, c_out, 3)
        self.norm2 = Norm(c_out)
        self.conv2 = Conv(c_out, c_out, 3)
        if c_in != c_out:
            self.nin_shortcut = Conv(c_in, c_out, 1)

    def forward(self, x, x_bias: torch.Tensor | None = None):
        """See resnet_block; `x_bias` is the previous convolution's pending bias."""
        shortcut = self.nin_shortcut.conv if hasattr(self, "nin_shortcut") else None
        return resnet_block(x, x_bias, self.norm1.norm, self.conv1.conv, self.norm2.norm, self.conv2.conv, shortcut)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3)

    @property
    def upsampling_conv(self) -> nn.Conv2d:  # see freeze_subpixel_weights
        return self.conv.conv

    def forward(self, x):
        return upsample_conv(self.conv.conv, x)


class UpLevel(nn.Module):
    """One resolution level: `num_res_blocks + 1` resnet blocks, then (for levels 1..log2 patch) a 2x upsample."""

    def __init__(self, c_in: int, c_out: int, num_blocks: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(num_blocks))
        if upsample:
            self.upsample = Upsample(c_out)

    def forward(self, x, x_bias=None):
        """(output, its pending bias or None): the upsampling convolution's bias stays pending."""
        for i, blk in enumerate(self.block):
            x = blk(x, x_bias if i == 0 else None)
        return self.upsample(x) if hasattr(self, "upsample") else (x, None)


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x, x_bias=None):
        return self.block_2(self.block_1(x, x_bias))


class ConvDecoder(nn.Module):
    """The official `Decoder` with cnn_type '2d', no attention, no pixel-shuffle upsampling."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        check_vae_config(cfg)
        ch, mult, levels = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        ups = cfg.patch_size.bit_length() - 1
        top = ch * mult[-1]
        self.conv_in = Conv(cfg.codebook_dim, top, 3)
        self.mid = Mid(top)
        # up[i] is level i; they run from the coarsest (levels - 1) down to 0, so level i reads level i+1's output.
        self.up = nn.ModuleList(
            UpLevel(ch * mult[i + 1] if i + 1 < levels else top, ch * mult[i], cfg.num_res_blocks + 1,
                    upsample=1 <= i <= ups)
            for i in range(levels)
        )
        self.norm_out = Norm(ch * mult[0])
        self.conv_out = Conv(ch * mult[0], 3, 3)

    def forward(self, z):
        h = self.mid(conv_without_bias(self.conv_in.conv, z), self.conv_in.conv.bias)  # (B, ch*mult[-1], H, W)
        pending = None  # the bias of the last convolution, not yet added to h
        for level in reversed(self.up):
            h, pending = level(h, pending)  # doubles H, W at levels 1..log2(patch)
        return self.conv_out(self.norm_out(h, silu=True, pre_bias=pending))  # (B, 3, H*patch, W*patch)


class BSQDecoder(nn.Module):
    """Decode side of the official BSQ tokenizer. State dict keys are the official `decoder.*` keys."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder = ConvDecoder(cfg)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, codebook_dim, H, W) summed codes -> (B, 3, H*patch, W*patch) image in [-1, 1].

        The latent's dtype must be the weights' dtype (cast it: summed codes are usually fp32).
        """
        if not isinstance(latent, torch.Tensor):
            raise TypeError(f"latent must be a torch.Tensor, got {type(latent).__name__}")
        if latent.ndim != 4 or latent.shape[1] != self.cfg.codebook_dim:
            raise ValueError(f"{self.cfg.name}: latent must be (B, {self.cfg.codebook_dim}, H, W), got {tuple(latent.shape)}")
        weight_dtype = self.decoder.conv_in.conv.weight.dtype
        if latent.dtype != weight_dtype:
            raise TypeError(f"latent dtype {latent.dtype} != decoder weight dtype {weight_dtype}; cast the latent first")
        latent = latent.contiguous(memory_format=torch.channels_last)  # why: see build_vae
        return self.decoder(latent).clamp(-1.0, 1.0).contiguous()  # (B, 3, H*patch, W*patch), plain NCHW

    forward = decode


# --- codes and token layout


def bits_to_codes(bits: torch.Tensor, codebook_dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Bits {0, 1} -> BSQ codes {-1/sqrt(d), +1/sqrt(d)}, d = codebook_dim (the official `BSQ.bits_to_codes`).

    Elementwise, so it works on (B, n, 4*d) patchified tokens as well as on (..., d). The official
    `indices_to_codes` then L2-normalises each d-vector, which is the identity for exact bits (norm 1).
    """
    if not isinstance(bits, torch.Tensor):
        raise TypeError(f"bits must be a torch.Tensor, got {type(bits).__name__}")
    if not isinstance(codebook_dim, int) or codebook_dim <= 0:
        raise ValueError(f"codebook_dim must be a positive int, got {codebook_dim!r}")
    if bits.ndim == 0 or bits.shape[-1] % codebook_dim:
        raise ValueError(f"bits' last dim must be a multiple of codebook_dim {codebook_dim}, got shape {tuple(bits.shape)}")
    if dtype is None:
        dtype = bits.dtype if bits.is_floating_point() else torch.float32
    scale = 1.0 / math.sqrt(codebook_dim)
    return bits.to(dtype) * (2.0 * scale) - scale


def tokens_to_latent(tokens: torch.Tensor, h: int, w: int, patchify: bool) -> torch.Tensor:
    """(B, h*w, C) tokens -> latent (B, C, h, w); with patchify (B, h*w, 4d) -> (B, d, 2h, 2w).

    Official unpatchify: token channel c*4 + 2*a + b goes to latent[c, 2i+a, 2j+b] (pixel_shuffle order).
    """
    B, L, C = tokens.shape
    if L != h * w:
        raise ValueError(f"tokens have {L} positions, grid {h}x{w} needs {h * w}")
    if patchify and C % 4:
        raise ValueError(f"patchified tokens need a channel count divisible by 4, got {C}")
    x = tokens.transpose(1, 2).reshape(B, C, h, w)  # (B, C, h, w)
    return F.pixel_shuffle(x, 2) if patchify else x  # (B, C/4, 2h, 2w) with patchify


def latent_to_tokens(latent: torch.Tensor, patchify: bool) -> torch.Tensor:
    """Inverse of `tokens_to_latent`: (B, d, 2h, 2w) -> (B, h*w, 4d) with patchify, else (B, C, h, w) -> (B, h*w, C)."""
    if latent.ndim != 4:
        raise ValueError(f"latent must be (B, C, H, W), got {tuple(latent.shape)}")
    if patchify and (latent.shape[-2] % 2 or latent.shape[-1] % 2):
        raise ValueError(f"patchify needs an even latent grid, got {tuple(latent.shape[-2:])}")
    x = F.pixel_unshuffle(latent, 2) if patchify else latent  # (B, 4d, h, w) with patchify
    return x.flatten(2).transpose(1, 2)  # (B, h*w, C)


# --- construction and strict loading


def decoder_key_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Official decoder key -> shape for `cfg`, read from a meta-device build (allocates no weights)."""
    with torch.device("meta"):
        model = BSQDecoder(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_vae(cfg: VAEConfig, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32) -> BSQDecoder:
    """Random-weight decoder (PyTorch default init, seeded, global RNG untouched), in eval mode.

    Conv weights are channels_last (kept by later .to(device/dtype) calls): cuDNN then runs every conv
    without the NCHW<->NHWC transposes it otherwise adds around each one (~10% of a GPU decode).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BSQDecoder(cfg)
    return model.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval().requires_grad_(False)


def _canonical_name(key: str, expected: dict) -> str:
    """Map a flat name (`conv_in.weight`, `norm1.bias`) to its wrapped official name; the official
    loader accepts both spellings, so we do too. Unknown names come back unchanged."""
    if key in expected:
        return key
    stem, _, leaf = key.rpartition(".")
    for wrapper in ("conv", "norm"):
        wrapped = f"{stem}.{wrapper}.{leaf}"
        if wrapped in expected:
            return wrapped
    return key


def select_decoder_state(sd: dict, cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Strictly pick the decoder weights out of a full official tokenizer state dict.

    Keys under IGNORED_PREFIXES are dropped by name; every other key must be an expected decoder key
    (wrapped or flat spelling) with the expected shape, and every expected key must be present.
    Raises CheckpointError listing every missing, unexpected, duplicated, wrongly shaped, non-floating-point and
    non-finite key (checkpoint.select_state).
    """
    try:
        return _select_decoder_state(sd, cfg)
    except CheckpointError as e:  # another model's tokenizer (d32 for d56, say) is named
        from .config import CONFIGS

        for other in dict.fromkeys(c.vae for c in CONFIGS.values() if c.vae != cfg):
            try:
                _select_decoder_state(sd, other)
            except CheckpointError:
                continue
            raise CheckpointError(f"this is the {other.name} tokenizer, not {cfg.name}\n{e}") from None
        raise


def _select_decoder_state(sd: dict, cfg: VAEConfig) -> dict[str, torch.Tensor]:
    expected = decoder_key_shapes(cfg)
    header = (f"tokenizer checkpoint does not match {cfg.name} (codebook_dim {cfg.codebook_dim}, ch {cfg.ch}, "
              f"ch_mult {cfg.ch_mult}; {len(expected)} decoder keys expected; ignored prefixes {IGNORED_PREFIXES})")
    return select_state(sd, expected, lambda k: None if k.startswith(IGNORED_PREFIXES) else _canonical_name(k, expected),
                        header)


def read_tokenizer_state_dict(path: str) -> dict:
    """The AutoEncoder state dict of a tokenizer file. Official .pth files wrap it as {'vae': state_dict, ...}
    (the official loader reads that entry); a flat state dict (.safetensors, or a bare .pth) is used as is."""
    sd = read_state_dict(path)
    if isinstance(sd.get("vae"), dict):
        sd = sd["vae"]
    elif not any(isinstance(k, str) and k.startswith(_DECODER_PREFIX) for k in sd):
        raise CheckpointError(f"{path}: no 'vae' entry and no '{_DECODER_PREFIX}*' keys; top-level keys: "
                              f"{sorted(map(str, sd))[:20]}")
    return sd


def load_vae(path: str, cfg: VAEConfig, device="cpu", dtype: torch.dtype = torch.float32) -> BSQDecoder:
    """Load an official tokenizer (.pth or .safetensors) strictly into a BSQDecoder, in eval mode."""
    decoder_sd = select_decoder_state(read_tokenizer_state_dict(path), cfg)
    with torch.device("meta"):
        model = BSQDecoder(cfg)
    model.load_state_dict({k: parameter_tensor(v, device, dtype) for k, v in decoder_sd.items()}, strict=True, assign=True)
    return model.to(memory_format=torch.channels_last).eval().requires_grad_(False)  # why: see build_vae
