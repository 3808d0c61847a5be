"""The Triton GroupNorm (+ fused SiLU) of the tokenizer decoder (sparvar/kernels/group_norm.py) against F.group_norm
and the torch reference sparvar.vae.split_group_norm: input checks on CPU, the kernels and the decoder's use of
them under Triton's CPU interpreter, and on the GPU (bf16 within one bf16 step; a full 2B decode vs the eager path)."""
from __future__ import annotations

import copy
import textwrap

import pytest
import torch
import torch.nn.functional as F

import sparvar.vae as V
from sparvar.config import get_config
from triton_interpreter import run_interpreted

triton = pytest.importorskip("triton")
from sparvar.kernels.group_norm import group_norm  # noqa: E402

CL = torch.channels_last


def norm_inputs(B, C, H, W, dtype, device, groups=32, offset=3.0, channels_last=True, seed=0):
    """x with per-channel offsets `offset` x the spread (statistics kept in low precision would show), and a
    GroupNorm with non-trivial weight and bias."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g) * 1.5 + offset * torch.randn(1, C, 1, 1, generator=g)
    x = x.to(device=device, dtype=dtype)
    x = x.contiguous(memory_format=CL) if channels_last else x.contiguous()
    norm = torch.nn.GroupNorm(groups, C, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(C, generator=g) + 0.5)
        norm.bias.copy_(torch.rand(C, generator=g) - 0.5)
    return x, norm.to(device=device, dtype=dtype)


def truth(x, norm, silu):
    """fp32 GroupNorm (+ SiLU) of the given (already rounded) input, unrounded."""
    y = F.group_norm(x.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps)
    return F.silu(y) if silu else y


# ------------------------------------------------------------------------------------------------ CPU: checks
def test_group_norm_rejects_bad_inputs():
    x, norm = norm_inputs(2, 64, 5, 7, torch.bfloat16, "cpu")
    w, b = norm.weight, norm.bias
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        group_norm(x.numpy, w, b, 32)
    with pytest.raises(ValueError, match=r"4-D \(B, C, H, W\)"):
        group_norm(x[0], w, b, 32)
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        group_norm(x.double(), w, b, 32)
    with pytest.raises(ValueError, match="num_groups must be a positive int dividing the 64 channels"):
        group_norm(x, w, b, 24)
    with pytest.raises(ValueError, match="num_groups"):
        group_norm(x, w, b, 32.0)
    with pytest.raises(ValueError, match=r"weight must be contiguous \(64,\)"):
        group_norm(x, w[:32], b, 32)
    with pytest.raises(TypeError, match="bias must be floating point"):
        group_norm(x, w, torch.zeros(64, dtype=torch.int32), 32)
    with pytest.raises(ValueError, match="eps must be a finite non-negative"):
        group_norm(x, w, b, 32, eps=-1.0)
    with pytest.raises(ValueError, match="empty input"):
        group_norm(x[:, :, :0], w, b, 32)
    with pytest.raises(ValueError, match=r"channels_last \(NHWC\) or contiguous NCHW"):
        group_norm(x[:, :, :, ::2], w, b, 32)
    with pytest.raises(ValueError, match=r"channels_last \(NHWC\) or contiguous NCHW"):
        group_norm(x.transpose(2, 3), w, b, 32)
    with pytest.raises(ValueError, match="at most 4096 are supported"):
        big = torch.zeros(1, 8192, 1, 2, dtype=torch.bfloat16)
        group_norm(big, torch.ones(8192), torch.zeros(8192), 32)
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        group_norm(x, w, b, 32)
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        group_norm(x.contiguous(), w, b, 32, silu=True)  # NCHW is accepted up to the device check


def test_norm_keeps_native_op_off_the_gpu_fast_path():
    """CPU (and, by the same test, torch.compile / ONNX export / autograd) run nn.GroupNorm then F.silu as before."""
    x, norm = norm_inputs(2, 64, 5, 7, torch.float32, "cpu")
    m = V.Norm(64)
    m.norm.load_state_dict(norm.state_dict())
    assert V._kernel_for(x, m.norm.weight) is None
    with torch.no_grad():
        assert torch.equal(m(x), norm(x))
        assert torch.equal(m(x, silu=True), F.silu(norm(x)))
    assert list(m.state_dict()) == ["norm.weight", "norm.bias"]  # official key names


# ------------------------------------------------------------------------------------------------ interpreter
INTERPRETER_SCRIPT = textwrap.dedent('''
    import torch
    import torch.nn.functional as F

    import sparvar.vae as V
    from sparvar.config import VAE_TINY
    from sparvar.kernels.group_norm import group_norm
    from tests.test_group_norm import norm_inputs, truth

    worst = {"fp32": 0.0, "fp16": 0.0, "decode": 0.0}
    def err(kind, a, b):
        worst[kind] = max(worst[kind], (a.float() - b.float()).abs().nan_to_num(nan=float("inf")).max().item())

    # fp32 (the interpreter truncates fp32 -> bf16 casts; rounding is checked on the GPU) and fp16 inputs; odd spatial
    # sizes, 2 batch rows, several tiles and chunks per row (the interpreter uses small tiles), 3 channels per group
    # (96 = 32 x 3, not a power of two), 24 groups, NCHW as well as channels_last
    cases = [((2, 64, 9, 7), 32, True), ((2, 96, 5, 11), 32, True), ((1, 48, 13, 3), 24, True), ((2, 64, 7, 9), 32, False),
             ((2, 64, 1, 1), 32, True)]  # 1x1: channels_last and NCHW at once; 2 values per group
    # (not 1: x * scale + shift then cancels at rstd = 1/sqrt(eps), in split_group_norm as here)
    for dtype in (torch.float32, torch.float16):
        for (B, C, H, W), groups, cl in cases:
            x, norm = norm_inputs(B, C, H, W, dtype, "cpu", groups=groups, channels_last=cl)
            for silu in (False, True):
                out = group_norm(x, norm.weight, norm.bias, groups, norm.eps, silu=silu)
                assert out.dtype == dtype and out.shape == x.shape
                assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
                # (determinism is checked on the GPU, where programs run concurrently; here they run one by one)
                err("fp32" if dtype == torch.float32 else "fp16", out, truth(x, norm, silu))

    # a pre-bias (a convolution's pending bias) is the same as adding it to x first
    for (B, C, H, W), groups, cl in cases[:2] + cases[3:4]:
        x, norm = norm_inputs(B, C, H, W, torch.float32, "cpu", groups=groups, channels_last=cl)
        pre_bias = torch.randn(C, generator=torch.Generator().manual_seed(C)) * 3
        out = group_norm(x, norm.weight, norm.bias, groups, norm.eps, silu=True, pre_bias=pre_bias)
        err("fp32", out, truth(x + pre_bias.view(1, -1, 1, 1), norm, True))

    # the decoder's other passes: the residual sum with a bias (NHWC and NCHW), the nearest 2x upsample
    from types import SimpleNamespace
    from sparvar.kernels import decoder_glue as G
    for shape, cl in (((2, 48, 5, 7), True), ((2, 48, 5, 7), False), ((1, 3, 1, 9), True)):
        g = torch.Generator().manual_seed(1)
        x, h = (torch.randn(*shape, generator=g) for _ in range(2))
        if cl:
            x, h = (t.contiguous(memory_format=torch.channels_last) for t in (x, h))
        bias = torch.randn(shape[1], generator=g)
        out = G.residual_add(x, h, bias)
        assert out.stride() == x.stride()
        err("fp32", out, x + h + bias.view(1, -1, 1, 1))
        if cl:
            up = G.upsample_nearest_2x(x)
            assert up.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(up, F.interpolate(x, scale_factor=2.0, mode="nearest")), "upsample is a copy"
    # the sub-pixel upsampling's interleave: a copy (several programs, channels not a power of two, 1-pixel grids)
    for shape in ((2, 4 * 12, 6, 8), (1, 4 * 3, 2, 2), (1, 4 * 5, 4, 2)):
        y = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).contiguous(memory_format=torch.channels_last)
        out = G.subpixel_interleave(y)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out, G.subpixel_interleave_reference(y)), "the interleave is a copy"

    # the decoder's use: every Norm, residual sum and upsample through the kernels (forced on the CPU)
    calls = {"norm": [], "add": 0, "up": 0, "interleave": 0}
    def norm_kernel(x, weight, bias, groups, eps, silu=False, pre_bias=None):
        calls["norm"].append((silu, pre_bias is not None))
        return group_norm(x, weight, bias, groups, eps, silu=silu, pre_bias=pre_bias)
    def add(x, h, bias):
        calls["add"] += 1
        return G.residual_add(x, h, bias)
    def up(x):
        calls["up"] += 1
        return G.upsample_nearest_2x(x)
    def interleave(y):
        calls["interleave"] += 1
        return G.subpixel_interleave(y)
    vae = V.build_vae(VAE_TINY)
    # one batch row (the cases above take two): the decode's interpreter time is most of this script's
    latent = torch.randn(1, VAE_TINY.codebook_dim, 2, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = vae.decode(latent)
        V._triton_kernels = lambda: SimpleNamespace(group_norm=norm_kernel, residual_add=add, upsample_nearest_2x=up,
                                                    subpixel_interleave=interleave)
        assert V.freeze_subpixel_weights(vae) == sum(isinstance(m, V.Upsample) for m in vae.modules())
        V._fast_path = lambda x, weight: True
        out = vae.decode(latent)
    blocks = sum(isinstance(m, V.ResnetBlock) for m in vae.modules())
    ups = sum(isinstance(m, V.Upsample) for m in vae.modules())
    assert len(calls["norm"]) == sum(isinstance(m, V.Norm) for m in vae.modules()), calls
    assert all(silu for silu, _ in calls["norm"]), calls
    # norm2 of every block, and norm1 after conv_in and after each upsample, take a pending bias
    assert sum(pending for _, pending in calls["norm"]) == blocks + 1 + ups, calls
    # channels_last, frozen: every upsampling convolution in its sub-pixel form (sparvar.vae.upsample_conv)
    assert calls["add"] == blocks and calls["interleave"] == ups and calls["up"] == 0, calls
    err("decode", out, ref)

    # HART's tokenizer decoder (official flat module names, attention blocks, NCHW: its upsampling stays torch's)
    # through the same functions and kernels
    from sparvar.hart.config import HART_VQ_TINY
    from sparvar.hart.tokenizer import build_hart_vq
    hart = build_hart_vq(HART_VQ_TINY, seed=1)
    f_hat = torch.randn(1, HART_VQ_TINY.z_channels, 2, 3, generator=torch.Generator().manual_seed(1))
    calls.update(norm=[], add=0, up=0, interleave=0)
    assert V.freeze_subpixel_weights(hart) > 0  # frozen, but its input is NCHW here
    with torch.no_grad():
        V._fast_path = lambda x, weight: False
        ref = hart.decode(f_hat)
        V._fast_path = lambda x, weight: True
        out = hart.decode(f_hat)
    assert len(calls["norm"]) == sum(isinstance(m, torch.nn.GroupNorm) for m in hart.modules()), calls
    assert calls["add"] == sum(type(m).__name__ == "ResnetBlock" for m in hart.modules()), calls
    assert calls["interleave"] == calls["up"] == 0, calls  # NCHW here: the official form, torch's upsampling
    err("decode", out, ref)
    print("WORST", worst["fp32"], worst["fp16"], worst["decode"])
''')


def test_group_norm_under_triton_interpreter():
    fp32, fp16, decode = map(float, run_interpreted(INTERPRETER_SCRIPT).split())
    assert fp32 < 1e-4, f"fp32 GroupNorm under the interpreter differs from F.group_norm by {fp32}"
    assert fp16 < 8e-3, f"fp16 GroupNorm under the interpreter differs from the fp32 truth by {fp16}"  # |y| < 8: 1 fp16 step
    assert decode < 1e-4, f"a tiny fp32 decode through the kernels differs from the native path by {decode}"


# ------------------------------------------------------------------------------------------------ GPU
def steps_apart(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, floor: float = 2 ** -6) -> torch.Tensor:
    """|a - b| in units of `dtype`'s spacing at max(|a|, |b|, floor). The floor: near 0, x * scale + shift cancels
    in fp32 (in split_group_norm as in the kernels), an absolute error of a few fp32 steps of |x * scale|."""
    a, b = a.float(), b.float()
    mag = torch.maximum(a.abs(), b.abs()).clamp_min(floor)
    spacing = torch.ldexp(torch.full_like(mag, torch.finfo(dtype).eps), torch.frexp(mag).exponent - 1)
    return (a - b).abs() / spacing


@pytest.mark.gpu
@pytest.mark.parametrize("shape,channels_last", [((1, 128, 256, 256), True), ((2, 96, 33, 47), True),
                                                 ((2, 96, 33, 47), False), ((1, 256, 128, 128), True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_norm_gpu_within_one_step(shape, channels_last, dtype):
    x, norm = norm_inputs(*shape, dtype, "cuda", channels_last=channels_last)
    with torch.no_grad():
        ref = V.split_group_norm(x, norm)
        for silu in (False, True):
            out = group_norm(x, norm.weight, norm.bias, 32, norm.eps, silu=silu)
            assert out.dtype == dtype and out.stride() == x.stride()
            assert torch.equal(out, group_norm(x, norm.weight, norm.bias, 32, norm.eps, silu=silu)), "not deterministic"
            # one rounding of the fp32 result: within one step of the unrounded truth
            assert steps_apart(out, truth(x, norm, silu), dtype).max() <= 1.0
            if not silu:
                assert steps_apart(out, ref, dtype).max() <= 1.0, "differs from split_group_norm by more than one step"
            else:  # eager rounds the norm output, then the SiLU again: a step of y, scaled by |silu'| <= 1.1
                torch.testing.assert_close(out.float(), F.silu(ref).float(), atol=4e-3, rtol=2 ** -7)


@pytest.mark.gpu
def test_group_norm_gpu_fp32():
    x, norm = norm_inputs(2, 96, 33, 47, torch.float32, "cuda")
    with torch.no_grad():
        for silu in (False, True):
            torch.testing.assert_close(group_norm(x, norm.weight, norm.bias, 32, norm.eps, silu=silu),
                                       truth(x, norm, silu), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_decode_through_kernels_matches_eager_path():
    """A 2B tokenizer decode (1024x1024) in bf16: the Triton path against the eager one (nn.GroupNorm + F.silu, which
    Norm runs under autograd), both against an fp32 decode; the kernels must not be less faithful than eager."""
    cfg = get_config("infinity-2b").vae
    vae = V.build_vae(cfg, device="cuda", dtype=torch.bfloat16)
    latent = torch.randn(1, cfg.codebook_dim, 64, 64, generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        fast = vae.decode(latent.bfloat16()).float()
    with torch.enable_grad():  # requires_grad: every Norm takes the native op
        eager = vae.decode(latent.bfloat16().requires_grad_()).detach().float()
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            exact = copy.deepcopy(vae).float().decode(latent.requires_grad_()).detach()
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
    assert fast.shape == (1, 3, 1024, 1024)
    err_fast, err_eager = (fast - exact).abs().mean().item(), (eager - exact).abs().mean().item()
    assert err_fast <= 1.1 * err_eager + 1e-4, f"kernels {err_fast:.3g} vs eager {err_eager:.3g} mean abs error to fp32"
    # (a CPU emulation of the kernels' numerics at 512x512: mean error to fp32 0.0052 vs eager's 0.0059; kernel vs
    # eager mean 0.0075, max 0.105 — bf16 noise through 30 convs, in pixels of spread 0.29)
    diff = (fast - eager).abs()
    assert diff.mean().item() < 2 * err_eager + 1e-3 and diff.max().item() < 0.25, \
        f"kernel vs eager decode: mean {diff.mean().item():.3g}, max {diff.max().item():.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decoder_glue_kernels_on_gpu(dtype):
    """The residual sum with a bias is one fp32 sum rounded once, as in its reference (so bit-equal); the upsample
    is a copy. Decoder-sized inputs: several programs per batch row, 256 channels."""
    from sparvar.kernels.decoder_glue import (residual_add, residual_add_reference, subpixel_interleave,
                                              subpixel_interleave_reference, upsample_nearest_2x,
                                              upsample_nearest_2x_reference)

    g = torch.Generator(device="cuda").manual_seed(0)
    for shape, cl in (((1, 256, 96, 80), True), ((2, 96, 33, 47), True), ((2, 96, 33, 47), False)):
        x, h = (torch.randn(*shape, device="cuda", generator=g).to(dtype) for _ in range(2))
        if cl:
            x, h = (t.contiguous(memory_format=torch.channels_last) for t in (x, h))
        bias = torch.randn(shape[1], device="cuda", generator=g)
        out = residual_add(x, h, bias)
        assert out.stride() == x.stride() and out.dtype == dtype
        assert torch.equal(out, residual_add_reference(x, h, bias))
        if cl:
            assert torch.equal(upsample_nearest_2x(x), upsample_nearest_2x_reference(x))
            y = torch.randn(shape[0], 4 * shape[1], shape[2] + 1, shape[3] + 1, device="cuda", generator=g).to(dtype)
            y = y.contiguous(memory_format=torch.channels_last)
            assert torch.equal(subpixel_interleave(y), subpixel_interleave_reference(y))
    with pytest.raises(ValueError, match="channels_last"):
        upsample_nearest_2x(torch.randn(1, 8, 4, 4, device="cuda"))
    with pytest.raises(ValueError, match="h must match"):
        residual_add(x, h.contiguous(memory_format=torch.channels_last), bias)


def test_decoder_glue_rejects_bad_inputs():
    pytest.importorskip("triton", reason="Triton not installed")
    from sparvar.kernels.decoder_glue import residual_add, upsample_nearest_2x

    x = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match="h must match"):
        residual_add(x, torch.randn(1, 8, 4, 5), torch.zeros(8))
    with pytest.raises(ValueError, match="bias must be"):
        residual_add(x, x, torch.zeros(7))
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        residual_add(x.double(), x.double(), torch.zeros(8))
    with pytest.raises(ValueError, match="channels_last"):
        upsample_nearest_2x(x)
    with pytest.raises(ValueError, match="4-D"):
        upsample_nearest_2x(x[0])


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["infinity-2b", "hart-0.7b"])
def test_subpixel_upsampling_decode_is_as_faithful_as_the_official_form(model, monkeypatch):
    """A 1024² decode with the upsampling convolutions in their sub-pixel form (the engines' default) against the
    same decode in the official form, both on the kernels' path, both against an fp32 decode: the form adds one
    rounding of each summed 3x3 tap in the low-precision dtype, and must stay as close to fp32."""
    if model == "hart-0.7b":
        from sparvar.hart.tokenizer import build_hart_vq

        cfg = get_config(model)
        full = build_hart_vq(cfg.vq, seed=0, device="cuda")
        low = copy.deepcopy(full).half_decoder()
        assert V.freeze_subpixel_weights(low) > 0  # as GraphedDecoder does
        latent = torch.randn(1, cfg.vq.z_channels, 64, 64, generator=torch.Generator().manual_seed(0)).cuda()
        decode_low, decode_exact = low.decode, full.decode  # f_hat stays fp32 (the quantizer's); the decode casts
    else:
        cfg = get_config(model).vae
        vae = V.build_vae(cfg, device="cuda", dtype=torch.bfloat16)
        latent = torch.randn(1, cfg.codebook_dim, 64, 64, generator=torch.Generator().manual_seed(0)).cuda()
        exact_vae = copy.deepcopy(vae).float()  # not frozen: the official form, in fp32
        assert V.freeze_subpixel_weights(vae) == 4  # as GraphedDecoder does
        decode_low, decode_exact = (lambda z: vae.decode(z.bfloat16())), exact_vae.decode
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            monkeypatch.setattr(V, "SUBPIXEL_UPSAMPLE", False)  # the fp32 truth independent of the form under test
            exact = decode_exact(latent).float()  # (HART's fp32 decode is NCHW: the official form anyway)
            official = decode_low(latent).float()
            monkeypatch.setattr(V, "SUBPIXEL_UPSAMPLE", True)
            subpixel = decode_low(latent).float()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert not torch.equal(subpixel, official)  # the two forms ran (they round differently)
    err_sub, err_off = (subpixel - exact).abs().mean().item(), (official - exact).abs().mean().item()
    assert err_sub <= 1.15 * err_off + 1e-4, f"sub-pixel {err_sub:.3g} vs official {err_off:.3g} mean abs error to fp32"
    assert (subpixel - official).abs().max().item() < 0.25
