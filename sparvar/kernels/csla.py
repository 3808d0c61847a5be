"""CSLA block-sparse attention forward in Triton (also the dense flash kernel the CS4A decision runs).

One program computes one query block of BLOCK_M queries for one (batch row, head) with an online softmax
over that block's active key blocks (the layout's `kv_num_blocks` / `kv_indices`, the same for every batch
row and head; see sparvar.csla.BlockLayout). Semantics are block-granular: every key of an active block is
attended. Only the last key block may be partial (kv_len not a multiple of BLOCK_N); it is the last entry
of a row when present (indices ascend), so the loop runs the unmasked full blocks first and masks that one
block alone. The kernel tile is the layout's block shape.

q (B, H, Lq, D), k and v (B, H, Lk, D) in bf16 or fp16, any strides with the head dim contiguous (the KV
cache may be a view into a larger buffer); output (B, H, Lq, D) contiguous. Softmax scale defaults to 1:
the model's q already carries its scale.
"""
from __future__ import annotations

import math
import os
import weakref

import torch

try:  # triton is optional: the CPU package imports without it and the wrappers say what is missing
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None
    HAS_TRITON = False

DTYPES = (torch.bfloat16, torch.float16)
HEAD_DIMS = (64, 128)
TILE_SIZES = (16, 32, 64, 128)  # power-of-two tiles tl.dot accepts and the register budget allows
LOG2E = 1.4426950408889634
INT32_MAX = 2**31 - 1


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1): kernels then run on CPU tensors, for tests only."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning() -> bool:
    """SPARVAR_TRITON_AUTOTUNE=0 launches the fixed default configs (no tuning runs: faster tests, fixed choice)."""
    return not interpreting() and os.environ.get("SPARVAR_TRITON_AUTOTUNE", "1") != "0"


# ------------------------------------------------------------------------------------------------ checks
def require_triton(what: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{what} needs the `triton` package, which is not installed")


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
        if max((s - 1) * st for s, st in zip(t.shape, t.stride())) > INT32_MAX:
            raise ValueError(f"{name}: {label} spans more than 2**31 elements; int32 offsets would overflow")


def check_device(name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    if interpreting():
        if ref.device.type != "cpu":
            raise ValueError(f"{name}: under TRITON_INTERPRET=1 tensors must be on the CPU, got {ref.device}")
    elif ref.device.type != "cuda":
        raise ValueError(f"{name}: tensors must be on a CUDA device, got {ref.device} "
                         "(use the reference_* functions on the CPU)")
    for label, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name}: {label} is on {t.device}, q on {ref.device}; all inputs must share a device")


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
    def online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, valid_n, MASK_N: tl.constexpr):
        """One key tile of the online softmax: scores in log2 units, m_i the running row max (log2 units).

        k is (BLOCK_N, D) as loaded; invalid columns (MASK_N) get -inf scores. Every tile holds >= 1 valid key,
        so m_i is finite after the first tile and exp2(-inf - m) = 0 for the masked columns.
        """
        qk = tl.dot(q, tl.trans(k))
        if MASK_N:
            qk = tl.where(valid_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        return acc, l_i, m_new

    @triton.jit
    def _csla_fwd_kernel(
        Q, K, V, Out, Lse, KVNumBlocks, KVIndices, QOrder,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om,
        stride_idx,
        H, q_len, kv_len, qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DENSE: tl.constexpr, EVEN_N: tl.constexpr, USE_ORDER: tl.constexpr, STORE_LSE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        if USE_ORDER:  # heaviest query blocks first: the last wave is the lightest
            q_block = tl.load(QOrder + pid_m)
        else:
            q_block = pid_m
        offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < q_len
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        k_base = K + b * stride_kb + h * stride_kh + offs_d[None, :]
        v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :]
        idx_row = KVIndices + q_block * stride_idx

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        if DENSE:
            num = tl.cdiv(kv_len, BLOCK_N)
        else:
            num = tl.load(KVNumBlocks + q_block)
        num_full = num
        if not EVEN_N:  # the partial last key block, if this row has it, is its last entry
            if DENSE:
                num_full = num - 1
            else:
                last = tl.load(idx_row + num - 1)
                num_full = num - (last == (kv_len - 1) // BLOCK_N).to(tl.int32)

        for i in range(0, num_full):
            if DENSE:
                start_n = i * BLOCK_N
            else:
                start_n = tl.load(idx_row + i) * BLOCK_N
            keys = start_n + offs_n
            k = tl.load(k_base + keys[:, None] * stride_kn)
            v = tl.load(v_base + keys[:, None] * stride_vn)
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, keys < kv_len, False)

        if num_full < num:
            if DENSE:
                start_n = num_full * BLOCK_N
            else:
                start_n = tl.load(idx_row + num_full) * BLOCK_N
            keys = start_n + offs_n
            key_ok = keys < kv_len
            k = tl.load(k_base + keys[:, None] * stride_kn, mask=key_ok[:, None], other=0.0)
            v = tl.load(v_base + keys[:, None] * stride_vn, mask=key_ok[:, None], other=0.0)
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, key_ok, True)

        out = acc / l_i[:, None]
        tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None])
        if STORE_LSE:  # natural-log logsumexp of the scaled scores
            lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634
            tl.store(Lse + pid_bh * q_len + offs_m, lse, mask=row_ok)

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
    _csla_fwd_tuned = triton.autotune(configs=_CSLA_CONFIGS, key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "DENSE", "EVEN_N"],
                                      prune_configs_by={"early_config_prune": _prune_by_tile})(_csla_fwd_kernel)


def default_launch_config(block_m: int, block_n: int) -> dict:
    """The config used where no tuning runs (interpreter, AOT): Hopper-friendly defaults per tile."""
    if block_m >= 128:
        return dict(num_warps=8, num_stages=3 if block_n <= 64 else 2)
    return dict(num_warps=4, num_stages=3 if block_m * block_n > 32 * 32 else 2)


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kv_num_blocks: torch.Tensor | None = None,
                  kv_indices: torch.Tensor | None = None, block_m: int = 128, block_n: int = 64, scale: float = 1.0,
                  q_order: torch.Tensor | None = None, return_lse: bool = False, out_dtype: torch.dtype | None = None,
                  name: str = "flash_forward"):
    """Launch the flash kernel: dense when kv_num_blocks is None, block-sparse otherwise. Inputs already checked.

    Returns out (B, H, Lq, D) in out_dtype (default q's), or (out, lse (B, H, Lq) fp32 natural-log logsumexp)
    with return_lse.
    """
    require_triton(name)
    b, h, q_len, d = q.shape
    kv_len = k.shape[2]
    dense = kv_num_blocks is None
    out = torch.empty((b, h, q_len, d), dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty((b, h, q_len), dtype=torch.float32, device=q.device) if return_lse else out
    placeholder = out  # pointer args the constexpr flags make the kernel ignore
    args = (q, k, v, out, lse,
            placeholder if dense else kv_num_blocks, placeholder if dense else kv_indices,
            placeholder if q_order is None else q_order,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            0 if dense else kv_indices.stride(0), h, q_len, kv_len, float(scale) * LOG2E)
    meta = dict(HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, DENSE=dense, EVEN_N=kv_len % block_n == 0,
                USE_ORDER=q_order is not None, STORE_LSE=return_lse)
    grid = (-(-q_len // block_m), b * h)
    if interpreting():
        _csla_fwd_kernel[grid](*args, **meta, **default_launch_config(block_m, block_n))
    else:
        kernel = _csla_fwd_tuned if autotuning() else _csla_fwd_kernel
        extra = {} if autotuning() else default_launch_config(block_m, block_n)
        with torch.cuda.device(q.device):
            kernel[grid](*args, **meta, **extra)
    return (out, lse) if return_lse else out


def tuned_config(kernel: str = "csla") -> str | None:
    """The config the autotuner picked last for a kernel (for benchmark reports)."""
    if not HAS_TRITON:
        return None
    fn = {"csla": "_csla_fwd_tuned"}.get(kernel)
    best = getattr(globals().get(fn), "best_config", None)
    return None if best is None else str(best)


# ------------------------------------------------------------------------------------------------ public API
def query_block_order(kv_num_blocks: torch.Tensor) -> torch.Tensor:
    """(num_q_blocks,) int32: query blocks by descending work, for the kernel's launch order (stable)."""
    check_index("query_block_order", "kv_num_blocks", kv_num_blocks, 1)
    return torch.sort(kv_num_blocks, descending=True, stable=True).indices.to(torch.int32)


def csla_attention_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                          kv_indices: torch.Tensor, block_m: int, block_n: int, *, scale: float = 1.0,
                          q_order: torch.Tensor | None = None) -> torch.Tensor:
    """Block-granular sparse attention over a FlexAttention-style layout shared by all batch rows and heads.

    kv_num_blocks (ceil(Lq/block_m),) int32; kv_indices (ceil(Lq/block_m), W) int32, ascending per row;
    q_order optional (ceil(Lq/block_m),) int32 permutation of the query blocks (launch order only).
    """
    name = "csla_attention"
    check_qkv(name, q, k, v)
    check_block_layout(name, q.shape[2], k.shape[2], kv_num_blocks, kv_indices, block_m, block_n)
    if q_order is not None:
        check_index(name, "q_order", q_order, 1)
        if q_order.shape != kv_num_blocks.shape:
            raise ValueError(f"{name}: q_order {tuple(q_order.shape)} must have kv_num_blocks' shape {tuple(kv_num_blocks.shape)}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{name}: scale must be a positive finite float, got {scale}")
    check_device(name, q, k=k, v=v, kv_num_blocks=kv_num_blocks, kv_indices=kv_indices, q_order=q_order)
    return flash_forward(q, k, v, kv_num_blocks=kv_num_blocks, kv_indices=kv_indices, block_m=block_m,
                         block_n=block_n, scale=scale, q_order=q_order, name=name)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float = 1.0, block_m: int = 128,
                    block_n: int = 64, return_lse: bool = False, out_dtype: torch.dtype | None = None):
    """Dense flash attention (the CS4A decision's first pass); with return_lse also the (B, H, Lq) fp32 logsumexp.

    out_dtype: q's dtype by default; float32 keeps the output unrounded (the decision subtracts from it).
    """
    name = "dense_attention"
    check_qkv(name, q, k, v)
    if out_dtype not in (None, q.dtype, torch.float32):
        raise TypeError(f"{name}: out_dtype must be None, {q.dtype} or torch.float32, got {out_dtype}")
    if block_m not in TILE_SIZES or block_n not in TILE_SIZES:
        raise ValueError(f"{name}: block_m and block_n must be in {TILE_SIZES}, got {block_m}, {block_n}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{name}: scale must be a positive finite float, got {scale}")
    check_device(name, q, k=k, v=v)
    return flash_forward(q, k, v, block_m=block_m, block_n=block_n, scale=scale, return_lse=return_lse,
                         out_dtype=out_dtype, name=name)


# One order tensor per layout object (layouts are static per scale; recomputing would cost launches per call).
_ORDER_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def csla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, *, scale: float = 1.0) -> torch.Tensor:
    """CSLA over a sparvar.csla.BlockLayout (block granularity only), through the sparvar::triton_csla_attention op."""
    if getattr(layout, "granularity", None) != "block":
        raise ValueError("csla_attention: the Triton kernel implements block-granular layouts only "
                         f"(every key of an active block attended); got granularity {getattr(layout, 'granularity', None)!r}")
    if q.shape[2:3] != (layout.q_len,) or k.shape[2:3] != (layout.kv_len,):
        raise ValueError(f"csla_attention: layout is for {layout.q_len} queries x {layout.kv_len} keys; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    kv_num_blocks, kv_indices = layout.kv_num_blocks, layout.kv_indices
    if kv_num_blocks.device != q.device:
        raise ValueError(f"csla_attention: layout is on {kv_num_blocks.device}, q on {q.device}; move it once with layout.to(device)")
    order = _ORDER_CACHE.get(layout)
    if order is None:
        order = _ORDER_CACHE[layout] = query_block_order(kv_num_blocks)
    return torch.ops.sparvar.triton_csla_attention(q, k, v, kv_num_blocks, kv_indices, order, layout.block_m,
                                                   layout.block_n, scale)


@torch.library.custom_op("sparvar::triton_csla_attention", mutates_args=())
def _csla_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
             q_order: torch.Tensor | None, block_m: int, block_n: int, scale: float) -> torch.Tensor:
    return csla_attention_blocks(q, k, v, kv_num_blocks, kv_indices, block_m, block_n, scale=scale, q_order=q_order)


@_csla_op.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, q_order, block_m, block_n, scale):
    return q.new_empty(q.shape)


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
