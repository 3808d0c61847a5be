"""HART residual diffusion head: official key names and sizes, the respaced IDDPM schedule, one step, the loop."""
import math

import numpy as np
import pytest
import torch

from sparvar.hart.config import HART_CONFIGS, HartDiffusionConfig
from sparvar.hart.diffusion import (DiffLoss, build_diffloss, denoise_step, diffloss_param_count,
                                    guidance_weights, guided_net_output, p_mean_variance, respaced_schedule, sample,
                                    space_timesteps)

TINY = HART_CONFIGS["hart-tiny"]


def official_keys(W, C, D, depth):
    """The official SimpleMLPAdaLN state dict (relative to `diffloss.`), written out from its module tree."""
    keys = {
        "net.time_embed.mlp.0.weight": (W, 256), "net.time_embed.mlp.0.bias": (W,),
        "net.time_embed.mlp.2.weight": (W, W), "net.time_embed.mlp.2.bias": (W,),
        "net.cond_embed.weight": (W, D), "net.cond_embed.bias": (W,),
        "net.input_proj.weight": (W, C), "net.input_proj.bias": (W,),
        "net.final_layer.linear.weight": (2 * C, W), "net.final_layer.linear.bias": (2 * C,),
        "net.final_layer.adaLN_modulation.1.weight": (2 * W, W), "net.final_layer.adaLN_modulation.1.bias": (2 * W,),
    }
    for i in range(depth):
        p = f"net.res_blocks.{i}."
        keys.update({
            p + "in_ln.weight": (W,), p + "in_ln.bias": (W,),
            p + "mlp.0.weight": (W, W), p + "mlp.0.bias": (W,), p + "mlp.2.weight": (W, W), p + "mlp.2.bias": (W,),
            p + "adaLN_modulation.1.weight": (3 * W, W), p + "adaLN_modulation.1.bias": (3 * W,),
        })
    return keys


@pytest.mark.parametrize("name", ["hart-0.7b", "hart-tiny"])
def test_diffloss_keys_shapes_and_param_count(name):
    cfg = HART_CONFIGS[name]
    with torch.device("meta"):
        model = DiffLoss(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_keys(cfg.diffusion.width, cfg.vq.z_channels, cfg.width, cfg.diffusion.depth)
    n = sum(p.numel() for p in model.parameters())
    assert n == diffloss_param_count(cfg)
    if name == "hart-0.7b":
        assert 36e6 < n < 38e6  # "about 37M" (paper)


def test_diffloss_rejects_wrong_config():
    with pytest.raises(TypeError, match="HartConfig"):
        DiffLoss(TINY.diffusion)
    import dataclasses
    bad = dataclasses.replace(TINY, diffusion=dataclasses.replace(TINY.diffusion, noise_schedule="linear"))
    with pytest.raises(ValueError, match="cosine"):
        DiffLoss(bad)


def test_space_timesteps_matches_official_rounding():
    kept = space_timesteps(1000, 8)
    assert kept[0] == 0 and kept[-1] == 999 and len(kept) == 8
    assert kept == [round(i * 999 / 7) for i in range(8)]
    assert space_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError):
        space_timesteps(10, 11)


@pytest.mark.parametrize("steps", [8, 25])
def test_respaced_schedule_against_direct_formulas(steps):
    cfg = HartDiffusionConfig(num_sampling_steps=steps)
    s = respaced_schedule(cfg)
    # Direct float64 computation from the official formulas (numpy, independent of the module's torch code).
    T = 1000
    f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    i = np.arange(T)
    base_betas = np.minimum(1 - f((i + 1) / T) / f(i / T), 0.999)
    abar_full = np.cumprod(1 - base_betas)
    kept = np.array(s.timesteps)
    assert len(kept) == steps and np.all(np.diff(kept) > 0) and kept[0] == 0 and kept[-1] == T - 1
    abar = abar_full[kept]
    np.testing.assert_allclose(s.alphas_cumprod, abar, rtol=1e-9)
    # new betas: 1 - abar_k / abar_{k-1}, so that the respaced cumprod hits the kept abar exactly
    new_betas = 1 - abar / np.concatenate([[1.0], abar[:-1]])
    np.testing.assert_allclose(s.betas, new_betas, rtol=1e-9)
    np.testing.assert_allclose(np.cumprod(1 - np.array(s.betas)), abar, rtol=1e-9)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = new_betas * (1 - abar_prev) / (1 - abar)
    np.testing.assert_allclose(s.posterior_log_variance_clipped, np.log(np.concatenate([[post_var[1]], post_var[1:]])),
                               rtol=1e-9)
    np.testing.assert_allclose(s.log_betas, np.log(new_betas), rtol=1e-9)


def test_p_mean_variance_against_independent_computation():
    s = respaced_schedule(TINY.diffusion)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g, dtype=torch.float64)
    out = torch.randn(5, 16, generator=g, dtype=torch.float64) * 0.3
    for k in (0, 3, s.num_steps - 1):
        mean, logvar, x0 = p_mean_variance(out, x, k, s)
        # Ho et al. / Nichol & Dhariwal, written from alphas_cumprod alone
        abar = s.alphas_cumprod[k]
        abar_prev = s.alphas_cumprod[k - 1] if k > 0 else 1.0
        beta = 1 - abar / abar_prev
        eps, v = out[:, :8], out[:, 8:]
        x0_ref = ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
        mean_ref = (math.sqrt(abar_prev) * beta * x0_ref + math.sqrt(1 - beta) * (1 - abar_prev) * x) / (1 - abar)
        kk = max(k, 1)  # the posterior variance is 0 at k = 0; the clipped log borrows step 1's
        post_var = (1 - s.alphas_cumprod[kk - 1]) / (1 - s.alphas_cumprod[kk]) * (1 - s.alphas_cumprod[kk] / s.alphas_cumprod[kk - 1])
        lo, hi = math.log(post_var), math.log(beta)
        logvar_ref = (v + 1) / 2 * hi + (1 - v) / 2 * lo
        torch.testing.assert_close(x0, x0_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(mean, mean_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(logvar, logvar_ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="channels"):
        p_mean_variance(out[:, :15], x, 0, s)


def test_guidance_as_a_tensor_is_the_float_scale_bit_for_bit():
    """A captured step takes its scale as `guidance_weights` (so one graph serves every cfg). It must compute what the
    Python float does, also for scales where 1 + float32(s) rounds differently from float32(1 + s) (1.09, 3.11 here)."""
    model = build_diffloss(TINY, seed=3)
    s = respaced_schedule(TINY.diffusion)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 8, generator=g)
    cond = torch.randn(10, TINY.width, generator=g)
    scales = (0.0, 1.09, 3.11, 4.5, 7.13)
    assert any((1 + torch.tensor(v)) != torch.tensor(1 + v) for v in scales)  # the case that needs the care
    for scale in scales:
        want = guided_net_output(model.net, x, 4, cond, scale, s)
        assert torch.equal(guided_net_output(model.net, x, 4, cond, guidance_weights(scale), s), want), scale


def test_guided_output_is_official_cfg_on_eps():
    model = build_diffloss(TINY, seed=3)
    s = respaced_schedule(TINY.diffusion)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, generator=g)
    cond = torch.randn(4, TINY.width, generator=g)
    k, scale = 5, 2.5
    got = guided_net_output(model.net, x, k, cond, scale, s)
    t = torch.full((2,), float(s.timesteps[k]))
    oc, ou = model.net(x, t, cond[:2]), model.net(x, t, cond[2:])
    torch.testing.assert_close(got[:, :8], (1 + scale) * oc[:, :8] - scale * ou[:, :8])
    torch.testing.assert_close(got[:, 8:], oc[:, 8:])  # variance from the conditional rows


def test_denoise_step_noise_rules():
    model = build_diffloss(TINY)
    s = respaced_schedule(TINY.diffusion)
    x, cond = torch.randn(2, 8), torch.randn(4, TINY.width)
    a = denoise_step(model.net, x, 0, cond, 1.5, None, s)
    b = denoise_step(model.net, x, 0, cond, 1.5, torch.randn(2, 8), s)
    torch.testing.assert_close(a, b)  # the last step adds no noise
    with pytest.raises(ValueError, match="noise"):
        denoise_step(model.net, x, 2, cond, 1.5, None, s)
    n = torch.randn(2, 8)
    hot = denoise_step(model.net, x, 2, cond, 1.5, n, s, temperature=1.0)
    cold = denoise_step(model.net, x, 2, cond, 1.5, n, s, temperature=0.0)
    assert not torch.allclose(hot, cold)


def test_sampler_deterministic_shapes_and_cfg():
    model = build_diffloss(TINY, seed=2)
    model.net.final_layer.linear.weight.mul_(0.05)  # keep x0 inside the [-1, 1] clip, so outputs vary
    cond = torch.randn(6, TINY.width, generator=torch.Generator().manual_seed(0))
    run = lambda seed, scale: model.sample(cond, scale, torch.Generator().manual_seed(seed))  # noqa: E731
    a = run(0, 4.0)
    assert a.shape == (3, TINY.vq.z_channels) and a.dtype == torch.float32
    torch.testing.assert_close(a, run(0, 4.0), rtol=0, atol=0)
    assert not torch.allclose(a, run(1, 4.0))
    assert not torch.allclose(a, run(0, 0.0))
    assert a.abs().max() <= TINY.diffusion.vae_scale + 1e-6  # clipped x0 times vae_scale bounds the last mean
    torch.testing.assert_close(run(0, 1.0), run(0, 0.0))  # official quirk: cfg == 1.0 means unguided
    with pytest.raises(ValueError, match="2B"):
        sample(model.net, cond[:5], 4.0, TINY.diffusion)
    with pytest.raises(ValueError, match="channels"):
        sample(model.net, cond[:, :10], 4.0, TINY.diffusion)


def test_denoise_step_exports_to_onnx():
    """One step is one graph: coefficients baked in, x / cond / noise as inputs; matches onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    model = build_diffloss(TINY, seed=0)
    s = respaced_schedule(TINY.diffusion)

    class Step(torch.nn.Module):
        def forward(self, x, cond, noise):
            return denoise_step(model.net, x, 3, cond, 3.0, noise, s)

    args = (torch.randn(4, 8), torch.randn(8, TINY.width), torch.randn(4, 8))
    proto = torch.onnx.export(Step(), args, dynamo=True, verbose=False).model_proto
    sess = ort.InferenceSession(proto.SerializeToString())
    got = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})[0]
    np.testing.assert_allclose(got, Step()(*args).numpy(), rtol=1e-5, atol=1e-5)


def test_sampler_with_low_precision_net_keeps_fp32_state():
    """The net may run in bf16 (as the official fp16 autocast); the sampler state and output stay fp32."""
    model = build_diffloss(TINY, seed=2)
    model.net.final_layer.linear.weight.mul_(0.05)
    cond = torch.randn(4, TINY.width, generator=torch.Generator().manual_seed(0))
    ref = model.sample(cond, 4.0, torch.Generator().manual_seed(0))
    low = build_diffloss(TINY, seed=2, dtype=torch.bfloat16)
    low.net.load_state_dict(model.net.state_dict())
    got = low.sample(cond.bfloat16(), 4.0, torch.Generator().manual_seed(0))
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=0.1)


def test_last_stage_cfg_scale_is_the_left_over_ratio():
    from sparvar.hart.diffusion import last_stage_cfg_scale
    # the official loop: for si in range(SN - 1): ratio = si / (SN - 1); the head then gets cfg * ratio
    for SN in (HART_CONFIGS["hart-0.7b"].num_scales, TINY.num_scales):
        ratio = None
        for si in range(SN - 1):
            ratio = si / (SN - 1)
        assert last_stage_cfg_scale(4.5, SN) == pytest.approx(4.5 * ratio)
    assert last_stage_cfg_scale(4.5, 14) == pytest.approx(4.5 * 12 / 13)
