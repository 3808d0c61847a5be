"""Infinity's sampling in the generation loop: classifier-free guidance on the logits and the temperature, checked
against the formulas of the official sampler (INFINITY.md) on a runner whose logits are known."""
import torch

from sparvar.generate import Sampling, SeededRows, generate, sample_bits
from sparvar.schedule import get_schedule

BITS = 4


class KnownLogits:
    """A runner whose logits are fixed per scale: conditional rows `cond`, unconditional rows `uncond`."""

    device = torch.device("cpu")

    def __init__(self, schedule, batch: int):
        g = torch.Generator().manual_seed(1)
        sizes = [h * w for h, w in schedule.grids]
        self.cond = [torch.randn(batch, n, 2 * BITS, generator=g) * 3 for n in sizes]
        self.uncond = [torch.randn(batch, n, 2 * BITS, generator=g) * 3 for n in sizes]

    def begin(self, features, lengths, guided):
        self.guided = guided

    def step(self, scale, codes):
        return torch.cat([self.cond[scale], self.uncond[scale]]) if self.guided else self.cond[scale]


class SignDecoder:
    """Codes are the bits as +-1; the image is the latent's first three channels."""

    codebook_dim, patchify = BITS, False

    def bits_to_codes(self, bits):
        return bits * 2 - 1

    def decode(self, latent):
        return latent[:, :3].clamp(-1, 1)


def test_guidance_mixes_conditional_and_unconditional_logits_as_official():
    """cfg * cond + (1 - cfg) * uncond on the logits (official cfg_insertion_layer=[0]); greedy bits are then
    l1 > l0 of that mix, so swapping the branches or dropping the guidance changes them."""
    schedule = get_schedule(256)
    runner = KnownLogits(schedule, batch=2)
    features, lengths = torch.zeros(2, 3, 8), torch.tensor([3, 3])
    for cfg in (1.0, 3.0, 0.25):
        got = generate(runner, SignDecoder(), schedule, features, lengths, Sampling(cfg=cfg, top_k=1), seed=0)
        for scale, bits in enumerate(got.bits):
            mixed = cfg * runner.cond[scale] + (1 - cfg) * runner.uncond[scale]
            want = (mixed[..., 1::2] > mixed[..., 0::2]).float()
            assert torch.equal(bits, want), (cfg, scale)
    unguided = generate(runner, SignDecoder(), schedule, features, lengths, Sampling(cfg=1.0, top_k=1), seed=0)
    guided = generate(runner, SignDecoder(), schedule, features, lengths, Sampling(cfg=3.0, top_k=1), seed=0)
    assert not all(torch.equal(a, b) for a, b in zip(unguided.bits, guided.bits))


def test_temperature_divides_the_logits():
    """Per bit p(1) = sigmoid((l1 - l0) / tau): the frequency of 1s over many draws matches it at tau 0.5 and 2
    (within 5 binomial standard deviations), and the two temperatures differ by far more than that."""
    n = 20000
    delta = torch.tensor([-1.5, -0.4, 0.3, 1.2])
    logits = torch.stack([torch.zeros(4), delta], -1).flatten().expand(n, 1, 8)  # (n, 1, 2 * 4): (l0, l1) per bit
    freqs = {}
    for tau in (0.5, 2.0):
        bits = sample_bits(logits, Sampling(tau=tau, top_p=0.0), SeededRows(0, n, "cpu"))
        freqs[tau] = bits.mean(0).squeeze(0)
        p = torch.sigmoid(delta / tau)
        sd = (p * (1 - p) / n).sqrt()
        assert ((freqs[tau] - p).abs() < 5 * sd).all(), (tau, freqs[tau], p)
    assert (freqs[0.5] - freqs[2.0]).abs().min() > 0.05


def test_a_tiny_temperature_samples_the_greedy_bits_not_nan():
    """l0 / tau and l1 / tau overflowed float32 for a tiny tau, and inf - inf is NaN: every such bit came out 0.
    The difference is divided instead: the bits are the greedy ones."""
    logits = torch.randn(1, 64, 2 * BITS, generator=torch.Generator().manual_seed(0)) * 3
    greedy = sample_bits(logits, Sampling(top_k=1), SeededRows(0, 1, "cpu"))
    for tau in (1e-30, 1e-39, 1e-45):
        assert torch.equal(sample_bits(logits, Sampling(tau=tau, top_p=0.0), SeededRows(0, 1, "cpu")), greedy), tau


def test_sampling_options_the_loop_cannot_honour_are_refused():
    """A negative cfg (HART's refused it; Infinity's sampled with it), a cfg past MAX_CFG (3e38 made HART's guided
    logits NaN: a black image), lengths the prompts do not have (the torch runner took them; only the engines' refused) and seeds
    that are not ints are named; numpy ints are seeds."""
    import numpy as np
    import pytest

    from sparvar.hart.sampling import HartSampling

    for cfg in (-5.0, 1e39, 3e38, 1e4 + 1):
        for family in (Sampling, HartSampling):
            with pytest.raises(ValueError, match=r"cfg must be .*in \[0, 10000\]"):
                family(cfg=cfg)
    assert Sampling(cfg=1e4).cfg == HartSampling(cfg=1e4).cfg == 1e4
    schedule = get_schedule(256)
    runner = KnownLogits(schedule, batch=2)
    features = torch.zeros(2, 3, 8)
    for lengths in (torch.tensor([0, 3]), torch.tensor([3, 4]), torch.tensor([3, 3, 3])):
        with pytest.raises(ValueError, match=r"text lengths must be 2 values in \[1, 3\]"):
            generate(runner, SignDecoder(), schedule, features, lengths, Sampling(top_k=1), seed=0)
    for lengths in (torch.tensor([2.5, 3.0]), torch.tensor([True, True]), [3, 3]):  # 2.5: torch's mask took 3, ORT 2
        with pytest.raises(ValueError, match="text lengths must be an integer tensor"):
            generate(runner, SignDecoder(), schedule, features, lengths, Sampling(top_k=1), seed=0)
    lengths = torch.tensor([3, 3])
    for seed in (1.0, "1", [1, 2.0], np.array([1, 2])):
        with pytest.raises(ValueError, match="give one int seed, or one int seed per prompt row"):
            generate(runner, SignDecoder(), schedule, features, lengths, Sampling(top_k=1), seed=seed)
    by_numpy = generate(runner, SignDecoder(), schedule, features, lengths, Sampling(), seed=np.int64(7))
    by_int = generate(runner, SignDecoder(), schedule, features, lengths, Sampling(), seed=7)
    assert all(torch.equal(a, b) for a, b in zip(by_numpy.bits, by_int.bits))
    per_row = generate(runner, SignDecoder(), schedule, features, lengths, Sampling(), seed=(np.int32(7), 8))
    assert per_row.bits[0].shape == by_int.bits[0].shape
