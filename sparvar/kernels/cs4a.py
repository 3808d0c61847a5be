"""CS4A kernels in Triton: grouped gather attention (later scales) and the decision pass (decision scale).

cs4a_attention: queries come in raster groups of `group_size`; group g attends to the keys at the absolute KV
positions key_idx[b, h, g, :] (gathered straight from the KV cache: no K/V copies), followed, when band_start is
given, by the contiguous own-scale band [band_start[g], band_start[g] + band_len). One program computes BLOCK_M
queries of one group (BLOCK_M = the largest of 128/64/32/16 dividing group_size: 64 for the paper's 192, so the
three programs of a group are launched next to each other and share its K/V rows through L2). Only the last key
tile can be partial, so the loop runs unmasked full tiles and masks that one tile. The output can fuse
`sign * attention + extra` (extra = the upsampled residual cache at later scales, or the dense output with sign -1
when the decision builds O_cache).

cs4a_decide (decision scale): pass 1 = dense attention with each row's logsumexp (cuDNN on the GPU, our flash
kernel in the interpreter: decision_dense_pass); pass 2 = per (key tile, batch*head) the column sums over each group's
queries of exp(s - lse), i.e. of the softmax probabilities (no atomics: each program owns its key tile and walks all
query tiles); then the top-k per group, ascending, in one kernel (select_topk: a digit-by-digit threshold search, no
sort), and the residual O_cache = O_dense - attention over the selection (cs4a kernel with sign -1, extra = O_dense;
with our kernel's fp32 O_dense it also writes O_dense rounded to the input dtype, the decision's output).
"""
from __future__ import annotations

import torch

from sparvar.kernels.csla import (HAS_TRITON, HEAD_DIMS, LOG2E, attention_output_like, autotuning, check_device,
                                  check_index, check_qkv, check_scale, dense_attention, interpreting, launch_device,
                                  require_triton)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from sparvar.kernels.csla import online_softmax_step, query_tile_prologue


def query_tile(group_size: int) -> int:
    """Queries per program: the largest of 128, 64, 32, 16 that divides group_size (tiles never straddle groups)."""
    for tile in (128, 64, 32, 16):
        if group_size % tile == 0:
            return tile
    raise ValueError(f"CS4A group_size must be a positive multiple of 16 (query tiles never straddle groups), got {group_size}")


# ------------------------------------------------------------------------------------------------ kernels
if HAS_TRITON:

    @triton.jit
    def _bilinear_rows(src, t, t_ok, src_h, src_w, dst_w, scale_h, scale_w, stride_l):
        """Rows t (raster tokens of a grid dst_w wide) of a (src_h, src_w) raster grid of rows at src + token *
        stride_l (src already offset by the columns), bilinear as torch's upsample_bilinear2d with align_corners=False
        (source index max(scale * (dst + 0.5) - 0.5, 0), the upper neighbour clamped): fp32 (len(t), columns)."""
        y = t // dst_w
        x = t % dst_w
        sy = tl.maximum((y.to(tl.float32) + 0.5) * scale_h - 0.5, 0.0)
        sx = tl.maximum((x.to(tl.float32) + 0.5) * scale_w - 0.5, 0.0)
        y0 = sy.to(tl.int32)  # floor: sy >= 0
        x0 = sx.to(tl.int32)
        ly = (sy - y0.to(tl.float32))[:, None]
        lx = (sx - x0.to(tl.float32))[:, None]
        y1 = tl.minimum(y0 + 1, src_h - 1)
        x1 = tl.minimum(x0 + 1, src_w - 1)
        mask = t_ok[:, None]
        v00 = tl.load(src + (y0 * src_w + x0)[:, None] * stride_l, mask=mask, other=0.0).to(tl.float32)
        v01 = tl.load(src + (y0 * src_w + x1)[:, None] * stride_l, mask=mask, other=0.0).to(tl.float32)
        v10 = tl.load(src + (y1 * src_w + x0)[:, None] * stride_l, mask=mask, other=0.0).to(tl.float32)
        v11 = tl.load(src + (y1 * src_w + x1)[:, None] * stride_l, mask=mask, other=0.0).to(tl.float32)
        return (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)

    @triton.jit
    def _slot_keys(idx_base, pos, num_gathered, start0, start1, start2, start3, band_len0, band_len1, band_len2,
                   NUM_BANDS: tl.constexpr):
        """The KV positions of key slots `pos` of one group: slots below num_gathered are gathered from idx_base, the
        next band_len0 are band 0's contiguous keys from start0, then band 1's from start1, and so on."""
        keys = tl.load(idx_base + pos, mask=pos < num_gathered, other=0)
        rel = pos - num_gathered  # the slot counted from the current band's first slot
        if NUM_BANDS > 0:
            keys = tl.where(rel >= 0, start0 + rel, keys)
        if NUM_BANDS > 1:
            rel = rel - band_len0
            keys = tl.where(rel >= 0, start1 + rel, keys)
        if NUM_BANDS > 2:
            rel = rel - band_len1
            keys = tl.where(rel >= 0, start2 + rel, keys)
        if NUM_BANDS > 3:
            rel = rel - band_len2
            keys = tl.where(rel >= 0, start3 + rel, keys)
        return keys

    @triton.jit
    def _cs4a_fwd_kernel(
        Q, K, V, Out, KeyIdx, GroupMap, BandStarts, Extra, ExtraOut,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om,
        stride_ib, stride_ih, stride_ig,
        stride_eb, stride_eh, stride_em,
        stride_band,
        H, q_len, num_gathered, band_len0, band_len1, band_len2, band_len3, group_size, qk_scale,
        src_h, src_w, dst_w, up_scale_h, up_scale_w,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        NUM_BANDS: tl.constexpr, GROUP_MAP: tl.constexpr, HAS_EXTRA: tl.constexpr, UPSAMPLE: tl.constexpr,
        NEGATE: tl.constexpr, STORE_EXTRA: tl.constexpr,
    ):
        # key slot p of group g: p < num_gathered -> KeyIdx[b, h, row, p] (row = GroupMap[g] with GROUP_MAP, else g),
        # then band i's slots -> BandStarts[i, g] + (slot within the band), for NUM_BANDS <= 4 contiguous bands
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        g = (pid_m * BLOCK_M) // group_size
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        q, k_base, v_base, row_ok, m_i, l_i, acc = query_tile_prologue(
            Q, K, V, b, h, offs_m, q_len, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_vb, stride_vh,
            HEAD_DIM, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row = g
        if GROUP_MAP:
            row = tl.load(GroupMap + g)
        idx_base = KeyIdx + b * stride_ib + h * stride_ih + row * stride_ig
        start0 = 0
        start1 = 0
        start2 = 0
        start3 = 0
        if NUM_BANDS > 0:
            start0 = tl.load(BandStarts + g)
        if NUM_BANDS > 1:
            start1 = tl.load(BandStarts + stride_band + g)
        if NUM_BANDS > 2:
            start2 = tl.load(BandStarts + 2 * stride_band + g)
        if NUM_BANDS > 3:
            start3 = tl.load(BandStarts + 3 * stride_band + g)
        num_keys = num_gathered + band_len0 + band_len1 + band_len2 + band_len3  # unused band lengths are 0

        num_full = num_keys // BLOCK_N
        for t in range(0, num_full):
            pos = t * BLOCK_N + offs_n
            keys = _slot_keys(idx_base, pos, num_gathered, start0, start1, start2, start3, band_len0, band_len1,
                              band_len2, NUM_BANDS)
            k = tl.load(k_base + keys[:, None] * stride_kn)
            v = tl.load(v_base + keys[:, None] * stride_vn)
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, pos < num_keys, False)

        if num_full * BLOCK_N < num_keys:  # the partial last tile; masked slots read key 0 (in bounds) and get -inf
            pos = num_full * BLOCK_N + offs_n
            valid = pos < num_keys
            keys = _slot_keys(idx_base, pos, num_gathered, start0, start1, start2, start3, band_len0, band_len1,
                              band_len2, NUM_BANDS)
            keys = tl.where(valid, keys, 0)
            k = tl.load(k_base + keys[:, None] * stride_kn)
            v = tl.load(v_base + keys[:, None] * stride_vn)
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, valid[None, :], True)

        out = acc / l_i[:, None]
        if NEGATE:
            out = -out
        if HAS_EXTRA:
            extra_base = Extra + b * stride_eb + h * stride_eh + offs_d[None, :]
            if UPSAMPLE:  # Extra is the residual cache on the decision grid: bilinear to these queries
                extra = _bilinear_rows(extra_base, offs_m, row_ok, src_h, src_w, dst_w, up_scale_h, up_scale_w,
                                       stride_em)
            else:
                extra = tl.load(extra_base + offs_m[:, None] * stride_em, mask=row_ok[:, None], other=0.0)
            out = out + extra.to(tl.float32)
            if STORE_EXTRA:  # the decision's dense output in the input dtype, saving a separate cast kernel
                tl.store(ExtraOut + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                         extra.to(ExtraOut.dtype.element_ty), mask=row_ok[:, None])
        tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _column_sums_kernel(
        Q, K, Lse, ColSums,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        H, q_len, kv_len, group_size, num_groups, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # one program per (key tile, batch*head) walks every query tile in order (BLOCK_M divides group_size, so
        # tiles never straddle groups) and writes a group's sums when its last tile is done: one long pipelined
        # loop per program with its key tile loaded once, and no atomics (each program owns its keys)
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        key_ok = offs_n < kv_len
        k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=key_ok[:, None], other=0.0)
        # int64: the sums (B, H, G, Lk) may exceed 2^31 elements where no input does (q, k and v spans are checked)
        out = ColSums + pid_bh.to(tl.int64) * num_groups * kv_len + offs_n
        cols = tl.zeros([BLOCK_N], dtype=tl.float32)
        num_tiles = tl.cdiv(q_len, BLOCK_M)
        tiles_per_group = group_size // BLOCK_M
        for t in range(0, num_tiles):
            offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = offs_m < q_len
            q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                        mask=row_ok[:, None], other=0.0)
            # rows past q_len get lse = +inf, hence probability 0
            lse = tl.load(Lse + pid_bh * q_len + offs_m, mask=row_ok, other=float("inf"))
            # scores transposed (keys x queries) so the column sum is a row reduction inside each warp
            s = tl.dot(k, tl.trans(q))
            p = tl.math.exp2(s * qk_scale - lse[None, :] * 1.4426950408889634)
            cols += tl.sum(p, 1)
            group_done = ((t + 1) % tiles_per_group == 0) | (t == num_tiles - 1)
            tl.store(out + (t // tiles_per_group) * kv_len, cols, mask=key_ok & group_done)
            cols = tl.where(group_done, 0.0, cols)

    @triton.jit
    def _select_topk_kernel(Sums, Selected, n, first, topk, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
        """One row of column sums (>= 0): the positions of its topk largest among [first, n), written ascending.

        Non-negative floats order like their int32 bit patterns, so the k-th largest value t is found digit by digit
        (RADIX_BITS bits per step, from the top): the largest t with count(x >= t) >= topk. Each step counts all
        2^RADIX_BITS candidates of its digit in the same passes over the row (which stays in L1/L2), so there are
        32 / RADIX_BITS dependent steps instead of one per bit, at 2^RADIX_BITS compares per value and step (2 bits
        measured fastest, see TOPK_LAUNCH). Then one pass writes every x > t and, of the x == t, the lowest
        positions until topk are taken (a cumsum gives each kept entry its output slot), so no sort is needed.
        """
        row = tl.program_id(0)
        base = Sums + row.to(tl.int64) * n
        out = Selected + row.to(tl.int64) * topk
        n = n - first  # the candidates, as positions relative to `first`
        base += first
        digits = tl.arange(0, 1 << RADIX_BITS)
        thr = 0
        for step in range(32 // RADIX_BITS):  # the first step's digit holds the sign bit: its candidates >= 2^31 wrap
            shift = 32 - RADIX_BITS * (step + 1)  # negative, below digit 0's, so the max below never takes them
            cand = thr | (digits << shift)
            hits = tl.zeros([BLOCK, 1 << RADIX_BITS], dtype=tl.int32)  # reduced once per step, not per chunk
            for start in range(0, n, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                bits = tl.load(base + offs, mask=offs < n, other=-1.0).to(tl.int32, bitcast=True)
                hits += (bits[:, None] >= cand[None, :]).to(tl.int32)
            counts = tl.sum(hits, 0)
            # count(x >= cand) falls as the digit grows, and digit 0 (cand = thr) always has >= topk: take the largest
            thr = tl.max(tl.where(counts >= topk, cand, 0), 0)
        above = 0
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            bits = tl.load(base + offs, mask=offs < n, other=-1.0).to(tl.int32, bitcast=True)
            above += tl.sum((bits > thr).to(tl.int32), 0)
        ties_needed = topk - above
        written = 0
        ties_seen = 0
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            bits = tl.load(base + offs, mask=offs < n, other=-1.0).to(tl.int32, bitcast=True)
            tie = (bits == thr).to(tl.int32)
            take = (bits > thr) | ((tie != 0) & (ties_seen + tl.cumsum(tie, 0) <= ties_needed))
            take_i = take.to(tl.int32)
            tl.store(out + written + tl.cumsum(take_i, 0) - 1, offs + first, mask=take)
            written += tl.sum(take_i, 0)
            ties_seen += tl.sum(tie, 0)

    def _prune_cs4a(configs, named_args, **kwargs):
        block_m = kwargs["BLOCK_M"]
        kept = [c for c in configs if not (block_m < 64 and c.num_warps > 4)
                and not (block_m < 64 and c.kwargs["BLOCK_N"] > 64)]
        return kept or configs[:1]

    _CS4A_CONFIGS = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
                     for n, w, s in ((64, 4, 3), (64, 4, 4), (64, 4, 5), (64, 4, 2), (32, 4, 3), (32, 4, 4), (128, 4, 3),
                                     (128, 8, 3), (64, 8, 3))]
    _cs4a_fwd_tuned = triton.autotune(configs=_CS4A_CONFIGS,
                                      key=["HEAD_DIM", "BLOCK_M", "num_gathered", "band_len0", "band_len1", "band_len2",
                                           "band_len3", "NUM_BANDS", "GROUP_MAP", "HAS_EXTRA", "UPSAMPLE", "STORE_EXTRA"],
                                      prune_configs_by={"early_config_prune": _prune_cs4a})(_cs4a_fwd_kernel)
    _COLSUM_CONFIGS = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
                       for n, w, s in ((128, 4, 3), (128, 4, 2), (128, 8, 3), (64, 4, 3), (256, 8, 3))]
    _column_sums_tuned = triton.autotune(configs=_COLSUM_CONFIGS,
                                         key=["HEAD_DIM", "BLOCK_M", "q_len", "kv_len", "group_size"],
                                         prune_configs_by={"early_config_prune": _prune_cs4a})(_column_sums_kernel)

    @triton.jit
    def _upsample_cache_kernel(Src, Out, H, hs, ws, hd, wd, scale_h, scale_w,
                               stride_sb, stride_sh, stride_sl, stride_ob, stride_oh, stride_ol,
                               HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
        """BLOCK_T raster tokens of the (hd, wd) grid for one (batch, head): bilinear (align_corners=False, as
        torch's upsample_bilinear2d: source index max(scale * (dst + 0.5) - 0.5, 0), upper neighbour clamped),
        weights and sums in fp32, one rounding."""
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < hd * wd
        d = tl.arange(0, HEAD_DIM)[None, :]
        src = Src + b.to(tl.int64) * stride_sb + h * stride_sh + d
        up = _bilinear_rows(src, t, t_ok, hs, ws, wd, scale_h, scale_w, stride_sl)
        out = Out + b.to(tl.int64) * stride_ob + h * stride_oh + t[:, None] * stride_ol + d
        tl.store(out, up.to(Out.dtype.element_ty), mask=t_ok[:, None])


def tuned_config(kernel: str) -> str | None:
    """The config the autotuner picked last for 'cs4a' or 'column_sums' (for benchmark reports)."""
    if not HAS_TRITON:
        return None
    fn = {"cs4a": "_cs4a_fwd_tuned", "column_sums": "_column_sums_tuned"}.get(kernel)
    best = getattr(globals().get(fn), "best_config", None)
    return None if best is None else str(best)


# ------------------------------------------------------------------------------------------------ checks
def _check_group(name: str, q_len: int, group_size) -> int:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"{name}: group_size must be a positive int, got {group_size!r}")
    query_tile(group_size)
    return -(-q_len // group_size)


def _check_cache_layout(name: str, o_cache: torch.Tensor, dtype: torch.dtype) -> None:
    """What the kernel needs of a residual cache besides its shape: q's dtype or fp32, the head dim contiguous."""
    if o_cache.dtype not in (dtype, torch.float32):
        raise TypeError(f"{name}: o_cache must be {dtype} or float32, got {o_cache.dtype}")
    if o_cache.stride(3) != 1:
        raise ValueError(f"{name}: o_cache must be contiguous in the head dim, got strides {o_cache.stride()}")


def check_cs4a_inputs(name: str, q, k, v, key_idx, group_size, o_cache=None, band_start=None, band_len: int = 0) -> None:
    check_qkv(name, q, k, v)
    b, h, q_len, _ = q.shape
    groups = _check_group(name, q_len, group_size)
    check_index(name, "key_idx", key_idx, 4)
    if tuple(key_idx.shape[:3]) != (b, h, groups):
        raise ValueError(f"{name}: key_idx {tuple(key_idx.shape)} must be (B, H, G, K) = ({b}, {h}, {groups}, K): "
                         f"ceil({q_len} / group_size={group_size}) groups")
    if not isinstance(band_len, int) or isinstance(band_len, bool) or band_len < 0:
        raise ValueError(f"{name}: band_len must be an int >= 0, got {band_len!r}")
    if band_start is None:
        if band_len:
            raise ValueError(f"{name}: band_len={band_len} given without band_start")
    else:
        check_index(name, "band_start", band_start, 1)
        if band_start.shape[0] != groups:
            raise ValueError(f"{name}: band_start {tuple(band_start.shape)} must have one start per group ({groups})")
        if band_len <= 0:
            raise ValueError(f"{name}: band_start given, so band_len must be positive, got {band_len}")
    num_keys = key_idx.shape[3] + band_len
    if num_keys == 0:
        raise ValueError(f"{name}: each group needs at least one key; key_idx has none and there is no band")
    if num_keys > k.shape[2]:
        raise ValueError(f"{name}: {num_keys} keys per group but the KV cache holds only {k.shape[2]}")
    if o_cache is not None:
        if not isinstance(o_cache, torch.Tensor):
            raise TypeError(f"{name}: o_cache must be a torch.Tensor or None, got {type(o_cache).__name__}")
        if o_cache.shape != q.shape:
            raise ValueError(f"{name}: o_cache {tuple(o_cache.shape)} must have q's shape {tuple(q.shape)} "
                             "(upsample it to this scale first)")
        _check_cache_layout(name, o_cache, q.dtype)
    check_device(name, q, k=k, v=v, key_idx=key_idx, band_start=band_start, o_cache=o_cache)


def check_key_values(key_idx: torch.Tensor, kv_len: int, band_start: torch.Tensor | None = None, band_len: int = 0) -> None:
    """Value checks needing a device sync (positions inside the KV cache); for tests and debugging."""
    if key_idx.numel() and (int(key_idx.min()) < 0 or int(key_idx.max()) >= kv_len):
        raise ValueError(f"key_idx holds positions outside [0, {kv_len}): [{int(key_idx.min())}, {int(key_idx.max())}]")
    if band_start is not None and (int(band_start.min()) < 0 or int(band_start.max()) + band_len > kv_len):
        raise ValueError(f"bands [band_start, band_start + {band_len}) leave the KV cache of {kv_len} keys")


# ------------------------------------------------------------------------------------------------ launches
# contiguous key ranges per group the kernel reads after the gathered keys: the sinks and one band per scale after
# the decision (HART-0.7b at 1024²: sinks + 3 bands at scale 13)
MAX_BANDS = 4


def _launch_cs4a(q, k, v, key_idx, group_size, extra, negate, band_starts, band_lens, scale, extra_out=None,
                 group_map=None, cache_grid=None, grid_hw=None, out=None):
    """out = (-1 if negate else 1) * attention + extra; with extra_out (from attention_output_like(q): the kernel
    writes it with out's strides) also extra_out = extra in extra_out's dtype. out: None (a new
    attention_output_like(q)) or such a tensor made by the caller (on another stream than the launch's).

    Group g's keys: key_idx[b, h, group_map[g] if group_map is not None else g, :], then for each i the band_lens[i]
    keys from band_starts[i, g] (band_starts (len(band_lens), G) int32). With cache_grid (and this scale's grid_hw),
    extra is on cache_grid and is interpolated bilinearly to each query (sparvar.cs4a.upsample_cache)."""
    require_triton("cs4a_attention")
    b, h, q_len, d = q.shape
    out = attention_output_like(q) if out is None else out
    block_m = query_tile(group_size)
    e = out if extra is None else extra
    lens = (*band_lens, *(0,) * MAX_BANDS)[:MAX_BANDS]
    (src_h, src_w), dst_w = cache_grid or (1, 1), (grid_hw[1] if grid_hw else 1)
    args = (q, k, v, out, key_idx, out if group_map is None else group_map, out if band_starts is None else band_starts,
            e, out if extra_out is None else extra_out,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            key_idx.stride(0), key_idx.stride(1), key_idx.stride(2), e.stride(0), e.stride(1), e.stride(2),
            0 if band_starts is None else band_starts.stride(0),
            h, q_len, key_idx.shape[3], *lens, group_size, float(scale) * LOG2E,
            src_h, src_w, dst_w, src_h / (grid_hw[0] if grid_hw else 1), src_w / dst_w)
    meta = dict(HEAD_DIM=d, BLOCK_M=block_m, NUM_BANDS=len(band_lens), GROUP_MAP=group_map is not None,
                HAS_EXTRA=extra is not None, UPSAMPLE=cache_grid is not None, NEGATE=negate,
                STORE_EXTRA=extra_out is not None)
    grid = (-(-q_len // block_m), b * h)
    if interpreting():
        _cs4a_fwd_kernel[grid](*args, **meta, BLOCK_N=32, num_warps=4, num_stages=2)
    elif autotuning():
        with launch_device(q):
            _cs4a_fwd_tuned[grid](*args, **meta)
    else:
        with launch_device(q):
            _cs4a_fwd_kernel[grid](*args, **meta, BLOCK_N=64, num_warps=8 if block_m >= 128 else 4, num_stages=3)
    return out


def cs4a_attention_raw(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_idx: torch.Tensor, group_size: int = 192,
                       o_cache: torch.Tensor | None = None, *, band_start: torch.Tensor | None = None, band_len: int = 0,
                       scale: float = 1.0) -> torch.Tensor:
    """Grouped gather attention (+ o_cache), launched directly (cs4a_attention goes through the custom op).

    q (B, H, Lq, D); k, v (B, H, Lk, D); key_idx (B, H, ceil(Lq / group_size), K) int32 absolute KV positions,
    unique within a group; band_start None or (G,) int32 starts of a contiguous band of band_len keys appended
    to each group's set; o_cache None or (B, H, Lq, D) (already at this scale) added to the output.
    """
    check_cs4a_inputs("cs4a_attention", q, k, v, key_idx, group_size, o_cache, band_start, band_len)
    check_scale("cs4a_attention", scale)
    return _launch_cs4a(q, k, v, key_idx, group_size, o_cache, False, None if band_start is None else band_start[None],
                        (band_len,) if band_start is not None else (), scale)


def cs4a_attention_from_selection_raw(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor,
                                      group_map: torch.Tensor, range_starts: torch.Tensor, range_lengths,
                                      group_size: int, o_cache: torch.Tensor | None = None, cache_grid=None, grid=None,
                                      *, scale: float = 1.0) -> torch.Tensor:
    """CS4A at a later scale straight from the decision state, in one launch (no key-set or upsampled-cache copies).

    Equals cs4a_attention_raw over key_idx = [sinks | selected[:, :, group_map[g]] | bands] plus o_cache upsampled
    from cache_grid to grid (sparvar.cs4a.cs4a_from_selection_ref composes exactly that): the kernel gathers each
    group's selection row through group_map, reads the ranges (range_starts (R, G) int32 starts of range_lengths[r]
    keys each: the sinks and each later scale's band, CS4AGeometry.range_starts / range_lengths) as contiguous keys,
    and interpolates the residual cache in its epilogue.

    selected (B, H, G_S, topk) int32; group_map (G,) int32 in [0, G_S); o_cache None or (B, H, cache_h*cache_w, D)
    on the decision grid cache_grid, q's dtype or fp32; grid: this scale's (h, w), h*w = Lq.
    Why: the composed path cost three more launches per CS4A layer and scale, with 6 MB of key sets and (2B,
    scale 12) 34 MB of upsampled cache written and read again.
    """
    name = "cs4a_attention_from_selection"
    check_qkv(name, q, k, v)
    b, h, q_len, d = q.shape
    groups = _check_group(name, q_len, group_size)
    check_index(name, "selected", selected, 4)
    if tuple(selected.shape[:2]) != (b, h) or selected.shape[3] == 0:
        raise ValueError(f"{name}: selected {tuple(selected.shape)} must be (B, H, G_S, topk) = ({b}, {h}, G_S, topk > 0)")
    check_index(name, "group_map", group_map, 1)
    if group_map.shape[0] != groups:
        raise ValueError(f"{name}: group_map {tuple(group_map.shape)} must name one decision group per query group "
                         f"({groups} = ceil({q_len} / group_size={group_size}))")
    lengths = tuple(range_lengths)
    if len(lengths) > MAX_BANDS or any(not isinstance(n, int) or isinstance(n, bool) or n <= 0 for n in lengths):
        raise ValueError(f"{name}: range_lengths must be at most {MAX_BANDS} positive ints, got {range_lengths!r}")
    check_index(name, "range_starts", range_starts, 2)
    if tuple(range_starts.shape) != (len(lengths), groups) or not range_starts.is_contiguous():
        raise ValueError(f"{name}: range_starts {tuple(range_starts.shape)} must be contiguous ({len(lengths)}, {groups}):"
                         " one start per range and query group")
    if selected.shape[3] + sum(lengths) > k.shape[2]:
        raise ValueError(f"{name}: {selected.shape[3] + sum(lengths)} keys per group but the KV cache holds only "
                         f"{k.shape[2]}")
    if grid is None or len(grid) != 2 or grid[0] * grid[1] != q_len:
        raise ValueError(f"{name}: grid {grid} must be this scale's (h, w) with h * w = {q_len} queries")
    if o_cache is not None:
        if cache_grid is None or len(cache_grid) != 2 or min(cache_grid) <= 0:
            raise ValueError(f"{name}: o_cache needs its grid cache_grid = (h, w), got {cache_grid}")
        if not isinstance(o_cache, torch.Tensor) or tuple(o_cache.shape) != (b, h, cache_grid[0] * cache_grid[1], d):
            raise ValueError(f"{name}: o_cache {tuple(getattr(o_cache, 'shape', ()))} must be (B, H, cache_h * cache_w, "
                             f"D) = ({b}, {h}, {cache_grid[0] * cache_grid[1]}, {d})")
        _check_cache_layout(name, o_cache, q.dtype)
    check_scale(name, scale)
    check_device(name, q, k=k, v=v, selected=selected, group_map=group_map, range_starts=range_starts, o_cache=o_cache)
    return _launch_cs4a(q, k, v, selected, group_size, o_cache, False, range_starts if lengths else None, lengths, scale,
                        group_map=group_map, cache_grid=None if o_cache is None else tuple(cache_grid),
                        grid_hw=tuple(grid))


# (query tile, key tile, warps, stages) of cs4a_column_sums where no autotuning runs (SPARVAR_TRITON_AUTOTUNE=0);
# with autotuning (the default) the tuner picks among _COLSUM_CONFIGS for this query tile
COLUMN_SUMS_LAUNCH = (64, 128, 4, 3)


def cs4a_column_sums(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, group_size: int, *,
                     scale: float = 1.0, launch: tuple[int, int, int, int] | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, G, Lk) fp32: per query group, the sums over its queries of softmax(q k^T * scale) (rows' lse given).
    launch: (query tile, key tile, warps, stages) to launch with, bypassing the autotuner; None: the autotuner's pick
    (COLUMN_SUMS_LAUNCH without autotuning). The query tile is capped at the largest power of two dividing group_size
    (tiles never straddle groups). out: a contiguous fp32 (B, H, G, Lk) tensor to write them to (a slice of one
    buffer for every decision layer: cs4a_decide_begin_raw)."""
    name = "cs4a_column_sums"
    block_m, block_n, warps, stages = launch or COLUMN_SUMS_LAUNCH
    if (block_m not in (16, 32, 64, 128) or block_n not in (32, 64, 128, 256) or warps not in (4, 8)
            or stages not in (1, 2, 3, 4)):
        raise ValueError(f"{name}: launch must be (query tile in 16/32/64/128, key tile in 32/64/128/256, warps 4 or 8, "
                         f"stages 1-4), got {launch}")
    check_qkv(name, q, k, k)
    b, h, q_len, d = q.shape
    groups = _check_group(name, q_len, group_size)
    if not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32 or tuple(lse.shape) != (b, h, q_len):
        raise ValueError(f"{name}: lse must be a float32 ({b}, {h}, {q_len}) tensor, got "
                         f"{getattr(lse, 'dtype', type(lse).__name__)} {tuple(getattr(lse, 'shape', ()))}")
    if not lse.is_contiguous():
        raise ValueError(f"{name}: lse must be contiguous")
    check_device(name, q, k=k, lse=lse)
    require_triton(name)
    kv_len = k.shape[2]
    if out is None:
        sums = torch.empty((b, h, groups, kv_len), dtype=torch.float32, device=q.device)
    elif (not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or tuple(out.shape) != (b, h, groups, kv_len)
          or not out.is_contiguous() or out.device != q.device):
        raise ValueError(f"{name}: out must be a contiguous float32 ({b}, {h}, {groups}, {kv_len}) tensor on {q.device}, "
                         f"got {getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}")
    else:
        sums = out
    block_m = min(block_m, query_tile(group_size))
    args = (q, k, lse, sums, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            h, q_len, kv_len, group_size, groups, float(scale) * LOG2E)
    grid = lambda meta: (triton.cdiv(kv_len, meta["BLOCK_N"]), b * h)  # noqa: E731
    if interpreting():
        _column_sums_kernel[grid({"BLOCK_N": 32})](*args, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=32, num_warps=4, num_stages=2)
    elif autotuning() and launch is None:
        with launch_device(q):
            _column_sums_tuned[grid](*args, HEAD_DIM=d, BLOCK_M=block_m)
    else:
        with launch_device(q):
            _column_sums_kernel[grid({"BLOCK_N": block_n})](*args, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
                                                           num_warps=warps, num_stages=stages)
    return sums


# (radix bits, chunk width, warps) of select_topk's launch. At the decision's shape on the H200 (2B: 288 rows of
# 4,121 sums; 8B: 504), inside a CUDA graph (bench/results/small_scales_decide_h200.json), us per call:
# 1 bit per step (the kernel before) 60.4 / 75.2; 2 bits 48.7 / 59.9; 4 bits 65.4 / 86.5 (2^r compares per sum and
# step outweigh the fewer steps)
TOPK_LAUNCH = (2, 512, 4)
TOPK_RADIX_BITS = (1, 2, 4)


def select_topk(sums: torch.Tensor, topk: int, first: int = 0, *, launch: tuple[int, int, int] | None = None) -> torch.Tensor:
    """(..., topk) int32 ascending positions of the topk largest entries among positions [first, n) of each row of
    sums (..., n), float32 >= 0 (first = the sink count: sinks never compete).

    first + torch.topk(sums[..., first:], topk).indices.sort() in one kernel; among equal values at the threshold
    the lowest positions win. launch: (radix bits, chunk width, warps), TOPK_LAUNCH by default.
    """
    name = "select_topk"
    if not isinstance(sums, torch.Tensor) or sums.dtype != torch.float32 or sums.dim() < 1 or not sums.is_contiguous():
        raise ValueError(f"{name}: sums must be a contiguous float32 tensor (..., n), got "
                         f"{getattr(sums, 'dtype', type(sums).__name__)} {tuple(getattr(sums, 'shape', ()))}")
    n = sums.shape[-1]
    if not isinstance(first, int) or isinstance(first, bool) or not 0 <= first < n:
        raise ValueError(f"{name}: first must be an int in [0, {n}), got {first!r}")
    if not isinstance(topk, int) or isinstance(topk, bool) or not 0 < topk <= n - first:
        raise ValueError(f"{name}: topk must be an int in [1, {n - first}] (positions [{first}, {n})), got {topk!r}")
    radix_bits, block, warps = launch or TOPK_LAUNCH
    if radix_bits not in TOPK_RADIX_BITS or block not in (128, 256, 512, 1024, 2048) or warps not in (1, 2, 4, 8):
        raise ValueError(f"{name}: launch must be (radix bits in {TOPK_RADIX_BITS}, chunk width a power of two in "
                         f"[128, 2048], warps in 1/2/4/8), got {launch}")
    check_device(name, sums)
    require_triton(name)
    selected = torch.empty((*sums.shape[:-1], topk), dtype=torch.int32, device=sums.device)
    rows = sums.numel() // max(n, 1)
    if rows == 0:
        return selected
    if interpreting():
        _select_topk_kernel[(rows,)](sums, selected, n, first, topk, BLOCK=min(block, 256), RADIX_BITS=radix_bits)
    else:
        with launch_device(sums):
            _select_topk_kernel[(rows,)](sums, selected, n, first, topk, BLOCK=block, RADIX_BITS=radix_bits,
                                         num_warps=warps)
    return selected


DECISION_DENSE_PASSES = ("cudnn", "triton")


def decision_dense_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0,
                        dense_pass: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decision's dense attention and each row's natural-log logsumexp (B, H, Lq) fp32 (for the column sums).

    dense_pass: "cudnn" (SDPA's cuDNN kernel, asked for its softmax statistics; output in q's dtype, laid out like
    q) or "triton" (our flash kernel; fp32 output). None: cuDNN for CUDA tensors, ours in the Triton interpreter.
    Why cuDNN: at 2B scale 10 it takes 0.235 ms against our kernel's 0.305 (bench/results/attention_h200.json), and
    the decision runs in 11 layers. Its bf16 output rounds O_dense before O_cache = O_dense - O_sparse; that costs
    one bf16 rounding of O_dense in absolute terms, which the decision's own output (O_dense in bf16) has anyway.
    """
    if dense_pass is None:
        dense_pass = "triton" if interpreting() or not q.is_cuda else "cudnn"
    if dense_pass == "triton":
        return dense_attention(q, k, v, scale=scale, return_lse=True, out_dtype=torch.float32)
    if dense_pass != "cudnn":
        raise ValueError(f"decision_dense_pass: unknown dense_pass {dense_pass!r}; expected one of {DECISION_DENSE_PASSES}")
    if not q.is_cuda:
        raise RuntimeError("decision_dense_pass: 'cudnn' needs CUDA tensors; q is on " + str(q.device))
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                   scale=scale)[:2]
    # torch allocates the statistics (B, H, Lq, 1), or token-major and transposed for some layouts
    return out, lse.reshape(q.shape[:3]).contiguous()


def cs4a_decide_raw(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int = 192, topk: int = 784,
                    sink_len: int = 0, *, scale: float = 1.0,
                    dense_pass: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decision scale: (out = dense attention, selected (B, H, G, topk) int32 ascending, o_cache = out - sparse).

    dense_pass: the kernel of the dense pass (decision_dense_pass; None = the default rule there).

    sink_len: KV positions [0, sink_len) are in every key set and never compete: the top-k is taken among
    [sink_len, Lk) and the residual subtracts attention over [sinks | selected] (sparvar.cs4a.cs4a_decide_ref).
    """
    name = "cs4a_decide"
    check_qkv(name, q, k, v)
    _check_group(name, q.shape[2], group_size)
    kv_len = k.shape[2]
    if not isinstance(sink_len, int) or isinstance(sink_len, bool) or not 0 <= sink_len < kv_len:
        raise ValueError(f"{name}: sink_len must be an int in [0, {kv_len}) (the KV length), got {sink_len!r}")
    if not isinstance(topk, int) or isinstance(topk, bool) or not 0 < topk <= kv_len - sink_len:
        raise ValueError(f"{name}: topk must be an int in [1, {kv_len - sink_len}] (the KV length {kv_len} minus "
                         f"{sink_len} sinks), got {topk!r}")
    check_scale(name, scale)
    check_device(name, q, k=k, v=v)
    dense, lse = decision_dense_pass(q, k, v, scale, dense_pass)
    # an fp32 O_dense (our kernel's) is rounded to q's dtype, the decision's output, by the residual kernel
    out = dense if dense.dtype == q.dtype else attention_output_like(q)
    return out, *_selection_and_cache(q, k, v, dense, lse, group_size, topk, sink_len, scale,
                                      extra_out=None if out is dense else out)


def _selection_and_cache(q, k, v, dense, lse, group_size, topk, sink_len, scale, extra_out=None):
    """The decision after its dense pass: the top-k selection per group and O_cache = O_dense - attention over it
    (with extra_out, the residual kernel also writes O_dense there in extra_out's dtype)."""
    sums = cs4a_column_sums(q, k, lse, group_size, scale=scale)
    selected = select_topk(sums, topk, sink_len)
    return selected, _residual_cache(q, k, v, dense, selected, group_size, sink_len, scale, extra_out)


def _sink_band(sink_len: int, groups: int, device) -> torch.Tensor | None:
    """The residual kernel's band starts for the sinks: each group's set gets the contiguous band [0, sink_len)
    (no concatenated index copy); None without sinks."""
    return torch.zeros((1, groups), dtype=torch.int32, device=device) if sink_len else None


def _residual_cache(q, k, v, dense, selected, group_size, sink_len, scale, extra_out=None, out=None,
                    band_starts=None):
    """O_cache = O_dense - attention over [sinks | selected] (with extra_out, also O_dense in extra_out's dtype).
    out, band_starts (_sink_band): made by the caller when it launches several (cs4a_decide_end_raw), made here
    otherwise."""
    if band_starts is None:
        band_starts = _sink_band(sink_len, selected.shape[2], q.device)
    return _launch_cs4a(q, k, v, selected, group_size, dense, True, band_starts, (sink_len,) if sink_len else (),
                        scale, extra_out=extra_out, out=out)


def cs4a_decide_begin_raw(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int, sums_out: torch.Tensor,
                          *, scale: float = 1.0, dense_pass: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decision of one layer, in two halves so that the top-k of every decision layer runs as one launch.

    This first half: the dense pass (returns `out`, the layer's attention output in q's dtype, and `dense`, what
    the residual subtracts from: out itself, or our kernel's fp32 output) and the column sums, written into
    sums_out (B, H, G, Lk) fp32, this layer's slice of a (layers, B, H, G, Lk) buffer. cs4a_decide_end_raw then
    takes the whole buffer. Per layer, the two halves compute what cs4a_decide_raw does, bit for bit with the
    cuDNN dense pass (the default on a GPU). With our fp32 dense pass, cs4a_decide_raw's residual kernel also writes
    the rounded output (another specialisation, tuned on its own), so tuned configs may differ in the last bits.
    Why: the top-k of one layer (288 rows of 4,121 sums at 2B) is one short wave of dependent steps on 132 SMs,
    48.9 us; the 11 layers' 3,168 rows in one launch take 26.5 us per layer (bench/results/small_scales_decide_launch_h100.json)."""
    name = "cs4a_decide_begin"
    check_qkv(name, q, k, v)
    _check_group(name, q.shape[2], group_size)
    check_scale(name, scale)
    check_device(name, q, k=k, v=v)
    dense, lse = decision_dense_pass(q, k, v, scale, dense_pass)
    cs4a_column_sums(q, k, lse, group_size, scale=scale, out=sums_out)
    return (dense if dense.dtype == q.dtype else dense.to(q.dtype)), dense


def cs4a_decide_end_raw(layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                        sums: torch.Tensor, group_size: int, topk: int, sink_len: int = 0, *,
                        scale: float = 1.0, lanes: tuple = ()) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The second half of the decision (cs4a_decide_begin_raw), for every decision layer at once: one top-k launch
    over sums (L, B, H, G, Lk), then each layer's residual cache. layers: (q, k, v, dense) per layer, in the order
    of sums' first dim. Returns (selected (B, H, G, topk) int32 ascending, o_cache) per layer.

    lanes: CUDA streams on the tensors' device besides the current one. The residual launches (independent of
    each other) are dealt round-robin over the current stream and these, which wait for the top-k first; the
    current stream waits for all of them before this returns, so what it runs next (and a CUDA-graph capture)
    sees every output, and the inputs may be freed after. Every output is allocated on the current stream.
    Why: one residual launch is 800 programs at 2B (25 query tiles x 32 batch-heads), 3.03 waves of 264 resident
    programs, so its last wave runs 8 programs on an otherwise idle GPU; launched side by side, the next launch's
    programs fill it. The values are those of the launches one after the other, bit for bit (the same kernels)."""
    name = "cs4a_decide_end"
    if not isinstance(sums, torch.Tensor) or sums.dim() != 5 or sums.shape[0] != len(layers):
        raise ValueError(f"{name}: sums must be (L, B, H, G, Lk) with L = {len(layers)} layers, got "
                         f"{tuple(getattr(sums, 'shape', ()))}")
    kv_len = sums.shape[-1]
    if not isinstance(sink_len, int) or isinstance(sink_len, bool) or not 0 <= sink_len < kv_len:
        raise ValueError(f"{name}: sink_len must be an int in [0, {kv_len}) (the KV length), got {sink_len!r}")
    for i, (q, k, v, dense) in enumerate(layers):
        check_qkv(name, q, k, v)
        if not isinstance(dense, torch.Tensor):
            raise ValueError(f"{name}: layer {i}'s dense output must be a tensor, got {type(dense).__name__}")
        check_device(name, q, k=k, v=v, dense=dense, sums=sums)
        groups = _check_group(name, q.shape[2], group_size)
        if k.shape[2] != kv_len or tuple(sums.shape[1:4]) != (*q.shape[:2], groups):
            raise ValueError(f"{name}: layer {i}'s q {tuple(q.shape)} in {groups} groups of {group_size} and k "
                             f"{tuple(k.shape)} do not match the column sums {tuple(sums.shape)} (L, B, H, G, Lk)")
        if dense.shape != q.shape or dense.dtype not in (q.dtype, torch.float32) or dense.stride(-1) != 1:
            raise ValueError(f"{name}: layer {i}'s dense output must have q's shape {tuple(q.shape)}, q's dtype or "
                             f"float32 and a contiguous head dim; got {dense.dtype} {tuple(dense.shape)} strides "
                             f"{dense.stride()}")
    check_scale(name, scale)
    if isinstance(lanes, torch.cuda.Stream) or not isinstance(lanes, (tuple, list)):
        raise ValueError(f"{name}: lanes must be a tuple of CUDA streams, got {type(lanes).__name__}")
    for lane in lanes:
        if not isinstance(lane, torch.cuda.Stream) or not sums.is_cuda or lane.device != sums.device:
            raise ValueError(f"{name}: lanes must be CUDA streams on the tensors' device {sums.device}, got "
                             f"{getattr(lane, 'device', type(lane).__name__)}")
    selected = select_topk(sums, topk, sink_len)  # checks topk against [sink_len, Lk)
    lanes = tuple(lanes)[:len(layers) - 1]  # more streams than launches would only fork and join empty ones
    band_starts = _sink_band(sink_len, sums.shape[3], sums.device)  # one for every layer, on the current stream
    # None: the current stream as it is (torch.cuda.stream(None) changes nothing; CPU tensors under the interpreter)
    current = torch.cuda.current_stream(sums.device) if lanes else None
    outs = [attention_output_like(q) for q, _, _, _ in layers]  # on the current stream: they outlive the lanes
    for lane in lanes:
        lane.wait_stream(current)  # the top-k's selection (and the outputs' allocation) first
    streams = (current, *lanes)
    for i, (q, k, v, dense) in enumerate(layers):
        with torch.cuda.stream(streams[i % len(streams)]):
            _residual_cache(q, k, v, dense, selected[i], group_size, sink_len, scale, out=outs[i],
                            band_starts=band_starts)
    for lane in lanes:
        current.wait_stream(lane)  # joined before return: no lane still reads an input or writes an output
    return [(selected[i], outs[i]) for i in range(len(layers))]


UPSAMPLE_TILE = 32  # tokens per upsample program (x HEAD_DIM channels)


def upsample_cache(o_cache: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """sparvar.cs4a.upsample_cache (bilinear, align_corners=False, fp32 sums, one rounding) in one Triton pass:
    (B, H, hs*ws, D) raster tokens, any strides with D contiguous -> contiguous (B, H, hd*wd, D).

    Why: torch's channels-last upsample_bilinear2d took 90 / 158 us per CS4A layer at 2B scales 11 / 12 on the
    H200 (profile_h200.json) for a 17 / 34 MB output, about 15x its memory floor."""
    name = "upsample_cache"
    require_triton(name)
    if not isinstance(o_cache, torch.Tensor) or o_cache.dim() != 4:
        raise ValueError(f"{name}: o_cache must be a 4-D (B, H, L, D) tensor, got "
                         f"{tuple(o_cache.shape) if isinstance(o_cache, torch.Tensor) else type(o_cache).__name__}")
    b, h, length, d = o_cache.shape
    (hs, ws), (hd, wd) = (tuple(int(n) for n in g) for g in (src_grid, dst_grid))
    if length != hs * ws:
        raise ValueError(f"{name}: o_cache has {length} tokens, grid {(hs, ws)} has {hs * ws}")
    if min(hs, ws, hd, wd) <= 0:
        raise ValueError(f"{name}: grids must be positive, got {(hs, ws)} -> {(hd, wd)}")
    if d not in HEAD_DIMS or o_cache.stride(3) != 1:
        raise ValueError(f"{name}: head dim must be one of {HEAD_DIMS} and contiguous, got {d} with strides "
                         f"{o_cache.stride()}")
    if o_cache.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{name}: o_cache must be bfloat16, float16 or float32, got {o_cache.dtype}")
    check_device(name, o_cache, hint="use sparvar.cs4a.upsample_cache elsewhere")
    out = torch.empty((b, h, hd * wd, d), dtype=o_cache.dtype, device=o_cache.device)
    grid = (triton.cdiv(hd * wd, UPSAMPLE_TILE), b * h)
    with launch_device(o_cache):
        _upsample_cache_kernel[grid](o_cache, out, h, hs, ws, hd, wd, hs / hd, ws / wd,
                                     o_cache.stride(0), o_cache.stride(1), o_cache.stride(2),
                                     out.stride(0), out.stride(1), out.stride(2),
                                     HEAD_DIM=d, BLOCK_T=UPSAMPLE_TILE, num_warps=4)
    return out


# ------------------------------------------------------------------------------------------------ custom ops
def cs4a_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_idx: torch.Tensor, group_size: int = 192,
                   o_cache: torch.Tensor | None = None, *, band_start: torch.Tensor | None = None, band_len: int = 0,
                   scale: float = 1.0) -> torch.Tensor:
    """cs4a_attention_raw through the sparvar::triton_cs4a_attention op (same arguments)."""
    return torch.ops.sparvar.triton_cs4a_attention(q, k, v, key_idx, o_cache, band_start, group_size, band_len, scale)


def cs4a_decide(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int = 192, topk: int = 784,
                sink_len: int = 0, *, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cs4a_decide_raw through the sparvar::triton_cs4a_decide op."""
    return torch.ops.sparvar.triton_cs4a_decide(q, k, v, group_size, topk, sink_len, scale)


@torch.library.custom_op("sparvar::triton_cs4a_attention", mutates_args=())
def _cs4a_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_idx: torch.Tensor, o_cache: torch.Tensor | None,
             band_start: torch.Tensor | None, group_size: int, band_len: int, scale: float) -> torch.Tensor:
    return cs4a_attention_raw(q, k, v, key_idx, group_size, o_cache, band_start=band_start, band_len=band_len, scale=scale)


@_cs4a_op.register_fake
def _(q, k, v, key_idx, o_cache, band_start, group_size, band_len, scale):
    return attention_output_like(q)


def cs4a_attention_from_selection(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor,
                                  geometry, o_cache: torch.Tensor | None = None, cache_grid=None, grid=None, *,
                                  scale: float = 1.0) -> torch.Tensor:
    """cs4a_attention_from_selection_raw for a sparvar.cs4a.CS4AGeometry on q's device, through the
    sparvar::triton_cs4a_from_selection op."""
    want = (geometry.num_decision_groups, geometry.topk)
    if not isinstance(selected, torch.Tensor) or selected.dim() != 4 or tuple(selected.shape[2:]) != want:
        raise ValueError(f"cs4a_attention_from_selection: the selection {tuple(getattr(selected, 'shape', ()))} must be "
                         f"(B, H, {want[0]}, {want[1]}): the geometry's decision groups and top-k")
    return torch.ops.sparvar.triton_cs4a_from_selection(
        q, k, v, selected, geometry.selected_group, geometry.range_starts, list(geometry.range_lengths),
        geometry.group_size, o_cache, None if cache_grid is None else list(cache_grid), list(grid), scale)


@torch.library.custom_op("sparvar::triton_cs4a_from_selection", mutates_args=())
def _cs4a_from_selection_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor,
                            group_map: torch.Tensor, range_starts: torch.Tensor, range_lengths: list[int],
                            group_size: int, o_cache: torch.Tensor | None, cache_grid: list[int] | None,
                            grid: list[int], scale: float) -> torch.Tensor:
    return cs4a_attention_from_selection_raw(q, k, v, selected, group_map, range_starts, range_lengths, group_size,
                                             o_cache, cache_grid, grid, scale=scale)


@_cs4a_from_selection_op.register_fake
def _(q, k, v, selected, group_map, range_starts, range_lengths, group_size, o_cache, cache_grid, grid, scale):
    return attention_output_like(q)


@torch.library.custom_op("sparvar::triton_cs4a_decide", mutates_args=())
def _cs4a_decide_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int, topk: int, sink_len: int,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return cs4a_decide_raw(q, k, v, group_size, topk, sink_len, scale=scale)


@_cs4a_decide_op.register_fake
def _(q, k, v, group_size, topk, sink_len, scale):
    b, h, q_len, _ = q.shape
    groups = -(-q_len // group_size)
    return (attention_output_like(q),
            q.new_empty((b, h, groups, topk), dtype=torch.int32),
            attention_output_like(q))


# ------------------------------------------------------------------------------------------------ references
def band_indices(band_start: torch.Tensor, band_len: int, batch: int, heads: int) -> torch.Tensor:
    """(B, H, G, band_len) int32 absolute positions of each group's band."""
    from sparvar.cs4a import Band

    band = Band(band_start, band_len).indices()
    return band.expand(batch, heads, *band.shape)


def reference_cs4a_attention(q, k, v, key_idx, group_size: int = 192, o_cache=None, *, band_start=None,
                             band_len: int = 0, scale: float = 1.0) -> torch.Tensor:
    """Plain-torch fp32 result of cs4a_attention (sparvar.cs4a.cs4a_attention_ref with the band appended)."""
    from sparvar.cs4a import cs4a_attention_ref

    if band_start is not None:
        key_idx = torch.cat([key_idx, band_indices(band_start, band_len, *q.shape[:2]).to(key_idx.device)], dim=-1)
    return cs4a_attention_ref(q.float() * scale, k, v, key_idx, group_size, o_cache).to(q.dtype)


def reference_cs4a_decide(q, k, v, group_size: int = 192, topk: int = 784, sink_len: int = 0, scale: float = 1.0):
    """Plain-torch fp32 result of cs4a_decide (sparvar.cs4a.cs4a_decide_ref)."""
    from sparvar.cs4a import cs4a_decide_ref

    out, selected, o_cache = cs4a_decide_ref(q.float() * scale, k, v, group_size, topk, sink_len)
    return out.to(q.dtype), selected, o_cache.to(q.dtype)


def reference_column_sums(q, k, group_size: int, scale: float = 1.0) -> torch.Tensor:
    """(B, H, G, Lk) fp32 column sums of the softmax probabilities per query group, in plain torch."""
    b, h, q_len, _ = q.shape
    groups = -(-q_len // group_size)
    probs = (q.float() * scale @ k.float().transpose(-1, -2)).softmax(dim=-1)  # (B, H, Lq, Lk)
    group_of_row = torch.arange(q_len, device=q.device) // group_size
    sums = probs.new_zeros(b, h, groups, k.shape[2])
    return sums.index_add_(2, group_of_row, probs)


# ------------------------------------------------------------------------------------------------ benchmark entry
def benchmark(batch: int = 2, heads: int = 16, head_dim: int = 128, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Time cs4a_attention at 1024^2 scale 12 (2,128 keys per group) against SDPA cuDNN (one quick comparison)."""
    from triton.testing import do_bench

    from sparvar.attention import dense_attention as sdpa_dense
    from sparvar.schedule import get_schedule
    from sparvar.sparse import default_policy

    schedule = get_schedule(1024)
    policy = default_policy("infinity-2b", schedule)
    scale = schedule.num_scales - 1
    geometry = policy.cs4a_geometry(schedule, scale).to("cuda")
    q_len, kv_len = schedule.lengths[scale], schedule.kv_len(scale)
    decision_kv = schedule.kv_len(policy.decision_scale)
    selected = torch.rand(batch, heads, geometry.num_decision_groups, decision_kv, device="cuda").topk(
        geometry.topk, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    key_idx = geometry.key_indices(selected)
    q = torch.randn(batch, heads, q_len, head_dim, device="cuda", dtype=dtype) * head_dim**-0.5
    k, v = (torch.randn(batch, heads, kv_len, head_dim, device="cuda", dtype=dtype) for _ in range(2))
    ms = do_bench(lambda: cs4a_attention(q, k, v, key_idx, policy.cs4a_group_size), return_mode="median")
    ms_cudnn = do_bench(lambda: sdpa_dense(q, k, v, "cudnn"), return_mode="median")
    return dict(keys_per_group=key_idx.shape[-1], cs4a_ms=ms, cudnn_ms=ms_cudnn, speedup=ms_cudnn / ms)


if __name__ == "__main__":
    print(benchmark())
