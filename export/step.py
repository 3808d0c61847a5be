"""The exported units of an Infinity engine, each stating its I/O once.

- `TextUnit`: text features -> everything the scale steps need from the prompt (pooled cond, AdaLN, <sos>,
  key mask, per-layer cross-attention K/V). Run once per prompt batch.
- `StepUnit(scale)`: one scale through all blocks. Past K/V are inputs and this scale's K/V outputs, so every
  graph has static shapes except the text length. With SparVAR, the CS4A decision scale also outputs each CS4A
  layer's key selection and residual cache, and the later scales take them as inputs.
- `DecodeUnit`: summed latent codes -> image.

Export (torch.onnx), the engine builders and the runtime all read these I/O lists; names are the contract.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from sparvar.config import InfinityConfig
from sparvar.model import ConcatKV, Infinity, TextCondition, rope_tables
from sparvar.schedule import Schedule

TEXT_LEN = "text_len"  # the one dynamic axis


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, or TEXT_LEN for the dynamic text axis
    dtype: str  # torch dtype name: float32, float16, bfloat16, int32, int64, bool

    def concrete(self, text_len: int) -> tuple[int, ...]:
        return tuple(text_len if d == TEXT_LEN else d for d in self.shape)

    def as_dict(self):
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def text_io(cfg: InfinityConfig, batch: int, dtype: torch.dtype) -> tuple[list[TensorSpec], list[TensorSpec]]:
    B2, H, D, C = 2 * batch, cfg.heads, cfg.head_dim, cfg.width
    inputs = [TensorSpec("text_features", (batch, TEXT_LEN, cfg.text_dim), "float32"),
              TensorSpec("text_lengths", (batch,), "int64")]
    outputs = [TensorSpec("sos", (B2, 1, C), _dt(dtype)), TensorSpec("cond", (B2, C), "float32"),
               TensorSpec("ada", (cfg.depth, B2, 1, 6, C), "float32"),
               TensorSpec("text_bias", (B2, 1, 1, TEXT_LEN), _dt(dtype))]
    for i in range(cfg.depth):
        outputs += [TensorSpec(f"text_k.{i}", (B2, H, TEXT_LEN, D), _dt(dtype)),
                    TensorSpec(f"text_v.{i}", (B2, H, TEXT_LEN, D), _dt(dtype))]
    return inputs, outputs


def cs4a_state_io(cfg, schedule, policy, batch, dtype, layer) -> list[TensorSpec]:
    """The decision scale's per-layer state that later CS4A scales read."""
    from sparvar.cs4a import num_groups

    S = policy.decision_scale
    G = num_groups(schedule.lengths[S], policy.cs4a_group_size)
    return [TensorSpec(f"cs4a_selected.{layer}", (2 * batch, cfg.heads, G, policy.topk(schedule)), "int32"),
            TensorSpec(f"cs4a_cache.{layer}", (2 * batch, cfg.heads, schedule.lengths[S], cfg.head_dim), _dt(dtype))]


def kv_io(cfg, schedule: Schedule, scale: int, batch: int, dtype: torch.dtype) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Past K/V inputs (none at scale 0) and this scale's new K/V outputs of a step graph (any model family)."""
    B2, H, D, dt = 2 * batch, cfg.heads, cfg.head_dim, _dt(dtype)
    n, past = schedule.lengths[scale], schedule.offsets[scale]
    inputs = [TensorSpec(f"past_{kv}.{i}", (B2, H, past, D), dt) for i in range(cfg.depth) for kv in "kv"] if past else []
    outputs = [TensorSpec(f"new_{kv}.{i}", (B2, H, n, D), dt) for i in range(cfg.depth) for kv in "kv"]
    return inputs, outputs


def cs4a_step_io(cfg, schedule: Schedule, scale: int, batch: int, dtype: torch.dtype,
                 policy) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """SparVAR: the CS4A decision scale outputs each CS4A layer's state, the later scales take it as inputs."""
    inputs, outputs = [], []
    for layer in range(cfg.depth) if policy is not None else ():
        kind = policy.kind(layer, scale)
        if kind == "cs4a_decide":
            outputs += cs4a_state_io(cfg, schedule, policy, batch, dtype, layer)
        elif kind == "cs4a":
            inputs += cs4a_state_io(cfg, schedule, policy, batch, dtype, layer)
    return inputs, outputs


def step_kv(named: dict, cfg, scale: int, like: torch.Tensor, plan=None) -> ConcatKV:
    """The ConcatKV of a step graph's forward from its named inputs (empty at scale 0), with the CS4A decision
    state the inputs carry loaded into `plan`."""
    if scale == 0:
        empty = like.new_zeros(like.shape[0], cfg.heads, 0, cfg.head_dim)
        kv = ConcatKV([empty] * cfg.depth, [empty] * cfg.depth)
    else:
        kv = ConcatKV([named[f"past_k.{i}"] for i in range(cfg.depth)], [named[f"past_v.{i}"] for i in range(cfg.depth)])
    if plan is not None:
        plan.reset()
        for i in range(cfg.depth):
            if f"cs4a_selected.{i}" in named:
                plan.load_state(i, named[f"cs4a_selected.{i}"], named[f"cs4a_cache.{i}"])
    return kv


def step_kv_outputs(kv: ConcatKV, cfg, scale: int, plan=None) -> dict[str, torch.Tensor]:
    """The new K/V (and, at the CS4A decision scale, each CS4A layer's state) a step graph outputs, by name."""
    produced = {}
    for i in range(cfg.depth):
        produced[f"new_k.{i}"], produced[f"new_v.{i}"] = kv.new_k[i], kv.new_v[i]
        if plan is not None and plan.policy.kind(i, scale) == "cs4a_decide":
            produced[f"cs4a_selected.{i}"], produced[f"cs4a_cache.{i}"] = plan.state(i)
    return produced


def step_io(cfg: InfinityConfig, schedule: Schedule, scale: int, batch: int, dtype: torch.dtype,
            policy=None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    B2, H, D, C = 2 * batch, cfg.heads, cfg.head_dim, cfg.width
    n = schedule.lengths[scale]
    dt = _dt(dtype)
    inputs = [TensorSpec("sos", (B2, 1, C), dt) if scale == 0 else TensorSpec("codes", (batch, n, cfg.bits), "float32"),
              TensorSpec("cond", (B2, C), "float32"), TensorSpec("ada", (cfg.depth, B2, 1, 6, C), "float32"),
              TensorSpec("text_bias", (B2, 1, 1, TEXT_LEN), dt)]
    for i in range(cfg.depth):
        inputs += [TensorSpec(f"text_k.{i}", (B2, H, TEXT_LEN, D), dt), TensorSpec(f"text_v.{i}", (B2, H, TEXT_LEN, D), dt)]
    past_kv, new_kv = kv_io(cfg, schedule, scale, batch, dtype)
    state_in, state_out = cs4a_step_io(cfg, schedule, scale, batch, dtype, policy)
    return inputs + past_kv + state_in, [TensorSpec("logits", (B2, n, cfg.num_logits), "float32")] + new_kv + state_out


class TextUnit(nn.Module):
    def __init__(self, model: Infinity):
        super().__init__()
        self.model = model

    def forward(self, text_features, text_lengths):
        t = self.model.encode_text(text_features, text_lengths, cfg_guidance=True)
        out = [t.sos, t.cond, t.ada, t.key_bias]
        for k, v in zip(t.k, t.v):
            out += [k, v]
        return tuple(out)


class StepUnit(nn.Module):
    """One scale of the transformer with explicit KV (and CS4A state) inputs and outputs."""

    def __init__(self, model: Infinity, schedule: Schedule, scale: int, batch: int, plan=None):
        super().__init__()
        self.model, self.schedule, self.scale, self.plan = model, schedule, scale, plan
        self.inputs, self.outputs = step_io(model.cfg, schedule, scale, batch, model.pos_start.dtype,
                                            plan.policy if plan is not None else None)
        self.register_buffer("rope", rope_tables(schedule, model.cfg.head_dim)[scale].to(model.pos_start.device))

    def forward(self, *args):
        cfg = self.model.cfg
        named = dict(zip((s.name for s in self.inputs), args))
        first = named.get("sos", named.get("codes"))
        text = TextCondition(cond=named["cond"], ada=named["ada"], sos=first, key_bias=named["text_bias"],
                             k=[named[f"text_k.{i}"] for i in range(cfg.depth)],
                             v=[named[f"text_v.{i}"] for i in range(cfg.depth)])
        kv = step_kv(named, cfg, self.scale, first, self.plan)
        tokens = self.model.scale_input(self.scale, None if self.scale == 0 else named["codes"], text)
        logits = self.model.step(tokens, self.scale, text, kv, self.rope, self.plan)
        produced = {"logits": logits, **step_kv_outputs(kv, cfg, self.scale, self.plan)}
        return tuple(produced[s.name] for s in self.outputs)


class DecodeUnit(nn.Module):
    def __init__(self, decoder):
        super().__init__()
        self.vae = decoder.module

    def forward(self, latent):
        return self.vae.decode(latent.to(next(self.vae.parameters()).dtype)).float()


def decode_io(cfg: InfinityConfig, schedule: Schedule, batch: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    patch = 2 if cfg.vae.spatial_patchify else 1
    h, w = schedule.final_grid
    H, W = schedule.image_size
    return ([TensorSpec("latent", (batch, cfg.vae.codebook_dim, h * patch, w * patch), "float32")],
            [TensorSpec("image", (batch, 3, H, W), "float32")])
