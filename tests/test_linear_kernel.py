"""The streaming linear (sparvar/kernels/linear.py): its tiles, its checks, the kernel under the interpreter against
F.linear, its PDL instructions in the sm_90 code (compiled here, no GPU), and on a GPU: against F.linear, inside a
CUDA graph behind a norm that triggers it, and in the engine (SPARVAR_PDL=1) against the engine without it."""
from __future__ import annotations

import pytest
import torch

from sparvar.kernels import linear as L
from triton_interpreter import run_interpreted


# ------------------------------------------------------------------------------------------------ CPU
@pytest.mark.parametrize("model,N,K", [("2b qkv", 6144, 2048), ("2b proj", 2048, 2048), ("2b fc1", 8192, 2048),
                                       ("2b fc2", 2048, 8192), ("8b qkv", 10752, 3584), ("8b proj", 3584, 3584),
                                       ("8b fc1", 14336, 3584), ("8b fc2", 3584, 14336), ("tiny", 384, 128)])
@pytest.mark.parametrize("M", [1, 2, 32, 72, 128])
def test_launch_config_tiles_divide_and_fit(model, N, K, M):
    cfg = L.launch_config(M, N, K, sm_count=132)
    assert N % cfg["BLOCK_N"] == 0 and K % cfg["BLOCK_K"] == 0
    assert cfg["BLOCK_M"] >= M and cfg["BLOCK_M"] in (16, 32, 64, 128)  # one row tile: the weights read once
    assert (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * 2 * cfg["num_stages"] <= L.SMEM_BYTES
    assert 2 <= cfg["num_stages"] <= 5


def test_launch_config_picks_the_measured_widths():
    """The widths that won at 2-32 rows in small_scales_h200.json where the rule reproduces them."""
    widths = {(N, K): L.launch_config(2, N, K)["BLOCK_N"] for N, K in
              ((6144, 2048), (2048, 2048), (8192, 2048), (2048, 8192), (3584, 3584), (14336, 3584), (3584, 14336))}
    assert widths == {(6144, 2048): 64, (2048, 2048): 16, (8192, 2048): 64, (2048, 8192): 16, (3584, 3584): 32,
                      (14336, 3584): 64, (3584, 14336): 32}


def test_launch_config_refuses_shapes_without_tiles():
    with pytest.raises(ValueError, match="multiples of 16 and 128"):
        L.launch_config(2, 100, 2048)
    with pytest.raises(ValueError, match="multiples of 16 and 128"):
        L.launch_config(2, 2048, 200)


def test_prefetch_bytes_spreads_the_budget_over_the_rows():
    w = torch.empty(6144, 2048, dtype=torch.bfloat16)
    assert L.prefetch_bytes(w, budget=12 << 20) == 2048  # 12 MiB over 6,144 rows of 4 KiB
    assert L.prefetch_bytes(w, budget=1 << 30) == 4096  # never past the row
    assert L.prefetch_bytes(w, budget=6144 * 100) == 96  # rounded down to the bulk prefetch's 16 bytes
    offset = torch.empty(6144 * 2048 + 1, dtype=torch.bfloat16)[1:].view(6144, 2048)  # 2 bytes off alignment
    assert L.prefetch_bytes(offset) == 0


@pytest.mark.parametrize("block_n,threads,row_bytes,want", [
    (16, 128, 4096, (8, 512)), (64, 128, 4096, (2, 2048)), (32, 128, 2048, (4, 512)), (64, 128, 16, (1, 16)),
    (16, 128, 48, (2, 16)), (16, 128, 0, (1, 0)), (16, 128, 100, (4, 16)), (128, 128, 4096, (1, 4096))])
def test_prefetch_chunks_give_each_thread_its_own_part_of_a_row(block_n, threads, row_bytes, want):
    """One chunk per thread (Triton would replicate a shorter vector, every copy issuing the prefetch again), each a
    multiple of 16 bytes, never past the part of the row asked for."""
    chunks, size = L.prefetch_chunks(row_bytes, block_n, threads)
    assert (chunks, size) == want
    assert block_n * chunks <= max(threads, block_n) and size % 16 == 0 and chunks * size <= row_bytes


def test_prefetch_budget_from_the_environment(monkeypatch):
    monkeypatch.delenv("SPARVAR_PDL_PREFETCH_MB", raising=False)
    assert L.prefetch_budget() == L.PREFETCH_BYTES_PER_CALL
    monkeypatch.setenv("SPARVAR_PDL_PREFETCH_MB", "0")
    assert L.prefetch_budget() == 0
    monkeypatch.setenv("SPARVAR_PDL_PREFETCH_MB", "4")
    assert L.prefetch_budget() == 4 << 20
    monkeypatch.setenv("SPARVAR_PDL_PREFETCH_MB", "1.5")
    with pytest.raises(ValueError, match="whole number of MiB"):
        L.prefetch_budget()


def test_streaming_linear_checks_its_inputs():
    x = torch.randn(2, 3, 128, dtype=torch.float16)
    w = torch.randn(256, 128, dtype=torch.float16)
    with pytest.raises(TypeError, match="share a dtype"):
        L.streaming_linear(x, w.float())
    with pytest.raises(TypeError, match="share a dtype"):
        L.streaming_linear(x.float(), w.float())  # fp32 is not a dtype of the kernel
    with pytest.raises(ValueError, match="contiguous \\(N, K\\)"):
        L.streaming_linear(x, w.t().contiguous().t())
    with pytest.raises(ValueError, match="contiguous \\(N, K\\)"):
        L.streaming_linear(x, w[:, :64])
    with pytest.raises(ValueError, match="bias must be a contiguous \\(256,\\)"):
        L.streaming_linear(x, w, torch.zeros(255, dtype=torch.float16))
    with pytest.raises(ValueError, match="CUDA device"):  # not under the interpreter: the CPU is no kernel device
        L.streaming_linear(x, w)


def test_the_engine_switch_is_off_by_default_and_never_streams_on_the_cpu(monkeypatch):
    x, w = torch.zeros(2, 128), torch.zeros(256, 128)
    monkeypatch.delenv("SPARVAR_PDL", raising=False)
    assert L.engine_linears() == "cublas" and not L.pdl_enabled()
    for value, mode in (("0", "cublas"), ("yes", "cublas"), ("stream", "stream"), ("1", "pdl")):
        monkeypatch.setenv("SPARVAR_PDL", value)
        assert L.engine_linears() == mode
        assert L.engine_streams(x, w) is None  # a CPU tensor: cuBLAS' path (F.linear), whatever the switch
    assert L.pdl_enabled() and not L.pdl_supported(x) and not L.pdl_trigger(x, 2)


INTERPRETER_SCRIPT = '''
import torch
import torch.nn.functional as F
from sparvar.kernels.linear import MAX_ROWS, streaming_linear

torch.manual_seed(0)
dt = torch.float16  # the interpreter mis-handles bf16 dots
worst = 0.0
for M, N, K, bias, gelu in ((1, 64, 256, True, False), (2, 96, 128, False, False), (MAX_ROWS, 48, 256, True, True),
                            (17, 32, 128, True, False)):
    x = torch.randn(M, K, dtype=dt)
    w = torch.randn(N, K, dtype=dt) * K ** -0.5
    b = torch.randn(N, dtype=dt) if bias else None
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    if gelu:  # on the fp32 accumulator, like cuBLASLt's epilogue
        ref = F.gelu(ref, approximate="tanh")
    out = streaming_linear(x.view(M, 1, K) if M % 2 else x.view(2, M // 2, K), w, b, gelu=gelu)
    assert out.shape[-1] == N and out.dtype == dt, (out.shape, out.dtype)
    worst = max(worst, (out.reshape(M, N).float() - ref).abs().max().item() / ref.abs().max().item())
try:
    streaming_linear(torch.randn(MAX_ROWS + 1, 128, dtype=dt), torch.randn(32, 128, dtype=dt))
    raise SystemExit("more than MAX_ROWS rows were taken")
except ValueError as e:
    assert "rows" in str(e), e
try:
    streaming_linear(torch.randn(2, 128, dtype=dt), torch.randn(32, 128, dtype=dt), pdl=True)
    raise SystemExit("pdl was taken under the interpreter")
except ValueError as e:
    assert "Hopper" in str(e) and "interpreter" in str(e), e
print("WORST", worst)
'''


def test_streaming_linear_under_triton_interpreter():
    worst = float(run_interpreted(INTERPRETER_SCRIPT))
    assert worst < 2e-3, f"the streaming linear differs from F.linear by {worst} (relative to the largest output)"


def _compile_sm90(kernel, pointers: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
                  stage: str = "ptx", **options):
    """triton.compile of a kernel for sm_90 on this machine (pointers and strides 16-byte aligned, as on a GPU);
    the text of `stage` (ptx, ttgir)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    given = dict(constexprs)
    for p in kernel.params:  # defaults of the constexprs the caller left out
        if p.is_constexpr and p.name not in given:
            given[p.name] = p.default
    names = kernel.arg_names
    signature = {n: "constexpr" if n in given else "*" + pointers[n] if n in pointers else "fp32" if n == "eps"
                 else "i32" for n in names}
    aligned = [i for i, n in enumerate(names) if signature[n].startswith("*") or n.startswith("stride")]
    source = ASTSource(fn=kernel, signature=signature, constexprs=given,
                       attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton_compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, **options)).asm[stage]


@pytest.mark.parametrize("pdl", [False, True])
def test_streaming_linear_pdl_instructions_in_sm90_code(pdl):
    """With PDL the kernel prefetches into L2, waits for the kernel before and then signals its own dependents, in
    that order; without it none of the three is in the code."""
    pytest.importorskip("triton")
    cfg = L.launch_config(2, 2048, 2048)
    consts = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    chunks, size = L.prefetch_chunks(2048, cfg["BLOCK_N"], 32 * cfg["num_warps"])
    consts.update(HAS_BIAS=True, GELU=True, PDL=pdl, **(dict(PREFETCH_CHUNKS=chunks, PREFETCH_CHUNK_BYTES=size) if pdl else {}))
    ptx = _compile_sm90(L._streaming_linear_kernel, dict.fromkeys(("X", "W", "Bias", "Y"), "bf16"), consts,
                        num_stages=cfg["num_stages"], launch_pdl=pdl)
    marks = ["cp.async.bulk.prefetch.L2.global", "griddepcontrol.wait", "griddepcontrol.launch_dependents"]
    found = [ptx.find(m) for m in marks]
    loads = [i for i in (ptx.find("cp.async.cg"), ptx.find("cp.async.ca"), ptx.find("ld.global")) if i >= 0]
    assert loads  # the tiles are read somewhere (the pattern below would pass vacuously otherwise)
    if pdl:
        assert all(i >= 0 for i in found) and found == sorted(found), dict(zip(marks, found))
        assert found[1] < min(loads)  # nothing (activations, bias) is read before the wait: only the prefetch
    else:
        assert all(i < 0 for i in found), dict(zip(marks, found))


@pytest.mark.parametrize("N", [2048, 3584, 6144])  # BLOCK_N 16, 32, 64
def test_each_thread_prefetches_its_own_chunk(N):
    """In the compiled sm_90 kernel the prefetch's addresses are a (BLOCK_N, chunks) tensor whose layout covers it
    exactly, one element per thread (a shorter vector would be replicated and every copy would prefetch again),
    and consecutive chunks of a row are chunk-bytes / element-size elements apart."""
    pytest.importorskip("triton")
    import re

    cfg = L.launch_config(2, N, 2048)
    chunks, size = L.prefetch_chunks(4096, cfg["BLOCK_N"], 32 * cfg["num_warps"])
    consts = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    consts.update(HAS_BIAS=False, GELU=False, PDL=True, PREFETCH_CHUNKS=chunks, PREFETCH_CHUNK_BYTES=size)
    ttgir = _compile_sm90(L._streaming_linear_kernel, dict.fromkeys(("X", "W", "Bias", "Y"), "bf16"), consts,
                          num_stages=cfg["num_stages"], launch_pdl=True, stage="ttgir")
    asm = next(line for line in ttgir.splitlines() if "cp.async.bulk.prefetch.L2" in line)
    shape, layout = re.search(r"tensor<(\d+x\d+)x!tt\.ptr<bf16>, (#\w+)>", asm).groups()
    assert shape == f"{cfg['BLOCK_N']}x{chunks}"
    spec = re.search(re.escape(layout) + r" = #ttg\.blocked<\{(.*)\}>", ttgir).group(1)
    field = lambda name: [int(v) for v in re.search(name + r" = \[(\d+), (\d+)\]", spec).groups()]  # noqa: E731
    per_thread, threads, warps = field("sizePerThread"), field("threadsPerWarp"), field("warpsPerCTA")
    assert per_thread == [1, 1]
    assert [threads[0] * warps[0], threads[1] * warps[1]] == [cfg["BLOCK_N"], chunks]
    assert f"arith.constant dense<{size // 2}> : tensor<{chunks}xi32" in ttgir  # bf16: 2 bytes per element


@pytest.mark.parametrize("trigger", [False, True])
def test_the_kernels_before_a_pdl_linear_signal_it_only_when_asked(trigger):
    """The norm and the attention kernel signal their PDL dependents (first thing) only with PDL_TRIGGER: every
    other launch compiles the code it always had."""
    pytest.importorskip("triton")
    from bench.csla_variants import compile_for_sm90
    from sparvar.kernels.pointwise import NORM_MODULATE, _residual_norm_kernel

    ptr = dict.fromkeys(("x_ptr", "y_ptr", "gate_ptr", "x_out_ptr", "out_ptr", "w_ptr", "b_ptr"), "bf16")
    norm = _compile_sm90(_residual_norm_kernel, dict(ptr, s_ptr="fp32"),
                         dict(HAS_Y=True, GATED=True, NORM=NORM_MODULATE, QUANT=False, BLOCK_C=2048,
                              PDL_TRIGGER=trigger))
    attention = compile_for_sm90(dict(HEAD_DIM=128, BLOCK_M=64, BLOCK_N=64, DENSE=True, EVEN_N=False,
                                      USE_ORDER=False, STORE_LSE=False, TOKEN=False, ROW_LEN=True,
                                      PDL_TRIGGER=trigger), num_warps=4, num_stages=3).asm["ptx"]
    for ptx in (norm, attention):
        assert ("griddepcontrol.launch_dependents" in ptx) == trigger
        assert "griddepcontrol.wait" not in ptx  # launched as usual: they wait for their inputs the usual way


def test_block_ops_keep_cublas_where_pdl_cannot_run(monkeypatch):
    """SPARVAR_PDL=1 on a machine without a Hopper GPU changes nothing: the ops take the cuBLAS path."""
    from sparvar.kernels import pointwise

    calls = []
    monkeypatch.setattr(L, "streaming_linear", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("SPARVAR_PDL", "1")
    ops = pointwise.triton_block_ops()
    layer = torch.nn.Linear(128, 256)
    x = torch.randn(1, 2, 128)
    torch.testing.assert_close(ops.linear(layer, x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert not calls


# ------------------------------------------------------------------------------------------------ GPU
needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                  reason="PDL and the bulk L2 prefetch need a Hopper (sm_90+) GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, pytest.param(True, marks=needs_hopper)])
@pytest.mark.parametrize("M,N,K", [(2, 6144, 2048), (32, 2048, 8192), (24, 3584, 3584), (8, 384, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_streaming_linear_matches_f_linear_on_gpu(M, N, K, dtype, pdl):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    w = torch.randn(N, K, device="cuda", dtype=dtype) * K ** -0.5
    b = torch.randn(N, device="cuda", dtype=dtype)
    for gelu in (False, True):
        ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
        ref = torch.nn.functional.gelu(ref, approximate="tanh") if gelu else ref
        out = L.streaming_linear(x, w, b, gelu=gelu, pdl=pdl)
        torch.testing.assert_close(out.float(), ref, atol=2e-2 if dtype == torch.bfloat16 else 4e-3, rtol=1e-2)


@pytest.mark.gpu
@needs_hopper
def test_pdl_chain_in_a_cuda_graph_reads_only_finished_inputs():
    """norm (signals early) -> fc1 with GELU (PDL) -> fc2 (PDL) -> norm, captured, replayed on new inputs: every PDL
    kernel waits for the one before, so the graph gives the eager, PDL-free result each time. A missing wait would
    read a half-written hidden activation (fc2 starts while fc1 runs)."""
    from sparvar.kernels.pointwise import residual_norm

    torch.manual_seed(0)
    B, n, C, F = 2, 16, 2048, 8192
    dev, dt = "cuda", torch.bfloat16
    x, y = torch.randn(B, n, C, device=dev, dtype=dt), torch.randn(B, n, C, device=dev, dtype=dt)
    gate = torch.rand(B, 1, C, device=dev)
    scale, shift = torch.randn(B, 1, C, device=dev) * 0.1, torch.randn(B, 1, C, device=dev) * 0.1
    w1, b1 = torch.randn(F, C, device=dev, dtype=dt) * C ** -0.5, torch.randn(F, device=dev, dtype=dt)
    w2, b2 = torch.randn(C, F, device=dev, dtype=dt) * F ** -0.5, torch.randn(C, device=dev, dtype=dt)

    def block(pdl):
        h = residual_norm(x, y, gate, scale=scale, shift=shift, pdl_trigger=pdl)[1]
        out = L.streaming_linear(L.streaming_linear(h, w1, b1, gelu=True, pdl=pdl), w2, b2, pdl=pdl)
        return residual_norm(x, out, gate, scale=scale, shift=shift)[1]

    block(True)  # compiled outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = block(True)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        y.copy_(torch.randn_like(y))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, block(False))  # same kernels, same order of sums: bit for bit


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("attention", ["dense", "sparvar"])
def test_engine_with_pdl_linears_gives_the_streaming_engines_logits(monkeypatch, attention):
    """infinity-tiny at 256² in bf16, CUDA graphs, teacher-forced with the same tokens: the runner captured with
    SPARVAR_PDL=1 runs its small scales' linears as PDL streaming linears and gives, bit for bit, the logits of the
    one captured with SPARVAR_PDL=stream (the same kernels and tiles, no PDL): PDL changes when kernels start, never
    what they compute, so any difference is a race. The default runner takes none of them; against it (cuBLAS)
    the logits agree within bf16 up to the CS4A decision (after it, near-tied random scores may select other keys)."""
    from sparvar.config import get_config
    from sparvar.cuda_engine import CudaGraphRunner
    from sparvar.model import build_model
    from sparvar.pipeline import make_plan
    from sparvar.schedule import get_schedule
    from sparvar.text import hashed_embeddings

    cfg, schedule = get_config("infinity-tiny"), get_schedule(256)
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16)
    runners, calls = {}, {}
    real = L.streaming_linear
    features, lengths = hashed_embeddings(["a red car"], cfg.text_dim, cfg.text_maxlen)
    for mode in ("0", "stream", "1"):
        seen = calls[mode] = []
        monkeypatch.setattr(L, "streaming_linear", lambda *a, seen=seen, **k: seen.append(k.get("pdl")) or real(*a, **k))
        monkeypatch.setenv("SPARVAR_PDL", mode)
        plan = make_plan(cfg, schedule, attention, backend="triton") if attention == "sparvar" else None
        runners[mode] = CudaGraphRunner(model, schedule, plan, use_graphs=True, backend="engine")
        runners[mode].begin(features.to("cuda"), lengths.to("cuda"), guided=True)
    assert not calls["0"] and calls["stream"] and not any(calls["stream"]) and calls["1"] and all(calls["1"])
    decision = getattr(runners["1"].plan, "policy", None)
    last_close = decision.decision_scale if decision is not None else schedule.num_scales - 1
    codes = None
    for scale in range(schedule.num_scales):
        base, stream, pdl = (runners[m].step(scale, codes).clone() for m in ("0", "stream", "1"))
        assert torch.equal(pdl, stream), f"scale {scale}: PDL changed the logits"
        if scale <= last_close:
            torch.testing.assert_close(pdl.float(), base.float(), atol=5e-2, rtol=5e-2)
        if scale + 1 < schedule.num_scales:
            codes = torch.randint(0, 2, (1, schedule.lengths[scale + 1], cfg.bits), device="cuda").float()
