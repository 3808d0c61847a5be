"""CSLA block-sparse attention for Hopper, written in Gluon: the next tile's QK^T runs while this tile's softmax does.

Same semantics and inputs as the Triton kernel in csla.py (block-granular layouts; its reference is
csla.reference_csla_attention), for 64-row query tiles of 64 keys. Why a second kernel: Nsight Compute showed the
Triton kernel's tensor pipe ~40% busy at two CTAs per SM (bench/results/ncu_sparse_kernels_2b_h100.json). Its
compiled loop waits for each tile's QK^T before that tile's softmax, and for the softmax before the next QK^T, so
the tensor cores work only while the SM's other CTA is between softmaxes. FlashAttention-3's in-warpgroup overlap
breaks that chain, and Gluon lets the kernel say it where Triton's compiler does not:

  - one warpgroup (4 warps) per 64-row query tile; q, K and V reach shared memory by TMA, the K/V tiles through a
    ring of STAGES buffers, each with an mbarrier the copy signals (tensor descriptors made per program, so keys
    past kv_len and queries past q_len read as zeros, and the output store is clipped at q_len);
  - per key tile j: issue S(j+1) = q K(j+1)^T as an asynchronous wgmma, then the online softmax of S(j) in
    registers, then O += P(j) V(j) with P from registers (no shared-memory round trip for P), and only then wait
    for S(j+1): the tensor cores run QK^T of one tile under the softmax of the one before;
  - the ring's buffer of tile j-1 is refilled (tile j-1+STAGES) as soon as its PV wgmma is known done, so the
    copies run STAGES-2 tiles ahead; STAGES >= 3 (with 2 the refill would wait on the tile it is loading).

Only the last tile of a row can be partial (indices ascend), and only that tile is masked. A row listing no block
gives NaN (an empty softmax), as the Triton kernel does. Gluon does not run under TRITON_INTERPRET: the CPU tests
compile the kernel for sm_90 (tests/test_kernels_cpu.py) and the GPU tests compare it with the reference.
"""
from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from sparvar.kernels.csla import (HAS_TRITON, _ensure_allocator, attention_output_like, interpreting, launch_device,
                                  LOG2E)

try:  # Gluon ships with Triton >= 3.5; without it the wrapper says what is missing
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_init, warpgroup_mma_wait)

    HAS_GLUON = HAS_TRITON
except ImportError:  # pragma: no cover - depends on the environment
    HAS_GLUON = False

WGMMA_TILES = ((64, 64),)  # 64 rows: one warpgroup's m64 wgmma; 64 keys keep S(j), S(j+1), O and P in registers
WGMMA_HEAD_DIMS = (64, 128)
# K/V ring depth per (head dim, pairs): 112 KB of shared memory at 128 (two CTAs per SM), 72 at 64; a pair's CTA
# (8 warps, one per SM by registers) takes 32 KB of q and 5 stages, 192 KB
STAGES = {(64, False): 4, (128, False): 3, (64, True): 6, (128, True): 5}


def wgmma_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int) -> bool:
    """Whether csla_attention_wgmma can run these (already checked) tensors: Gluon present, a Hopper GPU, a tile of
    WGMMA_TILES, head dim 64 or 128, and 16-byte aligned bases and strides (what a tensor descriptor takes)."""
    if not HAS_GLUON or interpreting() or (block_m, block_n) not in WGMMA_TILES or q.shape[3] not in WGMMA_HEAD_DIMS:
        return False
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    for t in (q, k, v):
        size = t.element_size()
        if t.data_ptr() % 16 or any(st <= 0 or st * size % 16 for st in t.stride()[:3]):
            return False
    return True


if HAS_GLUON:

    @gluon.jit
    def _issue_kv(k_desc, v_desc, start_n, bar, k_buf, v_buf, pred):
        """TMA copies of one K and one V tile (keys start_n..) into a ring buffer, signalling bar when both land."""
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(k_desc, [start_n, 0], bar, k_buf, pred=pred)
        tma.async_copy_global_to_shared(v_desc, [start_n, 0], bar, v_buf, pred=pred)

    @gluon.jit
    def _softmax_tile(s, m_i, l_i, qk_scale, valid, MASK: gl.constexpr):
        """The online softmax of one score tile (log2 units): its probabilities, the factor rescaling what came
        before, and the running row max and sum. With MASK, pairs where `valid` (broadcast to the tile) is False get
        no weight, and a row with no key yet (max still -inf) gets p = alpha = 0 rather than NaN."""
        if MASK:
            s = gl.where(valid, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        m_exp = m_new
        if MASK:
            m_exp = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_exp, 1))
        alpha = gl.exp2(m_i - m_exp)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_i

    @gluon.jit
    def _halves_ok(entry, rows, PAIRS: gl.constexpr):
        """(BLOCK_M, 1) bool: which rows of a paired tile its layout entry covers (bit 24: the first 64 rows, bit
        25: the last 64; see pair_layout); every row without PAIRS."""
        if PAIRS:
            return gl.expand_dims(((entry >> (24 + rows // 64)) & 1) != 0, 1)
        return gl.expand_dims(rows >= 0, 1)

    @gluon.jit
    def _csla_wgmma_kernel(
        Q, K, V, Out, KVNumBlocks, KVIndices, QOrder,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om,
        stride_idx,
        H, q_len, kv_len, qk_scale,
        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
        USE_ORDER: gl.constexpr, EVEN_N: gl.constexpr, PAIRS: gl.constexpr = False,
    ):
        # PAIRS: a 128-row tile of two 64-row query blocks over the union of their key blocks (pair_layout), one
        # warpgroup per block; each entry's bits 24-25 say which of the two lists it, the other's rows are masked
        gl.static_assert(BLOCK_M == (128 if PAIRS else 64), "one warpgroup per 64 query rows")
        gl.static_assert(STAGES >= 3, "the ring refills tile j-1's buffer after tile j+1's was waited on")
        dtype: gl.constexpr = Q.dtype.element_ty
        WARPS: gl.constexpr = BLOCK_M // 16
        # wgmma accumulators: S (BLOCK_M, BLOCK_N) and O (BLOCK_M, HEAD_DIM), warpgroups along M; P is the A
        # operand of O's wgmma straight from registers (k_width 2: 16-bit elements)
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        q_tile: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
        kv_tile: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        BLOCK_BITS: gl.constexpr = 0xFFFFFF if PAIRS else -1  # an entry's key block, without the pair's bits

        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        if USE_ORDER:  # heaviest query blocks first: the last wave is the lightest
            q_block = gl.load(QOrder + pid_m)
        else:
            q_block = pid_m
        # per (b, h) 2-D descriptors: rows past q_len / kv_len read as zeros, and the output store stops at q_len
        q_desc = tma.make_tensor_descriptor(Q + b * stride_qb + h * stride_qh, shape=[q_len, HEAD_DIM],
                                            strides=[stride_qm, 1], block_shape=[BLOCK_M, HEAD_DIM], layout=q_tile)
        o_desc = tma.make_tensor_descriptor(Out + b * stride_ob + h * stride_oh, shape=[q_len, HEAD_DIM],
                                            strides=[stride_om, 1], block_shape=[BLOCK_M, HEAD_DIM], layout=q_tile)
        k_desc = tma.make_tensor_descriptor(K + b * stride_kb + h * stride_kh, shape=[kv_len, HEAD_DIM],
                                            strides=[stride_kn, 1], block_shape=[BLOCK_N, HEAD_DIM], layout=kv_tile)
        v_desc = tma.make_tensor_descriptor(V + b * stride_vb + h * stride_vh, shape=[kv_len, HEAD_DIM],
                                            strides=[stride_vn, 1], block_shape=[BLOCK_N, HEAD_DIM], layout=kv_tile)

        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_tile)  # q, then the output tile
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_tile)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_tile)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(kv_bars.index(i), count=1)

        idx_row = KVIndices + q_block * stride_idx
        num = gl.load(KVNumBlocks + q_block)
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_block * BLOCK_M, 0], q_bar, q_smem)
        for i in gl.static_range(STAGES):  # the ring's first fill; tile 0 always (a row of no block reads column 0)
            ok = (i < num) | (i == 0)
            block = gl.load(idx_row + i, mask=ok, other=0) & BLOCK_BITS
            _issue_kv(k_desc, v_desc, block * BLOCK_N, kv_bars.index(i), k_smem.index(i), v_smem.index(i), ok)

        rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
        o_acc = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout))
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(kv_bars.index(0), 0)
        s_acc = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=[s_acc])

        for j in range(0, num - 1):  # every tile but the last (the only one that can be partial)
            nxt = j + 1
            mbarrier.wait(kv_bars.index(nxt % STAGES), (nxt // STAGES) & 1)
            s_acc = warpgroup_mma(q_smem, k_smem.index(nxt % STAGES).permute((1, 0)), s_zero, use_acc=False,
                                  is_async=True)
            valid = _halves_ok(gl.load(idx_row + j), rows, PAIRS) if PAIRS else rows
            p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, qk_scale, valid, PAIRS)
            o = warpgroup_mma_wait(1, deps=[o_acc])  # PV(j-1) done (issued before S(j+1)); S(j+1) may still run
            # tile j-1's buffer is free once every warpgroup's PV(j-1) is: each waited for its own above, and the
            # copy is issued by one thread (explicit, not left to the compiler's own barrier placement)
            gl.thread_barrier()
            refill = j - 1 + STAGES
            ok = (j >= 1) & (refill < num)
            block = gl.load(idx_row + refill, mask=ok, other=0) & BLOCK_BITS
            stage = refill % STAGES
            _issue_kv(k_desc, v_desc, block * BLOCK_N, kv_bars.index(stage), k_smem.index(stage),
                      v_smem.index(stage), ok)
            o = o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            o_acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(j % STAGES), o,
                                  is_async=True)
            s = warpgroup_mma_wait(1, deps=[s_acc])  # S(j+1) done; PV(j) may still run

        last = gl.maximum(num - 1, 0)
        entry = gl.load(idx_row + last)
        keys = (entry & BLOCK_BITS) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        valid = gl.expand_dims(keys < kv_len, 0) & _halves_ok(entry, rows, PAIRS)
        p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, qk_scale, valid, PAIRS or not EVEN_N)
        o = warpgroup_mma_wait(0, deps=[o_acc])
        o = o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        o_acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(last % STAGES), o,
                              is_async=True)
        o = warpgroup_mma_wait(0, deps=[o_acc])
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        l_o = gl.where(num > 0, l_o, float("nan"))  # a row of no block: NaN, an empty softmax (so is a pair's half)
        out = o / gl.expand_dims(l_o, 1)

        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(kv_bars.index(i))
        q_smem.store(out.to(dtype))  # every wgmma reading q is done: its buffer stages the output
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [q_block * BLOCK_M, 0], q_smem)
        tma.store_wait(0)


def pair_layout(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, kv_len: int, block_n: int):
    """The 64-row block layout as 128-row pairs of query blocks (2i, 2i+1): per pair, the union of the two key-block
    lists, ascending, each entry the key block with bit 24 set where block 2i lists it and bit 25 where 2i+1 does;
    (counts (P,), entries (P, ceil(kv_len / block_n)), launch order heaviest first (P,)), int32 on the layout's
    device, built without a host sync (scatters, sort, gather). Why: the pair's two warpgroups share each K/V tile
    they load, ~0.56x the loads of two 64-row tiles at 1024² for ~1.11x the tiles' wgmma (scales 10-12)."""
    nq, width = kv_indices.shape
    nk = -(-kv_len // block_n)
    dev = kv_indices.device
    pairs = -(-nq // 2)
    slot = torch.arange(width, device=dev)
    valid = slot[None, :] < kv_num_blocks[:, None].long()
    row = torch.arange(nq, device=dev)[:, None]
    cell = ((row // 2) * nk + kv_indices.long().clamp(0, nk - 1)).reshape(-1)
    flags = torch.zeros(pairs * nk, dtype=torch.int32, device=dev)
    for half in (0, 1):  # a max per half: a block listed twice in a row sets its bit once, never carries into the next
        bits = torch.where(valid & (row % 2 == half), 1 << (24 + half), 0).to(torch.int32)  # padding slots: 0
        flags |= torch.zeros_like(flags).scatter_reduce_(0, cell, bits.reshape(-1), reduce="amax")
    flags = flags.view(pairs, nk)
    listed = flags != 0
    blocks = torch.arange(nk, device=dev).expand(pairs, nk)
    order = torch.sort(torch.where(listed, blocks, blocks + nk), dim=1).indices  # listed blocks first, ascending
    entries = (order | flags.gather(1, order)).to(torch.int32).contiguous()
    counts = listed.sum(dim=1).to(torch.int32)
    return counts, entries, torch.sort(counts, descending=True, stable=True).indices.to(torch.int32)


# Per kv_indices tensor (a layout's, static per scale), its pair layout: built once, beside the 64-row layout's
# launch order in csla._ORDER_CACHE. Keyed weakly on the tensor's identity (a WeakKeyDictionary would compare
# tensors with ==); the entry also holds kv_num_blocks, kv_len and block_n to check it is the same layout (layouts
# are not changed in place).
_PAIR_CACHE = WeakIdKeyDictionary()


def _pairs_of(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, kv_len: int, block_n: int):
    cached = _PAIR_CACHE.get(kv_indices)
    if cached is None or cached[0] is not kv_num_blocks or cached[1] != (kv_len, block_n):
        cached = _PAIR_CACHE[kv_indices] = (kv_num_blocks, (kv_len, block_n),
                                            pair_layout(kv_num_blocks, kv_indices, kv_len, block_n))
    return cached[2]


def csla_wgmma_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                       kv_indices: torch.Tensor, block_m: int, block_n: int, *, scale: float,
                       q_order: torch.Tensor | None, pairs: bool = False) -> torch.Tensor:
    """Launch the kernel on inputs csla.csla_attention_blocks checked (wgmma_usable among them). pairs: 128-row
    tiles of two query blocks over pair_layout (q_order then unused: the pairs have their own launch order)."""
    b, h, q_len, d = q.shape
    kv_len = k.shape[2]
    out = attention_output_like(q)
    if pairs:
        kv_num_blocks, kv_indices, q_order = _pairs_of(kv_num_blocks, kv_indices, kv_len, block_n)
        block_m *= 2
    _ensure_allocator()  # the per-program tensor descriptors live in Triton's launch scratch
    grid = (-(-q_len // block_m), b * h)
    with launch_device(q):
        _csla_wgmma_kernel[grid](
            q, k, v, out, kv_num_blocks, kv_indices, out if q_order is None else q_order,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            kv_indices.stride(0), h, q_len, kv_len, float(scale) * LOG2E,
            HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=STAGES[d, pairs], USE_ORDER=q_order is not None,
            EVEN_N=kv_len % block_n == 0, PAIRS=pairs, num_warps=block_m // 16)
    return out
