"""CSLA block-sparse attention forward in Triton (also the dense flash kernel the CS4A decision runs).

One program computes one query block of BLOCK_M queries for one (batch row, head) with an online softmax
over that block's active key blocks (the layout's `kv_num_blocks` / `kv_indices`, the same for every batch
row and head; see sparvar.csla.BlockLayout). Semantics are block-granular by default: every key of an active
block is attended. Only the last key block may be partial (kv_len not a multiple of BLOCK_N); it is the last
entry of a row when present (indices ascend), so the loop runs the unmasked full blocks first and masks that
one block alone. The kernel tile is the layout's block shape.

Query tiles (a sparvar.csla.TileLayout, its own kernel `_csla_tiles_fwd_kernel`): one program per 2-D tile of the
query grid and (batch row, head); the tile's query rows are gathered by position, its keys BLOCK_N at a time from the
tile's key list, the last key tile masked.

Token-exact (TOKEN, a layout of granularity 'token'): each query block's tiles come reordered (token_tiles),
the tiles whose every (query, key) pair is in the mask first, computed with no mask, then the partial tiles,
each through its (BLOCK_M, BLOCK_N) byte mask from the layout's compact store of partial tiles only.

q (B, H, Lq, D), k and v (B, H, Lk, D) in bf16 or fp16, any strides with the head dim contiguous (the KV
cache may be a view into a larger buffer); output (B, H, Lq, D) contiguous. Softmax scale defaults to 1:
the model's q already carries its scale.
"""
from __future__ import annotations

import contextlib
import math
import os
import weakref

import torch

from sparvar.csla import KERNEL_TILE_SIZES

try:  # triton is optional: the CPU package imports without it and the wrappers say what is missing
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None
    HAS_TRITON = False

DTYPES = (torch.bfloat16, torch.float16)
HEAD_DIMS = (64, 128)
TILE_SIZES = KERNEL_TILE_SIZES  # power-of-two tiles tl.dot accepts and the register budget allows
LOG2E = 1.4426950408889634
INT32_MAX = 2**31 - 1


def kernels_take(dtype: torch.dtype | None, head_dim: int | None) -> bool:
    """Whether the kernels here run inputs of this dtype and head dim; None (not known yet) passes."""
    return (dtype is None or dtype in DTYPES) and (head_dim is None or head_dim in HEAD_DIMS)


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1): kernels then run on CPU tensors, for tests only."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_device(t: torch.Tensor):
    """The context to launch a kernel for tensor t in: Triton launches on the current CUDA device, not on its
    arguments' (a cuda:1 tensor launched from cuda:0 faults); nothing under the interpreter."""
    return contextlib.nullcontext() if interpreting() or not t.is_cuda else torch.cuda.device(t.device)


def autotuning() -> bool:
    """SPARVAR_TRITON_AUTOTUNE=0 launches the fixed default configs (no tuning runs: faster tests, fixed choice)."""
    return not interpreting() and os.environ.get("SPARVAR_TRITON_AUTOTUNE", "1") != "0"


# ------------------------------------------------------------------------------------------------ checks
def require_triton(what: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{what} needs the `triton` package, which is not installed")


def check_scale(name: str, scale) -> None:
    """The softmax scale a kernel multiplies the scores by: a positive finite float."""
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{name}: scale must be a positive finite float, got {scale}")


def check_qkv(name: str, q, k, v) -> None:
    """Shapes, dtypes and strides every kernel here accepts (ValueError/TypeError naming the problem); devices are
    checked last by each wrapper with check_device, so shape errors are reported on any device."""
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: {label} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}: {label} must be bfloat16 or float16, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{name}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{name}: expected q (B, H, Lq, D) and k, v (B, H, Lk, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"{name}: head dim {q.shape[3]} is not supported; supported: {HEAD_DIMS}")
    if 0 in q.shape or 0 in k.shape:
        raise ValueError(f"{name}: empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[0] * q.shape[1] > 65535:
        raise ValueError(f"{name}: B*H = {q.shape[0] * q.shape[1]} exceeds the launch grid limit 65535")
    for label, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1:
            raise ValueError(f"{name}: {label} must be contiguous in the head dim (stride 1), got strides {t.stride()}")
        # the kernels add the batch, head, token and dim offsets in int32: the largest sum must fit, not each term
        if sum((s - 1) * st for s, st in zip(t.shape, t.stride())) > INT32_MAX:
            raise ValueError(f"{name}: {label} spans more than 2**31 elements; int32 offsets would overflow")


def check_device(name: str, ref: torch.Tensor, *, hint: str = "use the reference_* functions on the CPU",
                 **others: torch.Tensor | None) -> None:
    """ref on the kernels' device (a CUDA GPU; the CPU under TRITON_INTERPRET=1), the others on ref's device."""
    if interpreting():
        if ref.device.type != "cpu":
            raise ValueError(f"{name}: under TRITON_INTERPRET=1 tensors must be on the CPU, got {ref.device}")
    elif ref.device.type != "cuda":
        raise ValueError(f"{name}: tensors must be on a CUDA device, got {ref.device} ({hint})")
    for label, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name}: {label} is on {t.device}, the first input on {ref.device}; all inputs must share a device")


def check_index(name: str, label: str, t, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name}: {label} must be int32, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name}: {label} must be {dims}-D, got shape {tuple(t.shape)}")
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name}: {label} must be contiguous in its last dim, got strides {t.stride()}")


def check_block_layout(name: str, q_len: int, kv_len: int, kv_num_blocks, kv_indices, block_m: int, block_n: int) -> None:
    for label, size in (("block_m", block_m), ("block_n", block_n)):
        if not isinstance(size, int) or isinstance(size, bool) or size not in TILE_SIZES:
            raise ValueError(f"{name}: {label} must be one of {TILE_SIZES} (the kernel tile is the layout block), got {size!r}")
    check_index(name, "kv_num_blocks", kv_num_blocks, 1)
    check_index(name, "kv_indices", kv_indices, 2)
    num_q_blocks = -(-q_len // block_m)
    if kv_num_blocks.shape[0] != num_q_blocks or kv_indices.shape[0] != num_q_blocks:
        raise ValueError(f"{name}: {q_len} queries in blocks of {block_m} need {num_q_blocks} rows; got kv_num_blocks "
                         f"{tuple(kv_num_blocks.shape)}, kv_indices {tuple(kv_indices.shape)}")
    num_kv_blocks = -(-kv_len // block_n)
    if not 1 <= kv_indices.shape[1] <= num_kv_blocks:
        raise ValueError(f"{name}: kv_indices has {kv_indices.shape[1]} columns; expected 1..{num_kv_blocks} "
                         f"({kv_len} keys in blocks of {block_n})")


def check_layout_values(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, kv_len: int, block_n: int) -> None:
    """Value checks that need a device sync (counts in range, indices ascending and in bounds); for tests/debug."""
    num_kv_blocks = -(-kv_len // block_n)
    counts = kv_num_blocks.long()
    if int(counts.min()) < 1 or int(counts.max()) > kv_indices.shape[1]:
        raise ValueError(f"kv_num_blocks must lie in [1, {kv_indices.shape[1]}], got [{int(counts.min())}, {int(counts.max())}]")
    valid = torch.arange(kv_indices.shape[1], device=kv_indices.device)[None, :] < counts[:, None]
    idx = kv_indices.long()
    if bool(((idx < 0) | (idx >= num_kv_blocks))[valid].any()):
        raise ValueError(f"kv_indices hold block indices outside [0, {num_kv_blocks})")
    ascending = idx[:, 1:] > idx[:, :-1]
    if bool((~ascending & valid[:, 1:]).any()):
        raise ValueError("kv_indices must be strictly ascending within each row's first kv_num_blocks entries")


# ------------------------------------------------------------------------------------------------ kernels
if HAS_TRITON:

    @triton.jit
    def query_tile_prologue(Q, K, V, b, h, offs_m, q_len, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh,
                            stride_vb, stride_vh, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
        """Start of one query tile of (batch row b, head h), shared by the CSLA and CS4A kernels: the tile's q rows
        (zeros past q_len), the (b, h) K and V base pointers over the head dim (add key * stride_kn to address
        keys) and the empty online-softmax state (row max, row sum, accumulator)."""
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < q_len
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        k_base = K + b * stride_kb + h * stride_kh + offs_d[None, :]
        v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :]
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        return q, k_base, v_base, row_ok, m_i, l_i, acc

    @triton.jit
    def online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, valid, MASK: tl.constexpr):
        """One key tile of the online softmax: scores in log2 units, m_i the running row max (log2 units).

        k is (BLOCK_N, D) as loaded; with MASK, pairs where `valid` (broadcast to (BLOCK_M, BLOCK_N): a key-column
        mask [None, :] or a token-exact tile mask) is False get -inf scores. A masked tile may leave a row with no
        key yet (token-exact tiles): its running max stays -inf and the exponents use 0 instead, so that row's
        p and alpha are exp2(-inf) = 0 rather than NaN.
        """
        qk = tl.dot(q, tl.trans(k))
        if MASK:
            qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_exp = m_new
        if MASK:
            m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * qk_scale - m_exp[:, None])
        alpha = tl.math.exp2(m_i - m_exp)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        return acc, l_i, m_new

    @triton.jit
    def _key_block(ptr, kv_len, BLOCK_N: tl.constexpr, CLAMP: tl.constexpr):
        """The key block a layout entry names; with CLAMP, forced into [0, ceil(kv_len / BLOCK_N))."""
        block = tl.load(ptr)
        if CLAMP:
            block = tl.minimum(tl.maximum(block, 0), tl.cdiv(kv_len, BLOCK_N) - 1)
        return block

    @triton.jit
    def _gathered_keys(keys, k_base, v_base, stride_kn, stride_vn, kv_len, CLAMP: tl.constexpr):
        """The K and V rows of a tile's listed keys (the query-tile kernel); with CLAMP, keys forced into
        [0, kv_len)."""
        if CLAMP:
            keys = tl.minimum(tl.maximum(keys, 0), kv_len - 1)
        return tl.load(k_base + keys[:, None] * stride_kn), tl.load(v_base + keys[:, None] * stride_vn)

    @triton.jit
    def _csla_fwd_kernel(
        Q, K, V, Out, Lse, KVNumBlocks, KVIndices, QOrder, NumFull, PartialIndex, PartialMasks, KVLens,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om,
        stride_idx,
        H, q_len, kv_len, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DENSE: tl.constexpr, EVEN_N: tl.constexpr, USE_ORDER: tl.constexpr, STORE_LSE: tl.constexpr,
        TOKEN: tl.constexpr, ROW_LEN: tl.constexpr, CLAMP_LAYOUT: tl.constexpr = False,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        if ROW_LEN:  # dense over each batch row's first KVLens[b] keys (padded text): the rest are never read
            # clamped to [0, kv_len]: a length <= 0 must read no key (never the rows before K), not a negative tile
            kv_len = tl.maximum(tl.minimum(tl.load(KVLens + b), kv_len), 0)
        if USE_ORDER:  # heaviest query blocks first: the last wave is the lightest
            q_block = tl.load(QOrder + pid_m)
        else:
            q_block = pid_m
        offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        q, k_base, v_base, row_ok, m_i, l_i, acc = query_tile_prologue(
            Q, K, V, b, h, offs_m, q_len, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_vb, stride_vh,
            HEAD_DIM, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        idx_row = KVIndices + q_block * stride_idx

        if DENSE:
            num = tl.cdiv(kv_len, BLOCK_N)
        else:
            num = tl.load(KVNumBlocks + q_block)
            if CLAMP_LAYOUT:  # the layout came from outside (TensorRT's timing inputs): keep every read in bounds
                num = tl.minimum(tl.maximum(num, 0), stride_idx)
        num_full = num
        if TOKEN:  # token-exact: the row's full tiles come first (see token_tiles), then the masked ones
            num_full = tl.load(NumFull + q_block)
        elif not EVEN_N:  # the partial last key block, if this row has it, is its last entry
            if DENSE:
                num_full = tl.maximum(num - 1, 0)  # no key at all (a row of length 0): no tail tile either
            else:
                # a row listing no block (num 0) has no tail either: without the clamps it read the previous
                # row's last entry (KVIndices[-1] for the first row) and ran it as a partial block
                last = _key_block(idx_row + tl.maximum(num - 1, 0), kv_len, BLOCK_N, CLAMP_LAYOUT)
                num_full = tl.maximum(num - (last == (kv_len - 1) // BLOCK_N).to(tl.int32), 0)

        for i in range(0, num_full):
            if DENSE:
                start_n = i * BLOCK_N
            else:
                start_n = _key_block(idx_row + i, kv_len, BLOCK_N, CLAMP_LAYOUT) * BLOCK_N
            keys = start_n + offs_n
            if CLAMP_LAYOUT:  # an outside layout may list the partial last key block anywhere: mask every block
                key_ok = keys < kv_len
                k = tl.load(k_base + keys[:, None] * stride_kn, mask=key_ok[:, None], other=0.0)
                v = tl.load(v_base + keys[:, None] * stride_vn, mask=key_ok[:, None], other=0.0)
            else:
                k = tl.load(k_base + keys[:, None] * stride_kn)
                v = tl.load(v_base + keys[:, None] * stride_vn)
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, (keys < kv_len)[None, :],
                                                CLAMP_LAYOUT)

        if TOKEN:
            # tiles with pairs left out: their (BLOCK_M, BLOCK_N) byte mask, False past q_len / kv_len
            tile_offs = (offs_m - q_block * BLOCK_M)[:, None] * BLOCK_N + offs_n[None, :]
            for i in range(num_full, num):
                keys = tl.load(idx_row + i) * BLOCK_N + offs_n
                key_ok = keys < kv_len
                k = tl.load(k_base + keys[:, None] * stride_kn, mask=key_ok[:, None], other=0.0)
                v = tl.load(v_base + keys[:, None] * stride_vn, mask=key_ok[:, None], other=0.0)
                tile = tl.load(PartialIndex + q_block * stride_idx + i)
                keep = tl.load(PartialMasks + tile * (BLOCK_M * BLOCK_N) + tile_offs) != 0
                acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, keep, True)
        elif num_full < num:  # the partial last tile
            if DENSE:
                start_n = num_full * BLOCK_N
            else:
                start_n = _key_block(idx_row + num_full, kv_len, BLOCK_N, CLAMP_LAYOUT) * BLOCK_N
            keys = start_n + offs_n
            key_ok = keys < kv_len
            k = tl.load(k_base + keys[:, None] * stride_kn, mask=key_ok[:, None], other=0.0)
            v = tl.load(v_base + keys[:, None] * stride_vn, mask=key_ok[:, None], other=0.0)
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, key_ok[None, :], True)

        out = acc / l_i[:, None]
        tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None])
        if STORE_LSE:  # natural-log logsumexp of the scaled scores
            lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
            tl.store(Lse + pid_bh * q_len + offs_m, lse, mask=row_ok)

    @triton.jit
    def _csla_tiles_fwd_kernel(
        Q, K, V, Out, QRows, KVCount, KVKeys, TileOrder,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om,
        stride_keys,
        H, q_len, kv_len, width, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_ORDER: tl.constexpr,
        CLAMP_LAYOUT: tl.constexpr,
    ):
        # one 2-D query tile (sparvar.csla.TileLayout) of (batch row, head): its BLOCK_M query rows gathered by
        # position (slots holding q_len are padding), its KVCount[tile] keys gathered BLOCK_N at a time.
        # CLAMP_LAYOUT (the TensorRT AOT entry): query slots forced into [0, q_len], counts into [0, width] and keys
        # into [0, kv_len), a no-op for a real layout; TensorRT times tactics on layouts it never wrote.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        if USE_ORDER:  # heaviest tiles first: the last wave is the lightest
            tile = tl.load(TileOrder + pid_m)
        else:
            tile = pid_m
        offs_m = tl.load(QRows + tile * BLOCK_M + tl.arange(0, BLOCK_M))
        if CLAMP_LAYOUT:
            offs_m = tl.minimum(tl.maximum(offs_m, 0), q_len)
        offs_n = tl.arange(0, BLOCK_N)
        q, k_base, v_base, row_ok, m_i, l_i, acc = query_tile_prologue(
            Q, K, V, b, h, offs_m, q_len, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_vb, stride_vh,
            HEAD_DIM, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        keys_row = KVKeys + tile * stride_keys
        num = tl.minimum(tl.load(KVCount + tile), width)  # a count past the row's width would read past it
        if CLAMP_LAYOUT:
            num = tl.maximum(num, 0)
        num_full = num // BLOCK_N
        for t in range(0, num_full):
            k, v = _gathered_keys(tl.load(keys_row + t * BLOCK_N + offs_n), k_base, v_base, stride_kn, stride_vn,
                                  kv_len, CLAMP_LAYOUT)
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, offs_n[None, :] >= 0, False)
        if num_full * BLOCK_N < num:  # the partial last tile: its empty slots read key 0 (in bounds) and get -inf
            pos = num_full * BLOCK_N + offs_n
            valid = pos < num
            k, v = _gathered_keys(tl.load(keys_row + pos, mask=valid, other=0), k_base, v_base, stride_kn, stride_vn,
                                  kv_len, CLAMP_LAYOUT)
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, valid[None, :], True)

        out = acc / l_i[:, None]
        tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None])

    def _prune_by_tile(configs, named_args, **kwargs):
        """Keep configs whose warp count suits the tile: 8 warps (two warpgroups) exactly for 128-row tiles."""
        block_m = kwargs["BLOCK_M"]
        block_n = kwargs["BLOCK_N"]
        kept = []
        for c in configs:
            if (block_m < 128) != (c.num_warps <= 4):  # 128-row tiles: 8 warps (4 would spill the accumulator)
                continue
            if block_m * block_n <= 32 * 32 and c.num_stages > 2:
                continue
            kept.append(c)
        return kept or configs[:1]

    # Small set, pruned per tile: (warps, stages). Hopper likes 8 warps / 3-4 stages at 128-row tiles.
    _CSLA_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((8, 3), (8, 4), (8, 2), (4, 3), (4, 2))]
    # Dense (the decision's pass): the tile is free, so it is tuned too; 64-row tiles fill the last wave better at
    # short query lengths (1,600 queries = 12.5 tiles of 128 per (batch, head)).
    _DENSE_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                      for m, n, w, s in ((128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 2),
                                         (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3))]
    _dense_fwd_tuned = triton.autotune(configs=_DENSE_CONFIGS, key=["HEAD_DIM", "q_len", "kv_len", "STORE_LSE"])(
        _csla_fwd_kernel)
    _csla_fwd_tuned = triton.autotune(configs=_CSLA_CONFIGS,
                                      key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "DENSE", "EVEN_N", "TOKEN",
                                           "q_len", "kv_len"],  # one tuning per scale: each has its own layout
                                      prune_configs_by={"early_config_prune": _prune_by_tile})(_csla_fwd_kernel)

    def _prune_query_tiles(configs, named_args, **kwargs):
        """128-query tiles: 8 warps only (4 would spill the accumulator); under 64: 4 warps, key tiles up to 64."""
        block_m = kwargs["BLOCK_M"]
        kept = [c for c in configs if (c.num_warps == 8 if block_m >= 128 else
                                       block_m >= 64 or (c.num_warps <= 4 and c.kwargs["BLOCK_N"] <= 64))]
        return kept or configs[:1]

    # the tile kernel gathers its keys, so the key tile is free: tuned with the launch shape
    _TILE_CONFIGS = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
                     for n, w, s in ((64, 4, 3), (64, 4, 4), (64, 4, 2), (32, 4, 3), (32, 4, 4), (128, 4, 2),
                                     (128, 8, 3), (64, 8, 3), (64, 8, 4))]
    _csla_tiles_fwd_tuned = triton.autotune(configs=_TILE_CONFIGS,
                                            key=["HEAD_DIM", "BLOCK_M", "q_len", "width"],
                                            prune_configs_by={"early_config_prune": _prune_query_tiles})(
        _csla_tiles_fwd_kernel)


def default_tile_launch_config(block_m: int) -> dict:
    """The query-tile kernel's key tile and launch where no tuning runs (SPARVAR_TRITON_AUTOTUNE=0, AOT): 64-key
    tiles, 3 stages; 8 warps for 128-query tiles (4 would spill the accumulator)."""
    return dict(BLOCK_N=64, num_warps=8 if block_m >= 128 else 4, num_stages=3)


def default_launch_config(block_m: int, block_n: int) -> dict:
    """The config used where no tuning runs (interpreter, AOT): Hopper-friendly defaults per tile."""
    if block_m >= 128:
        return dict(num_warps=8, num_stages=3 if block_n <= 64 else 2)
    return dict(num_warps=4, num_stages=3 if block_m * block_n > 32 * 32 else 2)


# The CSLA kernel's variants a caller can ask for by name, each launched with a fixed config: the hook through
# which benchmarks and tests put an experimental form beside the default one (bench/csla_variants.py). Earlier forms
# measured there and removed: tensor descriptors (TMA) with and without warp specialisation (no gain on the H100,
# removed after 6442115), key tiles read in halves and a Gluon kernel with FlashAttention-3's structure (slower).
CSLA_VARIANTS = {"pointer": {}}


def attention_output_like(q: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty (B, H, Lq, D) attention output laid out like q where q is token-major (a (B, Lq, H, D) tensor seen
    through transpose(1, 2), as the engine allocates it): the projection after attention then reads the output
    as (B, Lq, H * D) without a copy (the H200 profile had a 27-47 us copy per sparse layer at 2B scales 10-12).
    Contiguous otherwise. Every kernel here takes the output's strides."""
    b, h, q_len, d = q.shape
    dtype = dtype or q.dtype
    if q.transpose(1, 2).is_contiguous():
        return torch.empty((b, q_len, h, d), dtype=dtype, device=q.device).transpose(1, 2)
    return torch.empty((b, h, q_len, d), dtype=dtype, device=q.device)


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kv_num_blocks: torch.Tensor | None = None,
                  kv_indices: torch.Tensor | None = None, block_m: int | None = 128, block_n: int | None = 64,
                  scale: float = 1.0, q_order: torch.Tensor | None = None, token: tuple | None = None,
                  return_lse: bool = False, out_dtype: torch.dtype | None = None, kv_lens: torch.Tensor | None = None,
                  variant: str | None = None, name: str = "flash_forward"):
    """Launch the flash kernel: dense when kv_num_blocks is None, block-sparse otherwise. Inputs already checked.

    token: None (block-granular) or (num_full, tile_index, partial_masks viewed as uint8), kv_indices then
    being token_tiles' reordered tiles. Dense with block_m = block_n = None: the autotuner picks the tile on the
    GPU (128x64 elsewhere). kv_lens (dense only): (B,) int32, batch row b attends to its first kv_lens[b] keys.
    Returns out (B, H, Lq, D) in out_dtype (default q's), or (out, lse (B, H, Lq) fp32 natural-log logsumexp) with
    return_lse. variant: None (autotuned, or the default config), or a CSLA_VARIANTS name launched with the default
    config of the tile (block-sparse only).
    """
    require_triton(name)
    dense = kv_num_blocks is None
    tune_tile = dense and block_m is None and block_n is None and autotuning()
    if block_m is None or block_n is None:
        block_m, block_n = 128, 64
    b, h, q_len, d = q.shape
    kv_len = k.shape[2]
    out = attention_output_like(q, out_dtype)
    lse = torch.empty((b, h, q_len), dtype=torch.float32, device=q.device) if return_lse else out
    placeholder = out  # pointer args the constexpr flags make the kernel ignore
    args = (q, k, v, out, lse,
            placeholder if dense else kv_num_blocks, placeholder if dense else kv_indices,
            placeholder if q_order is None else q_order, *(token or (placeholder,) * 3),
            placeholder if kv_lens is None else kv_lens,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            0 if dense else kv_indices.stride(0), h, q_len, kv_len, float(scale) * LOG2E)
    row_len = kv_lens is not None  # each row's length is known on the device only: its last tile is always masked
    meta = dict(HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, DENSE=dense, EVEN_N=kv_len % block_n == 0 and not row_len,
                USE_ORDER=q_order is not None, STORE_LSE=return_lse, TOKEN=token is not None, ROW_LEN=row_len)
    grid = (-(-q_len // block_m), b * h)
    if variant is not None:
        meta.update(CSLA_VARIANTS[variant])
        with launch_device(q):
            _csla_fwd_kernel[grid](*args, **meta, **default_launch_config(block_m, block_n))
    elif tune_tile:
        del meta["BLOCK_M"], meta["BLOCK_N"]
        meta["EVEN_N"] = kv_len % 128 == 0 and not row_len  # true for every tuned BLOCK_N (64 | 128); False masks the last tile
        with launch_device(q):
            _dense_fwd_tuned[lambda m: (triton.cdiv(q_len, m["BLOCK_M"]), b * h)](*args, **meta)
    elif interpreting():
        _csla_fwd_kernel[grid](*args, **meta, **default_launch_config(block_m, block_n))
    else:
        kernel = _csla_fwd_tuned if autotuning() else _csla_fwd_kernel
        extra = {} if autotuning() else default_launch_config(block_m, block_n)
        with launch_device(q):
            kernel[grid](*args, **meta, **extra)
    return (out, lse) if return_lse else out


def tuned_config(kernel: str = "csla") -> str | None:
    """The config the autotuner picked last for a kernel (for benchmark reports)."""
    if not HAS_TRITON:
        return None
    fn = {"csla": "_csla_fwd_tuned", "dense": "_dense_fwd_tuned", "csla_tiles": "_csla_tiles_fwd_tuned"}.get(kernel)
    best = getattr(globals().get(fn), "best_config", None)
    return None if best is None else str(best)


# ------------------------------------------------------------------------------------------------ public API
def query_block_order(kv_num_blocks: torch.Tensor) -> torch.Tensor:
    """(num_q_blocks,) int32: query blocks by descending work, for the kernel's launch order (stable)."""
    check_index("query_block_order", "kv_num_blocks", kv_num_blocks, 1)
    return torch.sort(kv_num_blocks, descending=True, stable=True).indices.to(torch.int32)


def token_tiles(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                partial_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A token layout's tiles in the kernel's order: (num_full (nq,), tiles (nq, W), tile_index (nq, W)), int32.

    Per query block the full tiles (partial_index -1) come first, so the kernel runs them in one unmasked loop and
    the partial ones in a masked loop after it (the online softmax does not depend on the order); tile_index is
    partial_index in that order. Built on the layout's device without a host sync (stable sort, gathers).
    """
    name = "token_tiles"
    check_index(name, "kv_num_blocks", kv_num_blocks, 1)
    check_index(name, "kv_indices", kv_indices, 2)
    check_index(name, "partial_index", partial_index, 2)
    if partial_index.shape != kv_indices.shape:
        raise ValueError(f"{name}: partial_index {tuple(partial_index.shape)} must have kv_indices' shape "
                         f"{tuple(kv_indices.shape)}")
    valid = torch.arange(kv_indices.shape[1], device=kv_indices.device)[None, :] < kv_num_blocks[:, None]
    partial = partial_index >= 0
    rank = torch.where(valid, partial.to(torch.int8), 2)  # full, partial, padding
    order = torch.sort(rank, dim=1, stable=True).indices
    num_full = (valid & ~partial).sum(dim=1).to(torch.int32)
    return num_full, kv_indices.gather(1, order).contiguous(), partial_index.gather(1, order).contiguous()


def check_token_tiles(name: str, kv_indices, num_full, tile_index, partial_masks, block_m: int, block_n: int) -> None:
    check_index(name, "num_full", num_full, 1)
    check_index(name, "tile_index", tile_index, 2)
    if num_full.shape[0] != kv_indices.shape[0] or tile_index.shape != kv_indices.shape:
        raise ValueError(f"{name}: num_full {tuple(num_full.shape)} and tile_index {tuple(tile_index.shape)} must match "
                         f"kv_indices {tuple(kv_indices.shape)} (one count per query block, one entry per slot)")
    if tile_index.stride() != kv_indices.stride():  # the kernel walks both rows with kv_indices' row stride
        raise ValueError(f"{name}: tile_index strides {tile_index.stride()} must equal kv_indices' "
                         f"{kv_indices.stride()} (lay both out alike, e.g. .contiguous())")
    if not isinstance(partial_masks, torch.Tensor) or partial_masks.dtype != torch.bool:
        raise TypeError(f"{name}: partial_masks must be a bool tensor, got {getattr(partial_masks, 'dtype', type(partial_masks))}")
    if partial_masks.dim() != 3 or tuple(partial_masks.shape[1:]) != (block_m, block_n) or not partial_masks.is_contiguous():
        raise ValueError(f"{name}: partial_masks must be contiguous (num_partial, {block_m}, {block_n}), got shape "
                         f"{tuple(partial_masks.shape)}")
    if partial_masks.numel() > INT32_MAX:
        raise ValueError(f"{name}: {partial_masks.shape[0]} partial tiles overflow int32 offsets")


def csla_attention_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                          kv_indices: torch.Tensor, block_m: int, block_n: int, *, scale: float = 1.0,
                          q_order: torch.Tensor | None = None, num_full: torch.Tensor | None = None,
                          tile_index: torch.Tensor | None = None, partial_masks: torch.Tensor | None = None,
                          variant: str | None = None) -> torch.Tensor:
    """Sparse attention over a FlexAttention-style layout shared by all batch rows and heads.

    kv_num_blocks (ceil(Lq/block_m),) int32; kv_indices (ceil(Lq/block_m), W) int32, ascending per row;
    q_order optional (ceil(Lq/block_m),) int32 permutation of the query blocks (launch order only).
    Block-granular by default (every key of an active block attended). Token-exact with num_full, tile_index
    and partial_masks (sparvar.csla.BlockLayout's partial_masks; the other two and the reordered kv_indices from
    token_tiles): each row's first num_full tiles are computed unmasked, the rest through their byte masks.
    variant: None (autotuned on the GPU), or one of CSLA_VARIANTS launched with a fixed config (benchmarks and
    tests compare them side by side).
    """
    name = "csla_attention"
    check_qkv(name, q, k, v)
    check_block_layout(name, q.shape[2], k.shape[2], kv_num_blocks, kv_indices, block_m, block_n)
    token = (num_full, tile_index, partial_masks)
    if any(t is not None for t in token):
        check_token_tiles(name, kv_indices, *token, block_m, block_n)
        token = (num_full, tile_index, partial_masks.view(torch.uint8))
    else:
        token = None
    if q_order is not None:
        check_index(name, "q_order", q_order, 1)
        if q_order.shape != kv_num_blocks.shape:
            raise ValueError(f"{name}: q_order {tuple(q_order.shape)} must have kv_num_blocks' shape {tuple(kv_num_blocks.shape)}")
    check_scale(name, scale)
    if variant is not None and variant not in CSLA_VARIANTS:
        raise ValueError(f"{name}: unknown variant {variant!r}; known: {sorted(CSLA_VARIANTS)}")
    check_device(name, q, k=k, v=v, kv_num_blocks=kv_num_blocks, kv_indices=kv_indices, q_order=q_order,
                 num_full=num_full, tile_index=tile_index, partial_masks=partial_masks)
    return flash_forward(q, k, v, kv_num_blocks=kv_num_blocks, kv_indices=kv_indices, block_m=block_m,
                         block_n=block_n, scale=scale, q_order=q_order, token=token, variant=variant, name=name)


def check_tile_layout(name: str, q_len: int, kv_len: int, q_rows, kv_count, kv_keys) -> None:
    """Shapes and dtypes of a sparvar.csla.TileLayout's tensors as the tile kernel reads them."""
    check_index(name, "q_rows", q_rows, 2)
    check_index(name, "kv_count", kv_count, 1)
    check_index(name, "kv_keys", kv_keys, 2)
    if q_rows.shape[1] not in TILE_SIZES:
        raise ValueError(f"{name}: a query tile holds {q_rows.shape[1]} queries; the kernel takes {TILE_SIZES}")
    if not q_rows.is_contiguous():  # the kernel reads tile t's rows at t * BLOCK_M
        raise ValueError(f"{name}: q_rows must be contiguous, got strides {q_rows.stride()}")
    tiles = q_rows.shape[0]
    if kv_count.shape[0] != tiles or kv_keys.shape[0] != tiles:
        raise ValueError(f"{name}: q_rows {tuple(q_rows.shape)}, kv_count {tuple(kv_count.shape)} and kv_keys "
                         f"{tuple(kv_keys.shape)} must agree on the number of tiles")
    if tiles * q_rows.shape[1] < q_len:
        raise ValueError(f"{name}: {tiles} tiles of {q_rows.shape[1]} queries cannot hold {q_len} queries")
    if not 1 <= kv_keys.shape[1] <= kv_len:
        raise ValueError(f"{name}: kv_keys has {kv_keys.shape[1]} columns; expected 1..{kv_len} (the keys)")


def check_tile_values(q_len: int, kv_len: int, q_rows: torch.Tensor, kv_count: torch.Tensor,
                      kv_keys: torch.Tensor) -> None:
    """Value checks that need a device sync (each query in one slot, counts and keys in range); for tests/debug."""
    rows = q_rows.long().reshape(-1)
    real = rows[rows != q_len]
    if bool(((real < 0) | (real > q_len)).any()) or real.numel() != q_len or real.unique().numel() != q_len:
        raise ValueError(f"q_rows must hold each of the {q_len} queries once (padding slots hold {q_len})")
    counts = kv_count.long()
    if int(counts.min()) < 1 or int(counts.max()) > kv_keys.shape[1]:
        raise ValueError(f"kv_count must lie in [1, {kv_keys.shape[1]}], got [{int(counts.min())}, {int(counts.max())}]")
    valid = torch.arange(kv_keys.shape[1], device=kv_keys.device)[None, :] < counts[:, None]
    keys = kv_keys.long()
    if bool(((keys < 0) | (keys >= kv_len)).any()):
        raise ValueError(f"kv_keys hold positions outside [0, {kv_len})")
    if bool((~(keys[:, 1:] > keys[:, :-1]) & valid[:, 1:]).any()):
        raise ValueError("kv_keys must be strictly ascending within each tile's first kv_count entries")


def csla_attention_query_tiles(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_rows: torch.Tensor,
                               kv_count: torch.Tensor, kv_keys: torch.Tensor, *, scale: float = 1.0,
                               tile_order: torch.Tensor | None = None) -> torch.Tensor:
    """CSLA over 2-D query tiles (a sparvar.csla.TileLayout's q_rows / kv_count / kv_keys), shared by all batch rows
    and heads: each tile's queries attend its kv_count keys, gathered. tile_order: optional (num_tiles,) int32
    permutation (launch order only)."""
    name = "csla_attention"
    check_qkv(name, q, k, v)
    check_tile_layout(name, q.shape[2], k.shape[2], q_rows, kv_count, kv_keys)
    if tile_order is not None:
        check_index(name, "tile_order", tile_order, 1)
        if tile_order.shape != kv_count.shape:
            raise ValueError(f"{name}: tile_order {tuple(tile_order.shape)} must have kv_count's shape {tuple(kv_count.shape)}")
    check_scale(name, scale)
    check_device(name, q, k=k, v=v, q_rows=q_rows, kv_count=kv_count, kv_keys=kv_keys, tile_order=tile_order)
    require_triton(name)
    b, h, q_len, d = q.shape
    out = attention_output_like(q)
    args = (q, k, v, out, q_rows, kv_count, kv_keys, out if tile_order is None else tile_order,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            kv_keys.stride(0), h, q_len, k.shape[2], kv_keys.shape[1], float(scale) * LOG2E)
    meta = dict(HEAD_DIM=d, BLOCK_M=q_rows.shape[1], USE_ORDER=tile_order is not None, CLAMP_LAYOUT=False)
    grid = (q_rows.shape[0], b * h)
    if interpreting():
        _csla_tiles_fwd_kernel[grid](*args, **meta, BLOCK_N=32, num_warps=4, num_stages=2)
    elif autotuning():
        with launch_device(q):
            _csla_tiles_fwd_tuned[grid](*args, **meta)
    else:
        with launch_device(q):
            _csla_tiles_fwd_kernel[grid](*args, **meta, **default_tile_launch_config(q_rows.shape[1]))
    return out


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float = 1.0,
                    block_m: int | None = None, block_n: int | None = None, return_lse: bool = False,
                    out_dtype: torch.dtype | None = None, kv_lens: torch.Tensor | None = None):
    """Dense flash attention (the CS4A decision's first pass, the engine's smallest scales and its cross-attention);
    with return_lse also the (B, H, Lq) fp32 logsumexp.

    out_dtype: q's dtype by default; float32 keeps the output unrounded (the decision subtracts from it).
    block_m, block_n: the tile; None (both) lets the autotuner pick it on the GPU (128x64 without tuning).
    kv_lens: None, or (B,) int32 on q's device: batch row b attends to keys [0, kv_lens[b]) only (a padded text's
    real tokens; values above Lk count as Lk, and a row of 0 or less reads no key and gives NaN, as an all-masked
    softmax does).
    """
    name = "dense_attention"
    check_qkv(name, q, k, v)
    if out_dtype not in (None, q.dtype, torch.float32):
        raise TypeError(f"{name}: out_dtype must be None, {q.dtype} or torch.float32, got {out_dtype}")
    if (block_m is None) != (block_n is None) or (block_m is not None and (block_m not in TILE_SIZES
                                                                           or block_n not in TILE_SIZES)):
        raise ValueError(f"{name}: block_m and block_n must both be None or both in {TILE_SIZES}, got {block_m}, {block_n}")
    check_scale(name, scale)
    if kv_lens is not None and (not isinstance(kv_lens, torch.Tensor) or kv_lens.dtype != torch.int32
                                or kv_lens.shape != (q.shape[0],) or not kv_lens.is_contiguous()):
        raise ValueError(f"{name}: kv_lens must be None or a contiguous int32 ({q.shape[0]},) tensor (one length per "
                         f"batch row), got {kv_lens.dtype if isinstance(kv_lens, torch.Tensor) else type(kv_lens).__name__} "
                         f"{tuple(kv_lens.shape) if isinstance(kv_lens, torch.Tensor) else ''}")
    check_device(name, q, k=k, v=v, kv_lens=kv_lens)
    return flash_forward(q, k, v, block_m=block_m, block_n=block_n, scale=scale, return_lse=return_lse,
                         out_dtype=out_dtype, kv_lens=kv_lens, name=name)


# Per layout object, the launch order and (token layouts) the kernel-ordered tiles: layouts are static per scale,
# so these are built once (recomputing them would cost launches per call).
_ORDER_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def csla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, *, scale: float = 1.0) -> torch.Tensor:
    """CSLA over a sparvar.csla.BlockLayout, through sparvar::triton_csla_attention (granularity 'block') or
    sparvar::triton_csla_attention_token (granularity 'token': full tiles unmasked, partial tiles masked), or over a
    sparvar.csla.TileLayout (granularity 'tile': 2-D query tiles, keys gathered) through
    sparvar::triton_csla_query_tiles."""
    granularity = getattr(layout, "granularity", None)
    if granularity not in ("block", "token", "tile"):
        raise ValueError(f"csla_attention: layout must be a sparvar.csla.BlockLayout of granularity 'block' or 'token' "
                         f"or a TileLayout, got {type(layout).__name__} with granularity {granularity!r}")
    if granularity == "token" and (layout.partial_index is None or layout.partial_masks is None):
        raise ValueError("csla_attention: token layout without partial_index / partial_masks; build it with "
                         "sparvar.csla.block_layout_from_mask(mask, block_m, block_n, 'token')")
    if q.shape[2:3] != (layout.q_len,) or k.shape[2:3] != (layout.kv_len,):
        raise ValueError(f"csla_attention: layout is for {layout.q_len} queries x {layout.kv_len} keys; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    counts = layout.kv_count if granularity == "tile" else layout.kv_num_blocks  # each query tile's work
    if counts.device != q.device:
        raise ValueError(f"csla_attention: layout is on {counts.device}, q on {q.device}; move it once with layout.to(device)")
    cached = _ORDER_CACHE.get(layout)
    if cached is None:
        tiles = (token_tiles(layout.kv_num_blocks, layout.kv_indices, layout.partial_index) if granularity == "token"
                 else None)
        cached = _ORDER_CACHE[layout] = (query_block_order(counts), tiles)
    order, tiles = cached
    if granularity == "tile":
        return torch.ops.sparvar.triton_csla_query_tiles(q, k, v, layout.q_rows, layout.kv_count, layout.kv_keys,
                                                         order, scale)
    kv_num_blocks, kv_indices = layout.kv_num_blocks, layout.kv_indices
    if tiles is None:
        return torch.ops.sparvar.triton_csla_attention(q, k, v, kv_num_blocks, kv_indices, order, layout.block_m,
                                                       layout.block_n, scale)
    num_full, kv_tiles, tile_index = tiles
    return torch.ops.sparvar.triton_csla_attention_token(q, k, v, kv_num_blocks, kv_tiles, num_full, tile_index,
                                                         layout.partial_masks, order, layout.block_m, layout.block_n,
                                                         scale)


@torch.library.custom_op("sparvar::triton_csla_attention", mutates_args=())
def _csla_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
             q_order: torch.Tensor | None, block_m: int, block_n: int, scale: float) -> torch.Tensor:
    return csla_attention_blocks(q, k, v, kv_num_blocks, kv_indices, block_m, block_n, scale=scale, q_order=q_order)


@_csla_op.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, q_order, block_m, block_n, scale):
    return attention_output_like(q)


@torch.library.custom_op("sparvar::triton_csla_attention_token", mutates_args=())
def _csla_token_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                   kv_tiles: torch.Tensor, num_full: torch.Tensor, tile_index: torch.Tensor, partial_masks: torch.Tensor,
                   q_order: torch.Tensor | None, block_m: int, block_n: int, scale: float) -> torch.Tensor:
    return csla_attention_blocks(q, k, v, kv_num_blocks, kv_tiles, block_m, block_n, scale=scale, q_order=q_order,
                                 num_full=num_full, tile_index=tile_index, partial_masks=partial_masks)


@_csla_token_op.register_fake
def _(q, k, v, kv_num_blocks, kv_tiles, num_full, tile_index, partial_masks, q_order, block_m, block_n, scale):
    return attention_output_like(q)


@torch.library.custom_op("sparvar::triton_csla_query_tiles", mutates_args=())
def _csla_query_tiles_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_rows: torch.Tensor, kv_count: torch.Tensor,
                         kv_keys: torch.Tensor, tile_order: torch.Tensor | None, scale: float) -> torch.Tensor:
    return csla_attention_query_tiles(q, k, v, q_rows, kv_count, kv_keys, scale=scale, tile_order=tile_order)


@_csla_query_tiles_op.register_fake
def _(q, k, v, q_rows, kv_count, kv_keys, tile_order, scale):
    return attention_output_like(q)


# ------------------------------------------------------------------------------------------------ reference
def reference_csla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                             kv_indices: torch.Tensor, block_m: int, block_n: int, scale: float = 1.0) -> torch.Tensor:
    """Plain-torch fp32 result of csla_attention_blocks (the project's masked reference attention)."""
    from sparvar.attention import reference_attention
    from sparvar.csla import BlockLayout

    check_block_layout("reference_csla_attention", q.shape[2], k.shape[2], kv_num_blocks, kv_indices, block_m, block_n)
    layout = BlockLayout(q.shape[2], k.shape[2], block_m, block_n, kv_num_blocks, kv_indices, float("nan"))
    mask = layout.to_dense().to(q.device)
    return reference_attention(q.float() * scale, k, v, mask=mask).to(q.dtype)


# ------------------------------------------------------------------------------------------------ benchmark entry
def benchmark(batch: int = 2, heads: int = 16, head_dim: int = 128, block: tuple[int, int] = (128, 64),
              dtype: torch.dtype = torch.bfloat16) -> dict:
    """Time csla_attention on the paper's scale-12 layout at 1024^2 against SDPA cuDNN (one quick comparison)."""
    from triton.testing import do_bench

    from sparvar.attention import dense_attention as sdpa_dense
    from sparvar.csla import csla_layout
    from sparvar.schedule import get_schedule
    from sparvar.sparse import SparVARPolicy

    schedule = get_schedule(1024)
    scale = schedule.num_scales - 1
    layout = csla_layout(schedule, scale, 5, SparVARPolicy.csla_window_sides, *block).to("cuda")
    q_len, kv_len = schedule.lengths[scale], schedule.kv_len(scale)
    q = torch.randn(batch, heads, q_len, head_dim, device="cuda", dtype=dtype) * head_dim**-0.5
    k, v = (torch.randn(batch, heads, kv_len, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    ms = do_bench(lambda: csla_attention(q, k, v, layout), return_mode="median")
    ms_cudnn = do_bench(lambda: sdpa_dense(q, k, v, "cudnn"), return_mode="median")
    return dict(block=block, density=layout.density, csla_ms=ms, cudnn_ms=ms_cudnn, speedup=ms_cudnn / ms)


if __name__ == "__main__":
    print(benchmark())
