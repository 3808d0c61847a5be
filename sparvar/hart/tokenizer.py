"""HART's hybrid tokenizer, decode side: the multi-scale residual VQ quantizer's inference path and the conv decoder.

Architecture and parameter names follow the official `HARTAutoEncoder` (hart/modules/models/autoencoder/,
hart/modules/networks/basic_vae.py): our state dict keys are exactly its `quantize.*`, `post_quant_conv.*` and
`decoder.*` keys, so the HF `tokenizer/` checkpoint (a `HARTAutoEncoderWithDisc`: keys `vae.*` and `disc.*`)
loads by name. Only what decoding needs is built: the codebook, the shared Phi convs, post_quant_conv and the
decoder (VQGAN-f16 style: GroupNorm(32), self-attention at the coarsest level and in the middle, nearest 2x up).

Residual multi-scale VQ (the official `get_next_autoregressive_input`): after scale si, its embedded codes
(pn x pn) are bicubic-upsampled to the final grid, refined by the Phi conv picked by the relative scale position
si / (SN - 1), and added to f_hat; the next scale's input is f_hat area-downsampled to that scale's grid. The last
scale adds its codes plus the diffusion head's continuous residual without Phi. Both resamplings use precomputed
separable matrices (out = A_h @ x @ A_w^T), because ONNX has no adaptive average pooling to non-divisible sizes
(64 -> 27) and its cubic resize differs from torch's at the borders.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import parameter_tensor, read_state_dict, select_state
from ..vae import conv_without_bias, norm_silu, resnet_block, upsample_conv
from .config import HartVQConfig

GROUPS = 32  # the official Normalize: GroupNorm(32 groups, eps 1e-6) everywhere
BICUBIC_A = -0.75  # torch's (and OpenCV's) cubic convolution coefficient


# --- exportable resampling: separable interpolation matrices


def _cubic_weight(d: float) -> float:
    """Keys' cubic convolution kernel at distance |d| (the one torch's bicubic uses)."""
    a, d = BICUBIC_A, abs(d)
    if d <= 1:
        return ((a + 2) * d - (a + 3)) * d * d + 1
    if d < 2:
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return 0.0


@lru_cache(maxsize=None)
def _resample_matrix_f64(kind: str, n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 matrix of one axis of F.interpolate(size=..., align_corners=False).

    bicubic: source coordinate (o + 0.5) * n_in / n_out - 0.5, four taps, indices clamped at the borders
    (no antialiasing). area: output o averages inputs [floor(o * n_in / n_out), ceil((o + 1) * n_in / n_out)),
    exactly adaptive_avg_pool's windows; a 2-D window average is the product of its two 1-D averages.
    Cached as numpy, not torch: a tensor made while torch.export traces would be a fake tensor in the cache.
    """
    if n_in <= 0 or n_out <= 0:
        raise ValueError(f"resample sizes must be positive, got {n_in} -> {n_out}")
    m = np.zeros((n_out, n_in), dtype=np.float64)
    if kind == "bicubic":
        scale = n_in / n_out
        for o in range(n_out):
            src = (o + 0.5) * scale - 0.5
            base = math.floor(src)
            for tap in range(base - 1, base + 3):
                m[o, min(max(tap, 0), n_in - 1)] += _cubic_weight(src - tap)
    elif kind == "area":
        for o in range(n_out):
            start, end = (o * n_in) // n_out, -((-(o + 1) * n_in) // n_out)
            m[o, start:end] = 1.0 / (end - start)
    else:
        raise ValueError(f"unknown resample kind {kind!r} (expected 'bicubic' or 'area')")
    return m


_MATRICES: dict[tuple, torch.Tensor] = {}  # (kind, n_in, n_out, device, dtype) -> matrix, built once


def resample_matrix(kind: str, n_in: int, n_out: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The (n_out, n_in) matrix on `device` in `dtype`, cached so a GPU step makes no host-to-device copy."""
    values = _resample_matrix_f64(kind, int(n_in), int(n_out))
    if torch.compiler.is_compiling():  # torch.compile / torch.export tracing: a graph constant, never cached
        return torch.tensor(values, device=device, dtype=dtype)
    device = torch.device(device) if device is not None else torch.get_default_device()
    key = (kind, int(n_in), int(n_out), device, dtype)
    if key not in _MATRICES:
        _MATRICES[key] = torch.tensor(values, device=device, dtype=dtype)
    return _MATRICES[key]


def resample(x: torch.Tensor, size: tuple[int, int], kind: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, *size) as F.interpolate(x, size, mode=kind), as two matmuls (exports to ONNX MatMul)."""
    if x.ndim != 4:
        raise ValueError(f"resample expects (B, C, H, W), got {tuple(x.shape)}")
    a_h = resample_matrix(kind, x.shape[-2], size[0], x.device, x.dtype)  # (h_out, H)
    a_w = resample_matrix(kind, x.shape[-1], size[1], x.device, x.dtype)  # (w_out, W)
    return a_h @ x @ a_w.T  # (B, C, h_out, w_out)


# --- the multi-scale residual quantizer (inference path)


def check_vq_config(cfg: HartVQConfig) -> None:
    """Reject a HartVQConfig the official tokenizer cannot build, naming the field."""
    if not isinstance(cfg, HartVQConfig):
        raise TypeError(f"expected a HartVQConfig, got {type(cfg).__name__}")
    for field in ("vocab_size", "z_channels", "ch", "num_res_blocks"):
        if getattr(cfg, field) <= 0:
            raise ValueError(f"{cfg.name}: {field} must be positive, got {getattr(cfg, field)}")
    if not cfg.ch_mult or any(m <= 0 for m in cfg.ch_mult):
        raise ValueError(f"{cfg.name}: ch_mult must be non-empty and positive, got {cfg.ch_mult}")
    for m in cfg.ch_mult:
        if (cfg.ch * m) % GROUPS:
            raise ValueError(f"{cfg.name}: GroupNorm({GROUPS}) needs ch * ch_mult divisible by {GROUPS}, got {cfg.ch} x {m}")
    if cfg.share_quant_resi < 2:
        # 0 (one Phi per scale) and 1 (a single Phi) name their keys differently; no HART checkpoint uses them
        raise ValueError(f"{cfg.name}: only partially shared Phi convs (share_quant_resi >= 2) are implemented, "
                         f"got {cfg.share_quant_resi}")
    if not 1e-6 < cfg.quant_resi <= 1:
        raise ValueError(f"{cfg.name}: quant_resi must be in (0, 1], got {cfg.quant_resi}")


def phi_index(si: int, num_scales: int, num_phi: int) -> int:
    """Which shared Phi conv scale si uses: the one whose tick is nearest to si / (SN - 1) (official
    PhiPartiallyShared; ticks are spaced 1/(3K) from the ends for K = 4, 1/(2K) otherwise; ties go to the first)."""
    if not 0 <= si < num_scales or num_scales < 2:
        raise ValueError(f"scale index {si} out of range for {num_scales} scales")
    edge = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
    ticks = np.linspace(edge, 1 - edge, num_phi)  # numpy, as official: the same floats decide near-ties
    return int(np.argmin(np.abs(ticks - si / (num_scales - 1))))


class Phi(nn.Conv2d):
    """x * (1 - r) + conv3x3(x) * r: the residual refinement of each scale's upsampled codes."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = ratio

    def forward(self, x):
        return x * (1 - self.ratio) + super().forward(x) * self.ratio


class SharedPhi(nn.Module):
    """The official PhiPartiallyShared container (keys `qresi_ls.{i}.weight`)."""

    def __init__(self, channels: int, ratio: float, count: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, ratio) for _ in range(count))


class MultiScaleQuantizer(nn.Module):
    """Codebook and shared Phi convs of the official HARTHybridQuantizer, with its inference-time methods."""

    def __init__(self, cfg: HartVQConfig):
        super().__init__()
        self.cfg = cfg
        self.quant_resi = SharedPhi(cfg.z_channels, cfg.quant_resi, cfg.share_quant_resi)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)

    def embed(self, idx: torch.Tensor, pn: int) -> torch.Tensor:
        """(B, pn*pn) code indices, raster order -> (B, Cvae, pn, pn) codes."""
        if idx.ndim != 2 or idx.shape[1] != pn * pn:
            raise ValueError(f"indices must be (B, {pn * pn}) for a {pn}x{pn} scale, got {tuple(idx.shape)}")
        return self.embedding(idx).transpose(1, 2).unflatten(2, (pn, pn))  # (B, C, pn, pn)

    def phi(self, si: int, num_scales: int) -> Phi:
        return self.quant_resi.qresi_ls[phi_index(si, num_scales, len(self.quant_resi.qresi_ls))]

    def next_autoregressive_input(self, si: int, patch_nums: tuple[int, ...], f_hat: torch.Tensor,
                                  h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale si's codes h (B, C, pn, pn) -> (f_hat (B, C, P, P), the next scale's input (B, C, pn', pn')).

        P = patch_nums[-1]. Not in place (the official adds to f_hat in place). At the last scale h is the final
        tokens (codes plus the continuous residual), added without Phi, and the "next input" is f_hat itself."""
        SN, P = len(patch_nums), patch_nums[-1]
        if f_hat.shape[-2:] != (P, P) or h.shape[-2:] != (patch_nums[si],) * 2:
            raise ValueError(f"scale {si}: f_hat must be {P}x{P} and h {patch_nums[si]}x{patch_nums[si]}, got "
                             f"{tuple(f_hat.shape)} and {tuple(h.shape)}")
        if si == SN - 1:
            f_hat = f_hat + h
            return f_hat, f_hat
        f_hat = f_hat + self.phi(si, SN)(resample(h, (P, P), "bicubic"))  # conv after upsampling
        nxt = patch_nums[si + 1]
        return f_hat, resample(f_hat, (nxt, nxt), "area")


# --- the decoder (official basic_vae.Decoder; flat nn.Conv2d / nn.GroupNorm names)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()  # Identity: no keys

    def forward(self, x, x_bias=None):
        """sparvar.vae.resnet_block (conv biases folded into the next pass; `x_bias` the previous conv's pending
        bias), on the official flat module names."""
        shortcut = None if isinstance(self.nin_shortcut, nn.Identity) else self.nin_shortcut
        return resnet_block(x, x_bias, self.norm1, self.conv1, self.norm2, self.conv2, shortcut)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, softmax scale C^-0.5, q/k/v from one 1x1 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(norm_silu(self.norm, x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # (B, HW, C) each
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    @property
    def upsampling_conv(self) -> nn.Conv2d:  # see sparvar.vae.freeze_subpixel_weights
        return self.conv

    def forward(self, x):
        """(the upsampled convolution without its bias, that bias): see sparvar.vae.upsample_conv."""
        return upsample_conv(self.conv, x)


class UpLevel(nn.Module):
    """Resolution level i: num_res_blocks + 1 resnet blocks (each followed by attention at the coarsest level),
    then a 2x upsample for every level but 0."""

    def __init__(self, c_in: int, c_out: int, num_blocks: int, attention: bool, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(num_blocks if attention else 0))
        if upsample:
            self.upsample = Upsample2x(c_out)

    def forward(self, x, x_bias=None):
        """(output, its pending bias or None): the upsampling convolution's bias stays pending."""
        for i, blk in enumerate(self.block):
            x = blk(x, x_bias if i == 0 else None)
            if len(self.attn):
                x = self.attn[i](x)
        return self.upsample(x) if hasattr(self, "upsample") else (x, None)


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x, x_bias=None):
        return self.block_2(self.attn_1(self.block_1(x, x_bias)))


class Decoder(nn.Module):
    def __init__(self, cfg: HartVQConfig):
        super().__init__()
        ch, mult, levels = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        top = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, top, 3, padding=1)
        self.mid = Mid(top)
        # up[i] is level i; they run from the coarsest (levels - 1) down to 0, so level i reads level i+1's output.
        self.up = nn.ModuleList(
            UpLevel(ch * mult[i + 1] if i + 1 < levels else top, ch * mult[i], cfg.num_res_blocks + 1,
                    attention=i == levels - 1, upsample=i != 0)
            for i in range(levels)
        )
        self.norm_out = group_norm(ch * mult[0])
        self.conv_out = nn.Conv2d(ch * mult[0], 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(conv_without_bias(self.conv_in, z), self.conv_in.bias)  # (B, ch*mult[-1], h, w)
        pending = None  # the bias of the last convolution, not yet added to h
        for level in reversed(self.up):
            h, pending = level(h, pending)  # doubles H, W at every level but 0
        return self.conv_out(norm_silu(self.norm_out, h, silu=True, pre_bias=pending))  # (B, 3, h*stride, w*stride)


class HartVQDecoder(nn.Module):
    """Decode side of the official HART tokenizer. State dict keys are the official `quantize.*`,
    `post_quant_conv.*` and `decoder.*` keys (the HF checkpoint stores them under `vae.`)."""

    def __init__(self, cfg: HartVQConfig):
        super().__init__()
        check_vq_config(cfg)
        self.cfg = cfg
        self.quantize = MultiScaleQuantizer(cfg)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.decoder = Decoder(cfg)

    def indices_to_fhat(self, indices: list[torch.Tensor], patch_nums: tuple[int, ...],
                        residual: torch.Tensor | None = None) -> torch.Tensor:
        """Per-scale code indices [(B, pn*pn)] (+ the last scale's continuous residual (B, P*P, C) from the
        diffusion head) -> f_hat (B, C, P, P), as the official inference loop accumulates it."""
        if len(indices) != len(patch_nums):
            raise ValueError(f"{len(indices)} index tensors for {len(patch_nums)} scales")
        P = patch_nums[-1]
        f_hat = self.quantize.embedding.weight.new_zeros(indices[0].shape[0], self.cfg.z_channels, P, P)
        for si, (idx, pn) in enumerate(zip(indices, patch_nums)):
            h = self.quantize.embed(idx, pn)  # (B, C, pn, pn)
            if si == len(patch_nums) - 1 and residual is not None:
                if residual.shape != (idx.shape[0], P * P, self.cfg.z_channels):
                    raise ValueError(f"residual must be (B, {P * P}, {self.cfg.z_channels}), got {tuple(residual.shape)}")
                h = h + residual.transpose(1, 2).unflatten(2, (P, P)).to(h.dtype)
            f_hat, _ = self.quantize.next_autoregressive_input(si, patch_nums, f_hat, h)
        return f_hat

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """(B, Cvae, h, w) f_hat -> (B, 3, h*stride, w*stride) image in [-1, 1] (official `fhat_to_img`)."""
        if not isinstance(f_hat, torch.Tensor) or f_hat.ndim != 4 or f_hat.shape[1] != self.cfg.z_channels:
            raise ValueError(f"{self.cfg.name}: f_hat must be (B, {self.cfg.z_channels}, h, w), got "
                             f"{tuple(f_hat.shape) if isinstance(f_hat, torch.Tensor) else type(f_hat).__name__}")
        accumulator = self.quantize.embedding.weight.dtype
        if f_hat.dtype != accumulator:
            raise TypeError(f"f_hat dtype {f_hat.dtype} != the quantizer's dtype {accumulator} (f_hat accumulates there)")
        x = f_hat.to(self.decode_dtype)  # a no-op unless the decode side is half (half_decoder)
        if self.decode_dtype != accumulator:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.decoder(self.post_quant_conv(x)).clamp(-1.0, 1.0).contiguous()

    forward = decode

    @property
    def decode_dtype(self) -> torch.dtype:
        """The decode side's dtype: the quantizer's, or fp16/bf16 after half_decoder."""
        return self.post_quant_conv.weight.dtype

    def half_decoder(self, dtype: torch.dtype = torch.float16) -> "HartVQDecoder":
        """This tokenizer, its decode side converted in place to `dtype` and channels_last: the official inference
        runs under fp16 autocast (sample.py), so its decode convolutions see fp16. The quantizer stays in its dtype
        (fp32): f_hat accumulates over every scale there. Channels-last weights and input spare cuDNN the NCHW<->NHWC
        transposes around each convolution and let the 2x upsampling run its Triton kernel (sparvar.vae)."""
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"half_decoder takes torch.float16 or torch.bfloat16, got {dtype}")
        for module in (self.post_quant_conv, self.decoder):
            module.to(dtype=dtype, memory_format=torch.channels_last)
        return self


# --- construction and strict loading

# The HF tokenizer checkpoint is a HARTAutoEncoderWithDisc: the autoencoder under `vae.`, the GAN discriminator
# under `disc.` (dropped). Inside the autoencoder, these are not used to decode and are dropped by name: the
# encoder side, the quantizer's codebook-usage statistics, and the optional second decoder (`double_decoder`),
# which the official load_state_dict overwrites with a copy of `decoder` anyway.
VAE_PREFIX, DISC_PREFIX = "vae.", "disc."
IGNORED_PREFIXES = ("encoder.", "quant_conv.", "decoder2.", "post_quant_conv2.")
IGNORED_KEYS = ("quantize.ema_vocab_hit_SV",)


def decoder_key_shapes(cfg: HartVQConfig) -> dict[str, tuple[int, ...]]:
    """Official autoencoder key (without `vae.`) -> shape for everything decoding uses, from a meta build."""
    with torch.device("meta"):
        model = HartVQDecoder(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def select_decoder_state(sd: dict, cfg: HartVQConfig) -> dict[str, torch.Tensor]:
    """Strictly pick the decode-side weights out of an official tokenizer state dict.

    Accepts the HF layout (`vae.*` + `disc.*`) or a bare HARTAutoEncoder state dict (no `vae.` keys at all).
    Raises CheckpointError listing every missing, unexpected, wrongly shaped, non-tensor, non-floating-point and
    non-finite key (checkpoint.select_state)."""
    expected = decoder_key_shapes(cfg)
    wrapped = any(isinstance(k, str) and k.startswith(VAE_PREFIX) for k in sd)

    def name_of(key: str) -> str | None:
        if wrapped:
            if key.startswith(DISC_PREFIX):
                return None
            if not key.startswith(VAE_PREFIX):
                return ""  # a bare key in an HF-layout file: out of place
            key = key[len(VAE_PREFIX):]
        return None if key.startswith(IGNORED_PREFIXES) or key in IGNORED_KEYS else key

    header = (f"HART tokenizer checkpoint does not match {cfg.name} (vocab {cfg.vocab_size}, z_channels "
              f"{cfg.z_channels}, ch {cfg.ch}, ch_mult {cfg.ch_mult}; {len(expected)} decode keys expected; "
              f"dropped: '{DISC_PREFIX}*', {IGNORED_PREFIXES}, {IGNORED_KEYS})")
    return select_state(sd, expected, name_of, header, missing_prefix=VAE_PREFIX if wrapped else "")


def build_hart_vq(cfg: HartVQConfig, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32) -> HartVQDecoder:
    """Random-weight tokenizer decoder (PyTorch default init, seeded, global RNG untouched), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HartVQDecoder(cfg)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_hart_vq(path: str, cfg: HartVQConfig, device="cpu", dtype: torch.dtype = torch.float32) -> HartVQDecoder:
    """Load an official HART tokenizer (.safetensors / .pth / .bin) strictly into a HartVQDecoder, in eval mode."""
    decode_sd = select_decoder_state(read_state_dict(path), cfg)
    with torch.device("meta"):
        model = HartVQDecoder(cfg)
    model.load_state_dict({k: parameter_tensor(v, device, dtype) for k, v in decode_sd.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
