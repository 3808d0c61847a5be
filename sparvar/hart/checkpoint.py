"""Strict loading of the official HART transformer checkpoint (the `llm/` folder of hart-0.7b-1024px).

Our parameter names are the official ones, so there is no renaming: every missing, unexpected, wrongly shaped,
non-floating-point or non-finite key is one CheckpointError that lists them (sparvar.checkpoint.check_keys). Two
official buffers are accepted and dropped: `lvl_1L` (the level id of every token, which we derive from the
schedule) and `attn_bias_for_masking` (the training-time block-causal mask, 9750^2 fp32 = 380 MB at 1024 px, never
materialised here).

A checkpoint is a file (.bin / .pth / .safetensors) or the `llm/` folder. Of a folder we read, as official sample.py
does by default (use_ema=True), `ema_model.bin` when it is there; ema=False (or a folder without it) reads the
`model.safetensors` / `pytorch_model.bin` weights or their sharded index, and ema=True insists on the EMA file.
"""
from __future__ import annotations

import os

import torch

from ..checkpoint import (CheckpointError, check_keys, parameter_tensor, read_state_dict, read_weights, weight_files,
                          write_state_dict)
from .config import HartConfig
from .model import HART, build_model, cast_model

EMA_FILE = "ema_model.bin"


def official_key_shapes(cfg: HartConfig) -> dict[str, tuple[int, ...]]:
    """Official key -> shape of every tensor we load, from a meta-device model (allocates no weights)."""
    return {k: tuple(v.shape) for k, v in build_model(cfg, init="meta").state_dict().items()}


def dropped_buffer_shapes(cfg: HartConfig) -> dict[str, tuple[int, ...]]:
    """The official buffers a checkpoint may carry and we drop: over all T = text_len + sum(pn^2) - 1 tokens."""
    total = cfg.text_len + sum(pn * pn for pn in cfg.patch_nums[1:])
    return {"lvl_1L": (1, total), "attn_bias_for_masking": (1, 1, total, total)}


def official_buffers(cfg: HartConfig) -> dict[str, torch.Tensor]:
    """The dropped buffers as the official constructor makes them (for synthetic checkpoints only)."""
    levels = torch.cat([torch.zeros(cfg.text_len, dtype=torch.long)]
                       + [torch.full((pn * pn,), i + 1) for i, pn in enumerate(cfg.patch_nums[1:])])
    bias = torch.where(levels[:, None] >= levels[None, :], 0.0, float("-inf"))
    return {"lvl_1L": levels[None], "attn_bias_for_masking": bias[None, None]}


def check_state_dict(sd: dict[str, torch.Tensor], cfg: HartConfig) -> None:
    """Raise a CheckpointError listing every missing, unexpected, wrongly shaped, non-floating-point and non-finite
    key (check_keys; of the dropped buffers, presence and shape only)."""
    expected = official_key_shapes(cfg)
    dropped = {k: s for k, s in dropped_buffer_shapes(cfg).items() if k in sd}
    expected.update(dropped)
    check_keys(sd, expected, cfg.name, dropped_keys=frozenset(dropped))  # not loaded: integer ids, a -inf mask


def _ema_file(path: str, ema: bool | None) -> str | None:
    """The EMA weights file to read for a checkpoint path, or None to read its plain weights (see checkpoint_files)."""
    if not os.path.isdir(path):
        if ema:
            raise CheckpointError(f"ema=True takes the checkpoint folder (with {EMA_FILE}), got the file {path}")
        return None
    if ema or (ema is None and os.path.isfile(os.path.join(path, EMA_FILE))):
        return os.path.join(path, EMA_FILE)
    return None


def checkpoint_files(path: str, ema: bool | None = None) -> list[str]:
    """The weight file(s) a checkpoint path names: the file itself, or the right file(s) of an `llm/` folder
    (ema: None = the EMA weights when the folder has them, the official default; True = only those; False = never)."""
    ema_file = _ema_file(path, ema)
    return [ema_file] if ema_file else weight_files(path)


def read_checkpoint(path: str, ema: bool | None = None) -> dict[str, torch.Tensor]:
    ema_file = _ema_file(path, ema)
    return read_state_dict(ema_file) if ema_file else read_weights(path)


def _loadable(sd: dict[str, torch.Tensor], cfg: HartConfig) -> dict[str, torch.Tensor]:
    check_state_dict(sd, cfg)
    dropped = dropped_buffer_shapes(cfg)
    return {k: v for k, v in sd.items() if k not in dropped}


def load_checkpoint(model: HART, path: str, ema: bool | None = None) -> None:
    """Load an official checkpoint into `model` strictly (names, count and shapes must all match)."""
    model.load_state_dict(_loadable(read_checkpoint(path, ema), model.cfg), strict=True)


def load_model(cfg: HartConfig, path: str, device="cpu", dtype=torch.float32, ema: bool | None = None) -> HART:
    """A HART with the official weights at `path`, in `dtype` (the head stays fp32), without a random init first."""
    model = build_model(cfg, init="meta")
    sd = _loadable(read_checkpoint(path, ema), cfg)
    model.load_state_dict({k: parameter_tensor(v, device) for k, v in sd.items()}, strict=True, assign=True)
    return cast_model(model, dtype)


def save_official(model: HART, path: str, with_buffers: bool = True) -> None:
    """Write `model` as an official checkpoint file (with the official lvl_1L / attn_bias_for_masking buffers
    unless with_buffers=False); atomic. For synthetic checkpoints: official key names and layout."""
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if with_buffers:
        sd.update(official_buffers(model.cfg))
    write_state_dict(sd, path)
