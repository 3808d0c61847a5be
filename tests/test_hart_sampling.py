import math

import pytest
import torch

from sparvar.generate import SeededRows

from sparvar.hart.config import HART_CONFIGS
from sparvar.hart.sampling import (HartSampling, filter_top_k_top_p, guidance_ratio, guidance_scale, guide_logits,
                                   sample_scale, smooth_tau)

FULL = HART_CONFIGS["hart-0.7b"]  # 14 scales, 4096 codebook entries
TINY = HART_CONFIGS["hart-tiny"]  # 8 scales, 64 entries


def _data(seed: int) -> torch.Generator:  # test inputs
    return torch.Generator().manual_seed(seed)


def _gen(seed: int = 0) -> SeededRows:
    return SeededRows(seed, 1, "cpu")  # one stream for the batch, as `sparvar generate` draws


def test_official_defaults():
    s = HartSampling()
    assert (s.cfg, s.top_p, s.more_smooth) == (4.5, 0.0, False)
    assert [s.top_k(si) for si in range(FULL.num_scales)] == [600] * 7 + [300] * 7


def test_guidance_ramp_matches_the_official_loop():
    n = FULL.num_scales
    assert guidance_scale(0, n, 4.5) == 0.0  # the first scale is unguided
    for si in range(1, n - 1):
        assert guidance_scale(si, n, 4.5) == pytest.approx(4.5 * si / 13)
    # the last (maskgit) stage reuses the ratio the loop left behind: 12/13, not 13/13
    assert guidance_scale(n - 1, n, 4.5) == pytest.approx(4.5 * 12 / 13) == pytest.approx(4.1538, abs=1e-4)
    assert guidance_ratio(TINY.num_scales - 1, TINY.num_scales) == pytest.approx(6 / 7)
    assert smooth_tau(0.0) == pytest.approx(0.27) and smooth_tau(12 / 13) == pytest.approx(0.27 * (1 - 0.95 * 12 / 13))
    assert smooth_tau(1.0) > 0.005 and smooth_tau(1.5) == 0.005  # the floor


def test_guided_logits_combine_cond_and_uncond():
    cond, uncond = torch.randn(2, 3, 5, generator=_data(1)), torch.randn(2, 3, 5, generator=_data(2))
    both = torch.cat([cond, uncond])
    torch.testing.assert_close(guide_logits(both, 2.0), 3 * cond - 2 * uncond)
    assert torch.equal(guide_logits(both, 0.0), cond)


def test_top_k_never_samples_outside_the_top_k():
    logits = torch.randn(2, 256, FULL.vocab_size, generator=_data(3)) * 0.5  # flat: most mass outside any top 300
    codebook = torch.randn(FULL.vocab_size, FULL.latent_dim, generator=_data(4))
    sampling = HartSampling(cfg=0.0)
    for si, k in ((0, 600), (FULL.num_scales - 1, 300)):
        allowed = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(k, dim=-1).indices, True)
        gen = _gen(5)
        for _ in range(5):
            idx, codes = sample_scale(logits, si, FULL.num_scales, sampling, gen, codebook)
            assert allowed.gather(-1, idx[..., None]).all()
            assert torch.equal(codes, codebook[idx])
        assert idx.unique().numel() > 100  # a real draw, not an argmax
    # the filter on its own: exactly k survivors per row without ties
    assert (filter_top_k_top_p(logits, 300, 0.0) > -math.inf).sum(-1).eq(300).all()


def test_top_k_above_the_codebook_keeps_all_entries():
    logits = torch.randn(1, 4, TINY.vocab_size, generator=_data(6))
    assert torch.equal(filter_top_k_top_p(logits, 600, 0.0), logits)  # hart-tiny: 64 entries < 600


def test_top_p_keeps_the_nucleus_only():
    probs = torch.tensor([[[0.5, 0.3, 0.15, 0.05]]])
    kept = filter_top_k_top_p(probs.log(), 0, 0.7) > -math.inf
    assert kept.tolist() == [[[True, True, False, False]]]  # 0.5 + 0.3 >= 0.7; the rest sums to 0.2 <= 0.3
    # a vanishing nucleus still keeps the most likely entry (float32 cumsum reaches 1 - top_p = 1.0 everywhere)
    tiny_p = filter_top_k_top_p(torch.randn(3, 7, 50, generator=_data(15)), 0, 1e-9)
    assert (tiny_p > -math.inf).sum(-1).eq(1).all()
    idx, _ = sample_scale(probs.log().expand(1, 2000, 4), 3, 14, HartSampling(cfg=0.0, top_p=0.7), _gen(7),
                          torch.eye(4))
    assert set(idx.unique().tolist()) == {0, 1}


def test_guided_sampling_uses_the_ramped_combination():
    # cond prefers entry 0, uncond strongly prefers entry 0 too: at t > 0 guidance pushes away from 0
    cond = torch.tensor([[[2.0, 0.0, 0.0]]]).expand(1, 500, 3)
    uncond = torch.tensor([[[6.0, 0.0, 0.0]]]).expand(1, 500, 3)
    both, eye = torch.cat([cond, uncond]), torch.eye(3)
    s = HartSampling(cfg=4.5, top_k_coarse=0, top_k_fine=0)
    first, _ = sample_scale(both, 0, 14, s, _gen(8), eye)  # t = 0: cond only, entry 0 dominates
    later, _ = sample_scale(both, 13, 14, s, _gen(8), eye)  # t = 4.15: entry 0's logit 2 - 4.15*4 < 0
    assert (first == 0).float().mean() > 0.6 and (later == 0).float().mean() < 0.01


def test_fixed_generator_is_deterministic():
    logits = torch.randn(4, 9, FULL.vocab_size, generator=_data(9))
    codebook = torch.randn(FULL.vocab_size, FULL.latent_dim, generator=_data(10))
    for smooth in (False, True):
        s = HartSampling(more_smooth=smooth)
        a = sample_scale(logits, 2, FULL.num_scales, s, _gen(11), codebook)
        b = sample_scale(logits, 2, FULL.num_scales, s, _gen(11), codebook)
        c = sample_scale(logits, 2, FULL.num_scales, s, _gen(12), codebook)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


def test_more_smooth_mixes_the_kept_entries_after_the_same_draw():
    V = 32
    logits = torch.randn(2, 6, V, generator=_data(13))  # guided: B = 1
    s = HartSampling(top_k_coarse=5, more_smooth=True)
    idx, weights = sample_scale(logits, 1, TINY.num_scales, s, _gen(14), torch.eye(V))  # identity: codes = weights
    hard_idx, hard = sample_scale(logits, 1, TINY.num_scales, HartSampling(top_k_coarse=5), _gen(14), torch.eye(V))
    assert torch.equal(idx, hard_idx)  # the gumbel noise is drawn after the multinomial
    guided = guide_logits(logits, guidance_scale(1, TINY.num_scales, 4.5))
    outside = torch.ones_like(guided, dtype=torch.bool).scatter_(-1, guided.topk(5, dim=-1).indices, False)
    assert weights[outside].eq(0).all() and weights[~outside].gt(0).any()
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 6))
    assert not torch.equal(weights, hard)  # a soft mix, not the one-hot row


@pytest.mark.parametrize("kwargs, match", [
    (dict(cfg=-1.0), "cfg must be a finite number in \\[0, 10000\\]"),
    (dict(cfg=float("nan")), "cfg must be a finite number in \\[0, 10000\\]"),
    (dict(top_k_coarse=-5), "top_k_coarse must be an int >= 0"),
    (dict(top_k_fine=30.5), "top_k_fine must be an int >= 0"),
    (dict(fine_from=-1), "fine_from must be an int >= 0"),
    (dict(top_p=1.5), r"top_p must be in \[0, 1\]"),
    (dict(more_smooth="yes"), "more_smooth must be a bool"),
])
def test_bad_sampling_parameters_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HartSampling(**kwargs)


def test_bad_calls_are_clear_errors():
    with pytest.raises(ValueError, match="scale index 14 out of range for 14 scales"):
        guidance_ratio(14, 14)
    with pytest.raises(ValueError, match="at least 2 scales"):
        guidance_ratio(0, 1)
    with pytest.raises(ValueError, match=r"rows \[cond; uncond\]"):
        sample_scale(torch.randn(3, 1, 8), 0, 14, HartSampling(), _gen(), torch.randn(8, 4))
    with pytest.raises(ValueError, match=r"codebook must be \(V=8, Cvae\)"):
        sample_scale(torch.randn(2, 1, 8), 0, 14, HartSampling(), _gen(), torch.randn(16, 4))
