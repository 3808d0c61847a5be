"""The Infinity transformer (bitwise next-scale prediction), as plain torch.

Module and parameter names follow the official checkpoint (`sa.mat_qkv`, `ca.mat_kv`, `ada_gss`, ...) so that
conversion is only the block renumbering done in sparvar/checkpoint.py. Generation runs scale by scale:

    text = model.encode_text(features, lengths, cfg=True)    # once per prompt batch: pooled cond, AdaLN, CA K/V
    cache = model.new_cache(batch, schedule)                 # preallocated K/V for the whole schedule
    logits = model.step(tokens, scale, text, cache, rope)    # one scale: (2B, h*w, C) -> (2B, h*w, 2*bits)

The KV cache is preallocated and written in place; `step` has static shapes per scale, so it can be
captured in a CUDA graph or exported to ONNX one scale at a time.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import cross_attention, self_attention
from .config import InfinityConfig
from .schedule import Schedule

MAX_SCALE_MUL = math.log(100.0)  # official clamp of the learned attention temperature


# ----------------------------------------------------------------------------------------------- RoPE
def rope_angles(head_dim: int, rows: torch.Tensor, cols: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Angles (n, head_dim/2) of the 2D RoPE: the first head_dim/4 pairs rotate by row, the rest by column."""
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.float64) / half))  # (head_dim/4,)
    return torch.cat([rows.double()[:, None] * inv_freq, cols.double()[:, None] * inv_freq], dim=-1)


def rope_tables(schedule: Schedule, head_dim: int) -> list[torch.Tensor]:
    """Per scale a (2, n, head_dim/2) fp32 tensor of (cos, sin); positions sit on the 1M final grid."""
    tables = []
    for scale in range(schedule.num_scales):
        rows, cols = schedule.rope_positions(scale)
        angles = rope_angles(head_dim, torch.tensor(rows), torch.tensor(cols))
        tables.append(torch.stack([angles.cos(), angles.sin()]).float())
    return tables


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x (B, H, n, D) by the angles of rope (2, n, D/2), in fp32."""
    cos, sin = rope[0], rope[1]
    x2 = x.float().unflatten(-1, (-1, 2))  # (B, H, n, D/2, 2)
    x0, x1 = x2[..., 0], x2[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------------------------- KV cache
def cache_tokens(schedule: Schedule, tokens: int | None) -> int:
    """The positions a KV cache holds: the schedule's total by default, else `tokens` in [1, total]."""
    if tokens is None:
        return schedule.total_tokens
    if not isinstance(tokens, int) or not 1 <= tokens <= schedule.total_tokens:
        raise ValueError(f"a KV cache holds 1 to {schedule.total_tokens} positions for this schedule, got {tokens!r}")
    return tokens


class KVCache:
    """K/V of every layer for one generation, preallocated (to the schedule's total length, or to the scales a
    skipping loop runs) and written in place."""

    PAGE = 128  # the allocation holds whole pages of positions: cuDNN's paged SDPA (CSLA) reads a layer as pages

    def __init__(self, depth: int, batch: int, heads: int, total_tokens: int, head_dim: int, dtype, device):
        self.positions = total_tokens  # what it holds; the allocation rounds up to whole pages
        shape = (depth, batch, heads, -(-total_tokens // self.PAGE) * self.PAGE, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.offset = 0  # tokens before the scale being run

    def slot(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (B, H, ., D) of layer's K/V: this scale's n positions after the earlier scales (to be written), and
        all positions visible once they are."""
        end = self.offset + n
        if end > self.positions:  # the page padding past `positions` would take it silently
            raise ValueError(f"KV cache holds {self.positions} positions: {n} more after {self.offset} do not fit")
        k_all, v_all = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        return k_all[:, :, self.offset:], v_all[:, :, self.offset:], k_all, v_all

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this scale's k, v (B, H, n, D) after the earlier scales; return the visible cache views."""
        k_new, v_new, k_all, v_all = self.slot(layer, k.shape[2])
        k_new.copy_(k)
        v_new.copy_(v)
        return k_all, v_all


class ConcatKV:
    """KV for a traced/exported step: past K/V are inputs, the scale's new K/V are outputs, no in-place writes."""

    def __init__(self, past_k: list[torch.Tensor], past_v: list[torch.Tensor]):
        self.past_k, self.past_v = past_k, past_v
        self.new_k: list[torch.Tensor] = []
        self.new_v: list[torch.Tensor] = []

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.new_k.append(k)
        self.new_v.append(v)
        return torch.cat([self.past_k[layer], k], dim=2), torch.cat([self.past_v[layer], v], dim=2)


# ----------------------------------------------------------------------------------------------- layers
def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine parameters, computed in fp32 (official `ln_wo_grad`)."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """AdaLN: LayerNorm(x) * (1 + scale) + shift, in fp32, back in x's dtype."""
    return (layer_norm(x, eps) * (scale + 1) + shift).to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    return x + (y * gamma).to(x.dtype)


def residual_layer_norm(x, y, gamma, weight, bias, eps: float):
    """x' = gated_residual(x, y, gamma) and the affine LayerNorm of x' (the cross-attention's input)."""
    x = gated_residual(x, y, gamma)
    return x, F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def residual_modulate(x, y, scale, shift, eps: float):
    """x' = x + y and the AdaLN-modulated x' (the FFN's input)."""
    x = x + y
    return x, modulate(x, scale, shift, eps)


def gated_residual_modulate(x, y, gamma, scale, shift, eps: float):
    """x' = gated_residual(x, y, gamma) and the AdaLN-modulated x': a block's last op fused with the next block's
    first (see run_blocks)."""
    x = gated_residual(x, y, gamma)
    return x, modulate(x, scale, shift, eps)


def cosine_qk(q: torch.Tensor, k: torch.Tensor, scale_mul: torch.Tensor, rope: torch.Tensor):
    """Cosine attention inputs: unit q (times the learned per-head temperature) and unit k, both rotated by RoPE.

    The temperature replaces 1/sqrt(D), so attention runs with softmax scale 1.
    """
    q_out = apply_rope(F.normalize(q.float(), dim=-1).mul(scale_mul), rope).to(q.dtype)
    k_out = apply_rope(F.normalize(k.float(), dim=-1), rope).to(k.dtype)
    return q_out, k_out


def attention_inputs(qkv: torch.Tensor, heads: int, scale_mul: torch.Tensor, rope: torch.Tensor, kv, layer: int):
    """The fused projection's output (B, n, 3C) -> q (B, H, n, D) and the visible K/V after appending this scale's.
    scale_mul (H,) fp32 is the per-head temperature."""
    B, n, C3 = qkv.shape
    q, k, v = qkv.view(B, n, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, n, D)
    q, k = cosine_qk(q, k, scale_mul.view(1, heads, 1, 1), rope)
    k_all, v_all = kv.append(layer, k, v)
    return q, k_all, v_all


def linear(layer: nn.Linear, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """layer(x), with `bias` in place of the layer's own when given (the fused qkv projection's q/0/v biases)."""
    return F.linear(x, layer.weight, layer.bias if bias is None else bias)


def linear_gelu(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(linear(layer, x), approximate="tanh")


def qkv_bias(attn) -> torch.Tensor:
    """A SelfAttention's fused projection bias: q_bias, zeros for k (official), v_bias."""
    return torch.cat([attn.q_bias, attn.zero_k_bias, attn.v_bias])


def temperature(attn) -> torch.Tensor:
    """A SelfAttention's (H,) learned per-head attention temperature, clamped as official."""
    return attn.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp().view(attn.heads)


def frozen_weight_functions(attentions, functions=(qkv_bias, temperature)) -> dict:
    """Functions of an attention module's weights alone (`qkv_bias`, `temperature`) as lookups of values computed
    once now, for each module of `attentions`: for an engine whose weights no longer change. Recomputed in every
    step they are small kernels in every block of every scale (cat; clamp, exp)."""
    tables = {f: {attn: f(attn) for attn in attentions} for f in functions}
    return {f.__name__: table.__getitem__ for f, table in tables.items()}


def block_linears(block) -> tuple[nn.Linear, ...]:
    """An Infinity block's linears in the order a step runs them (the ones FP8 quantises)."""
    return block.sa.mat_qkv, block.sa.proj, block.ca.mat_q, block.ca.proj, block.ffn.fc1, block.ffn.fc2


def ffn(fc1: nn.Linear, fc2: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The block's MLP, fc2(gelu_tanh(fc1(x))): one op, so that an engine can fuse across the hidden activation."""
    return linear(fc2, linear_gelu(fc1, x))


# b_o's row of AbsorbedText.values, then zeros: with H*L a multiple of 16 (at every model's text buckets), P's row
# stride H*L + BIAS_ROWS stays one too, which Triton needs to know a row's start aligned and store 16 bytes at a time
BIAS_ROWS = 16


@dataclass(frozen=True)
class AbsorbedText:
    """A block's cross-attention with its query and output projections folded into the text (as MLA-style
    inference absorbs them): per prompt, each head's keys become k_h W_q[h] (C wide) and its values v_h W_o[:, h]^T,
    so a step runs scores = x @ keys^T (one row of H*L per token), a softmax per head, and out = P @ values: two
    GEMMs of H*L columns instead of two C x C projections and an attention. Fewer FLOPs while (H - 1) * L < C:
    short prompts (`absorption_pays`)."""

    keys: torch.Tensor  # (B, H, L, C) model dtype, k[b, h, l] @ W_q[h] (unscaled); stored head-major (H, B, L, C)
    bias: torch.Tensor  # (B, H, L) fp32 (fp64 for an fp64 model): scale * (b_q[h] . k[b, h, l]), -inf at padding
    values: torch.Tensor  # (B, H*L + BIAS_ROWS, C) model dtype: row h*L + l is v[b, h, l] @ W_o[:, h]^T, row H*L
    # is b_o and the rest zero. The engine's kernel writes P's matching columns, 1, 0, ..., so its one GEMM adds b_o
    # in fp32 before its one rounding, with no bias pass over its output. (b_o / H folded into every head's values
    # was 2.5x less accurate: its rounding error was the same for every row of a bf16 binade, summed H*L times.)
    scale: float  # D**-0.5, SDPA's default softmax scale of the cross-attention


def absorbed_probs(x: torch.Tensor, text: AbsorbedText) -> torch.Tensor:
    """The absorbed cross-attention's probabilities (B, n, H*L), unrounded: per head, softmax(scale * x @ keys_h^T +
    bias_h), with the scores in fp32 (fp64 for an fp64 model), as the unabsorbed form's attention keeps them."""
    B, n, C = x.shape
    H, L = text.bias.shape[1:]
    acc = text.bias.dtype
    scores = torch.bmm(x.to(acc), text.keys.to(acc).reshape(B, H * L, C).mT).view(B, n, H, L)
    return (scores * text.scale + text.bias[:, None]).softmax(-1).view(B, n, H * L)


def absorbed_cross_attention(x: torch.Tensor, text: AbsorbedText) -> torch.Tensor:
    """x (B, n, C) -> a block's cross-attention output (B, n, C), projections and b_o included, from its AbsorbedText.
    The probabilities are rounded to x's dtype before the second GEMM, as a flash kernel rounds P before P @ V.
    (The engine's kernel appends P's bias columns instead, and one GEMM adds b_o: sparvar/kernels/absorbed.py.)"""
    probs = absorbed_probs(x, text).to(x.dtype)
    HL = probs.shape[-1]
    return torch.baddbmm(text.values[:, HL: HL + 1], probs, text.values[:, :HL])


def absorption_pays(cfg: InfinityConfig, text_len: int, rows: int) -> bool:
    """Whether to absorb the cross-attention of `rows` batch rows (CFG counts both) with texts padded to `text_len`:
    - fewer FLOPs per token: 2 * H * L * C multiply-adds against 2 * C * C + 2 * L * C, i.e. (H - 1) * L < C
      (Infinity-2B, C 2048 and H 16: up to 136 positions; 8B, C 3584 and H 28: up to 132);
    - and the absorbed keys and values no larger than the two projections they replace, rows * H * L <= C: the
      small scales, bound by reading weights, read no more, and the text holds no more memory than those weights
      (one prompt with CFG up to a 64-position text at 2B and 8B; four prompts would hold 4x)."""
    return (cfg.heads - 1) * text_len < cfg.width and rows * cfg.heads * text_len <= cfg.width


@dataclass(frozen=True)
class BlockOps:
    """The ops of a block that an engine swaps: the element-wise glue between the GEMMs and attention, and the
    block's linears. Eager by default (these functions are the reference); the torch-cuda engine swaps in Triton
    kernels computing the same (sparvar/kernels/pointwise.py) and, optionally, FP8 linears (sparvar/fp8.py)."""

    modulate: object = modulate
    gated_residual: object = gated_residual
    residual_layer_norm: object = residual_layer_norm
    residual_modulate: object = residual_modulate
    gated_residual_modulate: object = gated_residual_modulate
    attention_inputs: object = attention_inputs
    linear: object = linear
    ffn: object = ffn
    qkv_bias: object = qkv_bias  # functions of the weights only (see frozen_weight_functions)
    temperature: object = temperature
    cross_attention: object = cross_attention
    absorbed_cross_attention: object = absorbed_cross_attention


EAGER = BlockOps()


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
        self.proj = nn.Linear(width, width)

    def forward(self, x, rope, kv, layer: int, scale: int, plan=None, backend: str = "sdpa", ops: BlockOps = EAGER):
        B, n, C = x.shape
        qkv = ops.linear(self.mat_qkv, x, ops.qkv_bias(self))
        q, k_all, v_all = ops.attention_inputs(qkv, self.heads, ops.temperature(self), rope, kv, layer)
        out = self_attention(q, k_all, v_all, layer=layer, scale=scale, plan=plan, backend=backend)
        return ops.linear(self.proj, out.transpose(1, 2).reshape(B, n, C))


class CrossAttention(nn.Module):
    """Queries attend to projected text tokens. With `pool=True` one learned query per head (attentive pooling)."""

    def __init__(self, width: int, kv_dim: int, heads: int, pool: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        if pool:
            self.mat_q = nn.Parameter(torch.zeros(1, heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(width, width)
        self.mat_kv = nn.Linear(kv_dim, 2 * width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def text_kv(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text (B, L, kv_dim) -> K, V (B, H, L, D); computed once per prompt, reused by every scale."""
        B, L, _ = text.shape
        kv = F.linear(text, self.mat_kv.weight, torch.cat([self.zero_k_bias, self.v_bias]))
        k, v = kv.view(B, L, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def absorb(self, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor) -> "AbsorbedText":
        """This block's cross-attention with its two projections folded into the text (see AbsorbedText): per head h,
        q_h . k = c . (W_q[h]^T k) + b_q[h] . k, and W_o (concat_h P_h v_h) + b_o = sum_h P_h (v_h W_o[:, h]^T) + b_o.
        k, v (B, H, L, D) as text_kv returns them, key_bias (B, 1, 1, L)."""
        if isinstance(self.mat_q, nn.Parameter):
            raise ValueError("an attentive-pooling cross-attention has no query projection to absorb")
        B, H, L, D = k.shape
        C = H * D
        w_q = self.mat_q.weight.view(H, D, C)  # q_h = W_q[h] c + b_q[h]
        w_o = self.proj.weight.view(C, H, D).permute(1, 2, 0)  # (H, D, C): W_o[:, h]^T, a strided view
        # one batched GEMM per projection, batched over heads with the rows of all prompts together: (H, B*L, D) is a
        # view of text_kv's k and v, and W_q[h], W_o[:, h]^T are views of the weights (the weights are not copied;
        # a broadcast (B, H, L, D) @ (H, D, C) would copy them B times). Keys stay head-major, as the kernel reads
        # them; the values are written once into (B, H*L + BIAS_ROWS, C), the second GEMM's operand, after them b_o.
        keys = torch.bmm(k.transpose(0, 1).reshape(H, B * L, D), w_q).view(H, B, L, C).transpose(0, 1)
        values = k.new_empty(B, H * L + BIAS_ROWS, C)
        values[:, : H * L].view(B, H, L, C).copy_(
            torch.bmm(v.transpose(0, 1).reshape(H, B * L, D), w_o).view(H, B, L, C).transpose(0, 1))
        values[:, H * L] = self.proj.bias
        values[:, H * L + 1:] = 0
        acc = torch.promote_types(k.dtype, torch.float32)  # fp32, or fp64 for an fp64 model
        bias = torch.matmul(k.to(acc), self.mat_q.bias.to(acc).view(H, D, 1)).squeeze(-1)  # (B, H, L)
        return AbsorbedText(keys=keys, bias=bias * D ** -0.5 + key_bias.to(acc).view(B, 1, L), values=values,
                            scale=D ** -0.5)

    def forward(self, x, k, v, key_bias, ops: BlockOps = EAGER, key_lens=None, absorbed: "AbsorbedText | None" = None):
        """x (B, n, C) (ignored when pooling), k/v (B, H, L, D), key_bias (B, 1, 1, L): 0 = real token, -inf = pad;
        key_lens None or (B,) int32, the same mask as counts of real tokens; absorbed: this block's AbsorbedText, run
        instead of the projections and attention (an engine's choice per scale, see sparvar.cuda_engine)."""
        if absorbed is not None:
            return ops.absorbed_cross_attention(x, absorbed)
        if isinstance(self.mat_q, nn.Parameter):
            B, n = k.shape[0], 1
            q = self.mat_q.to(k.dtype).unsqueeze(2).expand(B, -1, -1, -1)  # (B, H, 1, D)
        else:
            B, n, _ = x.shape
            q = ops.linear(self.mat_q, x).view(B, n, self.heads, self.head_dim).transpose(1, 2)
        out = ops.cross_attention(q, k, v, key_bias, key_lens)
        return ops.linear(self.proj, out.transpose(1, 2).reshape(B, n, -1))


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x, ops: BlockOps = EAGER):
        return ops.ffn(self.fc1, self.fc2, x)


class Block(nn.Module):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        C = cfg.width
        self.eps = cfg.norm_eps
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, C))  # per-block offset to the shared AdaLN output
        self.sa = SelfAttention(C, cfg.heads)
        self.ca = CrossAttention(C, C, cfg.heads)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.ffn = FFN(C, cfg.mlp_dim)

    def forward(self, x, h, ada, next_ada, text_k, text_v, text_bias, rope, kv, layer, scale, plan=None,
                backend="sdpa", ops: BlockOps = EAGER, text_lens=None, text_absorbed=None):
        """x: the residual stream; h: its AdaLN modulation for this block's self-attention, modulate(x, scale1,
        shift1), which the previous block's last op computed (run_blocks). ada (B, 1, 6, C) fp32: this block's AdaLN
        vectors, the shared output plus `ada_gss` (Infinity.encode_text); next_ada the next block's, None for the
        last block. Returns x and the next block's h (None after the last block)."""
        # official chunk order of the 6 AdaLN vectors; each (B, 1, C) in fp32
        gamma1, gamma2, _, scale2, _, shift2 = ada.unbind(2)
        x, c = ops.residual_layer_norm(x, self.sa(h, rope, kv, layer, scale, plan, backend, ops), gamma1,
                                       self.ca_norm.weight, self.ca_norm.bias, self.ca_norm.eps)
        x, h = ops.residual_modulate(x, self.ca(c, text_k, text_v, text_bias, ops, text_lens, text_absorbed), scale2,
                                     shift2, self.eps)
        y = self.ffn(h, ops)
        if next_ada is None:
            return ops.gated_residual(x, y, gamma2), None
        _, _, next_scale1, _, next_shift1, _ = next_ada.unbind(2)
        return ops.gated_residual_modulate(x, y, gamma2, next_scale1, next_shift1, self.eps)


def run_blocks(blocks, x, text: "TextCondition", rope, kv, scale: int, plan=None, backend: str = "sdpa",
               ops: BlockOps = EAGER):
    """Every block in order on the residual stream x. A block starts with the AdaLN modulation of its input and ends
    with a gated residual add; each block's end and the next block's start run as one op (gated_residual_modulate):
    one kernel instead of two per block boundary, which matters at the small scales, bound by kernel launches."""
    _, _, scale1, _, shift1, _ = text.ada[0].unbind(2)
    h = ops.modulate(x, scale1, shift1, blocks[0].eps)
    for layer, block in enumerate(blocks):
        next_ada = text.ada[layer + 1] if layer + 1 < len(blocks) else None
        absorbed = text.absorbed[layer] if text.absorbed is not None else None
        x, h = block(x, h, text.ada[layer], next_ada, text.k[layer], text.v[layer], text.key_bias, rope, kv, layer,
                     scale, plan, backend, ops, text.key_lens, absorbed)
    return x


@dataclass
class TextCondition:
    """Everything a generation needs from the prompt(s); batch rows are [cond..., uncond...] with CFG.

    What depends only on the prompt is computed here once, not in every block of every scale step: each block's
    AdaLN vectors and the additive attention mask (the step graphs replay ~4 fewer tiny kernels per block)."""

    cond: torch.Tensor  # (B, C) pooled text condition, fp32
    ada: torch.Tensor  # (depth, B, 1, 6, C) fp32: per block, the shared AdaLN output plus the block's ada_gss
    sos: torch.Tensor  # (B, 1, C) first-scale input token (before the level embedding)
    key_bias: torch.Tensor  # (B, 1, 1, L) in the model's dtype: 0 where the text token is real, -inf at padding
    k: list[torch.Tensor]  # per layer (B, H, L, D) cross-attention keys
    v: list[torch.Tensor]  # per layer (B, H, L, D) cross-attention values
    key_lens: torch.Tensor | None = None  # (B,) int32 real text tokens per row: key_bias as counts (padding is a suffix)
    absorbed: list[AbsorbedText] | None = None  # per layer, the cross-attention absorbed (Infinity.absorb_text)

    @property
    def batch(self) -> int:
        return self.cond.shape[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with a weight, in fp32, back in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class TextAttentivePool(nn.Module):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.ca = CrossAttention(cfg.width, cfg.text_dim, cfg.sos_heads, pool=True)

    def forward(self, text, key_bias):
        k, v = self.ca.text_kv(text)
        return self.ca(None, k, v, key_bias).squeeze(1)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, cond):
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return layer_norm(x, self.eps) * (scale + 1) + shift


class Infinity(nn.Module):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.width
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, cfg.text_dim))  # learned "empty prompt"
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.text_norm = RMSNorm(cfg.text_dim, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(cfg)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(cfg.text_dim, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.lvl_embed = nn.Embedding(cfg.num_level_embeddings, C)
        self.word_embed = nn.Linear(cfg.bits, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.num_logits)

    # ------------------------------------------------------------------------------------------- text
    def encode_text(self, features: torch.Tensor, lengths: torch.Tensor, cfg_guidance: bool = True) -> TextCondition:
        """features (B, L, text_dim) zero-padded encoder output, lengths (B,) real token counts.

        With CFG the unconditional rows use the learned `cfg_uncond[:len]` with each prompt's own length.
        """
        B, L, _ = features.shape
        if L > self.cfg.text_maxlen:
            raise ValueError(f"text has {L} tokens; {self.cfg.name} accepts at most {self.cfg.text_maxlen}")
        features = features.to(self.cfg_uncond.dtype)
        positions = torch.arange(L, device=features.device)
        real = positions[None, :] < lengths.to(features.device)[:, None]  # (B, L)
        features = features * real[..., None]
        if cfg_guidance:
            uncond = self.cfg_uncond[:L].unsqueeze(0).expand(B, -1, -1) * real[..., None]
            features = torch.cat([features, uncond])
            real = torch.cat([real, real])
        # the additive form of the padding mask (what SDPA turns a bool mask into, in every call otherwise)
        key_bias = torch.zeros(real.shape, dtype=features.dtype, device=features.device).masked_fill(~real, -math.inf)
        key_bias = key_bias[:, None, None, :]
        text = self.text_norm(features)
        cond = self.text_proj_for_sos(text, key_bias)
        shared = self.shared_ada_lin(cond).view(-1, 1, 6, self.cfg.width).float()
        ada = torch.stack([blk.ada_gss + shared for blk in self.blocks])  # (depth, B, 1, 6, C)
        cond = cond.float()
        text_ca = self.text_proj_for_ca(text)
        ks, vs = zip(*(blk.ca.text_kv(text_ca) for blk in self.blocks))
        sos = (cond.unsqueeze(1) + self.pos_start.float()).to(self.pos_start.dtype)
        return TextCondition(cond=cond, ada=ada, sos=sos, key_bias=key_bias, k=list(ks), v=list(vs),
                             key_lens=real.sum(-1, dtype=torch.int32))

    def absorb_text(self, text: TextCondition) -> TextCondition:
        """text with every block's cross-attention absorbed (CrossAttention.absorb): a step given it runs two
        GEMMs of heads * text-length columns per block in place of the cross-attention's projections and attention."""
        absorbed = [blk.ca.absorb(k, v, text.key_bias) for blk, k, v in zip(self.blocks, text.k, text.v)]
        return dataclasses.replace(text, absorbed=absorbed)

    # ------------------------------------------------------------------------------------------- steps
    def new_cache(self, batch: int, schedule: Schedule, tokens: int | None = None) -> KVCache:
        """The KV cache of one generation: `tokens` positions (the schedule's total by default; fewer serve a loop that
        skips the last scales)."""
        p = self.pos_start
        return KVCache(self.cfg.depth, batch, self.cfg.heads, cache_tokens(schedule, tokens), self.cfg.head_dim,
                       p.dtype, p.device)

    def scale_input(self, scale: int, codes: torch.Tensor | None, text: TextCondition) -> torch.Tensor:
        """Input tokens of a scale: <sos> for scale 0, else the embedded codes (B, n, bits), shared by the CFG rows."""
        if scale == 0:
            return text.sos
        x = self.word_embed(codes.to(self.word_embed.weight.dtype))
        return x.repeat(text.batch // x.shape[0], 1, 1)

    def step(self, tokens, scale: int, text: TextCondition, kv, rope, plan=None, backend: str = "sdpa",
             ops: BlockOps = EAGER) -> torch.Tensor:
        """Run every block on one scale's tokens (B, n, C); returns fp32 logits (B, n, 2*bits).

        `kv` is a KVCache (in-place, offset = tokens before this scale) or a ConcatKV (export); `ops` the block's
        element-wise functions and linears (eager, or a GPU engine's kernels).
        """
        x = tokens + self.lvl_embed.weight[scale].to(tokens.dtype)
        x = run_blocks(self.blocks, x, text, rope, kv, scale, plan, backend, ops)
        return self.head(self.head_nm(x.float(), text.cond))

    def forward_all_scales(self, inputs: list[torch.Tensor], text: TextCondition, schedule: Schedule) -> list[torch.Tensor]:
        """Teacher-forced pass over all scales at once with a block-causal scale mask (no cache); for tests.

        inputs[k] (B, n_k, C) are the step inputs of each scale. Returns per-scale logits.
        """
        x = torch.cat([t + self.lvl_embed.weight[k].to(t.dtype) for k, t in enumerate(inputs)], dim=1)
        lengths = [t.shape[1] for t in inputs]
        scale_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(x.device)
        visible = scale_of[:, None] >= scale_of[None, :]  # a scale sees every earlier scale and itself
        rope = torch.cat(rope_tables(schedule, self.cfg.head_dim)[: len(lengths)], dim=1).to(x.device)
        plan = _MaskPlan(visible)
        kv = ConcatKV([x.new_zeros(x.shape[0], self.cfg.heads, 0, self.cfg.head_dim)] * self.cfg.depth,
                      [x.new_zeros(x.shape[0], self.cfg.heads, 0, self.cfg.head_dim)] * self.cfg.depth)
        x = run_blocks(self.blocks, x, text, rope, kv, 0, plan)
        logits = self.head(self.head_nm(x.float(), text.cond))
        return list(logits.split(lengths, dim=1))


class _MaskPlan:
    """Attention under a fixed boolean mask: lets the full-sequence test pass reuse the blocks unchanged."""

    def __init__(self, mask):
        self.mask = mask

    def attend(self, q, k, v, layer, scale):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=1.0)


def build_model(cfg: InfinityConfig, device="cpu", dtype=torch.float32, init: str = "random", seed: int = 0) -> Infinity:
    """Build a model; `init='random'` gives a deterministic, sensibly scaled random init, 'meta' allocates nothing.

    Random weights are allocated directly in `dtype` (a 2B model never exists in fp32 as a whole) and drawn in
    fp32 one tensor at a time, so the same seed gives the same weights (up to rounding) in every dtype.
    A HART config (cfg.family == "hart") builds sparvar.hart.model.HART the same way.
    """
    model_class, init_fn = Infinity, init_random_
    if getattr(cfg, "family", "infinity") == "hart":  # the second family: its own module and random init
        from .hart.model import HART, init_random_ as init_hart_

        model_class, init_fn = HART, init_hart_
    with torch.device("meta"):
        model = model_class(cfg)
    if init == "meta":
        return model
    if init != "random":
        raise ValueError(f"unknown init {init!r}; expected 'random' or 'meta'")
    model = cast_model(model, dtype).to_empty(device=device)
    init_fn(model, torch.Generator(device=device).manual_seed(seed))
    return model


def cast_model(model: nn.Module, dtype) -> nn.Module:
    """Cast to the run dtype; the output head stays fp32 (as official: the logits decide what is sampled)."""
    model.to(dtype)
    model.head_nm.float()
    model.head.float()
    return model.eval()


@torch.no_grad()
def init_random_(model: Infinity, generator: torch.Generator) -> None:
    """Random weights that keep activations in a realistic range (the official init's scales)."""
    C = model.cfg.width
    std = math.sqrt(1 / C / 3)

    def normal_(p, s):
        p.copy_(torch.empty(p.shape, dtype=torch.float32, device=p.device).normal_(0, s, generator=generator))

    for name, p in model.named_parameters():
        if name.endswith("scale_mul_1H11"):
            p.fill_(math.log(4.0))
        elif name.endswith("norm.weight") or name == "text_norm.weight":
            p.fill_(1.0)
        elif name.endswith("ada_gss"):
            normal_(p, 1 / C**0.5)
        elif name == "cfg_uncond":
            normal_(p, 1.2 / model.cfg.text_dim**0.5)
        elif p.ndim == 1:
            p.zero_()
        else:
            normal_(p, std)
    for _, b in model.named_buffers():  # the zero k-biases: to_empty left them uninitialised
        b.zero_()
