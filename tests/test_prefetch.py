"""The engine's weight prefetch (sparvar/kernels/prefetch.py, sparvar.cuda_engine.WeightPrefetcher): the kernel
reads every element once (its sink sums, under Triton's CPU interpreter and on the GPU); which weight each
linear prefetches; on the GPU, a captured engine step with prefetch gives the bits of one without, and the
prefetch ran inside the graph."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparvar.config import get_config
from sparvar.cuda_engine import PREFETCH_MAX_BYTES, CudaGraphRunner, WeightPrefetcher, next_weights
from sparvar.model import block_linears, build_model
from sparvar.schedule import get_schedule
from sparvar.text import hashed_embeddings
from triton_interpreter import run_interpreted

CFG = get_config("infinity-tiny")


def test_each_linear_prefetches_the_next_weights_of_at_most_max_bytes():
    order = [nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 64), nn.Linear(64, 8)]  # fp32: 512, 1024, 4096, 2048 B
    nxt = next_weights(order, max_bytes=2048)
    assert list(nxt) == [order[0], order[2]]  # order[1]'s next (4 KB) is too large; the last linear has no next
    assert nxt[order[0]] is order[1].weight and nxt[order[2]] is order[3].weight


def test_block_linears_are_the_step_order():
    block = build_model(CFG).blocks[0]
    assert block_linears(block) == (block.sa.mat_qkv, block.sa.proj, block.ca.mat_q, block.ca.proj, block.ffn.fc1,
                                    block.ffn.fc2)


def test_prefetcher_needs_a_gpu_model():
    model = build_model(CFG)
    with pytest.raises(RuntimeError, match="weight prefetch needs the model on a CUDA GPU"):
        WeightPrefetcher(list(block_linears(model.blocks[0])))
    with pytest.raises(RuntimeError, match="weight prefetch needs the model on a CUDA GPU"):
        CudaGraphRunner(model, get_schedule(256), use_graphs=False, fuse_pointwise=False)


def test_prefetch_kernel_reads_every_element_interpreted():
    out = run_interpreted('''
        import torch
        from sparvar.kernels.prefetch import l2_prefetch, l2_prefetch_reference, prefetch_programs

        torch.manual_seed(0)
        worst = 0.0
        # a partial last chunk, an exact number of chunks, less than one load
        for shape, dtype in (((70, 1000), torch.float16), ((8, 4096), torch.float32), ((3, 5), torch.bfloat16)):
            w = torch.randn(shape).to(dtype)
            n = prefetch_programs(w.numel())
            sink = torch.full((n + 2,), 7.0)
            l2_prefetch(w, sink)
            worst = max(worst, (sink[:n] - l2_prefetch_reference(w)).abs().max().nan_to_num(nan=float("inf")).item())
            assert sink[n:].eq(7.0).all(), "wrote past its programs"
        for bad, msg in ((torch.zeros(4, 4).t(), "contiguous"), (torch.zeros(4, dtype=torch.int32), "float")):
            try:
                l2_prefetch(bad, torch.zeros(4))
            except (ValueError, TypeError) as e:
                assert msg in str(e), e
            else:
                raise AssertionError("accepted " + msg)
        try:
            l2_prefetch(torch.zeros(40000), torch.zeros(1))
        except ValueError as e:
            assert "at least 3 entries" in str(e), e
        else:
            raise AssertionError("accepted a short sink")
        print("WORST", worst)
    ''')
    assert float(out) < 1e-3


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_prefetch_keeps_the_engine_bits_and_runs_in_the_graph():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from sparvar.kernels.prefetch import l2_prefetch_reference, prefetch_programs
    from sparvar.pipeline import make_plan

    schedule = get_schedule(256)
    model = build_model(CFG, device="cuda", dtype=torch.bfloat16)
    f, l = hashed_embeddings(["a red car"], CFG.text_dim, CFG.text_maxlen)
    runners = [CudaGraphRunner(model, schedule, make_plan(CFG, schedule, "sparvar", backend="triton"),
                               prefetch_max_rows=rows) for rows in (None, 10**6)]
    last = model.blocks[-1].ffn.fc2.weight  # the last weight a step prefetches (at the last FFN's start)
    for r in runners:
        r.begin(f.cuda(), l.cuda(), True)
    codes = None
    for scale in range(schedule.num_scales):
        runners[1].prefetcher.sink.zero_()
        a, b = (r.step(scale, codes).clone() for r in runners)
        assert torch.equal(a, b), f"scale {scale}: prefetch changed the logits"
        n = prefetch_programs(last.numel())
        torch.testing.assert_close(runners[1].prefetcher.sink[:n], l2_prefetch_reference(last), atol=1e-3, rtol=1e-4)
        if scale + 1 < schedule.num_scales:
            codes = torch.randint(0, 2, (1, schedule.lengths[scale + 1], CFG.bits), device="cuda").float()
    assert runners[0].prefetcher is None and PREFETCH_MAX_BYTES >= last.numel() * last.element_size()
