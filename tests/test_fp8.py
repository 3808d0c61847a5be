"""FP8 linears (sparvar/fp8.py): the quantiser, the row threshold, the CPU emulation, the Triton kernel and the
GPU GEMM against the emulation."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from sparvar.config import get_config
from sparvar.fp8 import FP8_MAX, MIN_AMAX, Fp8Linears, Fp8Rows, Fp8Weight, fp8_matmul, quantize_rows_ref, with_fp8_linears
from sparvar.model import EAGER, build_model
from triton_interpreter import run_interpreted

CFG = get_config("infinity-tiny")
# over 16 hashed tokens: infinity-tiny's 32-position text bucket
LONG_PROMPT = "a small dog on the green grass by the old red barn and a tall tree under a blue sky at noon"


def test_quantize_rows_maps_each_row_max_to_448_and_reconstructs():
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different magnitudes
    x[5] = 0.0
    q, scale = quantize_rows_ref(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert torch.equal(q[5].float(), torch.zeros(256)) and scale[5].item() == pytest.approx(MIN_AMAX / FP8_MAX)
    live = torch.arange(64) != 5
    assert torch.equal(q[live].float().abs().amax(-1), torch.full((63,), FP8_MAX))
    rel = (q.float() * scale - x).norm(dim=-1)[live] / x.norm(dim=-1)[live]
    assert rel.max() < 0.04  # e4m3: 3 mantissa bits, ~2.5% rms
    assert rel.min() > 1e-3  # it really is quantised


def test_fp8_linears_only_from_min_tokens_and_only_block_linears():
    model = build_model(CFG)
    block = model.blocks[0]
    x = torch.randn(2, 10, CFG.width)
    ops = with_fp8_linears(EAGER, model, min_tokens=11)
    assert torch.equal(ops.linear(block.sa.proj, x), EAGER.linear(block.sa.proj, x))  # 10 tokens < 11: bf16 path
    ops = with_fp8_linears(EAGER, model, min_tokens=10)  # per image: the batch of 2 does not count
    out, ref = ops.linear(block.sa.proj, x), EAGER.linear(block.sa.proj, x)
    rel = (out - ref).norm() / ref.norm()
    assert 1e-3 < rel < 0.05
    assert torch.equal(ops.linear(model.head, x), EAGER.linear(model.head, x))  # not a block linear
    bias = torch.randn(3 * CFG.width)
    out, ref = ops.linear(block.sa.mat_qkv, x, bias), EAGER.linear(block.sa.mat_qkv, x, bias)  # replacement bias
    assert (out - ref).norm() / ref.norm() < 0.05
    f, fref = ops.ffn(block.ffn.fc1, block.ffn.fc2, x), EAGER.ffn(block.ffn.fc1, block.ffn.fc2, x)
    assert f.shape == fref.shape and 1e-3 < (f - fref).norm() / fref.norm() < 0.08
    ops = with_fp8_linears(EAGER, model, min_tokens=11)
    assert torch.equal(ops.ffn(block.ffn.fc1, block.ffn.fc2, x), EAGER.ffn(block.ffn.fc1, block.ffn.fc2, x))
    with pytest.raises(ValueError, match="min_tokens must be >= 0"):
        Fp8Linears(model, -1, EAGER)


def test_norms_hand_fp8_rows_to_the_fp8_linears_from_min_tokens():
    """At FP8 scales each norm's output is already quantised (Fp8Rows) and the next linear takes it as is: the same
    numbers as quantising the bf16 output inside the linear. Below the threshold everything stays bf16."""
    model = build_model(CFG)
    block = model.blocks[0]
    B, n, C = 2, 10, CFG.width
    x, y = torch.randn(B, n, C), torch.randn(B, n, C)
    ada = torch.randn(B, 1, 6, C) * 0.3
    gamma, scale, shift = ada[:, :, 0], ada[:, :, 2], ada[:, :, 4]
    w, b = block.ca_norm.weight, block.ca_norm.bias
    ops = with_fp8_linears(EAGER, model, min_tokens=n)
    h = ops.modulate(x, scale, shift, 1e-6)
    assert isinstance(h, Fp8Rows) and h.shape == (B, n, C) and h.values.shape == (B * n, C)
    ref_h = EAGER.modulate(x, scale, shift, 1e-6)
    assert torch.equal(ops.linear(block.sa.mat_qkv, h), ops.linear(block.sa.mat_qkv, ref_h))
    x2, c = ops.residual_layer_norm(x, y, gamma, w, b, 1e-6)
    rx2, rc = EAGER.residual_layer_norm(x, y, gamma, w, b, 1e-6)
    assert torch.equal(x2, rx2) and isinstance(c, Fp8Rows)
    assert torch.equal(ops.linear(block.ca.mat_q, c), ops.linear(block.ca.mat_q, rc))
    x3, h3 = ops.residual_modulate(x, y, scale, shift, 1e-6)
    rx3, rh3 = EAGER.residual_modulate(x, y, scale, shift, 1e-6)
    assert torch.equal(x3, rx3) and isinstance(h3, Fp8Rows)
    f = ops.ffn(block.ffn.fc1, block.ffn.fc2, h3)
    assert torch.equal(f, ops.ffn(block.ffn.fc1, block.ffn.fc2, rh3))
    assert 1e-3 < (f - EAGER.ffn(block.ffn.fc1, block.ffn.fc2, rh3)).norm() / f.norm() < 0.08
    with pytest.raises(TypeError, match="reached a bf16 linear"):
        ops.linear(model.head, h)
    below = with_fp8_linears(EAGER, model, min_tokens=n + 1)
    assert torch.equal(below.modulate(x, scale, shift, 1e-6), ref_h)


def test_fp8_matmul_emulation_is_the_product_of_the_dequantised_operands():
    w = torch.randn(48, 32, dtype=torch.float64).float()
    x = torch.randn(7, 32)
    q, s = quantize_rows_ref(x)
    fw = Fp8Weight.of(w)
    bias = torch.randn(48)
    out = fp8_matmul(q, s, fw, bias, torch.float32)
    ref = (q.double() * s.double()) @ (fw.values.double() * fw.scale.double().t()).t() + bias.double()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_fp8_step_stays_close_to_the_model():
    """A whole step with every block linear in FP8 (min_tokens 0): logits within a few percent."""
    from sparvar.cuda_engine import CudaGraphRunner
    from sparvar.schedule import get_schedule
    from sparvar.text import hashed_embeddings

    schedule = get_schedule(256)
    model = build_model(CFG)
    f, l = hashed_embeddings(["a red car"], CFG.text_dim, CFG.text_maxlen)
    runners = [CudaGraphRunner(model, schedule, use_graphs=False, fuse_pointwise=False, fp8_min_tokens=m) for m in (None, 0)]
    for r in runners:
        r.begin(f, l, True)
    codes = None
    for scale in range(4):
        a, b = (r.step(scale, codes) for r in runners)
        rel = ((a - b).norm() / a.norm()).item()
        assert 1e-3 < rel < 0.08, (scale, rel)
        codes = torch.randint(0, 2, (1, schedule.lengths[scale + 1], CFG.bits)).float()


def e4m3_interpreter_rounding(a: torch.Tensor, b: torch.Tensor, exact: torch.Tensor, slack: float = 1.0):
    """Where the interpreter's FP8 values `a` may differ from the reference's `b` for the exact values `exact`:
    (carry, neighbour) masks. Triton 3.6's interpreter casts fp32 -> e4m3 its own way: it drops the carry when
    rounding up to the next power of two (124.3 -> 64, not 128), breaks ties away from zero (272 -> 288, not 256)
    and rounds subnormals toward zero. The GPU rounds as torch does (checked on the GPU). So under the interpreter
    an element may be either e4m3 neighbour of the exact value, or half the reference when carried."""
    step = torch.where(exact.abs() < 2 ** -6, torch.full_like(exact, 2 ** -9),
                       2 ** (torch.log2(exact.abs().clamp_min(2 ** -6)).floor() - 3))
    neighbour = (a - exact).abs() <= step * slack
    carry = (b.abs() == 2 ** torch.log2(b.abs().clamp_min(1e-30)).round()) & (a == b / 2)
    return carry, neighbour


INTERPRETER_SCRIPT = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from sparvar.fp8 import quantize_rows_ref
    from sparvar.kernels.fp8 import quantize_rows_triton
    from test_fp8 import e4m3_interpreter_rounding
    torch.manual_seed(0)
    worst = 0.0
    for (M, K), gelu in [((5, 96), False), ((3, 1000), False), ((64, 256), False), ((64, 256), True), ((3, 1000), True)]:
        x = torch.randn(M, K) * 3  # fp32: the interpreter truncates fp32 -> bf16 (the GPU test covers bf16)
        q, s = quantize_rows_triton(x, gelu=gelu)
        rq, rs = quantize_rows_ref(x, gelu=gelu)
        assert torch.allclose(s, rs, rtol=1e-6), "scales differ"
        a, b = q.float(), rq.float()
        exact = (F.gelu(x, approximate="tanh") if gelu else x) / rs
        carry, neighbour = e4m3_interpreter_rounding(a, b, exact)
        normal = exact.abs() >= 2 ** -6  # e4m3 subnormals: the interpreter truncates them (GELU makes many)
        assert ((a == b) | carry)[normal].float().mean() > 0.99, "most values must round exactly as the reference"
        worst = max(worst, (~(neighbour | carry)).float().sum().item())
    print("WORST", worst)
''')


def test_quantize_kernel_under_triton_interpreter():
    assert float(run_interpreted(INTERPRETER_SCRIPT)) == 0, "quantised values differ from the reference"


NORM_INTERPRETER_SCRIPT = textwrap.dedent('''
    import torch
    import sparvar.model as M
    from sparvar.fp8 import Fp8Rows, quantize_rows_ref
    from sparvar.kernels.pointwise import residual_norm
    from test_fp8 import e4m3_interpreter_rounding
    torch.manual_seed(0)
    worst = 0.0
    B, n, C = 2, 9, 192
    x, y = torch.randn(B, n, C) * 2, torch.randn(B, n, C)
    ada = torch.randn(B, 1, 6, C) * 0.5
    gamma, scale, shift = ada[:, :, 0], ada[:, :, 2], ada[:, :, 4]
    w, b = torch.randn(C) * 0.3 + 1, torch.randn(C) * 0.1
    cases = [(residual_norm(x, scale=scale, shift=shift, quantize=True), (None, M.modulate(x, scale, shift, 1e-6))),
             (residual_norm(x, y, gamma, weight=w, bias=b, quantize=True), M.residual_layer_norm(x, y, gamma, w, b, 1e-6)),
             (residual_norm(x, y, scale=scale, shift=shift, quantize=True), M.residual_modulate(x, y, scale, shift, 1e-6))]
    for (xo, rows), (rx, ref) in cases:
        assert isinstance(rows, Fp8Rows) and rows.shape == x.shape
        assert (xo is None) == (rx is None) and (xo is None or torch.allclose(xo, rx, atol=1e-6))
        rq, rs = quantize_rows_ref(ref.reshape(-1, C))
        assert torch.allclose(rows.scale, rs, rtol=1e-5), "row scales differ"
        a = rows.values.float()
        carry, neighbour = e4m3_interpreter_rounding(a, rq.float(), ref.reshape(-1, C) / rs, slack=1.01)
        assert ((a == rq.float()) | carry).float().mean() > 0.97
        worst = max(worst, (~(neighbour | carry)).float().sum().item())
    print("WORST", worst)
''')


def test_quantizing_norm_kernel_under_triton_interpreter():
    assert float(run_interpreted(NORM_INTERPRETER_SCRIPT)) == 0, "FP8 norm outputs differ from the reference"


@pytest.mark.gpu
def test_quantizing_norms_match_the_reference_on_gpu():
    from sparvar.kernels.pointwise import residual_norm

    B, n, C = 2, 1024, 2048
    x = torch.randn(B, n, C, device="cuda", dtype=torch.bfloat16) * 2
    ada = torch.randn(B, 1, 6, C, device="cuda") * 0.5
    rows = residual_norm(x, scale=ada[:, :, 2], shift=ada[:, :, 4], quantize=True)[1]
    plain = residual_norm(x, scale=ada[:, :, 2], shift=ada[:, :, 4])[1]
    rq, rs = quantize_rows_ref(plain.reshape(-1, C))  # the same rounded output, quantised by the reference
    torch.testing.assert_close(rows.scale, rs, rtol=1e-6, atol=0)
    assert (rows.values.float() == rq.float()).float().mean() > 0.999


@pytest.mark.gpu
def test_quantize_kernel_and_fp8_gemm_match_the_reference_on_gpu():
    from sparvar.kernels.fp8 import quantize_rows_triton

    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16) * 2
    q, s = quantize_rows_triton(x)
    rq, rs = quantize_rows_ref(x)
    assert torch.equal(s, rs)
    assert (q.float() == rq.float()).float().mean() > 0.999  # the same round-to-nearest, up to division rounding
    w = Fp8Weight.of(torch.randn(6144, 2048, device="cuda", dtype=torch.bfloat16) / 45)
    bias = torch.randn(6144, device="cuda", dtype=torch.bfloat16)
    out = fp8_matmul(q, s, w, bias, torch.bfloat16)
    ref = fp8_matmul(q.cpu(), s.cpu(), Fp8Weight(w.values.cpu(), w.scale.cpu()), bias.cpu(), torch.float32)
    assert (out.float().cpu() - ref).norm() / ref.norm() < 4e-3  # fp32 accumulation, bf16 output
    dense = F.linear(x.float(), (w.values.float() * w.scale.t()), bias.float())
    assert (out.float() - dense).norm() / dense.norm() < 0.04


@pytest.mark.gpu
def test_quantize_kernel_with_gelu_matches_the_reference_on_gpu():
    from sparvar.kernels.fp8 import quantize_rows_triton

    x = torch.randn(4096, 8192, device="cuda", dtype=torch.bfloat16) * 2
    q, s = quantize_rows_triton(x, gelu=True)
    rq, rs = quantize_rows_ref(x, gelu=True)
    torch.testing.assert_close(s, rs, rtol=1e-2, atol=0)  # the row maximum may differ by one bf16 step of GELU
    assert (q.float() == rq.float()).float().mean() > 0.99


@pytest.mark.gpu
def test_fp8_engine_graphs_equal_its_eager_steps_on_gpu():
    from sparvar.cuda_engine import CudaGraphRunner
    from sparvar.generate import Sampling, generate
    from sparvar.pipeline import build_decoder
    from sparvar.schedule import get_schedule
    from sparvar.text import hashed_embeddings

    schedule = get_schedule(256)
    model = build_model(CFG, device="cuda", dtype=torch.bfloat16)
    decoder = build_decoder(CFG, None, "cuda", torch.bfloat16)
    f, l = hashed_embeddings(["a red car"], CFG.text_dim, CFG.text_maxlen)
    eager = CudaGraphRunner(model, schedule, use_graphs=False, fp8_min_tokens=32)
    graphs = CudaGraphRunner(model, schedule, fp8_min_tokens=32)
    a = generate(eager, decoder, schedule, f, l, Sampling(cfg=3.0), seed=3)
    b = generate(graphs, decoder, schedule, f, l, Sampling(cfg=3.0), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))
    assert graphs.current.text.absorbed is not None
    # two long prompts: a graph set that does not absorb (its cross-attention projections in bf16), captured beside
    f2, l2 = hashed_embeddings([LONG_PROMPT, LONG_PROMPT.replace("dog", "cat")], CFG.text_dim, CFG.text_maxlen)
    a = generate(eager, decoder, schedule, f2, l2, Sampling(cfg=3.0), seed=4)
    b = generate(graphs, decoder, schedule, f2, l2, Sampling(cfg=3.0), seed=4)
    assert graphs.current.text.absorbed is None
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))


def test_fp8_engine_spec_is_torch_cuda_infinity_only():
    from sparvar.engine import EngineSpec

    spec = EngineSpec(model="infinity-2b", resolution=1024, attention="sparvar", backend="torch-cuda", dtype="bf16", fp8=True)
    assert spec.default_dir().endswith("infinity-2b-1024-sparvar-fp8-torch-cuda")
    with pytest.raises(ValueError, match="FP8 linears are built for Infinity models on the torch-cuda backend only"):
        EngineSpec(model="infinity-2b", resolution=1024, backend="onnxruntime", fp8=True)
    with pytest.raises(ValueError, match="FP8 linears are built for Infinity models on the torch-cuda backend only"):
        EngineSpec(model="hart-0.7b", resolution=1024, backend="torch-cuda", fp8=True)


def test_quantize_kernel_refuses_empty_rows():
    """Rows with no values have no scale: the kernel would leave the scales unwritten (garbage), so it refuses."""
    pytest.importorskip("triton")
    from sparvar.kernels.fp8 import quantize_rows_triton

    with pytest.raises(ValueError, match=r"x has empty rows \(3, 0\)"):
        quantize_rows_triton(torch.zeros(3, 0, dtype=torch.bfloat16))


def test_fp8_engine_that_absorbs_keeps_the_cross_attention_out_of_fp8():
    """With FP8 linears the engine still absorbs the cross-attention where it pays, and no cross-attention projection
    is FP8 (absorbed, they do not run) while its norm hands it rows in the model's dtype: its steps are the eager
    model's with every other block linear in FP8 (what bench/fidelity.py scores). A graph set that does not absorb
    (two long prompts: 4 rows of 32 positions do not pay at tiny's width) runs the projections in the model's dtype
    too, so the numbers do not depend on the batch. With absorb=False they are FP8, a visibly different result."""
    from sparvar.cuda_engine import CudaGraphRunner
    from sparvar.generate import TorchRunner
    from sparvar.schedule import get_schedule
    from sparvar.text import hashed_embeddings

    schedule = get_schedule(256)
    model = build_model(CFG, seed=5)
    for blk in model.blocks:
        blk.ca.mat_q.bias.data.normal_()
        blk.ca.proj.bias.data.normal_()
    kwargs = dict(use_graphs=False, fuse_pointwise=False, fp8_min_tokens=0)
    absorbing, plain = CudaGraphRunner(model, schedule, **kwargs), CudaGraphRunner(model, schedule, absorb=False, **kwargs)
    reference = TorchRunner(model, schedule, ops=with_fp8_linears(EAGER, model, 0, cross_attention=False))
    fp8 = absorbing.ops.linear.__self__  # the engine's Fp8Linears
    assert not any(blk.ca.mat_q in fp8.weights or blk.ca.proj in fp8.weights for blk in model.blocks)
    assert all(blk.ca.mat_q in plain.ops.linear.__self__.weights for blk in model.blocks)

    def steps(runners, prompts):
        f, l = hashed_embeddings(prompts, CFG.text_dim, CFG.text_maxlen)
        for r in runners:
            r.begin(f, l, True)
        codes, out = None, []
        for scale in range(4):
            out.append([r.step(scale, codes).clone() for r in runners])
            codes = torch.randint(0, 2, (len(prompts), schedule.lengths[scale + 1], CFG.bits)).float()
        return out

    for scale, (a, b, want) in enumerate(steps((absorbing, plain, reference), ["a red car"])):
        near, other = ((a - want).norm() / want.norm()).item(), ((b - want).norm() / want.norm()).item()
        assert near < 1e-5 and other > 1e-4, (scale, near, other)
    assert absorbing.current.text.absorbed is not None and plain.current.text.absorbed is None
    assert not absorbing.absorbs(32, 4)  # two prompts padded to 32 positions: 4 rows x 2 heads x 32 > width 128
    for scale, (a, want) in enumerate(steps((absorbing, reference), [LONG_PROMPT, LONG_PROMPT.replace("dog", "cat")])):
        assert ((a - want).norm() / want.norm()).item() < 1e-5, scale
    assert absorbing.current.text.absorbed is None
