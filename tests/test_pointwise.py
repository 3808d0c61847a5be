"""The Triton element-wise kernels of the torch-cuda engine (sparvar/kernels/pointwise.py) against their references,
the model's own functions: input checks on CPU, the kernels under Triton's CPU interpreter, and on the GPU."""
from __future__ import annotations

import textwrap

import pytest
import torch

import sparvar.model as M
from triton_interpreter import run_interpreted

triton = pytest.importorskip("triton")
from sparvar.kernels.pointwise import qkv_rope, residual_norm, triton_block_ops  # noqa: E402


def inputs(B, n, C, H, dtype, device, offset=5):
    g = torch.Generator(device="cpu").manual_seed(B * 1000 + n)

    def randn(*shape, dtype=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    ada = randn(B, 1, 6, C, dtype=torch.float32, scale=0.5)
    D = C // H
    angles = torch.rand(n, D // 2, generator=g) * 6
    return dict(x=randn(B, n, C, scale=2.0), y=randn(B, n, C), ada=ada, gate=ada[:, :, 0], scale=ada[:, :, 2],
                shift=ada[:, :, 4], weight=randn(C, scale=0.3) + 1, bias=randn(C, scale=0.1),
                qkv=randn(B, n, 3 * C, scale=3.0), scale_mul=(torch.rand(H, generator=g) * 3 + 1).to(device, dtype),
                rope=torch.stack([angles.cos(), angles.sin()]).to(device), offset=offset)


def compare_all(t, B, n, C, H, check):
    """Every element-wise BlockOps entry of the kernels against the reference, through `check(name, out, ref)`."""
    eps = 1e-6
    check("gated_residual", residual_norm(t["x"], t["y"], t["gate"])[0], M.gated_residual(t["x"], t["y"], t["gate"]))
    check("modulate", residual_norm(t["x"], scale=t["scale"], shift=t["shift"], eps=eps)[1],
          M.modulate(t["x"], t["scale"], t["shift"], eps))
    for out, ref, what in ((residual_norm(t["x"], t["y"], t["gate"], weight=t["weight"], bias=t["bias"], eps=eps),
                            M.residual_layer_norm(t["x"], t["y"], t["gate"], t["weight"], t["bias"], eps), "layer_norm"),
                           (residual_norm(t["x"], t["y"], scale=t["scale"], shift=t["shift"], eps=eps),
                            M.residual_modulate(t["x"], t["y"], t["scale"], t["shift"], eps), "modulate"),
                           (triton_block_ops().gated_residual_modulate(t["x"], t["y"], t["gate"], t["scale"],
                                                                       t["shift"], eps),
                            M.gated_residual_modulate(t["x"], t["y"], t["gate"], t["scale"], t["shift"], eps),
                            "gated_modulate")):
        check(f"residual_{what}: x", out[0], ref[0])
        check(f"residual_{what}: normed", out[1], ref[1])
    # HART's pre-norm blocks: RMSNorm with a weight, alone and after the residual add
    check("rms_norm", residual_norm(t["x"], weight=t["weight"], eps=eps, rms=True)[1], M.rms_norm(t["x"], t["weight"], eps))
    out = residual_norm(t["x"], t["y"], weight=t["weight"], eps=eps, rms=True)
    ref_x = t["x"] + t["y"]
    check("residual_rms: x", out[0], ref_x)
    check("residual_rms: normed", out[1], M.rms_norm(ref_x, t["weight"], eps))
    D, off = C // H, t["offset"]
    caches = [M.KVCache(2, B, H, n + off + 3, D, t["x"].dtype, t["x"].device) for _ in range(2)]
    for c in caches:
        c.offset = off
        c.k.normal_()  # earlier scales' entries must survive untouched
        c.v.copy_(c.k)
    caches[1].k.copy_(caches[0].k)
    caches[1].v.copy_(caches[0].v)
    q, k_all, v_all = triton_block_ops().attention_inputs(t["qkv"], H, t["scale_mul"], t["rope"], caches[0], 1)
    rq, rk, rv = M.attention_inputs(t["qkv"], H, t["scale_mul"], t["rope"], caches[1], 1)
    assert q.shape == rq.shape == (B, H, n, D)
    check("q", q, rq)
    check("k (cache)", caches[0].k, caches[1].k)
    check("v (cache)", caches[0].v, caches[1].v)
    assert k_all.shape == rk.shape and v_all.shape == rv.shape


# ------------------------------------------------------------------------------------------------ CPU: checks
def test_residual_norm_rejects_bad_inputs():
    x = torch.randn(2, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="nothing to compute"):
        residual_norm(x)
    with pytest.raises(ValueError, match="y must be contiguous like x"):
        residual_norm(x, torch.randn(2, 4, 9, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="weight and bias"):
        residual_norm(x, weight=torch.ones(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="RMSNorm .* takes a weight only"):
        residual_norm(x, weight=torch.ones(8), bias=torch.ones(8), rms=True)
    with pytest.raises(ValueError, match="must be contiguous \\(8,\\)"):
        residual_norm(x, weight=torch.ones(9), rms=True)
    with pytest.raises(ValueError, match="quantize applies to the normalised output"):
        residual_norm(x, x, quantize=True)
    with pytest.raises(TypeError, match="gate must be float32"):
        residual_norm(x, x, torch.ones(2, 1, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="one contiguous row of 8 channels per batch row"):
        residual_norm(x, x, torch.ones(3, 1, 8))
    with pytest.raises(ValueError, match="one contiguous row of 8 channels per batch row"):
        residual_norm(x, x, torch.ones(1, 2, 8))  # B*C values, but its batch stride would read past them
    with pytest.raises(ValueError, match="x has no channels"):
        residual_norm(x[..., :0].contiguous(), scale=torch.ones(2, 1, 0), shift=torch.ones(2, 1, 0), quantize=True)
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        residual_norm(x, x, torch.ones(2, 1, 8))
    for ok in ((2, 1, 8), (2, 8)):
        with pytest.raises(ValueError, match="must be on a CUDA device"):  # shape accepted: only the device is wrong
            residual_norm(x, x, torch.ones(ok))


def test_qkv_rope_rejects_bad_inputs():
    qkv = torch.randn(2, 4, 3 * 2 * 16, dtype=torch.bfloat16)
    k = torch.empty(2, 2, 4, 16, dtype=torch.bfloat16)
    rope = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="does not match"):
        qkv_rope(qkv, torch.ones(2), rope, k[:, :1], k[:, :1])
    with pytest.raises(ValueError, match="rope must be contiguous float32"):
        qkv_rope(qkv, torch.ones(2), torch.zeros(2, 4, 16), k, k)
    with pytest.raises(ValueError, match="scale_mul must hold 2 floating-point"):
        qkv_rope(qkv, torch.ones(3), rope, k, k)
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        qkv_rope(qkv, torch.ones(2), rope, k, k)
    with pytest.raises(TypeError, match="preallocated KVCache"):
        triton_block_ops().attention_inputs(qkv, 2, torch.ones(2), rope, M.ConcatKV([k], [k]), 0)


# ------------------------------------------------------------------------------------------------ interpreter
INTERPRETER_SCRIPT = textwrap.dedent('''
    import torch
    from tests.test_pointwise import compare_all, inputs
    worst = 0.0
    def check(name, out, ref):
        global worst
        worst = max(worst, (out.float() - ref.float()).abs().nan_to_num(nan=float("inf")).max().item())
    # fp32: the interpreter truncates fp32 -> bf16 casts (the GPU rounds), so rounding is checked on the GPU
    for B, n, C, H in [(2, 37, 192, 3), (1, 5, 96, 3)]:
        compare_all(inputs(B, n, C, H, torch.float32, "cpu"), B, n, C, H, check)
    print("WORST", worst)
''')


def test_pointwise_kernels_under_triton_interpreter():
    worst = float(run_interpreted(INTERPRETER_SCRIPT))
    assert worst < 2e-5, f"pointwise kernels under the interpreter differ from the references by {worst}"


# ------------------------------------------------------------------------------------------------ HART kernels
def hart_inputs(B, n, H, D, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(B * 100 + n)
    angles = torch.rand(B, n, D, generator=g) * 6
    return dict(qkv=(torch.randn(B, n, 3 * H * D, generator=g) * 2).to(device, dtype),
                rope=torch.stack([angles.cos(), angles.sin()]).to(device),
                gate=(torch.randn(B, n, 4 * H, generator=g) * 3).to(device, dtype),
                up=torch.randn(B, n, 4 * H, generator=g).to(device, dtype))


def compare_hart(t, B, n, H, D, check, offset=3):
    """HART's attention inputs and SwiGLU kernels against sparvar.hart.model's functions."""
    from sparvar.hart import model as HM
    from sparvar.kernels.pointwise import qkv_rope_half, swiglu

    dtype, device = t["qkv"].dtype, t["qkv"].device
    caches = [M.KVCache(1, B, H, n + offset + 2, D, dtype, device) for _ in range(2)]
    for c in caches:
        c.offset = offset
    caches[0].k.normal_()  # earlier scales' entries must survive untouched
    caches[0].v.normal_()
    caches[1].k.copy_(caches[0].k)
    caches[1].v.copy_(caches[0].v)
    k_new, v_new, _, _ = caches[0].slot(0, n)
    q = qkv_rope_half(t["qkv"], 0.03125, t["rope"], k_new, v_new)
    rq, _, _ = HM.attention_inputs(t["qkv"], H, 0.03125, t["rope"], caches[1], 0)
    check("hart q", q, rq)
    check("hart k (cache)", caches[0].k, caches[1].k)
    check("hart v (cache)", caches[0].v, caches[1].v)
    check("swiglu", swiglu(t["gate"], t["up"]), HM.swiglu(t["gate"], t["up"]))


def test_hart_kernels_reject_bad_inputs():
    from sparvar.kernels.pointwise import qkv_rope_half, swiglu

    t = hart_inputs(2, 5, 2, 16, torch.float32, "cpu")
    k = torch.zeros(2, 2, 5, 16)
    with pytest.raises(ValueError, match="rope must be contiguous float32 \\(2, 2, 5, 16\\)"):
        qkv_rope_half(t["qkv"], 0.25, t["rope"][:, :, :4], k, k.clone())
    with pytest.raises(ValueError, match="q_scale must be a positive Python float"):
        qkv_rope_half(t["qkv"], torch.tensor(0.25), t["rope"], k, k.clone())
    with pytest.raises(ValueError, match="does not match"):
        qkv_rope_half(t["qkv"], 0.25, t["rope"], k[:, :1], k[:, :1].clone())
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        qkv_rope_half(t["qkv"], 0.25, t["rope"], k, k.clone())
    with pytest.raises(ValueError, match="one shape and float dtype"):
        swiglu(t["gate"], t["up"][..., :3])
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        swiglu(t["gate"], t["up"])


HART_INTERPRETER_SCRIPT = textwrap.dedent('''
    import torch
    from test_pointwise import compare_hart, hart_inputs
    worst = 0.0

    def check(name, out, ref):
        global worst
        worst = max(worst, (out.float() - ref.float()).abs().nan_to_num(nan=float("inf")).max().item())
    for B, n, H, D in [(2, 37, 3, 64), (1, 5, 2, 16)]:  # fp32 (the interpreter truncates casts to bf16)
        compare_hart(hart_inputs(B, n, H, D, torch.float32, "cpu"), B, n, H, D, check)
    print("WORST", worst)
''')


def test_hart_kernels_under_triton_interpreter():
    worst = float(run_interpreted(HART_INTERPRETER_SCRIPT))
    assert worst < 2e-5, f"HART kernels under the interpreter differ from the references by {worst}"


@pytest.mark.gpu
@pytest.mark.parametrize("B,n,H,D", [(2, 4096, 24, 64), (2, 300, 24, 64), (2, 1, 2, 64)])
def test_hart_kernels_match_references_on_gpu(B, n, H, D):
    """bf16 at hart-0.7b's shapes: v copies exactly; q, k and SwiGLU within one bf16 step (fp32 rounding order)."""

    def check(name, out, ref):
        if name == "hart v (cache)":
            assert torch.equal(out, ref), name
            return
        diff = (out.float() - ref.float()).abs()
        step = ref.float().abs().clamp_min(1e-2) * 2 ** -7
        assert bool((diff <= step).all()), f"{name}: {int((diff > step).sum())} elements beyond one bf16 step"
        assert (diff == 0).float().mean() > 0.95, f"{name}: only {(diff == 0).float().mean():.3f} exact"

    compare_hart(hart_inputs(B, n, H, D, torch.bfloat16, "cuda"), B, n, H, D, check)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("B,n,C,H", [(2, 4096, 2048, 16), (2, 37, 3584, 28), (2, 1, 2048, 16), (4, 300, 128, 2)])
def test_pointwise_kernels_match_references_on_gpu(B, n, C, H):
    """bf16 at the 2B / 8B widths (3584 is not a power of two), one token, and the tiny model. The residual outputs
    round exactly as eager; normalised outputs may differ by one bf16 step where the fp32 sums round differently."""

    def check(name, out, ref):
        diff = (out.float() - ref.float()).abs()
        step = ref.float().abs().clamp_min(1e-2) * 2 ** -7  # one bf16 step at the reference's magnitude
        assert bool((diff <= step).all()), f"{name}: {int((diff > step).sum())} elements beyond one bf16 step"
        if name.endswith(": x") or name == "gated_residual" or name == "v (cache)":
            assert torch.equal(out, ref), f"{name} must round exactly as eager torch"
        else:
            assert (diff == 0).float().mean() > 0.95, f"{name}: only {(diff == 0).float().mean():.3f} exact"

    compare_all(inputs(B, n, C, H, torch.bfloat16, "cuda"), B, n, C, H, check)


@pytest.mark.gpu
def test_linear_gelu_epilogue_matches_reference_on_gpu():
    from sparvar.kernels.pointwise import linear_gelu_epilogue

    x = torch.randn(2, 333, 2048, device="cuda", dtype=torch.bfloat16)
    layer = torch.nn.Linear(2048, 8192, device="cuda", dtype=torch.bfloat16)
    out, ref = linear_gelu_epilogue(layer, x), M.linear_gelu(layer, x)
    assert out.shape == ref.shape
    rel = (out.float() - ref.float()).norm() / ref.float().norm()
    assert rel < 4e-3, rel  # the epilogue applies GELU before rounding; eager rounds the linear output first
