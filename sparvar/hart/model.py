"""The HART transformer (hart-0.7b), as plain torch, behind the same step interface as sparvar.model.Infinity.

Module and parameter names are the official ones (`blocks.{i}.attn.qkv_proj`, `ffn.gate_proj`, `head_nm.ada_lin.1`,
`decoder_norm`, `diffloss.net.*`), so official checkpoints load without renaming (sparvar/hart/checkpoint.py).
Differences from Infinity that shape the interface:

- No cross-attention: the text enters as a `text_len`-slot PREFIX in self-attention. Scale 0 runs those slots
  (fully bidirectional, pads included, as the official inference); its 1x1 token is predicted from the last
  prefix slot and never enters the KV. Every later scale sees the whole cache plus itself.
- RoPE depends on each batch row's text length (image positions start after the last text position), so the
  tables are built per prompt batch: `rope_tables(schedule, head_dim, text.positions)`.

    text = model.encode_text(features, mask, cfg_guidance=True)    # prefix tokens, pooled cond, text positions
    ropes = rope_tables(schedule, cfg.head_dim, text.positions)     # per scale (2, B, n, head_dim)
    cache = model.new_cache(text.batch, schedule)                   # KV of text_len + sum(pn^2) - 1 slots
    logits = model.step(tokens, scale, text, cache, ropes[scale])   # scale 0: (B, 1, V); scale s: (B, pn_s^2, V)
    logits, hidden = model.step(..., return_hidden=True)            # hidden: the last block's output (B, n, C)
    z = model.diffusion_condition(hidden, code_vectors)             # decoder_norm(hidden + word_embed(codes))
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import self_attention
from ..model import (ConcatKV, KVCache, RMSNorm, _MaskPlan, build_model, cache_tokens, cast_model,  # noqa: F401
                     qkv_bias, rms_norm)  # (some re-exported)
from ..schedule import Schedule
from .config import HartConfig
from .diffusion import DiffLoss

ROPE_BASE = 10000.0  # official rope_theta
MAX_SCALE_MUL = math.log(100.0)  # clamp of the learned temperature (attn_l2_norm only)


# ----------------------------------------------------------------------------------------------- RoPE
# Angles are laid out as the official code feeds them to HF `rotate_half` (dim i pairs with dim i + D/2), and
# computed with the same float32 operations, so positions like 64/3 round the same way.
def _inv_freq(head_dim: int, step: int) -> torch.Tensor:
    """1 / base^(k/head_dim) for k = 0, step, 2*step, ... < head_dim (float32, official op order)."""
    return 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, step, dtype=torch.int64).float() / head_dim))


def text_rope_angles(head_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """1-D RoPE of the text prefix: positions (B, L) -> angles (B, L, head_dim) = [p f, p f], f_k = base^(-2k/D)."""
    freqs = positions.float()[..., None] * _inv_freq(head_dim, 2).to(positions.device)  # (B, L, D/2)
    return torch.cat([freqs, freqs], dim=-1)


def image_rope_angles(head_dim: int, pn: int, last_pn: int, text_last: torch.Tensor) -> torch.Tensor:
    """2-D RoPE of a pn x pn scale: angles (B, pn*pn, head_dim) = [r f, r f, c f, c f], f_k = base^(-4k/D).

    (row, col) are scaled to the last grid as floats (official: coords / pn * last_pn, no rounding) and shifted by
    each row's last text position `text_last` (B,). With rotate_half, dim i < D/4 (angle r f_i) pairs with dim
    i + D/2 (angle c f_i): each rotated pair mixes a row and a column angle (not a rotation).
    """
    idx = torch.arange(pn, device=text_last.device)
    grid = torch.stack(torch.meshgrid(idx, idx, indexing="ij"), dim=-1)  # (pn, pn, 2) = (row, col)
    coords = (grid / pn * last_pn).reshape(1, pn * pn, 2) + text_last[:, None, None]  # (B, n, 2) float32
    inv_freq = _inv_freq(head_dim, 4).to(text_last.device)  # (D/4,)
    row, col = coords[..., 0:1] * inv_freq, coords[..., 1:2] * inv_freq  # each (B, n, D/4)
    return torch.cat([row, row, col, col], dim=-1)


def rope_tables(schedule: Schedule, head_dim: int, text_positions: torch.Tensor) -> list[torch.Tensor]:
    """Per scale a (2, B, n, head_dim) float32 (cos, sin) table for these prompts' text positions (B, L).

    Scale 0 covers the text prefix (1-D positions); scale s >= 1 its pn x pn grid (2-D positions after the
    last text position). Batch rows differ, so the tables are built once per prompt batch.
    """
    if schedule.prefix_len is None or schedule.prefix_len != text_positions.shape[1]:
        raise ValueError(f"schedule text prefix {schedule.prefix_len} does not match {text_positions.shape[1]} text "
                         "positions (a HART schedule comes from get_schedule(..., model=<hart model>))")
    last_pn = schedule.rope_grid[0]
    text_last = text_positions[:, -1]  # official: context_position_ids[:, -1]
    tables = []
    for scale, (h, w) in enumerate(schedule.grids):
        if h != w:
            raise ValueError(f"HART grids are square, got {h}x{w} at scale {scale}")
        if scale == 0:
            angles = text_rope_angles(head_dim, text_positions)
        else:
            angles = image_rope_angles(head_dim, h, last_pn, text_last)
        tables.append(torch.stack([angles.cos(), angles.sin()]))
    return tables


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x (B, H, n, D) * cos + rotate_half(x) * sin with rope (2, B, n, D), in fp32, back in x's dtype."""
    cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)  # (B, 1, n, D)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def rope_qk(q: torch.Tensor, k: torch.Tensor, rope: torch.Tensor, q_scale: torch.Tensor | float):
    """RoPE on q and k; q also carries the softmax scale, so attention runs with scale 1 like Infinity's."""
    return (apply_rope(q, rope).float() * q_scale).to(q.dtype), apply_rope(k, rope)


def attention_inputs(qkv: torch.Tensor, heads: int, q_scale: torch.Tensor | float, rope: torch.Tensor, kv, layer: int,
                     unit_qk: bool = False):
    """The fused projection's output (B, n, 3C) -> q (B, H, n, D) and the visible K/V after appending this scale's.
    unit_qk (attn_l2_norm): unit q and k before RoPE, as official; q_scale is then the per-head temperature."""
    B, n, C3 = qkv.shape
    q, k, v = qkv.view(B, n, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, n, D)
    if unit_qk:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    q, k = rope_qk(q, k, rope, q_scale)
    k_all, v_all = kv.append(layer, k, v)  # the cache holds post-RoPE keys, as official
    return q, k_all, v_all


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def residual_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float):
    """x + y, and its RMSNorm (the pre-norm block's residual add, then the next branch's norm)."""
    x = x + y
    return x, rms_norm(x, weight, eps)


@dataclass(frozen=True)
class Pointwise:
    """The element-wise glue of a HART block (the role of sparvar.model.BlockOps, without the linears): eager by
    default; the GPU engine passes Triton kernels computing the same (sparvar/kernels/pointwise.py)."""

    attention_inputs: object = attention_inputs
    swiglu: object = swiglu
    rms_norm: object = rms_norm
    residual_rms_norm: object = residual_rms_norm
    qkv_bias: object = qkv_bias  # a function of the weights only (sparvar.model.frozen_weight_functions)


EAGER = Pointwise()


# ----------------------------------------------------------------------------------------------- layers
class Attention(nn.Module):
    """Official LlamaAttention: fused qkv with q/v biases only, RoPE, softmax scale cfg.attn_scale."""

    def __init__(self, cfg: HartConfig):
        super().__init__()
        C = cfg.width
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.softmax_scale = cfg.attn_scale
        self.qkv_proj = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        if cfg.attn_l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, cfg.heads, 1, 1), 4.0).log())
        self.proj = nn.Linear(C, C)

    def forward(self, x, rope, kv, layer: int, scale: int, plan=None, backend: str = "sdpa", pw: Pointwise = EAGER):
        B, n, C = x.shape
        qkv = F.linear(x, self.qkv_proj.weight, pw.qkv_bias(self))
        unit_qk = hasattr(self, "scale_mul_1H11")  # cosine attention (attn_l2_norm): a learned temperature
        q_scale = self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp() if unit_qk else self.softmax_scale
        q, k_all, v_all = pw.attention_inputs(qkv, self.heads, q_scale, rope, kv, layer, unit_qk)
        out = self_attention(q, k_all, v_all, layer=layer, scale=scale, plan=plan, backend=backend)
        return self.proj(out.transpose(1, 2).reshape(B, n, C))


class MLP(nn.Module):
    """Official LlamaMLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x, pw: Pointwise = EAGER):
        return self.down_proj(pw.swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    """Official AdaLNSelfAttn with attn_type = mlp_type = "llama".

    `ln_wo_grad` is an RMSNorm WITH a weight (the official fused RMSNorm ignores elementwise_affine=False), shared
    by the attention and MLP branches. With disable_aln (hart-0.7b) the block is plain pre-norm; otherwise
    `ada_lin` modulates both branches from the max-pooled text (official sep_aln_pooling_mode="max").
    """

    def __init__(self, cfg: HartConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.ffn = MLP(cfg.width, cfg.mlp_dim)
        self.ln_wo_grad = RMSNorm(cfg.width, cfg.norm_eps)
        if not cfg.disable_aln:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * cfg.width))

    def forward(self, x, h, next_norm, cond, rope, kv, layer, scale, plan=None, backend="sdpa", pw: Pointwise = EAGER):
        """x: the residual stream; h: its RMSNorm for this block's attention when the previous block's last op
        computed it (run_blocks), else None; next_norm: the next block's RMSNorm when this block's last op should
        compute the next h (a pre-norm next block), else None. Returns x and the next block's h or None."""
        if not hasattr(self, "ada_lin"):
            w, eps = self.ln_wo_grad.weight, self.ln_wo_grad.eps
            if h is None:
                h = pw.rms_norm(x, w, eps)
            x, h = pw.residual_rms_norm(x, self.attn(h, rope, kv, layer, scale, plan, backend, pw), w, eps)
            y = self.ffn(h, pw)
            if next_norm is None:
                return x + y, None
            return pw.residual_rms_norm(x, y, next_norm.weight, next_norm.eps)
        # official chunk order; each (B, 1, C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond).view(-1, 1, 6, x.shape[-1]).unbind(2)
        h = self.ln_wo_grad(x) * (scale1 + 1) + shift1
        x = x + self.attn(h, rope, kv, layer, scale, plan, backend, pw) * gamma1
        h = self.ln_wo_grad(x) * (scale2 + 1) + shift2
        return x + self.ffn(h, pw) * gamma2, None


def run_blocks(blocks, x, cond, rope, kv, scale: int, plan=None, backend: str = "sdpa", pw: Pointwise = EAGER):
    """Every block in order on the residual stream x. A pre-norm block starts with the RMSNorm of its input and ends
    with a residual add; between two such blocks the add and the norm run as one op (residual_rms_norm): one kernel
    instead of two per block boundary (the small scales are bound by kernel launches). AdaLN blocks norm their own
    input."""
    h = None
    for layer, block in enumerate(blocks):
        nxt = blocks[layer + 1] if layer + 1 < len(blocks) else None
        next_norm = nxt.ln_wo_grad if nxt is not None and not hasattr(nxt, "ada_lin") else None
        x, h = block(x, h, next_norm, cond, rope, kv, layer, scale, plan, backend, pw)
    return x


class AdaLNBeforeHead(nn.Module):
    """Official AdaLNBeforeHead (llama norm): RMSNorm(x) * (1 + scale) + shift, from the max-pooled text."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.ln_wo_grad = RMSNorm(width, eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, cond):
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return self.ln_wo_grad(x) * (scale + 1) + shift


@dataclass
class TextCondition:
    """Everything the steps need from the prompt(s); batch rows are [cond..., uncond...] with CFG."""

    prefix: torch.Tensor  # (B, L, C) context_embed(features): scale 0's input tokens (before the level embedding)
    cond: torch.Tensor  # (B, C) max-pool of `prefix` over all L slots: the head's (and per-block) AdaLN condition
    positions: torch.Tensor  # (B, L) int64 text RoPE positions, cumsum(mask) - 1; all 0 in the uncond rows

    @property
    def batch(self) -> int:
        return self.cond.shape[0]  # cond, not prefix: a later scale's exported step graph gets no prefix


class HART(nn.Module):
    def __init__(self, cfg: HartConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.width
        self.word_embed = nn.Linear(cfg.latent_dim, C)
        self.context_embed = nn.Linear(cfg.text_dim, C)
        self.lvl_embed = nn.Embedding(cfg.num_scales, C)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        self.decoder_norm = RMSNorm(C, cfg.norm_eps)
        self.diffloss = DiffLoss(cfg)

    # ------------------------------------------------------------------------------------------- text
    def encode_text(self, features: torch.Tensor, mask: torch.Tensor, cfg_guidance: bool = True) -> TextCondition:
        """features (B, L, text_dim): the text encoder's output at all L = text_len slots, pads included (the
        prefix runs pads too, as official). mask: (B, L) bool (True = real token) or lengths (B,) of right-padded
        prompts; it only sets the RoPE positions (cumsum(mask) - 1).

        With CFG the unconditional rows are a zero context with all positions 0 (official).
        """
        B, L, D = features.shape
        if L != self.cfg.text_len or D != self.cfg.text_dim:
            raise ValueError(f"text features {tuple(features.shape)}: {self.cfg.name} takes (B, {self.cfg.text_len}, "
                             f"{self.cfg.text_dim}) (pad or truncate to text_len slots)")
        mask = mask.to(features.device)
        if mask.ndim == 1:  # lengths of right-padded prompts
            if mask.shape[0] != B:
                raise ValueError(f"{mask.shape[0]} text lengths for a batch of {B}")
            mask = torch.arange(L, device=features.device)[None, :] < mask[:, None]
        if mask.shape != (B, L) or mask.dtype != torch.bool:
            raise ValueError(f"text mask must be bool (B, L) = ({B}, {L}) or lengths (B,), got {mask.dtype} {tuple(mask.shape)}")
        positions = mask.long().cumsum(1) - 1
        features = features.to(self.context_embed.weight.dtype)
        if cfg_guidance:
            features = torch.cat([features, torch.zeros_like(features)])
            positions = torch.cat([positions, torch.zeros_like(positions)])
        prefix = self.context_embed(features)
        # official AdaLNBeforeHead: max over every slot (no mask), pads and all
        cond = prefix.float().amax(dim=1)
        return TextCondition(prefix=prefix, cond=cond, positions=positions)

    # ------------------------------------------------------------------------------------------- steps
    def new_cache(self, batch: int, schedule: Schedule, tokens: int | None = None) -> KVCache:
        """See sparvar.model.Infinity.new_cache."""
        if schedule.prefix_len != self.cfg.text_len:
            raise ValueError(f"schedule text prefix {schedule.prefix_len} != {self.cfg.name} text_len {self.cfg.text_len} "
                             "(use get_schedule(..., model=<hart model>))")
        p = self.word_embed.weight
        return KVCache(self.cfg.depth, batch, self.cfg.heads, cache_tokens(schedule, tokens), self.cfg.head_dim,
                       p.dtype, p.device)

    def scale_input(self, scale: int, codes: torch.Tensor | None, text: TextCondition) -> torch.Tensor:
        """Input tokens of a scale: the text prefix for scale 0, else word_embed of the code vectors
        (B, pn^2, latent_dim) (the quantizer's next-scale input), shared by the CFG rows."""
        if scale == 0:
            return text.prefix
        x = self.word_embed(codes.to(self.word_embed.weight.dtype))
        return x.repeat(text.batch // x.shape[0], 1, 1)

    def step(self, tokens, scale: int, text: TextCondition, kv, rope, plan=None, backend: str = "sdpa",
             pointwise: Pointwise = EAGER, return_hidden: bool = False):
        """Run every block on one scale's tokens (B, n, C); returns fp32 logits over the codebook.

        Scale 0: tokens are the text_len prefix slots (bidirectional among themselves); only the last slot's
        logits (B, 1, V) are returned: it predicts the 1x1 token. Scale s >= 1: (B, pn_s^2, V). `kv` is a KVCache
        (offset = schedule.offsets[scale]) or a ConcatKV (export); `rope` this scale's rope_tables entry.
        With return_hidden, also the last block's output (B, n, C) at the same positions: after the last scale it is
        the diffusion head's input (see diffusion_condition).
        """
        if scale == 0 and tokens.shape[1] != self.cfg.text_len:
            raise ValueError(f"scale 0 runs the {self.cfg.text_len} text slots, got {tokens.shape[1]} tokens")
        x = tokens + self.lvl_embed.weight[scale].to(tokens.dtype)
        x = run_blocks(self.blocks, x, text.cond.to(x.dtype), rope, kv, scale, plan, backend, pointwise)
        if scale == 0:
            x = x[:, -1:]  # official: logits[:, [-1]]; the other prefix slots predict nothing
        logits = self.head(self.head_nm(x.float(), text.cond))
        return (logits, x) if return_hidden else logits

    def diffusion_condition(self, hidden: torch.Tensor, code_vectors: torch.Tensor) -> torch.Tensor:
        """The diffusion MLP's condition after the last scale: decoder_norm(hidden + word_embed(code vectors)).

        hidden (B, n, C) from step(..., return_hidden=True) on the last scale; code_vectors (B or B/2, n, latent_dim)
        are the codebook vectors of the sampled indices (shared by the CFG rows, as official).
        """
        emb = self.word_embed(code_vectors.to(self.word_embed.weight.dtype))
        emb = emb.repeat(hidden.shape[0] // emb.shape[0], 1, 1)
        return self.decoder_norm(hidden + emb.to(hidden.dtype))

    def forward_all_scales(self, inputs: list[torch.Tensor], text: TextCondition, schedule: Schedule,
                           return_hidden: bool = False):
        """Teacher-forced pass over [text | scales 1..] at once under the block-causal mask (no cache); for tests.

        inputs[k] are the step inputs of each scale (inputs[0] = text.prefix). Returns per-scale logits shaped as
        `step` returns them (scale 0: the last text slot only), and with return_hidden the per-scale hidden states.
        """
        x = torch.cat([t + self.lvl_embed.weight[k].to(t.dtype) for k, t in enumerate(inputs)], dim=1)
        lengths = [t.shape[1] for t in inputs]
        if lengths != list(schedule.lengths[: len(inputs)]):
            raise ValueError(f"inputs of lengths {lengths} do not follow the schedule {schedule.lengths}")
        scale_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(x.device)
        plan = _MaskPlan(scale_of[:, None] >= scale_of[None, :])  # a scale sees every earlier scale and itself
        rope = torch.cat(rope_tables(schedule, self.cfg.head_dim, text.positions)[: len(inputs)], dim=2).to(x.device)
        empty = [x.new_zeros(x.shape[0], self.cfg.heads, 0, self.cfg.head_dim)] * self.cfg.depth
        kv = ConcatKV(empty, empty)
        x = run_blocks(self.blocks, x, text.cond.to(x.dtype), rope, kv, 0, plan)
        hidden = list(x.split(lengths, dim=1))
        hidden[0] = hidden[0][:, -1:]
        logits = [self.head(self.head_nm(h.float(), text.cond)) for h in hidden]
        return (logits, hidden) if return_hidden else logits


# ----------------------------------------------------------------------------------------------- build
# build_model / cast_model are sparvar.model's (one for both families); this is HART's random init.
@torch.no_grad()
def init_random_(model: HART, generator: torch.Generator) -> None:
    """Random weights in the official init's spirit: trunc-normal-ish N(0, 1/(3 fan_in)) linears, residual
    outputs scaled down by sqrt(2 depth), norms at 1, biases at 0, a small head."""
    depth = model.cfg.depth

    def normal_(p, std):
        p.copy_(torch.empty(p.shape, dtype=torch.float32, device=p.device).normal_(0, std, generator=generator))

    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, (RMSNorm, nn.LayerNorm)) and m.weight is not None}
    for name, p in model.named_parameters():
        if id(p) in norm_weights:
            p.fill_(1.0)
        elif name.endswith("scale_mul_1H11"):
            p.fill_(math.log(4.0))
        elif p.ndim == 1:
            p.zero_()
        else:
            std = math.sqrt(1 / (3 * p.shape[-1]))
            if name.endswith(("attn.proj.weight", "ffn.down_proj.weight")):
                std /= math.sqrt(2 * depth)
            elif name in ("head.weight",):
                std *= 0.1
            normal_(p, std)
    for _, b in model.named_buffers():  # the zero k-biases (and any diffloss buffers): to_empty left them empty
        b.zero_()
