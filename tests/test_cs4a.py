"""CS4A selection, residual cache, key-set geometry and the gathered reference attention (CPU)."""
import pytest
import torch
import torch.nn.functional as F

from sparvar.attention import reference_attention
from sparvar.cs4a import (cs4a_attention_ref, cs4a_band, cs4a_decide_ref, cs4a_geometry, cs4a_topk, num_groups,
                          source_groups, upsample_cache)
from sparvar.schedule import ASPECT_TEMPLATES, RESOLUTION_NUM_SCALES, get_schedule


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def qkv(lq, lk, b=2, h=2, d=16, seed=0):
    return randn(b, h, lq, d, seed=seed), randn(b, h, lk, d, seed=seed + 1), randn(b, h, lk, d, seed=seed + 2)


def group_mask(key_idx, q_len, kv_len, group_size):
    """(B, H, Lq, Lk) bool: query i keeps the keys of its group g = i // group_size."""
    b, h = key_idx.shape[:2]
    mask = torch.zeros(b, h, q_len, kv_len, dtype=torch.bool)
    for i in range(q_len):
        mask[:, :, i].scatter_(-1, key_idx[:, :, i // group_size].long(), True)
    return mask


def test_topk_formula():
    assert cs4a_topk(4121, 0.2, 112) == 784
    assert cs4a_topk(121, 0.2, 16) == 32
    assert cs4a_topk(50, 0.2, 112) == 50  # never more than the KV length
    assert cs4a_topk(400, 0.05, 112) == 112  # at least one tile
    with pytest.raises(ValueError, match="ratio"):
        cs4a_topk(400, 0.0, 112)


def test_source_group_formula():
    src = source_groups(12, 9)
    expected = [min(8, max(0, round((g + 0.5) / 12 * 9 - 0.5))) for g in range(12)]
    assert src.tolist() == expected
    assert source_groups(22, 12).tolist() == [min(11, max(0, round((g + 0.5) / 22 * 12 - 0.5))) for g in range(22)]


def test_key_counts_at_1024():
    s = get_schedule(1024)
    topk = cs4a_topk(s.kv_len(10), 0.2, 112)
    g11 = cs4a_geometry(s, 10, 11, 192, (7, 9), 112, topk)
    g12 = cs4a_geometry(s, 10, 12, 192, (7, 9), 112, topk)
    assert (g11.num_decision_groups, g11.num_groups, g12.num_groups) == (9, 12, 22)
    assert g11.band_lengths == (560,) and g12.band_lengths == (560, 784)
    assert (topk, g11.key_count, g12.key_count) == (784, 1344, 2128)
    assert g11.key_count / s.kv_len(11) == pytest.approx(0.209, abs=1e-3)
    assert g12.key_count / s.kv_len(12) == pytest.approx(0.202, abs=1e-3)
    # the bands where the authors' aggregate_group_indices puts them: from the group's first window row (rows 4g - 3
    # at scale 11, 3g - 4 at scale 12, clipped at 0), the round-up padding after the window, shifted back at the end
    starts11 = (g11.band_starts[0] - s.offsets[11]).tolist()
    starts12 = (g12.band_starts[1] - s.offsets[12]).tolist()
    assert starts11 == [min(max(4 * g - 3, 0) * 48, 2304 - 560) for g in range(12)]
    assert starts11[:4] == [0, 48, 240, 432] and starts11[-1] == 2304 - 560
    assert starts12 == [min(max(3 * g - 4, 0) * 64, 4096 - 784) for g in range(22)]
    assert starts12[:4] == [0, 0, 128, 320] and starts12[-1] == 4096 - 784


ALL_SCHEDULES = [(res, ratio) for res in RESOLUTION_NUM_SCALES for ratio in ASPECT_TEMPLATES]


@pytest.mark.parametrize("res,ratio", ALL_SCHEDULES)
def test_geometry_valid_for_every_schedule(res, ratio):
    s = get_schedule(res, ratio)
    decision, group_size, sides, multiple = s.num_scales - 3, 192, (7, 9), 112
    topk = cs4a_topk(s.kv_len(decision), 0.2, multiple)
    selected = torch.stack([torch.randperm(s.kv_len(decision))[:topk].sort().values
                            for _ in range(num_groups(s.lengths[decision], group_size))])[None, None].int()
    for scale, side in zip((decision + 1, decision + 2), sides):
        h, w = s.grids[scale]
        geo = cs4a_geometry(s, decision, scale, group_size, sides, multiple, topk)
        groups = num_groups(h * w, group_size)
        assert geo.num_groups == groups
        assert ((geo.selected_group >= 0) & (geo.selected_group < geo.num_decision_groups)).all()
        prev_groups = num_groups(s.lengths[scale - 1], group_size)
        src = source_groups(groups, prev_groups)
        assert ((src >= 0) & (src < prev_groups)).all()
        band = cs4a_band(s, scale, group_size, side, multiple)
        assert band.length % multiple == 0 or band.length == h * w
        for g in range(groups):  # the band holds the group's rows +- side//2 and stays on its own scale
            lo, hi = int(band.start[g]) - s.offsets[scale], int(band.start[g]) - s.offsets[scale] + band.length
            first, last = g * group_size, min((g + 1) * group_size, h * w) - 1
            need_lo = max(0, first // w - side // 2) * w
            need_hi = min(h - 1, last // w + side // 2) * w + w
            assert 0 <= lo <= need_lo and need_hi <= hi <= h * w
            # as the authors place it: from the group's first band row, the padding after, shifted back at the end
            assert lo == min(need_lo, h * w - band.length)
        key_idx = geo.key_indices(selected)
        assert key_idx.dtype == torch.int32 and key_idx.shape == (1, 1, groups, geo.key_count)
        assert (key_idx[..., 1:] > key_idx[..., :-1]).all()  # ascending and duplicate-free
        assert int(key_idx.max()) < s.kv_len(scale)


def test_decide_selection_and_exact_cache():
    lq, lk, gs, topk = 40, 90, 16, 24  # 3 groups, the last partial
    q, k, v = qkv(lq, lk)
    out, selected, o_cache = cs4a_decide_ref(q, k, v, gs, topk)
    dense = reference_attention(q, k, v)
    torch.testing.assert_close(out, dense)
    assert selected.shape == (2, 2, 3, topk) and selected.dtype == torch.int32
    assert (selected[..., 1:] > selected[..., :-1]).all()
    probs = (q @ k.transpose(-1, -2)).softmax(-1)
    for g in range(3):
        colsum = probs[:, :, g * gs:(g + 1) * gs].sum(2)  # (B, H, Lk)
        kept = colsum.gather(-1, selected[:, :, g].long())
        dropped = colsum.masked_fill(torch.zeros_like(colsum, dtype=torch.bool).scatter(-1, selected[:, :, g].long(), True), -1)
        assert (kept.min(-1).values >= dropped.max(-1).values).all()  # the top-k column sums were kept
    # sparse attention over the selection + the cache reproduces dense; the cache is what the selection misses
    sparse = reference_attention(q, k, v, mask=group_mask(selected, lq, lk, gs))
    torch.testing.assert_close(o_cache, dense - sparse, atol=1e-5, rtol=1e-5)
    assert o_cache.abs().max() > 1e-3
    torch.testing.assert_close(cs4a_attention_ref(q, k, v, selected, gs, o_cache), dense, atol=1e-5, rtol=1e-5)


def test_sinks_lead_every_key_set_and_never_compete():
    """HART's text prefix: the first sink_len keys are always attended and never take a top-k slot."""
    lq, lk, gs, topk, sinks = 40, 90, 16, 24, 30
    q, k, v = qkv(lq, lk, seed=5)
    k[:, :, :sinks] *= 3.0  # make the sinks the strongest columns: a plain top-k would pick them
    _, plain, _ = cs4a_decide_ref(q, k, v, gs, topk)
    assert (plain < sinks).any()
    out, selected, o_cache = cs4a_decide_ref(q, k, v, gs, topk, sink_len=sinks)
    assert (selected >= sinks).all() and (selected[..., 1:] > selected[..., :-1]).all()
    probs = (q @ k.transpose(-1, -2)).softmax(-1)
    colsum = probs[:, :, :gs, sinks:].sum(2)  # group 0, non-sink columns
    assert torch.equal(selected[:, :, 0].long() - sinks, colsum.topk(topk, -1).indices.sort(-1).values)
    key_set = torch.cat([torch.arange(sinks, dtype=torch.int32).expand(2, 2, 3, sinks), selected], -1)
    sparse = reference_attention(q, k, v, mask=group_mask(key_set, lq, lk, gs))
    torch.testing.assert_close(o_cache, out - sparse, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sinks"):
        cs4a_decide_ref(q, k, v, gs, lk - sinks + 1, sink_len=sinks)
    # later scales: the geometry puts the sinks in front of the inherited selection and the bands
    s = get_schedule(256)
    geo = cs4a_geometry(s, 4, 5, 16, (3,), 16, 32, sink_len=21)
    sel = torch.arange(21, 21 + 32, dtype=torch.int32).expand(1, 1, geo.num_decision_groups, 32)
    key_idx = geo.key_indices(sel)
    assert geo.key_count == key_idx.shape[-1] == 21 + 32 + geo.band_lengths[0]
    assert torch.equal(key_idx[0, 0, :, :21], torch.arange(21, dtype=torch.int32).expand(geo.num_groups, 21))
    assert (key_idx[..., 1:] > key_idx[..., :-1]).all()


@pytest.mark.parametrize("sinks", [0, 21])
def test_key_indices_are_sinks_inherited_selection_and_bands(sinks):
    """Every group's key set, built independently: the sinks, the selection of the decision group it inherits
    (source groups followed scale by scale), then each later scale's band; per batch row and head."""
    s = get_schedule(256)
    geo = cs4a_geometry(s, 4, 6, 16, (3, 5), 16, 32, sink_len=sinks)
    assert len(geo.band_lengths) == 2
    sel = torch.stack([torch.randperm(s.kv_len(4) - sinks)[:32].sort().values + sinks
                       for _ in range(2 * 3 * geo.num_decision_groups)]).view(2, 3, geo.num_decision_groups, 32).int()
    key_idx = geo.key_indices(sel)
    assert key_idx.dtype == torch.int32 and key_idx.shape == (2, 3, geo.num_groups, geo.key_count)
    source = torch.arange(geo.num_decision_groups)
    for scale in (5, 6):
        source = source[source_groups(num_groups(s.lengths[scale], 16), len(source))]
    bands = [cs4a_band(s, 5, 16, 3, 16), cs4a_band(s, 6, 16, 5, 16)]
    bands[0] = type(bands[0])(bands[0].start[source_groups(num_groups(s.lengths[6], 16), num_groups(s.lengths[5], 16))],
                              bands[0].length)
    for b in range(2):
        for h in range(3):
            for g in range(geo.num_groups):
                want = torch.cat([torch.arange(sinks), sel[b, h, source[g]].long()]
                                 + [torch.arange(int(band.start[g]), int(band.start[g]) + band.length) for band in bands])
                assert torch.equal(key_idx[b, h, g].long(), want), (b, h, g)
    # the reference's int64 selection gives the same int32 key sets
    assert torch.equal(geo.key_indices(sel.long()), key_idx)


def test_gathered_attention_equals_group_masked_attention():
    lq, lk, gs = 50, 70, 16
    q, k, v = qkv(lq, lk, seed=3)
    key_idx = torch.stack([torch.randperm(lk)[:20] for _ in range(2 * 2 * 4)]).view(2, 2, 4, 20).int()
    expected = reference_attention(q, k, v, mask=group_mask(key_idx, lq, lk, gs))
    torch.testing.assert_close(cs4a_attention_ref(q, k, v, key_idx, gs), expected)
    cache = randn(*q.shape, seed=9)
    torch.testing.assert_close(cs4a_attention_ref(q, k, v, key_idx, gs, cache), expected + cache)


@pytest.mark.parametrize("use_cache", [True, False])
def test_full_selection_and_full_bands_equal_dense(use_cache):
    s = get_schedule(256)  # decision 4, later 5 and 6
    gs = 16
    q, k, v = qkv(s.lengths[4], s.kv_len(4), seed=4)
    _, selected, o_cache = cs4a_decide_ref(q, k, v, gs, s.kv_len(4))
    assert o_cache.abs().max() < 1e-5
    for scale in (5, 6):
        geo = cs4a_geometry(s, 4, scale, gs, (99, 99), 16, s.kv_len(4))
        assert geo.key_count == s.kv_len(scale)
        q, k, v = qkv(s.lengths[scale], s.kv_len(scale), seed=scale)
        cache = upsample_cache(o_cache, s.grids[4], s.grids[scale]) if use_cache else None
        out = cs4a_attention_ref(q, k, v, geo.key_indices(selected), gs, cache)
        torch.testing.assert_close(out, reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_upsample_cache_keeps_raster_layout():
    b, h, d, src, dst = 2, 3, 4, (5, 4), (10, 8)
    rows = torch.arange(src[0], dtype=torch.float32)[:, None].expand(*src)  # value = row index, every channel
    cache = rows.reshape(1, 1, -1, 1).expand(b, h, -1, d).clone()
    up = upsample_cache(cache, src, dst).view(b, h, *dst, d)
    expected = F.interpolate(rows[None, None], size=dst, mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(up, expected[None, None, :, :, None].expand_as(up))
    assert not torch.allclose(up[:, :, 0], up[:, :, -1])  # depends on the row: no transposed layout
    with pytest.raises(ValueError, match="tokens"):
        upsample_cache(cache, (4, 4), dst)


def bilinear_float64(cache: torch.Tensor, src, dst) -> torch.Tensor:
    """align_corners=False bilinear written out (source coordinate (i + 0.5) * in / out - 0.5, clamped at 0; the
    upper neighbour clamped at the border), in float64: an independent check of upsample_cache."""
    b, h, _, d = cache.shape
    image = cache.double().view(b, h, *src, d)

    def taps(n_in, n_out):
        pos = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
        lo = pos.floor().long().clamp_max(n_in - 1)
        return lo, (lo + 1).clamp_max(n_in - 1), (pos - lo)

    y0, y1, wy = taps(src[0], dst[0])
    x0, x1, wx = taps(src[1], dst[1])
    wy, wx = wy[:, None, None], wx[None, :, None]
    top = image[:, :, y0][:, :, :, x0] * (1 - wx) + image[:, :, y0][:, :, :, x1] * wx
    bottom = image[:, :, y1][:, :, :, x0] * (1 - wx) + image[:, :, y1][:, :, :, x1] * wx
    return (top * (1 - wy) + bottom * wy).reshape(b, h, -1, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("src,dst", [((40, 40), (48, 48)), ((40, 40), (64, 64)), ((5, 4), (9, 7)), ((3, 3), (3, 3))])
def test_upsample_cache_matches_the_bilinear_formula(dtype, src, dst):
    cache = torch.randn(2, 3, src[0] * src[1], 16).to(dtype)
    up = upsample_cache(cache, src, dst)
    assert up.dtype == dtype and up.shape == (2, 3, dst[0] * dst[1], 16) and up.stride(-1) == 1
    ref = bilinear_float64(cache, src, dst)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)  # fp32 coordinates; one bf16 rounding
    torch.testing.assert_close(up.double(), ref, **tol)


def test_bad_inputs_raise():
    q, k, v = qkv(40, 90)
    with pytest.raises(ValueError, match="topk"):
        cs4a_decide_ref(q, k, v, 16, 91)
    with pytest.raises(ValueError, match="key_idx"):
        cs4a_attention_ref(q, k, v, torch.zeros(2, 2, 2, 8, dtype=torch.int32), 16)
    with pytest.raises(TypeError, match="int32"):
        cs4a_attention_ref(q, k, v, torch.zeros(2, 2, 3, 8), 16)
    with pytest.raises(ValueError, match="odd"):
        cs4a_band(get_schedule(256), 5, 16, 4, 16)
    geo = cs4a_geometry(get_schedule(256), 4, 5, 16, (3, 5), 16, 32)
    with pytest.raises(ValueError, match="selection"):
        geo.key_indices(torch.zeros(1, 1, 4, 31, dtype=torch.int32))
