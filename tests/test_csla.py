"""CSLA masks, block layouts and the masked reference attention (CPU)."""
import pytest
import torch

from sparvar.attention import reference_attention
from sparvar.csla import (BlockLayout, block_layout_from_mask, csla_attention_ref, csla_layout, csla_token_mask)
from sparvar.schedule import get_schedule

PAPER_SIDES = (-1, -1, -1, 1, 1, 3, 5, 7)


def brute_force_token_mask(schedule, scale, sinks, sides):
    """Token mask written the slow, obvious way: one query and one key at a time, Python's round."""
    hq, wq = schedule.grids[scale]
    rows = []
    for y in range(hq):
        for x in range(wq):
            row = []
            for j in range(scale + 1):
                hj, wj = schedule.grids[j]
                k = j - (schedule.num_scales - len(sides))  # sides are per key scale, the last one the last scale's
                side = sides[k] if k >= 0 else -1
                cy, cx = round(y * hj / hq), round(x * wj / wq)
                for r in range(hj):
                    for c in range(wj):
                        if j < sinks:
                            row.append(True)
                        elif side == -1:
                            row.append(False)
                        else:
                            row.append(abs(r - cy) <= side // 2 and abs(c - cx) <= side // 2)
            rows.append(row)
    return torch.tensor(rows)


def brute_force_block_mask(token_mask, bm, bn):
    lq, lk = token_mask.shape
    out = torch.zeros_like(token_mask)
    for i in range(0, lq, bm):
        for n in range(0, lk, bn):
            if token_mask[i:i + bm, n:n + bn].any():
                out[i:i + bm, n:n + bn] = True
    return out


def random_qkv(schedule, scale, b=2, h=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lq, lk = schedule.lengths[scale], schedule.kv_len(scale)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (lq, lk, lk))
    return q, k, v


@pytest.mark.parametrize("scale,sinks,sides", [(6, 3, (1, 3, 5)), (5, 2, (-1, 1, 3, 5)), (6, 5, PAPER_SIDES), (4, 0, (3,))])
def test_token_mask_matches_brute_force(scale, sinks, sides):
    s = get_schedule(256)
    assert torch.equal(csla_token_mask(s, scale, sinks, sides), brute_force_token_mask(s, scale, sinks, sides))


def test_token_mask_non_square_schedule():
    s = get_schedule(256, "16:9")  # 9:16 template, non-square grids on every scale
    assert s.grids[5][0] != s.grids[5][1]
    assert torch.equal(csla_token_mask(s, 5, 2, (1, 3, 5)), brute_force_token_mask(s, 5, 2, (1, 3, 5)))


def test_a_key_scale_has_its_window_side_at_every_query_scale():
    """As the SparVAR authors' mask (its side looked up by the key's scale): at 1024^2 key scales 5..12 have sides
    -1, -1, -1, 1, 1, 3, 5, 7 whatever the query scale. So query scale 10 keeps 3x3 of its own scale and one token
    of scales 8 and 9; scale 11 5x5 of its own, 3x3 of scale 10; scale 12 7x7, 5x5, 3x3, 1, 1."""
    s = get_schedule(1024)
    for scale, kept in ((10, {8: 1, 9: 1, 10: 9}), (11, {8: 1, 9: 1, 10: 9, 11: 25}),
                        (12, {8: 1, 9: 1, 10: 9, 11: 25, 12: 49})):
        mask = csla_token_mask(s, scale, 5, PAPER_SIDES)
        h, w = s.grids[scale]
        row = mask[(h // 2) * w + w // 2]  # a query in the middle: no window clipped at a border
        per_scale = {j: int(row[s.offsets[j]:s.offsets[j + 1]].sum()) for j in range(scale + 1)}
        assert per_scale == {**{j: s.lengths[j] for j in range(5)}, 5: 0, 6: 0, 7: 0, **kept}, scale


def test_paper_densities_at_1024():
    s = get_schedule(1024)
    square = csla_layout(s, 12, 5, PAPER_SIDES, 128, 128)
    wide = csla_layout(s, 12, 5, PAPER_SIDES, 128, 64)
    assert (square.q_len, square.kv_len) == (4096, 10521)
    assert square.token_density == pytest.approx(0.0192, abs=5e-4)
    assert square.density == pytest.approx(0.164, abs=1e-3)
    assert wide.density == pytest.approx(0.135, abs=1e-3)
    assert "density=16.38%" in repr(square) and "token_density=1.92%" in repr(square)


@pytest.mark.parametrize("bm,bn", [(32, 32), (48, 40), (16, 64)])  # 256 x 521: partial last blocks on both sides
def test_block_layout_format(bm, bn):
    s = get_schedule(256)
    mask = csla_token_mask(s, 6, 3, (1, 3, 5))
    layout = block_layout_from_mask(mask, bm, bn)
    nq, nk = -(-256 // bm), -(-521 // bn)
    assert (layout.num_q_blocks, layout.num_kv_blocks) == (nq, nk)
    assert layout.kv_num_blocks.dtype == torch.int32 and layout.kv_indices.dtype == torch.int32
    assert layout.kv_num_blocks.shape == (nq,)
    assert layout.kv_indices.shape == (nq, int(layout.kv_num_blocks.max()))
    blocks = brute_force_block_mask(mask, bm, bn)[::bm, ::bn]
    for i in range(nq):
        n = int(layout.kv_num_blocks[i])
        row = layout.kv_indices[i].tolist()
        assert row[:n] == blocks[i].nonzero().flatten().tolist()  # exactly the active blocks, ascending
        assert all(p == row[n - 1] for p in row[n:])  # padding repeats the last valid index
    assert layout.density == pytest.approx(blocks.float().mean().item())
    assert torch.equal(layout.to_dense(), brute_force_block_mask(mask, bm, bn))


def test_windows_covering_everything_equal_dense():
    s = get_schedule(256)
    q, k, v = random_qkv(s, 6)
    layout = csla_layout(s, 6, 0, (99,) * 7, 32, 32)
    assert layout.density == 1.0 and layout.token_density == 1.0
    torch.testing.assert_close(csla_attention_ref(q, k, v, layout), reference_attention(q, k, v), rtol=0, atol=0)


def test_block_granular_attention_uses_or_reduced_mask():
    s = get_schedule(256)
    q, k, v = random_qkv(s, 6, seed=1)
    token = csla_token_mask(s, 6, 3, (1, 3, 5))
    layout = csla_layout(s, 6, 3, (1, 3, 5), 32, 16)
    assert layout.granularity == "block"
    expected = reference_attention(q, k, v, mask=brute_force_block_mask(token, 32, 16))
    torch.testing.assert_close(csla_attention_ref(q, k, v, layout), expected)
    # block granularity attends strictly more keys than the windows, so the outputs differ
    assert not torch.allclose(expected, reference_attention(q, k, v, mask=token), atol=1e-3)


def test_token_granular_attention_uses_token_mask():
    s = get_schedule(256)
    q, k, v = random_qkv(s, 5, seed=2)
    layout = csla_layout(s, 5, 3, (1, 3, 5), 32, 16, "token")
    assert layout.granularity == "token" and "granularity=token" in repr(layout)
    token = brute_force_token_mask(s, 5, 3, (1, 3, 5))
    torch.testing.assert_close(csla_attention_ref(q, k, v, layout), reference_attention(q, k, v, mask=token))
    # its block lists still name every block holding a kept token
    assert torch.equal(layout.block_mask(), brute_force_block_mask(token, 32, 16)[::32, ::16])


def test_layouts_are_cached():
    s = get_schedule(512)
    assert csla_layout(s, 9, 5, PAPER_SIDES, 128, 64) is csla_layout(s, 9, 5, PAPER_SIDES, 128, 64)
    assert csla_layout(s, 9, 5, PAPER_SIDES, 128, 64) is not csla_layout(s, 9, 5, PAPER_SIDES, 64, 64)


def test_layout_to_device_keeps_content():
    layout = csla_layout(get_schedule(256), 6, 3, (1, 3, 5), 16, 16)
    moved = layout.to("cpu")
    assert isinstance(moved, BlockLayout) and moved.density == layout.density
    assert torch.equal(moved.to_dense(), layout.to_dense())


def test_bad_inputs_raise():
    s = get_schedule(256)
    with pytest.raises(ValueError, match="positive odd"):
        csla_token_mask(s, 6, 3, (1, 4, 5))
    with pytest.raises(ValueError, match="outside"):
        csla_token_mask(s, 7, 3, (1, 3, 5))
    with pytest.raises(ValueError, match="granularity"):
        csla_layout(s, 6, 3, (1, 3, 5), 16, 16, "tile")
    with pytest.raises(ValueError, match="attend to no key"):
        csla_layout(s, 6, 0, (-1,), 16, 16)
    q, k, v = random_qkv(s, 5)
    with pytest.raises(ValueError, match="layout is for"):
        csla_attention_ref(q, k, v, csla_layout(s, 6, 3, (1, 3, 5), 16, 16))


def test_reference_attention_in_head_chunks_equals_all_at_once(monkeypatch):
    """The reference computes a few heads at a time when the score matrix would be large: same result, any mask."""
    import sparvar.attention as attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, n, 8, generator=g) for n in (7, 11, 11))
    masks = [None, torch.rand(7, 11, generator=g) < 0.5, torch.rand(2, 5, 7, 11, generator=g) < 0.5,
             torch.rand(2, 1, 1, 11, generator=g) < 0.5, torch.rand(5, 7, 11, generator=g) < 0.5]  # last: per head, 3-D
    whole = [attention.reference_attention(q, k, v, m) for m in masks]
    monkeypatch.setattr(attention, "REFERENCE_SCORE_BYTES", 2 * 7 * 11 * 4 * 2)  # two heads per chunk
    for m, want in zip(masks, whole):  # a query row with no key is NaN in both paths alike
        torch.testing.assert_close(attention.reference_attention(q, k, v, m), want, equal_nan=True)
