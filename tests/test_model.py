import math

import pytest
import torch

from sparvar.config import CONFIGS, get_config
from sparvar.generate import Sampling, SeededRows, TorchRunner, sample_bits
from sparvar.model import KVCache, apply_rope, build_model, rope_angles, rope_tables
from sparvar.schedule import ASPECT_TEMPLATES, get_schedule, parse_aspect

TINY = get_config("infinity-tiny")


def test_schedules_match_spec():
    s = get_schedule(1024)
    assert [h for h, _ in s.grids] == [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64]
    assert s.total_tokens == 10521
    assert list(s.offsets[:-1]) == [0, 1, 5, 21, 57, 121, 265, 521, 921, 1497, 2521, 4121, 6425]
    assert get_schedule(512).total_tokens == 2521 and get_schedule(256).total_tokens == 521
    assert len(ASPECT_TEMPLATES) == 15
    assert get_schedule(1024, "9:16").grids[-1] == (48, 84)  # snaps to the 0.571 template (official 7:4 transposed)
    assert get_schedule(1024, "16:9").grids[-1] == (84, 48)
    assert parse_aspect("4:3") == 1.333 and parse_aspect(1.0) == 1.0


def test_bad_resolution_and_aspect_name_the_supported_ones():
    with pytest.raises(ValueError, match=r"supported: \[256, 512, 768, 1024\]"):
        get_schedule(300)
    with pytest.raises(ValueError, match="supported h/w ratios"):
        get_schedule(1024, "7:3")
    with pytest.raises(ValueError, match="unknown model 'infinity-3b'"):
        get_config("infinity-3b")


def test_rope_positions_come_from_the_1024_grid():
    s = get_schedule(256)
    rows, cols = s.rope_positions(6)  # 16x16 scale -> rows 0, 4, ..., 60 of the 64x64 grid
    assert sorted(set(rows)) == list(range(0, 64, 4)) and sorted(set(cols)) == list(range(0, 64, 4))
    rows, _ = get_schedule(1024).rope_positions(3)  # 6x6: round-half-even of i * 64/6
    assert sorted(set(rows)) == [round(i * 64 / 6) for i in range(6)] == [0, 11, 21, 32, 43, 53]


def test_rope_positions_round_as_the_official_float32_product():
    """Official basic.py forms i * (H / h) as int tensor * Python float, i.e. in float32: at aspect 3:1, scale 9 (54 rows
    on the 111-row rope grid) row 27 is 55.5 exactly in float32 (-> 56) but 55.49999... in float64 (-> 55)."""
    for aspect in ("3:1", "1:3"):
        s = get_schedule(1024, aspect)
        rows, cols = s.rope_positions(9)
        h, w = s.grids[9]
        line = rows[::w] if aspect == "3:1" else cols[:w]
        assert len(line) == 54 and line[27] == 56 and round(27 * (111 / 54)) == 55


def test_rope_matches_direct_formula():
    D = 128
    rows, cols = torch.tensor([0, 5, 63]), torch.tensor([7, 0, 40])
    ang = rope_angles(D, rows, cols)
    for t in range(3):
        for pair in (0, 31, 32, 63):
            k = pair if pair < 32 else pair - 32
            pos = (rows if pair < 32 else cols)[t].item()
            assert ang[t, pair].item() == pytest.approx(pos * 10000 ** (-2 * k / 64), rel=1e-12)
    x = torch.randn(1, 1, 3, D, dtype=torch.float64)
    rope = torch.stack([ang.cos(), ang.sin()]).float()
    y = apply_rope(x.float(), rope)
    # pair (2i, 2i+1) rotated by angle i: check one pair by hand, and that the norm is preserved
    a = ang[1, 40].item()
    x0, x1 = x[0, 0, 1, 80].item(), x[0, 0, 1, 81].item()
    assert y[0, 0, 1, 80].item() == pytest.approx(x0 * math.cos(a) - x1 * math.sin(a), abs=1e-5)
    assert y[0, 0, 1, 81].item() == pytest.approx(x0 * math.sin(a) + x1 * math.cos(a), abs=1e-5)
    assert torch.allclose(y.norm(dim=-1), x.float().norm(dim=-1), atol=1e-5)


def _teacher_inputs(model, schedule, text, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = [text.sos]
    for k in range(1, schedule.num_scales):
        codes = torch.randn(B, schedule.lengths[k], model.cfg.bits, generator=g)
        inputs.append(model.scale_input(k, codes, text))
    return inputs


@torch.no_grad()
def test_cached_steps_equal_one_block_causal_forward():
    """Pins the KV cache, RoPE offsets per scale and the level embedding together."""
    model = build_model(TINY, seed=1)
    schedule = get_schedule(256)
    text = model.encode_text(torch.randn(2, 6, TINY.text_dim), torch.tensor([6, 3]), cfg_guidance=True)
    inputs = _teacher_inputs(model, schedule, text, 2)
    cache = model.new_cache(text.batch, schedule)
    ropes = rope_tables(schedule, TINY.head_dim)
    stepped = []
    for k in range(schedule.num_scales):
        cache.offset = schedule.offsets[k]
        stepped.append(model.step(inputs[k], k, text, cache, ropes[k]))
    full = model.forward_all_scales(inputs, text, schedule)
    for k, (a, b) in enumerate(zip(stepped, full)):
        assert a.shape == (4, schedule.lengths[k], TINY.num_logits)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"scale {k}")
    # and the scale index matters: a wrong level embedding changes the logits
    cache.offset = schedule.offsets[3]
    wrong = model.step(inputs[3], 4, text, cache, ropes[3])
    assert (wrong - stepped[3]).abs().max() > 1e-3


@torch.no_grad()
def test_blocks_fused_across_boundaries_equal_the_blocks_one_by_one():
    """run_blocks computes each block's first modulation inside the previous block's last op; the logits equal the
    blocks written out one at a time (modulate, self-attention, cross-attention, gated FFN residual), bit for bit."""
    from sparvar import model as M

    model = build_model(TINY, seed=2)
    schedule = get_schedule(256)
    text = model.encode_text(torch.randn(2, 6, TINY.text_dim), torch.tensor([6, 3]), cfg_guidance=True)
    scale = 2
    tokens = model.scale_input(scale, torch.randn(2, schedule.lengths[scale], TINY.bits).sign(), text)
    rope = rope_tables(schedule, TINY.head_dim)[scale]

    def run(step):
        cache = model.new_cache(text.batch, schedule)
        cache.offset = schedule.offsets[scale]
        cache.k.normal_(generator=torch.Generator().manual_seed(0))
        cache.v.copy_(cache.k)
        return step(cache)

    def one_by_one(cache):
        x = tokens + model.lvl_embed.weight[scale]
        for layer, blk in enumerate(model.blocks):
            gamma1, gamma2, scale1, scale2, shift1, shift2 = text.ada[layer].unbind(2)
            h = M.modulate(x, scale1, shift1, blk.eps)
            x, c = M.residual_layer_norm(x, blk.sa(h, rope, cache, layer, scale), gamma1, blk.ca_norm.weight,
                                         blk.ca_norm.bias, blk.ca_norm.eps)
            x, h = M.residual_modulate(x, blk.ca(c, text.k[layer], text.v[layer], text.key_bias), scale2, shift2, blk.eps)
            x = M.gated_residual(x, blk.ffn(h), gamma2)
        return model.head(model.head_nm(x.float(), text.cond))

    fused = run(lambda cache: model.step(tokens, scale, text, cache, rope))
    assert torch.equal(fused, run(one_by_one))


@torch.no_grad()
def test_kv_cache_is_preallocated_and_written_in_place():
    model = build_model(TINY)
    schedule = get_schedule(256)
    cache = model.new_cache(2, schedule)
    ptr = cache.k.data_ptr()
    pages = -(-schedule.total_tokens // KVCache.PAGE) * KVCache.PAGE  # whole pages (cuDNN's paged CSLA reads them)
    assert cache.k.shape == (TINY.depth, 2, TINY.heads, pages, TINY.head_dim)
    runner = TorchRunner(model, schedule)
    runner.begin(torch.randn(1, 4, TINY.text_dim), torch.tensor([4]), guided=True)
    runner.cache = cache
    runner.step(0, None)
    assert cache.k.data_ptr() == ptr and cache.k[:, :, :, 0].abs().sum() > 0 and cache.k[:, :, :, 1:].abs().sum() == 0


@torch.no_grad()
def test_cfg_rows_use_learned_uncond_with_prompt_length():
    model = build_model(TINY)
    feats = torch.randn(1, 5, TINY.text_dim)
    t = model.encode_text(feats, torch.tensor([3]), cfg_guidance=True)
    assert t.batch == 2 and (t.key_bias[:, 0, 0] == 0).tolist() == [[True] * 3 + [False] * 2] * 2
    assert t.key_lens.dtype == torch.int32 and t.key_lens.tolist() == [3, 3]  # the same mask, as counts
    # padding positions must not influence anything
    feats2 = feats.clone()
    feats2[:, 3:] = 100.0
    t2 = model.encode_text(feats2, torch.tensor([3]), cfg_guidance=True)
    torch.testing.assert_close(t.cond, t2.cond)
    # the uncond row equals encoding cfg_uncond[:3] as a prompt
    t3 = model.encode_text(model.cfg_uncond[:3][None], torch.tensor([3]), cfg_guidance=False)
    torch.testing.assert_close(t.cond[1:], t3.cond, atol=1e-5, rtol=1e-5)


def test_bit_sampling_thresholds_and_determinism():
    logits = torch.zeros(1, 1, 8)
    # bit 0: p1 = 0.02 -> always 0; bit 1: p1 = 0.98 -> always 1; bits 2,3: p1 = 0.5
    for b, p in ((0, 0.02), (1, 0.98)):
        logits[0, 0, 2 * b + 1] = math.log(p / (1 - p))
    s = Sampling(top_p=0.97)
    draws = torch.stack([sample_bits(logits, s, SeededRows(i, logits.shape[0], 'cpu')) for i in range(200)])
    assert draws[..., 0].sum() == 0 and draws[..., 1].sum() == 200
    assert 60 < draws[..., 2].sum() < 140
    a = sample_bits(logits, s, SeededRows(3, logits.shape[0], 'cpu'))
    b = sample_bits(logits, s, SeededRows(3, logits.shape[0], 'cpu'))
    assert torch.equal(a, b)
    # the official top-p removes only the smaller of the two values: below top_p 0.5 it is greedy (p1 0.6 -> bit
    # 1, p1 0.4 -> bit 0), and at a tie bit 1 stays (an ascending sort puts bit 0 first)
    pairs = torch.zeros(1, 1, 6)
    for b, p in ((0, 0.6), (1, 0.4), (2, 0.5)):
        pairs[0, 0, 2 * b + 1] = math.log(p / (1 - p))
    for top_p in (0.3, 0.5):
        draws = torch.stack([sample_bits(pairs, Sampling(top_p=top_p), SeededRows(i, 1, 'cpu')) for i in range(50)])
        assert draws[..., 0].min() == 1 and draws[..., 1].max() == 0 and draws[..., 2].min() == 1, top_p
    greedy = sample_bits(logits, Sampling(top_k=1), SeededRows(0, logits.shape[0], 'cpu'))
    assert greedy[0, 0, :2].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="top_k"):
        Sampling(top_k=5)
    # NaN passes `tau <= 0` and `0 <= top_p <= 1` alike, and a NaN cfg turns every p1 into NaN: all bits 0
    for bad in ({"cfg": float("nan")}, {"tau": float("nan")}, {"top_p": float("nan")}, {"cfg": float("inf")},
                {"cfg": 10**400}):  # an int beyond float's range: a ValueError too, not an OverflowError
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a finite number"):
            Sampling(**bad)


def test_param_counts_from_meta():
    assert sum(p.numel() for p in build_model(get_config("infinity-2b"), init="meta").parameters()) == 2_204_564_032
    n8 = sum(p.numel() for p in build_model(get_config("infinity-8b"), init="meta").parameters())
    assert 8.2e9 < n8 < 8.5e9
    assert set(CONFIGS) >= {"infinity-2b", "infinity-8b", "infinity-tiny"}


def test_per_row_seeds_draw_what_one_prompt_generations_draw():
    """Seeds given per prompt row: each row samples exactly the bits of a one-prompt generation with its seed (what a
    server batching requests needs); one seed for a one-prompt batch is the same stream as before."""
    from sparvar.pipeline import Pipeline

    pipe = Pipeline.create("infinity-tiny", resolution=256, attention="sparvar")
    f, l = pipe.text_features(["a red car", "a small dog on the grass"], allow_hashed=True)
    both = pipe.generate(f, l, Sampling(cfg=3.0), seed=[5, 6])
    for i, seed in enumerate((5, 6)):
        alone = pipe.generate(f[i:i + 1, :int(l[i])], l[i:i + 1], Sampling(cfg=3.0), seed=[seed])
        assert all(torch.equal(a[i:i + 1], b) for a, b in zip(both.bits, alone.bits)), i
        assert all(torch.equal(a, b) for a, b in zip(alone.bits, pipe.generate(
            f[i:i + 1, :int(l[i])], l[i:i + 1], Sampling(cfg=3.0), seed=seed).bits))
    shared = pipe.generate(f, l, Sampling(cfg=3.0), seed=5)
    assert not all(torch.equal(a[1:], b[1:]) for a, b in zip(shared.bits, both.bits))  # one stream: rows differ
    with pytest.raises(ValueError, match="one int seed per prompt row \\(2\\)"):
        pipe.generate(f, l, Sampling(cfg=3.0), seed=[5])


@torch.no_grad()
def test_absorbed_cross_attention_equals_projections_and_attention():
    """The absorbed form (query and output projections folded into the text, biases included) computes the same
    cross-attention as the projections and SDPA: per block with padded prompts, and through a whole step."""
    from sparvar.model import absorption_pays

    model = build_model(TINY, dtype=torch.float64, seed=3)
    gen = torch.Generator().manual_seed(0)
    for blk in model.blocks:  # nonzero biases: their folding into the scores and values is what is checked
        for p in (blk.ca.mat_q.bias, blk.ca.proj.bias, blk.ca.v_bias):
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    schedule = get_schedule(256)
    text = model.encode_text(torch.randn(2, 6, TINY.text_dim, dtype=torch.float64), torch.tensor([6, 3]),
                             cfg_guidance=True)
    absorbed = model.absorb_text(text)
    assert absorbed.absorbed is not None and text.absorbed is None
    c = torch.randn(4, 10, TINY.width, generator=gen, dtype=torch.float64)
    for layer, blk in enumerate(model.blocks):
        want = blk.ca(c, text.k[layer], text.v[layer], text.key_bias)
        got = blk.ca(c, text.k[layer], text.v[layer], text.key_bias, absorbed=absorbed.absorbed[layer])
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, msg=f"layer {layer}")
    scale = 3
    tokens = model.scale_input(scale, torch.randn(2, schedule.lengths[scale], TINY.bits, generator=gen).sign(), text)
    rope = rope_tables(schedule, TINY.head_dim)[scale].double()
    logits = []
    for t in (text, absorbed):
        cache = model.new_cache(t.batch, schedule)
        cache.offset = schedule.offsets[scale]
        logits.append(model.step(tokens, scale, t, cache, rope))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-9, rtol=1e-9)
    # fewer FLOPs while (heads - 1) * text length < width (up to 136 positions at 2B, 132 at 8B), and the absorbed
    # text no larger than the projections: rows * heads * length <= width
    assert [absorption_pays(CONFIGS["infinity-2b"], n, 1) for n in (64, 128, 129)] == [True, True, False]
    assert [absorption_pays(CONFIGS["infinity-8b"], n, 1) for n in (64, 128, 129)] == [True, True, False]
    tiny = get_config("infinity-tiny")  # width 128, 2 heads: the size bound, 1 * 2 * L <= 128, cuts at 64
    assert [absorption_pays(tiny, n, 1) for n in (32, 64, 65)] == [True, True, False]
    assert [absorption_pays(CONFIGS["infinity-2b"], 64, rows) for rows in (2, 3, 8)] == [True, False, False]
    assert [absorption_pays(CONFIGS["infinity-8b"], 64, rows) for rows in (2, 3)] == [True, False]


@torch.no_grad()
def test_absorbed_cross_attention_in_bf16_is_as_accurate_as_the_projections():
    """In bf16 the absorbed form stays as close to fp32 as the projections and attention do (a version that folded
    b_o / H into the rounded values was 2.5x further off: that rounding error is the same for every row of a binade,
    and the second GEMM sums H*L rows)."""
    import copy

    from sparvar.model import CrossAttention, absorbed_cross_attention

    torch.manual_seed(0)
    C, H, B, L, n = 1024, 16, 2, 16, 64
    exact = CrossAttention(C, C, H)
    for p in exact.parameters():
        p.normal_(0, 0.02)
    half = copy.deepcopy(exact).bfloat16()
    x, k, v = (torch.randn(*shape).bfloat16() for shape in ((B, n, C), (B, H, L, C // H), (B, H, L, C // H)))
    key_bias = torch.zeros(B, 1, 1, L)
    key_bias[..., 13:] = float("-inf")
    want = exact(x.float(), k.float(), v.float(), key_bias)

    def error(out):
        return ((out.float() - want).norm() / want.norm()).item()

    projected = error(half(x, k, v, key_bias.bfloat16()))
    absorbed = error(absorbed_cross_attention(x, half.absorb(k, v, key_bias.bfloat16())))
    assert absorbed < 1.3 * projected, (absorbed, projected)
