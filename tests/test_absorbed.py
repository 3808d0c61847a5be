"""The absorbed cross-attention kernel (sparvar/kernels/absorbed.py) against its reference,
sparvar.model.absorbed_cross_attention: input checks on the CPU, the kernel under Triton's CPU interpreter, and on
the GPU at the 2B / 8B shapes. That the absorbed form equals the projections and attention is
tests/test_model.py::test_absorbed_cross_attention_equals_projections_and_attention."""
from __future__ import annotations

import textwrap

import pytest
import torch

from sparvar.model import BIAS_ROWS, AbsorbedText, absorbed_cross_attention, absorbed_probs
from triton_interpreter import run_interpreted

triton = pytest.importorskip("triton")
from sparvar.kernels.absorbed import absorbed_scores, engine_absorbed_cross_attention  # noqa: E402


def absorbed_inputs(B, n, C, H, L, lengths, dtype, device, seed=0):
    """x and an AbsorbedText with `lengths[b]` real text positions of L per row (the rest -inf)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, C, generator=g).to(device, dtype)
    # keys scaled so that the scores spread over a few units, as a trained model's do
    # head-major keys, as CrossAttention.absorb stores them
    keys = (torch.randn(H, B, L, C, generator=g) * 3 / C ** 0.5 * (C // H) ** 0.5).to(device, dtype).transpose(0, 1)
    bias = torch.randn(B, H, L, generator=g)
    for b, length in enumerate(lengths):
        bias[b, :, length:] = float("-inf")
    values = torch.zeros(B, H * L + BIAS_ROWS, C)  # as CrossAttention.absorb lays them out: b_o after the heads' rows
    values[:, : H * L] = torch.randn(B, H * L, C, generator=g)
    values[:, H * L] = torch.randn(C, generator=g)
    return x, AbsorbedText(keys=keys, bias=bias.to(device), values=values.to(device, dtype), scale=(C // H) ** -0.5)


def reference_probs(x, text):
    """The kernel's output computed by the reference, in fp32: the probabilities, then the bias columns 1, 0, ...
    (against AbsorbedText.values' last rows they add b_o)."""
    probs = absorbed_probs(x, text)
    columns = probs.new_zeros(*probs.shape[:-1], BIAS_ROWS)
    columns[..., 0] = 1
    return torch.cat([probs, columns], dim=-1)


def test_absorbed_scores_name_bad_inputs():
    x, text = absorbed_inputs(2, 5, 128, 2, 16, [16, 3], torch.float32, "cpu")
    cases = [
        (lambda: absorbed_scores(x.half(), text.keys, text.bias, 0.1), "x and keys must share one dtype"),
        (lambda: absorbed_scores(x, text.keys, text.bias.double(), 0.1), "bias must be float32"),
        (lambda: absorbed_scores(x, text.keys[:, :, :-1], text.bias, 0.1), "expected x (B, n, C), keys (B, H, L, C)"),
        (lambda: absorbed_scores(x[..., :96], text.keys[..., :96], text.bias, 0.1), "not a multiple of 64"),
        (lambda: absorbed_scores(x, text.keys, text.bias, float("nan")), "scale must be a positive finite"),
        (lambda: absorbed_scores(x[0], text.keys, text.bias, 0.1), "x must be 3-D"),
        (lambda: absorbed_scores(x, text.keys.transpose(2, 3).contiguous().transpose(2, 3), text.bias, 0.1),
         "keys in their (L, C) rows"),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")
                           .replace("*", r"\*")):
            call()
    big = torch.zeros(2, 2, 300)
    with pytest.raises(ValueError, match="at most 256"):
        absorbed_scores(x, torch.zeros(2, 2, 300, 128), big, 0.1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="must be on a CUDA device"):
            absorbed_scores(x, text.keys, text.bias, text.scale)


INTERPRETER_SCRIPT = textwrap.dedent('''
    import torch
    from tests.test_absorbed import absorbed_inputs, reference_probs
    import sparvar.kernels.absorbed as A
    from sparvar.kernels.absorbed import absorbed_scores, engine_absorbed_cross_attention
    from sparvar.model import absorbed_cross_attention
    worst = 0.0
    # fp32 (the interpreter truncates fp32 -> bf16 casts); L not a power of two, below 16, padded rows; n across tiles
    for B, n, C, H, L, lengths in [(2, 37, 128, 2, 24, [24, 5]), (1, 3, 192, 3, 8, [8]), (2, 70, 64, 1, 64, [1, 64]),
                                   (2, 40, 128, 4, 16, [16, 7])]:
        x, text = absorbed_inputs(B, n, C, H, L, lengths, torch.float32, "cpu")
        probs = absorbed_scores(x, text.keys, text.bias, text.scale)
        worst = max(worst, (probs - reference_probs(x, text)).abs().max().item())
        out = engine_absorbed_cross_attention(x, text)
        ref = absorbed_cross_attention(x, text)
        worst = max(worst, ((out - ref).abs() / ref.abs().amax()).max().item())
        alone = absorbed_scores(x, text.keys, text.bias, text.scale, bias_columns=False)  # no bias columns
        assert alone.shape == (B, n, H * L)
        worst = max(worst, (alone - reference_probs(x, text)[..., : H * L]).abs().max().item())
    # every config the autotuner may keep, heads per program included, launched as given
    B, n, C, H, L = 2, 40, 128, 4, 16
    x, text = absorbed_inputs(B, n, C, H, L, [16, 9], torch.float32, "cpu")
    ran = set()
    for c in A._CONFIGS:
        if A._fits(c, C, n, H, L, 16, 4):
            config = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            probs = absorbed_scores(x, text.keys, text.bias, text.scale, config=config)
            worst = max(worst, (probs - reference_probs(x, text)).abs().max().item())
            ran.add(c.kwargs["HEADS"])
    assert ran == {1, 2, 4}, ran
    print("WORST", worst)
''')


def test_absorbed_scores_under_triton_interpreter():
    worst = float(run_interpreted(INTERPRETER_SCRIPT))
    assert worst < 1e-5, f"the absorbed cross-attention kernel under the interpreter differs from the reference by {worst}"


@pytest.mark.gpu
@pytest.mark.parametrize("B,n,C,H,L", [(2, 4096, 2048, 16, 64), (2, 1, 2048, 16, 64), (2, 1600, 3584, 28, 64),
                                       (2, 37, 3584, 28, 128), (4, 300, 128, 2, 32)])
def test_absorbed_cross_attention_matches_reference_on_gpu(B, n, C, H, L):
    """bf16 at the 2B / 8B shapes: the probabilities within one bf16 step of the fp32 reference's; the output
    (cuBLAS P @ values) close to the reference's."""
    lengths = [L - 3 * b for b in range(B)]
    x, text = absorbed_inputs(B, n, C, H, L, lengths, torch.bfloat16, "cuda")
    probs = absorbed_scores(x, text.keys, text.bias, text.scale)
    ref = reference_probs(x, text)
    assert probs.dtype == torch.bfloat16 and probs.shape == (B, n, H * L + BIAS_ROWS)
    diff = (probs.float() - ref).abs()
    assert bool((diff <= ref.abs() * 2 ** -7 + 1e-6).all()), f"{int((diff > ref.abs() * 2 ** -7 + 1e-6).sum())} beyond a bf16 step"
    heads = probs[..., : H * L].reshape(B, n, H, L)
    masked = heads[1, :, :, lengths[1]:] if B > 1 and lengths[1] < L else probs.new_zeros(1)
    assert bool((masked == 0).all()), "padded text positions must get probability 0"
    out, want = engine_absorbed_cross_attention(x, text), absorbed_cross_attention(x, text)
    rel = (out.float() - want.float()).norm() / want.float().norm()
    assert rel < 5e-3, rel


def test_absorbed_scores_configs_fit_and_compile_for_hopper():
    """The autotuner keeps, for every engine shape, only configs whose width loop runs unmasked and whose pipelined
    tiles fit in shared memory; each config kept, or launched untuned, at the 2B and 8B shapes (64- and 128-position
    texts) compiles for sm_90 with tensor-core MMAs (wgmma), asynchronous copies, and Hopper's shared memory."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    from sparvar.kernels import absorbed as A

    bf16 = torch.empty(0, dtype=torch.bfloat16)
    compiled = set()
    assert all(A._fits(A._CONFIGS[-1], C, 1, H, L, 16, 4) for C in (64, 192) for H in (1, 3) for L in (1, 7))
    for C, H, n in ((2048, 16, 1), (2048, 16, 4096), (3584, 28, 1600), (128, 2, 5), (192, 3, 40)):
        for L in (8, 24, 64, 128):
            block_l = max(16, triton.next_power_of_2(L))
            kept = A._prune(A._CONFIGS, {"C": C, "n": n, "H": H, "L": L, "X": bf16}, BLOCK_L=block_l, IEEE=False)
            assert kept and all(C % c.kwargs["BLOCK_C"] == 0 and H % c.kwargs["HEADS"] == 0 for c in kept), (C, n, L)
            assert all(c.kwargs["HEADS"] == 1 for c in kept) or block_l == L, (C, n, L, kept)
            assert all(c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["HEADS"] * block_l) * c.kwargs["BLOCK_C"] * 2
                       <= 200 * 1024 for c in kept), (C, n, L)
            assert n > 16 or all(c.kwargs["BLOCK_M"] <= 32 for c in kept), (C, n, kept)
            untuned = A.default_config(n, C, H, L, block_l, 2)
            if C >= 2048 and L in (64, 128):
                assert n <= 16 or any(c.kwargs["HEADS"] > 1 for c in kept), (C, n, kept)
                compiled |= {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_C"], c.kwargs["HEADS"], c.num_warps, c.num_stages, L)
                             for c in kept}
                compiled.add((untuned["BLOCK_M"], untuned["BLOCK_C"], untuned["HEADS"], untuned["num_warps"],
                              untuned["num_stages"], L))
    kernel = A._absorbed_scores_kernel
    names = kernel.arg_names
    pointers = {"X": "bf16", "K": "bf16", "Bias": "fp32", "P": "bf16"}
    for block_m, block_c, heads, warps, stages, L in sorted(compiled):
        constexprs = dict(BLOCK_M=block_m, BLOCK_L=L, BLOCK_C=block_c, HEADS=heads, IEEE=False, BIAS_COLUMNS=BIAS_ROWS)
        signature = {a: "constexpr" if a in constexprs else "*" + pointers[a] if a in pointers
                     else "fp32" if a == "scale_log2e" else "i32" for a in names}
        aligned = [i for i, a in enumerate(names) if signature[a].startswith("*") or a.startswith("stride")
                   or a == "C"]
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                           attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
        what = (block_m, block_c, heads, warps, stages, L)
        compiled_kernel = triton_compile(source, target=GPUTarget("cuda", 90, 32),
                                         options=dict(num_warps=warps, num_stages=stages))
        ptx = compiled_kernel.asm["ptx"]
        assert ("wgmma" in ptx or block_m < 64) and "cp.async" in ptx, what
        assert compiled_kernel.metadata.shared <= 232448, (what, compiled_kernel.metadata.shared)  # 227 KB per CTA
    assert {c[2] for c in compiled} == {1, 2, 4} and {c[5] for c in compiled} == {64, 128}


def test_absorbed_scores_refuse_a_config_that_does_not_suit_the_launch():
    x, text = absorbed_inputs(2, 40, 128, 2, 24, [24, 3], torch.float32, "cpu")
    with pytest.raises(ValueError, match="does not suit x"):  # two heads per program need L a power of two
        absorbed_scores(x, text.keys, text.bias, text.scale,
                        config=dict(BLOCK_M=64, BLOCK_C=64, HEADS=2, num_warps=4, num_stages=3))
