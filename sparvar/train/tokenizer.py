"""A bitwise multi-scale tokenizer with the interface of Infinity's BSQ tokenizer, for training.

encoder (ours: conv + resnet blocks, stride = patch_size) -> latent z (B, d, H, W)
-> multi-scale residual BSQ over the schedule's grids (official rules, below) -> summed codes
-> decoder = `sparvar.vae.ConvDecoder` (the official decoder architecture), so the exported `decoder.*`
   weights load with `sparvar.vae.load_vae` and serve the normal generation path.

Multi-scale BSQ, as the official `MultiScaleBSQ` (without its optional extras):
for each grid (h, w): r = area-downsample(residual) to (h, w); bits = (l2norm_d(r) > 0); codes =
+-1/sqrt(d) (`vae.bits_to_codes`); up = trilinear-upsample(codes) to (H, W) (`generate.resample`, the
inference upsampling); residual -= up (detached); summed += up. Gradients pass straight through the sign
onto l2norm(r). The sum is exactly what generation rebuilds from the same bits.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparvar.config import VAEConfig
from sparvar.generate import resample
from sparvar.vae import Conv, ConvDecoder, Mid, Norm, ResnetBlock, bits_to_codes, check_vae_config, latent_to_tokens


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class DownLevel(nn.Module):
    def __init__(self, c_in: int, c_out: int, num_blocks: int, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(num_blocks))
        if downsample:
            self.downsample = Downsample(c_out)

    def forward(self, x):
        for blk in self.block:
            x = blk(x)
        return self.downsample(x) if hasattr(self, "downsample") else x


class Encoder(nn.Module):
    """Mirror of the decoder: levels 0..n-1 with `num_res_blocks` blocks each, stride-2 convs at levels < log2(patch)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        check_vae_config(cfg)
        ch, mult = cfg.ch, cfg.ch_mult
        downs = cfg.patch_size.bit_length() - 1
        self.conv_in = Conv(3, ch * mult[0], 3)
        self.down = nn.ModuleList(
            DownLevel(ch * mult[max(i - 1, 0)], ch * mult[i], cfg.num_res_blocks, downsample=i < downs)
            for i in range(len(mult))
        )
        top = ch * mult[-1]
        self.mid = Mid(top)
        self.norm_out = Norm(top)
        self.conv_out = Conv(top, cfg.codebook_dim, 3)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


def multiscale_bsq(z: torch.Tensor, grids: tuple[tuple[int, int], ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """z (B, d, H, W) -> (summed codes (B, d, H, W) with straight-through gradients, bits per scale (B, h*w, d) in {0, 1})."""
    B, d, H, W = z.shape
    if tuple(grids[-1]) != (H, W):
        raise ValueError(f"the last grid {tuple(grids[-1])} must be the latent grid {(H, W)}")
    residual, summed, bits = z, torch.zeros_like(z), []
    for h, w in grids:
        r = residual if (h, w) == (H, W) else F.interpolate(residual, size=(h, w), mode="area")
        unit = F.normalize(r, dim=1)
        b = (unit > 0).to(z.dtype)
        hard = bits_to_codes(b.movedim(1, -1), d).movedim(-1, 1)
        codes = unit + (hard - unit).detach()  # value: the codes; gradient: onto l2norm(r)
        up = codes if (h, w) == (H, W) else resample(codes, (H, W))
        residual = residual - up.detach()
        summed = summed + up
        bits.append(latent_to_tokens(b, patchify=False))
    return summed, bits


class Tokenizer(nn.Module):
    """Encoder + multi-scale BSQ + decoder; state dict keys `encoder.*` and `decoder.*` (the official decoder keys)."""

    def __init__(self, cfg: VAEConfig, grids: tuple[tuple[int, int], ...]):
        super().__init__()
        if cfg.spatial_patchify:
            raise ValueError(f"{cfg.name}: training supports tokenizers without spatial patchify only")
        self.cfg, self.grids = cfg, tuple(tuple(g) for g in grids)
        self.encoder = Encoder(cfg)
        self.decoder = ConvDecoder(cfg)

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.grids[-1]
        return h * self.cfg.patch_size, w * self.cfg.patch_size

    def _check(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != self.image_size:
            raise ValueError(f"images must be (B, 3, {self.image_size[0]}, {self.image_size[1]}), got {tuple(images.shape)}")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """images (B, 3, H, W) in [-1, 1] -> (reconstruction, unclamped, bits per scale)."""
        self._check(images)
        summed, bits = multiscale_bsq(self.encoder(images), self.grids)
        return self.decoder(summed), bits

    @torch.no_grad()
    def encode_bits(self, images: torch.Tensor) -> list[torch.Tensor]:
        self._check(images)
        return multiscale_bsq(self.encoder(images), self.grids)[1]

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """images -> decoded images in [-1, 1] (what a generation decoding these bits would show)."""
        return self(images)[0].clamp(-1.0, 1.0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of two (B, 3, H, W) batches in [-1, 1], measured on [0, 1] pixels."""
    mse = (a.float() - b.float()).div(2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def tokenizer_loss(tokenizer: Tokenizer, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pixel reconstruction loss (MSE + L1 on [-1, 1]); also returns the batch PSNR."""
    recon, _ = tokenizer(images)
    mse = F.mse_loss(recon.float(), images)
    loss = mse + F.l1_loss(recon.float(), images)
    return loss, {"mse": mse.detach(), "psnr": 10 * math.log10(4.0) - 10 * torch.log10(mse.detach())}
