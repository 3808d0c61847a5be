"""Teacher-forced next-scale bit prediction for `sparvar.model.Infinity` (all scales in one pass).

The inputs of scale k >= 1 are built from the ground-truth bits of scales < k exactly as generation builds
them from sampled bits (sparvar/generate.py): codes upsampled to the final grid and summed, the sum resampled
to grid k. Scale 0's input is the text's <sos>. Official training downsamples that sum with `area`; we use
the inference resampling so that training and generation see the same inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparvar.generate import resample
from sparvar.model import Infinity, TextCondition
from sparvar.schedule import Schedule
from sparvar.text import hashed_embeddings
from sparvar.vae import bits_to_codes, latent_to_tokens, tokens_to_latent


def class_prompts(class_names: tuple[str, ...]) -> list[str]:
    """The prompt of each class: its name (the model card's text interface)."""
    return list(class_names)


def class_text(class_names: tuple[str, ...], text_dim: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (K, L, text_dim), lengths (K,)) of the class prompts, through `text.hashed_embeddings`."""
    return hashed_embeddings(class_prompts(class_names), text_dim, max_tokens)


def next_scale_codes(bits: list[torch.Tensor], schedule: Schedule, codebook_dim: int) -> list[torch.Tensor]:
    """Ground-truth bits per scale (B, n_k, d) -> the code inputs (B, n_k, d) of scales 1 .. K-1."""
    if len(bits) != schedule.num_scales:
        raise ValueError(f"need bits for all {schedule.num_scales} scales, got {len(bits)}")
    final = schedule.final_grid
    summed, inputs = None, []
    for k, b in enumerate(bits[:-1]):
        h, w = schedule.grids[k]
        up = resample(tokens_to_latent(bits_to_codes(b, codebook_dim), h, w, patchify=False), final)
        summed = up if summed is None else summed + up
        inputs.append(latent_to_tokens(resample(summed, schedule.grids[k + 1]), patchify=False))
    return inputs


def training_text(model: Infinity, features: torch.Tensor, lengths: torch.Tensor, drop: torch.Tensor) -> TextCondition:
    """Text condition of a batch; rows with drop=True get the learned empty prompt `cfg_uncond` (for CFG)."""
    L = features.shape[1]
    uncond = model.cfg_uncond[:L].unsqueeze(0).to(features.dtype)
    features = torch.where(drop[:, None, None], uncond, features)
    return model.encode_text(features, lengths, cfg_guidance=False)


def bit_logits(model: Infinity, bits: list[torch.Tensor], text: TextCondition, schedule: Schedule) -> torch.Tensor:
    """Logits (B, total_tokens, 2*bits) of every scale, teacher-forced, with the block-causal scale mask."""
    codes = next_scale_codes(bits, schedule, model.cfg.vae.codebook_dim)
    # fp32 inputs keep the residual stream in fp32 under autocast (word_embed's output would be bf16)
    inputs = [text.sos.float()] + [model.scale_input(k + 1, c, text).float() for k, c in enumerate(codes)]
    return torch.cat(model.forward_all_scales(inputs, text, schedule), dim=1)


def bit_loss(logits: torch.Tensor, bits: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """2-way cross-entropy per bit (= BCE on l1 - l0), mean over all tokens and bits; plus bit accuracy."""
    target = torch.cat(bits, dim=1).float()
    pair = logits.float().unflatten(-1, (-1, 2))
    margin = pair[..., 1] - pair[..., 0]
    loss = F.binary_cross_entropy_with_logits(margin, target)
    acc = ((margin > 0).float() == target).float().mean()
    return loss, {"bit_acc": acc.detach()}


def scale_losses(logits: torch.Tensor, bits: list[torch.Tensor]) -> list[float]:
    """Per-scale mean BCE (for logs)."""
    out, start = [], 0
    for b in bits:
        n = b.shape[1]
        out.append(bit_loss(logits[:, start:start + n], [b])[0].item())
        start += n
    return out
