"""Loading a weight matrix into the GPU's L2 cache ahead of the GEMM that reads it.

At the small scales (2-288 rows per linear) every GEMM streams its whole weight from HBM for a few rows of
output, and one at a time: a 2B block's 8 MB projections took 6.6 us through cuBLAS, 1.2 TB/s of the H200's
4.8 (bench/results/small_scales_h200.json), each kernel paying HBM latency as it ramps up and drains. The
kernels between two GEMMs (norms, attention: 2.5-5 us each) leave HBM idle. The torch-cuda engine runs this
kernel on a side stream beside the chain, loading the next GEMM's weights while the current GEMM and the small
kernels after it run (sparvar.cuda_engine.WeightPrefetcher); that GEMM then reads them from L2.

    l2_prefetch(w, sink)   every element of w read once (default cache policy: the lines stay in L2 until
                           evicted); each program writes the fp32 sum of its chunk to sink, so that the loads
                           are kept, and so that a test can check that every element was read

The result is the sink alone: nothing a model computes depends on it.
"""
from __future__ import annotations

import torch

from sparvar.kernels.csla import HAS_TRITON, check_device, require_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

PREFETCH_BLOCK = 2048  # elements per load (4 KB of bf16: 16 per thread of 4 warps)
PREFETCH_UNROLL = 8  # independent loads in flight per program: 32 KB of bf16 per program


def prefetch_programs(numel: int) -> int:
    """Programs (= sink entries) that l2_prefetch launches for a tensor of `numel` elements."""
    return -(-numel // (PREFETCH_BLOCK * PREFETCH_UNROLL))


def l2_prefetch_reference(w: torch.Tensor) -> torch.Tensor:
    """What l2_prefetch writes to its sink: each program's chunk of w (flat, in order) summed in fp32."""
    chunk = PREFETCH_BLOCK * PREFETCH_UNROLL
    flat = w.reshape(-1).float()
    flat = torch.nn.functional.pad(flat, (0, prefetch_programs(flat.numel()) * chunk - flat.numel()))
    return flat.view(-1, chunk).sum(1)


if HAS_TRITON:

    @triton.jit
    def _l2_prefetch_kernel(W, Sink, numel, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * (BLOCK * UNROLL)
        offs = tl.arange(0, BLOCK)
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for i in tl.static_range(UNROLL):  # unrolled: all of the chunk's loads are issued before the first returns
            idx = start + i * BLOCK + offs
            total += tl.load(W + idx, mask=idx < numel, other=0.0).to(tl.float32)
        tl.store(Sink + tl.program_id(0), tl.sum(total, 0))


def l2_prefetch(w: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """Read all of `w` (contiguous, any float dtype) through L2; `sink` (fp32, >= prefetch_programs(w.numel())
    entries) receives the per-program sums. Returns sink."""
    require_triton("l2_prefetch")
    if not w.is_contiguous():
        raise ValueError(f"l2_prefetch: the weight must be contiguous, got strides {w.stride()} for shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"l2_prefetch: the weight must be a float tensor, got {w.dtype}")
    programs = prefetch_programs(w.numel())
    if sink.dtype != torch.float32 or sink.dim() != 1 or sink.numel() < programs:
        raise ValueError(f"l2_prefetch: sink must be a 1-D fp32 tensor of at least {programs} entries, got "
                         f"{sink.dtype} {tuple(sink.shape)}")
    check_device("l2_prefetch", w, sink=sink)
    _l2_prefetch_kernel[(programs,)](w, sink, w.numel(), BLOCK=PREFETCH_BLOCK, UNROLL=PREFETCH_UNROLL, num_warps=4)
    return sink
