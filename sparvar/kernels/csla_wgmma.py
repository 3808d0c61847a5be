"""CSLA block-sparse attention for Hopper, written in Gluon: persistent, and the next tile's QK^T under this tile's
softmax.

Same semantics and inputs as the Triton kernel in csla.py (block-granular layouts; its reference is
csla.reference_csla_attention), for 64-row query tiles of 64 keys. Why a second kernel: Nsight Compute showed the
Triton kernel's tensor pipe ~40% busy at two CTAs per SM (bench/results/ncu_sparse_kernels_2b_h100.json). A query
block of the engine's layouts has ~20 key tiles, so each Triton program spends a large share of its life starting
(its q and first K/V tiles fetched with nothing to overlap) and its compiled loop waits for each tile's QK^T
before that tile's softmax. This kernel:

  - is persistent over query blocks: each program owns one (batch row, head) and every P-th query block of the
    launch order (P programs per head, about two per SM in all), so its tensor descriptors are made once, and the
    K/V tiles of its next query block are already loading while it finishes the current one;
  - streams K/V tiles by TMA through a ring of STAGES shared-memory buffers, each with an mbarrier the copy
    signals; the stream runs across query blocks, STAGES-2 tiles ahead of the consumer (tile t's buffer is refilled
    with tile t+STAGES as soon as t's PV wgmma is known done);
  - keeps q in registers (the QK^T wgmma's A operand), so q's one shared buffer only stages the next query block's
    q, loaded by TMA while the current block runs; the output goes straight from registers to memory;
  - per key tile j: issues S(j+1) = q K(j+1)^T as an asynchronous wgmma, then the online softmax of S(j), then
    O += P(j) V(j) with P from registers, and only then waits for S(j+1) (FlashAttention-3's in-warpgroup overlap).

Only the last tile of a query block can be partial (indices ascend), and only that tile is masked. A query block
listing no key block gives NaN (an empty softmax), as the Triton kernel does (its ring still loads one tile for it,
so the stream's count stays one per listed block, at least one per query block). Gluon does not run under
TRITON_INTERPRET: the CPU tests compile the kernel for sm_90 (tests/test_kernels_cpu.py), the GPU tests compare it
with the reference.

Measured at 8d7ea33 (bench/results/csla_variants_wgmma_h100_8d7ea33.json), before it was persistent: one program per
query block (descriptors made per program, q through shared memory) ran 0.92x the Triton kernel at 2B/8B's
layouts, no faster than Triton's own TMA variant (0.93x); 128-row tiles of two query blocks over the union of their
key blocks (half the K/V loads for ~1.11x the MMA work) ran 0.77x.
"""
from __future__ import annotations

import torch

from sparvar.kernels.csla import HAS_TRITON, LOG2E, _ensure_allocator, interpreting, launch_device

try:  # Gluon ships with Triton >= 3.5; without it the wrapper says what is missing
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma, warpgroup_mma_init,
                                                                  warpgroup_mma_wait)

    HAS_GLUON = HAS_TRITON
except ImportError:  # pragma: no cover - depends on the environment
    HAS_GLUON = False

WGMMA_TILES = ((64, 64),)  # 64 rows: one warpgroup's m64 wgmma; 64 keys keep S(j), S(j+1), O, P and q in registers
WGMMA_HEAD_DIMS = (64, 128)
STAGES = {64: 4, 128: 3}  # K/V ring depth per head dim: 112 KB of shared memory at 128 (two CTAs per SM), 72 at 64
CTAS_PER_SM = 2  # what the shared memory holds at head dim 128; the grid is sized to this many per SM


def wgmma_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int) -> bool:
    """Whether csla_wgmma_forward can run these (already checked) tensors: Gluon present, a Hopper GPU, a tile of
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
    def _softmax_tile(s, m_i, l_i, qk_scale, valid, MASK: gl.constexpr):
        """The online softmax of one score tile (log2 units): its probabilities, the factor rescaling what came
        before, and the running row max and sum. With MASK, keys where `valid` (broadcast to the tile) is False get
        no weight."""
        if MASK:
            s = gl.where(valid, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_i

    @gluon.jit
    def _query_block(QOrder, pos, USE_ORDER: gl.constexpr):
        if USE_ORDER:  # heaviest query blocks first: every program's first blocks are its heaviest
            return gl.load(QOrder + pos)
        return pos

    @gluon.jit
    def _produce(cur, item, tile, count, row, n_items, prog, nprog, k_desc, v_desc, k_smem, v_smem, kv_bars,
                 KVNumBlocks, KVIndices, QOrder, stride_idx, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                 USE_ORDER: gl.constexpr):
        """Load the stream's tile `cur` (tile `tile` of this program's query block number `item`, whose layout row
        is `row` and whose tile count is `count`) into ring buffer cur % STAGES, if the stream has it; return the
        cursor advanced by one tile (to the next query block's first tile after the last of this one)."""
        ok = item < n_items
        block = gl.load(row + tile, mask=ok & (tile < gl.maximum(count, 0)), other=0)
        bar = kv_bars.index(cur % STAGES)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=ok)
        tma.async_copy_global_to_shared(k_desc, [block * BLOCK_N, 0], bar, k_smem.index(cur % STAGES), pred=ok)
        tma.async_copy_global_to_shared(v_desc, [block * BLOCK_N, 0], bar, v_smem.index(cur % STAGES), pred=ok)
        tile += 1
        if tile >= gl.maximum(count, 1):  # a block listing nothing still streams one tile (see the module doc)
            item += 1
            tile = 0
            nxt_ok = item < n_items
            qb = _query_block(QOrder, prog + gl.minimum(item, n_items - 1) * nprog, USE_ORDER)  # in range past the end
            row = KVIndices + qb * stride_idx
            count = gl.load(KVNumBlocks + qb, mask=nxt_ok, other=1)
        return cur + 1, item, tile, count, row

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
        USE_ORDER: gl.constexpr, EVEN_N: gl.constexpr,
    ):
        gl.static_assert(BLOCK_M == 64, "one warpgroup per 64 query rows")
        gl.static_assert(STAGES >= 3, "the ring refills tile t's buffer after tile t+1's was waited on")
        dtype: gl.constexpr = Q.dtype.element_ty
        # wgmma accumulators: S (BLOCK_M, BLOCK_N) and O (BLOCK_M, HEAD_DIM), one warpgroup along M; q and P are the
        # A operands of their wgmmas straight from registers (k_width 2: 16-bit elements)
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        q_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        q_tile: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
        kv_tile: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)

        prog = gl.program_id(0)
        nprog = gl.num_programs(0)
        pid_bh = gl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        n_items = gl.cdiv(gl.cdiv(q_len, BLOCK_M) - prog, nprog)  # query blocks prog, prog + nprog, ... (>= 1)
        # per (b, h) 2-D descriptors, made once: rows past q_len / kv_len read as zeros
        q_desc = tma.make_tensor_descriptor(Q + b * stride_qb + h * stride_qh, shape=[q_len, HEAD_DIM],
                                            strides=[stride_qm, 1], block_shape=[BLOCK_M, HEAD_DIM], layout=q_tile)
        k_desc = tma.make_tensor_descriptor(K + b * stride_kb + h * stride_kh, shape=[kv_len, HEAD_DIM],
                                            strides=[stride_kn, 1], block_shape=[BLOCK_N, HEAD_DIM], layout=kv_tile)
        v_desc = tma.make_tensor_descriptor(V + b * stride_vb + h * stride_vh, shape=[kv_len, HEAD_DIM],
                                            strides=[stride_vn, 1], block_shape=[BLOCK_N, HEAD_DIM], layout=kv_tile)
        out_base = Out + b * stride_ob + h * stride_oh
        o_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        o_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))

        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_tile)  # the next query block's q
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_tile)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_tile)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kv_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(kv_bars.index(i), count=1)

        q_block = _query_block(QOrder, prog, USE_ORDER)
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_block * BLOCK_M, 0], q_bar, q_smem)
        # the K/V stream's producer cursor: its next tile, and that tile's query block (number, tile, count, row)
        p_cur = 0
        p_item = 0
        p_tile = 0
        p_count = gl.load(KVNumBlocks + q_block)
        p_row = KVIndices + q_block * stride_idx
        for i in gl.static_range(STAGES):  # the ring's first fill
            p_cur, p_item, p_tile, p_count, p_row = _produce(
                p_cur, p_item, p_tile, p_count, p_row, n_items, prog, nprog, k_desc, v_desc, k_smem, v_smem,
                kv_bars, KVNumBlocks, KVIndices, QOrder, stride_idx, BLOCK_N, STAGES, USE_ORDER)

        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        o_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        t = 0  # the consumer's place in the K/V stream
        for item in range(0, n_items):
            q_block = _query_block(QOrder, prog + item * nprog, USE_ORDER)
            num = gl.load(KVNumBlocks + q_block)
            n = gl.maximum(num, 1)
            idx_row = KVIndices + q_block * stride_idx
            mbarrier.wait(q_bar, item & 1)
            q = q_smem.load(q_layout)
            gl.thread_barrier()  # every warp holds its q: the buffer takes the next block's
            nxt = item + 1 < n_items
            mbarrier.expect(q_bar, q_desc.block_type.nbytes, pred=nxt)
            tma.async_copy_global_to_shared(q_desc, [_query_block(QOrder, prog + gl.minimum(item + 1, n_items - 1) * nprog,
                                                                  USE_ORDER) * BLOCK_M, 0], q_bar, q_smem, pred=nxt)

            m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
            l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
            o_acc = warpgroup_mma_init(o_zero)
            mbarrier.wait(kv_bars.index(t % STAGES), (t // STAGES) & 1)
            s_acc = warpgroup_mma(q, k_smem.index(t % STAGES).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=[s_acc])
            for j in range(0, n - 1):  # every tile but the last (the only one that can be partial)
                mbarrier.wait(kv_bars.index((t + 1) % STAGES), ((t + 1) // STAGES) & 1)
                s_acc = warpgroup_mma(q, k_smem.index((t + 1) % STAGES).permute((1, 0)), s_zero, use_acc=False,
                                      is_async=True)
                p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, qk_scale, s_zero, False)
                o = warpgroup_mma_wait(1, deps=[o_acc])  # PV(t-1) done (issued before S(t+1)); S(t+1) may run on
                if j > 0:  # tile t-1's buffer is free (at j = 0 that tile was the previous block's, refilled there)
                    gl.thread_barrier()  # every warp's PV(t-1) done before one thread issues the copy
                    p_cur, p_item, p_tile, p_count, p_row = _produce(
                        p_cur, p_item, p_tile, p_count, p_row, n_items, prog, nprog, k_desc, v_desc, k_smem,
                        v_smem, kv_bars, KVNumBlocks, KVIndices, QOrder, stride_idx, BLOCK_N, STAGES, USE_ORDER)
                o = o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
                o_acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(t % STAGES), o,
                                      is_async=True)
                s = warpgroup_mma_wait(1, deps=[s_acc])  # S(t+1) done; PV(t) may still run
                t += 1

            keys = gl.load(idx_row + n - 1) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, qk_scale, gl.expand_dims(keys < kv_len, 0), not EVEN_N)
            o = warpgroup_mma_wait(0, deps=[o_acc])
            if n > 1:  # PV(t-1), this block's, done: its buffer is free
                gl.thread_barrier()
                p_cur, p_item, p_tile, p_count, p_row = _produce(
                    p_cur, p_item, p_tile, p_count, p_row, n_items, prog, nprog, k_desc, v_desc, k_smem, v_smem,
                    kv_bars, KVNumBlocks, KVIndices, QOrder, stride_idx, BLOCK_N, STAGES, USE_ORDER)
            o = o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            o_acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(t % STAGES), o,
                                  is_async=True)
            o = warpgroup_mma_wait(0, deps=[o_acc])
            gl.thread_barrier()  # PV(t) done in every warp: tile t's buffer is free
            p_cur, p_item, p_tile, p_count, p_row = _produce(
                p_cur, p_item, p_tile, p_count, p_row, n_items, prog, nprog, k_desc, v_desc, k_smem, v_smem,
                kv_bars, KVNumBlocks, KVIndices, QOrder, stride_idx, BLOCK_N, STAGES, USE_ORDER)
            t += 1
            l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
            l_o = gl.where(num > 0, l_o, float("nan"))  # a block listing nothing: NaN, an empty softmax
            out = (o / gl.expand_dims(l_o, 1)).to(dtype)
            rows = q_block * BLOCK_M + o_rows
            gl.store(out_base + gl.expand_dims(rows, 1) * stride_om + gl.expand_dims(o_cols, 0), out,
                     mask=gl.expand_dims(rows < q_len, 1))

        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(kv_bars.index(i))


def csla_wgmma_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                       kv_indices: torch.Tensor, block_m: int, block_n: int, *, scale: float,
                       q_order: torch.Tensor | None, programs: int | None = None) -> torch.Tensor:
    """Launch the kernel on inputs csla.csla_attention_blocks checked (wgmma_usable among them): per (batch row,
    head), enough programs for CTAS_PER_SM on every SM in all (or `programs`, for tests), each taking every P-th
    query block of the launch order (q_order: heaviest first, so each program's share is about even)."""
    from sparvar.kernels.csla import attention_output_like

    b, h, q_len, d = q.shape
    kv_len = k.shape[2]
    out = attention_output_like(q)
    _ensure_allocator()  # the per-program tensor descriptors live in Triton's launch scratch
    blocks = -(-q_len // block_m)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    per_head = programs if programs is not None else CTAS_PER_SM * sms // (b * h)  # one wave: a second would double the time
    grid = (max(1, min(blocks, per_head)), b * h)
    with launch_device(q):
        _csla_wgmma_kernel[grid](
            q, k, v, out, kv_num_blocks, kv_indices, out if q_order is None else q_order,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            kv_indices.stride(0), h, q_len, kv_len, float(scale) * LOG2E,
            HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=STAGES[d], USE_ORDER=q_order is not None,
            EVEN_N=kv_len % block_n == 0, num_warps=4)
    return out
