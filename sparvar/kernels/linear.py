"""A linear for few rows that streams its weights, with programmatic dependent launch (PDL) on Hopper.

Reference: sparvar.model.linear (F.linear) and, with gelu, linear_gelu_epilogue's cuBLASLt epilogue (GELU on the
fp32 accumulator, one rounding).

Why: at the small scales (2-288 rows with CFG at 1024², scales 0-5) every block GEMM streams its whole weight for a
handful of rows, and per-kernel latency, not bytes, bounds it: cuBLAS moves 25-34 MB weights at 2.3-3.0 TB/s and
8 MB ones at 1.3 TB/s (bench/results/small_scales_h200.json, against ~4.8 there), and HBM idles during the norm
and attention kernels between the GEMMs. Prefetching the next weights from a side stream made every such scale
~1 ms slower (docs/performance.md, "Measured and removed"): the prefetch programs competed with the GEMM for SMs.

PDL moves the overlap into the GEMM itself. The linear is launched with the PDL attribute, so its programs may
start as soon as the kernel before it has signalled (`gdc_launch_dependents`, which the engine's norms and
attention kernels do first thing when asked: `pdl_trigger`). Each program then asks L2 for the first
`prefetch_bytes` of each of its weight rows (Hopper's bulk prefetch, fire and forget: the weights never depend on
the kernel before), waits for that kernel's completion and memory (`gdc_wait`: every program waits before it
reads an activation or writes anything, so a PDL kernel never sees a half-written input and never overwrites one
still being read), signals its own dependents, and streams the rest. The prefetch is bounded per call
(`PREFETCH_BYTES_PER_CALL`, or SPARVAR_PDL_PREFETCH_MB): L2 is 50 MB on an H100, and lines evicted before their
use would be read twice.

The engine's switch, SPARVAR_PDL (`engine_linears`): `1` runs this kernel with PDL; `stream` runs it without
PDL (the same kernel and tiles, so what PDL itself changes can be measured beside it, bit for bit); anything
else leaves cuBLAS. Without PDL the kernel is a plain weight-streaming GEMM, which matched cuBLAS at 2-32 rows
there (MAX_ROWS).

Measured on the H100 (bench/results/e2e_engines_2b_tma_pdl_h100.json, 2B, side by side): PDL made scales 0-2
~0.5 ms slower each, not faster (dense engine 251.8 against 247.7 ms with cuBLAS and 250.5 streaming without PDL),
so cuBLAS stays the default. With one prefetch chunk per thread (it had been issued 2-8 times over) and again
without any prefetch (SPARVAR_PDL_PREFETCH_MB=0), another H100 measured PDL 0.19-0.31 and 0.08-0.24 ms slower per
scale than the same kernel without it (bench/results/e2e_engines_2b_pdl_h100.json): the programmatic launch itself
loses, the prefetch adds to it. Why is not known (not profiled): programs started early that then wait, or the
graph's programmatic edges.
"""
from __future__ import annotations

import os

import torch

from sparvar.kernels.csla import HAS_TRITON, check_device, interpreting, launch_device, require_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from sparvar.kernels.fp8 import gelu_tanh_f32

DTYPES = (torch.bfloat16, torch.float16)
# rows with CFG at 1024²: scales 0-2 (2, 8, 32 rows), where this kernel ran within 0.1 ms per scale of cuBLAS on the
# H100 without PDL (e2e_engines_2b_tma_pdl_h100.json). Scale 3's 72 rows in one 128-row tile cost 2.3 ms more
# (5.6 against 3.3 ms), and at 128 rows cuBLAS had won in isolation (small_scales_h200.json, 8B fc1 30.2 against 53.9 us)
MAX_ROWS = 32
PREFETCH_BYTES_PER_CALL = 12 << 20  # ~4 us of HBM at 3.35 TB/s: what a norm or attention kernel before it hides
SMEM_BYTES = 200 << 10  # of the H100's 227 KB per block, some left for the compiler's own


def engine_linears() -> str:
    """What the torch-cuda engine runs its block linears of <= MAX_ROWS rows with, from SPARVAR_PDL: "pdl" (1:
    this kernel with PDL, the kernels before it signalling early), "stream" (this kernel without PDL: the
    ablation) or "cublas" (unset or anything else: the default, PDL having measured slower on the H100)."""
    return {"1": "pdl", "stream": "stream"}.get(os.environ.get("SPARVAR_PDL", "0"), "cublas")


def prefetch_budget() -> int:
    """Bytes a PDL linear asks L2 for before its wait: SPARVAR_PDL_PREFETCH_MB (0: none, to measure PDL without
    the prefetch), PREFETCH_BYTES_PER_CALL by default."""
    value = os.environ.get("SPARVAR_PDL_PREFETCH_MB")
    if value is None:
        return PREFETCH_BYTES_PER_CALL
    if not value.isdigit():
        raise ValueError(f"SPARVAR_PDL_PREFETCH_MB must be a whole number of MiB (0: no prefetch), got {value!r}")
    return int(value) << 20


def pdl_enabled() -> bool:
    """SPARVAR_PDL=1 (see engine_linears)."""
    return engine_linears() == "pdl"


def pdl_supported(t: torch.Tensor) -> bool:
    """griddepcontrol and the bulk L2 prefetch are Hopper (sm_90+) instructions; the interpreter has neither."""
    return HAS_TRITON and not interpreting() and t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


def pdl_trigger(t: torch.Tensor, rows: int) -> bool:
    """Whether an engine kernel launched now for tensor t, before a linear of `rows` rows, signals its PDL dependents
    first thing: where that linear is a PDL streaming linear (a no-op otherwise, but kept off so that every other
    launch compiles the code it always had)."""
    return rows <= MAX_ROWS and pdl_enabled() and pdl_supported(t)


def check_pdl(name: str, t: torch.Tensor) -> None:
    if not pdl_supported(t):
        raise ValueError(f"{name}: PDL needs a Hopper (sm_90+) GPU and a compiled kernel, not "
                         f"{'the interpreter' if interpreting() else t.device}")


def engine_streams(x: torch.Tensor, *weights: torch.Tensor) -> str | None:
    """How the engine runs the linears of x's rows (..., K) by `weights` (each (N, K'), applied in turn: fc1 then
    fc2): "pdl" or "stream" where engine_linears() asks for this kernel and it takes every one of them (rows,
    dtype, tile shapes, a GPU), else None (cuBLAS). "pdl" on a GPU before Hopper raises."""
    mode = engine_linears()
    if mode == "cublas" or not HAS_TRITON or interpreting() or not x.is_cuda or x.dtype not in DTYPES:
        return None
    if x.numel() > MAX_ROWS * x.shape[-1]:
        return None
    for w in weights:
        if w.dtype != x.dtype or w.dim() != 2 or not w.is_contiguous() or w.shape[0] % 16 or w.shape[1] % 128:
            return None
    if mode == "pdl":  # asked for on a GPU without PDL: an error, not a silent cuBLAS run under the PDL name
        check_pdl("SPARVAR_PDL=1", x)
    return mode


if HAS_TRITON:

    @triton.jit
    def _prefetch_l2(ptrs, nbytes):
        """cp.async.bulk.prefetch.L2: ask L2 for nbytes from each address (16-byte aligned, a multiple of 16), no
        registers, no wait. Every thread holding an element issues it: a vector shorter than the program's threads
        is replicated across them (Triton's layouts), so callers give one element per thread (PREFETCH_CHUNKS)."""
        return tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                                         [ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _streaming_linear_kernel(X, W, Bias, Y, M, K, stride_xm, stride_wn, stride_ym,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 HAS_BIAS: tl.constexpr, GELU: tl.constexpr, PDL: tl.constexpr,
                                 PREFETCH_CHUNKS: tl.constexpr = 1, PREFETCH_CHUNK_BYTES: tl.constexpr = 0):
        # One program owns BLOCK_N output columns for BLOCK_M rows and streams those weight rows once, whole K
        # (N % BLOCK_N == 0 and K % BLOCK_K == 0: the wrapper picks the tiles so).
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_rows = W + offs_n.to(tl.int64) * stride_wn
        if PDL:
            if PREFETCH_CHUNK_BYTES > 0:  # the weights never depend on the kernel before: fetch them while it finishes
                # each row's first PREFETCH_CHUNKS * PREFETCH_CHUNK_BYTES bytes, one chunk per thread (no duplicates)
                chunk = tl.arange(0, PREFETCH_CHUNKS) * (PREFETCH_CHUNK_BYTES // (W.dtype.element_ty.primitive_bitwidth // 8))
                _prefetch_l2(w_rows[:, None] + chunk[None, :],
                             tl.full([BLOCK_N, PREFETCH_CHUNKS], PREFETCH_CHUNK_BYTES, tl.int32))
            tl.extra.cuda.gdc_wait()  # the kernel before has finished and its writes are visible
            tl.extra.cuda.gdc_launch_dependents()  # a PDL linear after this one (fc2 after fc1) may start fetching
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < M
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_rows[:, None] + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for _ in range(0, K // BLOCK_K):
            x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs)
            acc = tl.dot(x, tl.trans(w), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n).to(tl.float32)[None, :]
        if GELU:
            acc = gelu_tanh_f32(acc)
        y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=row_ok[:, None])


def launch_config(M: int, N: int, K: int, sm_count: int = 132) -> dict:
    """Tiles for (M rows, N outputs, K inputs), from the configurations that won per shape at 2-32 rows in
    bench/results/small_scales_h200.json (2B and 8B): the widest BLOCK_N of 64/32/16 that still gives ~2/3 of the
    SMs a program (enough streams in flight), BLOCK_K 256 for narrow tiles and 128 for 64-wide ones, and as many
    pipeline stages as shared memory takes (up to 5)."""
    block_n = next((bn for bn in (64, 32, 16) if N % bn == 0 and 3 * (N // bn) >= 2 * sm_count),
                   next((bn for bn in (16, 32, 64) if N % bn == 0), None))
    block_k = next((bk for bk in ((128, 256) if block_n == 64 else (256, 128)) if K % bk == 0), None)
    if block_n is None or block_k is None:
        raise ValueError(f"streaming_linear: N ({N}) and K ({K}) must be multiples of 16 and 128")
    block_m = max(16, 1 << (min(M, 128) - 1).bit_length())  # tl.dot's least; one row tile up to 128 rows
    per_stage = (block_m + block_n) * block_k * 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
                num_stages=max(2, min(5, SMEM_BYTES // per_stage)))


def prefetch_bytes(weight: torch.Tensor, budget: int = PREFETCH_BYTES_PER_CALL) -> int:
    """Bytes of each weight row to prefetch: the call's budget spread over all N rows, a multiple of 16 (the bulk
    prefetch's unit), at most the row; 0 where the rows are not 16-byte aligned."""
    N, K = weight.shape
    row_bytes = K * weight.element_size()
    if weight.data_ptr() % 16 or weight.stride(0) * weight.element_size() % 16:
        return 0
    return min(row_bytes, budget // N) // 16 * 16


def prefetch_chunks(row_bytes: int, block_n: int, threads: int) -> tuple[int, int]:
    """(chunks per row, bytes per chunk) for prefetching `row_bytes` of each of a program's block_n rows with one
    chunk per thread: threads // block_n chunks (a power of two) of a multiple of 16 bytes each, fewer where a row
    is too short. The rows' prefetched prefix is chunks * bytes <= row_bytes; (1, 0): nothing to prefetch."""
    chunks = max(1, threads // block_n)
    while chunks > 1 and row_bytes // chunks < 16:
        chunks //= 2
    size = row_bytes // chunks // 16 * 16
    return (chunks, size) if size else (1, 0)


def streaming_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, gelu: bool = False,
                     pdl: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., K) of at most MAX_ROWS rows; with gelu, gelu_tanh of it applied to the
    fp32 accumulator before rounding. pdl: launch with programmatic dependent launch and prefetch the weights
    (Hopper; pdl_supported). weight (N, K) contiguous, bias (N,) or None, all one dtype (bf16/fp16)."""
    name = "streaming_linear"
    require_triton(name)
    if x.dtype not in DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"{name}: x, weight and bias must share a dtype of {DTYPES}, got {x.dtype}, {weight.dtype}, "
                        f"{None if bias is None else bias.dtype}")
    if weight.dim() != 2 or not weight.is_contiguous() or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: weight must be a contiguous (N, K) matrix with K = x.shape[-1], got "
                         f"{tuple(weight.shape)} (contiguous: {weight.is_contiguous()}) for x {tuple(x.shape)}")
    N, K = weight.shape
    if bias is not None and (bias.shape != (N,) or not bias.is_contiguous()):
        raise ValueError(f"{name}: bias must be a contiguous ({N},) vector, got {tuple(bias.shape)}")
    check_device(name, x, hint="use F.linear on the CPU", weight=weight, bias=bias)
    x2 = x.reshape(-1, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if not 0 < M <= MAX_ROWS:
        raise ValueError(f"{name}: takes 1 to {MAX_ROWS} rows (cuBLAS is faster above), got {M}")
    if pdl:
        check_pdl(name, x)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
    cfg = launch_config(M, N, K, sms)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = (N // cfg["BLOCK_N"], triton.cdiv(M, cfg["BLOCK_M"]))
    pdl_args = {}
    if pdl:
        n_chunks, chunk_bytes = prefetch_chunks(prefetch_bytes(weight, prefetch_budget()), cfg["BLOCK_N"],
                                                32 * cfg["num_warps"])
        pdl_args = dict(launch_pdl=True, PREFETCH_CHUNKS=n_chunks, PREFETCH_CHUNK_BYTES=chunk_bytes)
    with launch_device(x):
        _streaming_linear_kernel[grid](x2, weight, weight if bias is None else bias, y, M, K,
                                       x2.stride(0), weight.stride(0), y.stride(0), HAS_BIAS=bias is not None,
                                       GELU=gelu, PDL=pdl, **pdl_args, **cfg)
    return y.view(*x.shape[:-1], N)
