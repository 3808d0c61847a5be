"""The Triton kernels against the fp32 references on a CUDA GPU (skipped without one; see conftest.py).

Fresh random inputs per test, odd lengths (partial last query/key blocks and groups), strided inputs (q as a
transposed (B, L, H, D) projection, K/V as views into a longer preallocated cache), bf16 and fp16.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

kernels = pytest.importorskip("sparvar.kernels")
if not kernels.HAS_TRITON:
    pytest.skip("triton is not installed", allow_module_level=True)

from sparvar.attention import reference_attention  # noqa: E402
from sparvar.csla import block_layout_from_mask  # noqa: E402
from sparvar.kernels.csla import check_layout_values  # noqa: E402
from sparvar.kernels.cs4a import TOPK_RADIX_BITS, check_key_values, decision_dense_pass  # noqa: E402

DEV = "cuda"
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def projected_q(b, h, length, d, dtype):
    """q as the model makes it: a (B, L, H, D) projection seen as (B, H, L, D) (non-contiguous)."""
    return (torch.randn(b, length, h, d, device=DEV, dtype=dtype) * d**-0.5).transpose(1, 2)


def cache_view(b, h, length, d, dtype, spare=37):
    """K or V as a view of the first `length` rows of a longer preallocated cache filled with NaN beyond them."""
    buf = torch.full((b, h, length + spare, d), float("nan"), device=DEV, dtype=dtype)
    buf[:, :, :length] = torch.randn(b, h, length, d, device=DEV, dtype=dtype)
    return buf[:, :, :length]


def random_layout(q_len, kv_len, block_m, block_n, density=0.3, with_last=None):
    nq, nk = -(-q_len // block_m), -(-kv_len // block_n)
    blocks = torch.rand(nq, nk) < density
    blocks[torch.arange(nq), torch.randint(0, nk, (nq,))] = True
    if with_last is not None:
        blocks[:, -1] = with_last
        blocks[0, -1] = True  # at least one row ends with the partial block
        blocks[:, 0] = True
    mask = blocks.repeat_interleave(block_m, 0).repeat_interleave(block_n, 1)[:q_len, :kv_len]
    return block_layout_from_mask(mask, block_m, block_n).to(DEV)


def assert_close(out, ref, dtype, what):
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype], f"{what}: max abs error {err:.3g} > {TOL[dtype]}"


# ------------------------------------------------------------------------------------------------ CSLA
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [(128, 64), (128, 128), (64, 64)])
def test_csla_matches_reference(dtype, block, d):
    b, h, q_len, kv_len = 2, 3, 300, 1000  # partial last query block and key block
    q = projected_q(b, h, q_len, d, dtype)
    k, v = cache_view(b, h, kv_len, d, dtype), cache_view(b, h, kv_len, d, dtype)
    layout = random_layout(q_len, kv_len, *block)
    check_layout_values(layout.kv_num_blocks, layout.kv_indices, kv_len, block[1])
    out = kernels.csla_attention(q, k, v, layout)
    # laid out like the token-major q (the projection after attention reads it without a copy)
    assert out.shape == q.shape and out.dtype == dtype and out.stride() == q.stride()
    assert_close(out, reference_attention(q, k, v, mask=layout.to_dense()), dtype, f"csla {block}")


@pytest.mark.parametrize("block,d", [((128, 64), 64), ((16, 16), 64), ((32, 32), 128)])
def test_csla_other_tiles_and_head_dims(block, d):
    dtype = torch.bfloat16
    q_len, kv_len = 100, 333
    q = projected_q(1, 2, q_len, d, dtype)
    k, v = cache_view(1, 2, kv_len, d, dtype), cache_view(1, 2, kv_len, d, dtype)
    layout = random_layout(q_len, kv_len, *block)
    order = kernels.query_block_order(layout.kv_num_blocks)
    out = kernels.csla_attention_blocks(q, k, v, layout.kv_num_blocks, layout.kv_indices, *block, q_order=order, scale=0.8)
    ref = kernels.reference_csla_attention(q, k, v, layout.kv_num_blocks, layout.kv_indices, *block, scale=0.8)
    assert_close(out, ref, dtype, f"csla {block} d{d}")


@pytest.mark.parametrize("with_last", [True, False])
def test_csla_even_and_partial_last_key_block(with_last):
    """Rows that end on the partial last key block and rows that do not, plus an exact multiple of the tile."""
    dtype = torch.bfloat16
    for kv_len in (1000, 1024):
        q = projected_q(1, 2, 256, 128, dtype)
        k, v = cache_view(1, 2, kv_len, 128, dtype), cache_view(1, 2, kv_len, 128, dtype)
        layout = random_layout(256, kv_len, 128, 64, with_last=with_last)
        out = kernels.csla_attention(q, k, v, layout)
        assert_close(out, reference_attention(q, k, v, mask=layout.to_dense()), dtype, f"csla kv_len {kv_len}")


def test_csla_paper_layout_at_1024():
    from sparvar.schedule import get_schedule
    from sparvar.sparse import default_policy

    schedule = get_schedule(1024)
    policy = default_policy("infinity-2b", schedule)
    dtype = torch.bfloat16
    layout = policy.csla_layout(schedule, 12)  # 128x128 blocks, 16.4% of tiles
    layout = layout.to(DEV)
    q = projected_q(1, 2, layout.q_len, 128, dtype)
    k, v = cache_view(1, 2, layout.kv_len, 128, dtype), cache_view(1, 2, layout.kv_len, 128, dtype)
    out = kernels.csla_attention(q, k, v, layout)
    assert_close(out, reference_attention(q, k, v, mask=layout.to_dense()), dtype, "csla paper layout")


# ------------------------------------------------------------------------------------------------ CSLA, variants
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("block", [(64, 64), (128, 64)], ids=lambda b: "x".join(map(str, b)))
@pytest.mark.parametrize("variant", sorted(kernels.csla.CSLA_VARIANTS))
def test_csla_variants_match_reference(variant, block, d):
    """Each CSLA_VARIANTS entry (the forms bench/csla_variants.py times side by side) at its fixed config, on a
    token-major q and K/V cache views with NaN past kv_len; rows that end on the partial last key block and, at 1024
    keys, a layout with none."""
    dtype = torch.bfloat16 if block != (64, 64) or d == 128 else torch.float16
    for kv_len in (1000, 1024):
        q = projected_q(2, 3, 300, d, dtype)
        k, v = cache_view(2, 3, kv_len, d, dtype), cache_view(2, 3, kv_len, d, dtype)
        layout = random_layout(300, kv_len, *block, with_last=True)
        order = kernels.query_block_order(layout.kv_num_blocks)
        out = kernels.csla_attention_blocks(q, k, v, layout.kv_num_blocks, layout.kv_indices, *block, q_order=order,
                                            variant=variant)
        assert out.stride() == q.stride()
        assert_close(out, reference_attention(q, k, v, mask=layout.to_dense()), dtype, f"{variant} {block} d{d} {kv_len}")


def token_layout(q_len, kv_len, block_m, block_n):
    """A token mask with full tiles (the first key blocks, like sinks), partial tiles, a query block whose tiles are all
    partial, and the partial last query/key blocks."""
    mask = torch.rand(q_len, kv_len) < 0.05
    mask[:, :2 * block_n] = True
    mask[block_m:2 * block_m] = torch.rand(block_m, kv_len) < 0.03
    mask[block_m:2 * block_m, 0] = True
    mask[:, -3:] |= torch.rand(q_len, 3) < 0.5
    return block_layout_from_mask(mask, block_m, block_n, "token").to(DEV)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [(128, 64), (64, 64), (128, 128)])
def test_csla_token_exact_matches_reference(dtype, block, d):
    from sparvar.csla import csla_attention_ref

    b, h, q_len, kv_len = 2, 3, 300, 1000
    q = projected_q(b, h, q_len, d, dtype)
    k, v = cache_view(b, h, kv_len, d, dtype), cache_view(b, h, kv_len, d, dtype)
    layout = token_layout(q_len, kv_len, *block)
    assert bool((layout.partial_index == -1).any()) and layout.partial_masks.shape[0] > 0
    out = kernels.csla_attention(q, k, v, layout)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, csla_attention_ref(q, k, v, layout), dtype, f"csla token {block} d{d}")


def test_csla_token_paper_layout_at_1024():
    from sparvar.schedule import get_schedule
    from sparvar.sparse import default_policy

    schedule = get_schedule(1024)
    policy = default_policy("infinity-2b", schedule, csla_granularity="token")
    dtype = torch.bfloat16
    layout = policy.csla_layout(schedule, 12).to(DEV)  # 64x64 tiles, 1.9% of pairs
    q = projected_q(1, 2, layout.q_len, 64, dtype)
    k, v = cache_view(1, 2, layout.kv_len, 64, dtype), cache_view(1, 2, layout.kv_len, 64, dtype)
    out = kernels.csla_attention(q, k, v, layout)
    assert_close(out, reference_attention(q, k, v, mask=layout.to_dense()), dtype, "csla token paper layout")


@pytest.mark.parametrize("d", [64, 128])
def test_csla_aot_entry_matches_reference(d):
    """The TensorRT AOT entry, launched here through Triton with TensorRT's arguments (contiguous tensors)."""
    from sparvar.kernels.aot import _csla_aot_kernel

    dtype, b, h, q_len, kv_len, block = torch.float16, 2, 3, 300, 1000, (64, 64)
    q = torch.randn(b, h, q_len, d, device=DEV, dtype=dtype) * d**-0.5
    k, v = (torch.randn(b, h, kv_len, d, device=DEV, dtype=dtype) for _ in range(2))
    layout = random_layout(q_len, kv_len, *block)
    kernel = kernels.aot_kernel("CSLAAttention", dtype="float16", head_dim=d, attrs=dict(block_m=64, block_n=64))
    out = torch.empty_like(q)
    _csla_aot_kernel[(layout.num_q_blocks, b * h)](q, k, v, layout.kv_num_blocks, layout.kv_indices, h, q_len, kv_len,
                                                   layout.kv_indices.shape[1], out, **kernel.constexprs,
                                                   num_warps=kernel.num_warps, num_stages=kernel.num_stages)
    assert_close(out, reference_attention(q, k, v, mask=layout.to_dense()), dtype, f"csla aot d{d}")


def test_dense_attention_and_lse():
    dtype = torch.bfloat16
    q = projected_q(2, 2, 333, 128, dtype)
    k, v = cache_view(2, 2, 777, 128, dtype), cache_view(2, 2, 777, 128, dtype)
    out, lse = kernels.dense_attention(q, k, v, return_lse=True)
    assert_close(out, reference_attention(q, k, v), dtype, "dense")
    ref_lse = torch.logsumexp(q.float() @ k.float().transpose(-1, -2), dim=-1)
    assert (lse - ref_lse).abs().max().item() < 1e-3


# ------------------------------------------------------------------------------------------------ CS4A
def random_key_idx(b, h, groups, count, below, device=DEV):
    """(B, H, G, count) int32 ascending unique positions in [0, below)."""
    return torch.rand(b, h, groups, below, device=device).topk(count, dim=-1).indices.sort(dim=-1).values.to(torch.int32)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("band,cache", [(False, False), (True, False), (True, True)])
def test_cs4a_matches_reference(dtype, band, cache, d):
    b, h, gs, q_len, kv_len = 2, 2, 192, 500, 3000  # 3 groups, the last one partial
    groups = -(-q_len // gs)
    q = projected_q(b, h, q_len, d, dtype)
    k, v = cache_view(b, h, kv_len, d, dtype), cache_view(b, h, kv_len, d, dtype)
    key_idx = random_key_idx(b, h, groups, 224, 2000)
    band_start = torch.randint(2000, kv_len - 112, (groups,), device=DEV, dtype=torch.int32) if band else None
    band_len = 112 if band else 0  # 336 keys: the last 64-key tile is partial
    # a residual is a small correction; large values would only test bf16 rounding of the sum (1 ulp = 0.03 at 4)
    o_cache = 0.1 * torch.randn(b, h, q_len, d, device=DEV, dtype=dtype) if cache else None
    check_key_values(key_idx, kv_len, band_start, band_len)
    out = kernels.cs4a_attention(q, k, v, key_idx, gs, o_cache, band_start=band_start, band_len=band_len)
    ref = kernels.reference_cs4a_attention(q, k, v, key_idx, gs, o_cache, band_start=band_start, band_len=band_len)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, ref, dtype, f"cs4a band={band} cache={cache}")


def test_cs4a_tiny_model_groups_and_head_dim_64():
    dtype = torch.bfloat16
    b, h, d, gs, q_len, kv_len = 2, 2, 64, 16, 100, 265
    groups = -(-q_len // gs)
    q = projected_q(b, h, q_len, d, dtype)
    k, v = cache_view(b, h, kv_len, d, dtype), cache_view(b, h, kv_len, d, dtype)
    key_idx = random_key_idx(b, h, groups, 40, kv_len)
    o_cache = 0.1 * torch.randn(b, h, q_len, d, device=DEV, dtype=torch.float32)
    out = kernels.cs4a_attention(q, k, v, key_idx, gs, o_cache)
    assert_close(out, kernels.reference_cs4a_attention(q, k, v, key_idx, gs, o_cache), dtype, "cs4a gs16 d64")


def test_cs4a_paper_geometry_at_1024():
    from sparvar.schedule import get_schedule
    from sparvar.sparse import default_policy

    schedule = get_schedule(1024)
    policy = default_policy("infinity-2b", schedule)
    dtype = torch.bfloat16
    geometry = policy.cs4a_geometry(schedule, 11).to(DEV)
    selected = random_key_idx(1, 2, geometry.num_decision_groups, geometry.topk, schedule.kv_len(10))
    key_idx = geometry.key_indices(selected)  # (1, 2, 12, 1344)
    q = projected_q(1, 2, schedule.lengths[11], 128, dtype)
    k, v = cache_view(1, 2, schedule.kv_len(11), 128, dtype), cache_view(1, 2, schedule.kv_len(11), 128, dtype)
    out = kernels.cs4a_attention(q, k, v, key_idx, policy.cs4a_group_size)
    assert_close(out, kernels.reference_cs4a_attention(q, k, v, key_idx, policy.cs4a_group_size), dtype, "cs4a paper")


@pytest.mark.parametrize("sinks", [0, 300])
@pytest.mark.parametrize("scale", [11, 12])
def test_cs4a_from_selection_paper_geometry_at_1024(scale, sinks):
    """The engine's one-launch CS4A (selection through the group map, sinks and bands read as ranges, the residual
    cache interpolated in the epilogue) against the composed path it replaced and the fp32 reference, at the
    paper's 1024² geometry (scale 12: two bands), with HART-like sinks."""
    from sparvar.cs4a import cs4a_from_selection_ref, cs4a_geometry, upsample_cache
    from sparvar.schedule import get_schedule

    schedule = get_schedule(1024)
    dtype, gs = torch.bfloat16, 192
    geometry = cs4a_geometry(schedule, 10, scale, gs, (7, 9), 112, 784, sink_len=sinks).to(DEV)
    selected = sinks + random_key_idx(2, 2, geometry.num_decision_groups, 784, schedule.kv_len(10) - sinks)
    q = projected_q(2, 2, schedule.lengths[scale], 128, dtype)
    k, v = cache_view(2, 2, schedule.kv_len(scale), 128, dtype), cache_view(2, 2, schedule.kv_len(scale), 128, dtype)
    o_cache = 0.1 * torch.randn(2, 2, schedule.lengths[10], 128, device=DEV, dtype=dtype)
    grids = schedule.grids[10], schedule.grids[scale]
    out = kernels.cs4a_attention_from_selection(q, k, v, selected, geometry, o_cache, *grids)
    composed = cs4a_from_selection_ref(kernels.cs4a_attention, kernels.upsample_cache, q, k, v, selected, geometry,
                                       o_cache, *grids)
    reference = cs4a_from_selection_ref(kernels.reference_cs4a_attention, upsample_cache, q, k, v, selected, geometry,
                                        o_cache, *grids)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, reference, dtype, f"cs4a from selection, scale {scale}, {sinks} sinks")
    assert_close(out, composed, dtype, f"cs4a from selection vs composed, scale {scale}, {sinks} sinks")
    torch.library.opcheck(torch.ops.sparvar.triton_cs4a_from_selection.default,
                          (q, k, v, selected, geometry.selected_group, geometry.range_starts,
                           list(geometry.range_lengths), gs, o_cache, list(grids[0]), list(grids[1]), 1.0))


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cs4a_decide(dtype, d):
    b, h, gs, q_len, kv_len, topk = 2, 2, 192, 400, 1500, 224
    q = projected_q(b, h, q_len, d, dtype) * 4  # peaked rows: column sums far from uniform
    k, v = cache_view(b, h, kv_len, d, dtype), cache_view(b, h, kv_len, d, dtype)
    out, selected, o_cache = kernels.cs4a_decide(q, k, v, gs, topk)
    assert selected.dtype == torch.int32 and selected.shape == (b, h, 3, topk)
    assert bool((selected[..., 1:] > selected[..., :-1]).all()), "selection must be strictly ascending"
    assert_close(out, reference_attention(q, k, v), dtype, "decide dense out")
    assert out.stride() == q.stride(), "the decision's output is laid out like q"
    ref_sums = kernels.reference_column_sums(q, k, gs)
    _, lse = decision_dense_pass(q, k, v)  # as the decision calls it (cuDNN on the GPU)
    sums = kernels.cs4a_column_sums(q, k, lse, gs)
    assert (sums - ref_sums).abs().max().item() <= 1e-2 * ref_sums.max().item()
    # every selected key is (up to rounding) among the top-k of the exact column sums
    kth = ref_sums.topk(topk, dim=-1).values[..., -1:]
    chosen = ref_sums.gather(-1, selected.long())
    assert bool((chosen >= kth - 1e-2 * ref_sums.max()).all())
    # fp32 references (no bf16 rounding of the two terms before the difference, as the kernel does)
    q32, k32, v32 = q.float(), k.float(), v.float()
    ref_cache = reference_attention(q32, k32, v32) - kernels.reference_cs4a_attention(q32, k32, v32, selected, gs)
    assert_close(o_cache, ref_cache, dtype, "decide o_cache")
    # the selection is exactly the top-k of the kernel's own column sums
    assert torch.equal(selected.long(), sums.topk(topk, dim=-1).indices.sort(dim=-1).values)


@pytest.mark.parametrize("launch", [None, (1, 1024, 4), (2, 512, 4), (4, 256, 4), (4, 512, 8)])
def test_select_topk_equals_torch_topk(launch):
    sums = torch.rand(2, 16, 9, 4121, device=DEV)  # the decision's shape at 1024^2 (distinct values)
    sums[1, 0] = (torch.tensor(1.0).view(torch.int32) + torch.randperm(4121, dtype=torch.int32)).view(torch.float32)
    selected = kernels.select_topk(sums, 784, launch=launch)  # row [1, 0]: values one ulp apart
    assert torch.equal(selected.long(), sums.topk(784, dim=-1).indices.sort(dim=-1).values)
    sums[0, 0, 0] = 0.0
    sums[0, 0, 0, 100:900] = 0.5  # 800 ties for 784 places: the lowest positions
    assert torch.equal(kernels.select_topk(sums, 784, launch=launch)[0, 0, 0].long(), torch.arange(100, 884, device=DEV))
    tail = kernels.select_topk(sums, 784, 300, launch=launch)  # HART-style sinks: positions [300, n) compete
    assert torch.equal(tail[1].long(), 300 + sums[1, ..., 300:].topk(784, dim=-1).indices.sort(dim=-1).values)
    assert launch is None or launch[0] in TOPK_RADIX_BITS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decision_dense_passes_agree(dtype):
    """cuDNN (the default on the GPU) and our kernel give the same dense output, logsumexp and decision."""
    b, h, d, gs, q_len, kv_len, topk = 2, 3, 128, 192, 500, 1700, 336
    q = projected_q(b, h, q_len, d, dtype) * 4
    k, v = cache_view(b, h, kv_len, d, dtype), cache_view(b, h, kv_len, d, dtype)
    scores = q.float() @ k.float().transpose(-1, -2)
    for dense_pass in ("cudnn", "triton"):
        out, lse = decision_dense_pass(q, k, v, dense_pass=dense_pass)
        assert lse.dtype == torch.float32 and lse.shape == (b, h, q_len) and lse.is_contiguous()
        assert (lse - torch.logsumexp(scores, -1)).abs().max().item() < 1e-2, f"{dense_pass}: logsumexp"
        assert_close(out, reference_attention(q, k, v), dtype, f"{dense_pass}: dense output")
    out_c, sel_c, cache_c = kernels.cs4a_decide_raw(q, k, v, gs, topk, dense_pass="cudnn")
    out_t, sel_t, cache_t = kernels.cs4a_decide_raw(q, k, v, gs, topk, dense_pass="triton")
    assert out_c.stride() == out_t.stride() == q.stride()
    assert_close(out_c, out_t, dtype, "decision output, cuDNN vs ours")
    assert_close(cache_c, cache_t, dtype, "O_cache, cuDNN vs ours")
    same = (torch.zeros(*sel_c.shape[:-1], kv_len, device=DEV).scatter_(-1, sel_c.long(), 1.0)
            * torch.zeros(*sel_t.shape[:-1], kv_len, device=DEV).scatter_(-1, sel_t.long(), 1.0)).sum()
    assert same >= 0.99 * sel_c.numel(), "the two passes' selections differ beyond rounding near-ties"


@pytest.mark.parametrize("lanes", [0, 1, 2])
def test_cs4a_decide_in_halves_matches_whole(lanes):
    """The engine's decision in halves (every decision layer's top-k in one launch) == cs4a_decide_raw per layer,
    at 2B's decision shape (1,600 queries, 4,121 keys, top-784), with the cuDNN dense pass; with the residual
    launches dealt over `lanes` side streams too (joined before the call returns: compared right after it, with
    nothing queued before the comparisons, no sync)."""
    b, h, d, gs, q_len, kv_len, topk = 2, 4, 128, 192, 1600, 4121, 784
    layers = [(projected_q(b, h, q_len, d, torch.bfloat16) * 4, cache_view(b, h, kv_len, d, torch.bfloat16),
               cache_view(b, h, kv_len, d, torch.bfloat16)) for _ in range(3)]
    wants = [kernels.cs4a_decide_raw(q, k, v, gs, topk) for q, k, v in layers]
    sums = torch.empty(3, b, h, 9, kv_len, device=DEV)
    begun = [kernels.cs4a_decide_begin_raw(q, k, v, gs, sums[i]) for i, (q, k, v) in enumerate(layers)]
    side = tuple(torch.cuda.Stream() for _ in range(lanes))
    ended = kernels.cs4a_decide_end_raw([(*t, dense) for t, (_, dense) in zip(layers, begun)], sums, gs, topk,
                                        lanes=side)
    for (q, k, v), (out, _), (selected, cache), (want_out, want_selected, want_cache) in zip(layers, begun, ended,
                                                                                          wants):
        assert torch.equal(cache, want_cache) and cache.stride() == want_cache.stride()
        assert torch.equal(selected, want_selected)
        assert torch.equal(out, want_out) and out.stride() == q.stride()


def test_cs4a_decide_end_on_lanes_captures_and_replays():
    """The second half with its residuals on two side streams, captured in a CUDA graph (an unjoined lane fails the
    capture) and replayed on new inputs: the eager one-stream result for those inputs, bit for bit, with sinks."""
    b, h, d, gs, q_len, kv_len, topk, sinks = 2, 2, 64, 192, 576, 1400, 224, 121
    make = lambda: [(projected_q(b, h, q_len, d, torch.bfloat16) * 4, cache_view(b, h, kv_len, d, torch.bfloat16),  # noqa: E731
                     cache_view(b, h, kv_len, d, torch.bfloat16)) for _ in range(5)]
    static, fresh = make(), make()
    sums = torch.empty(5, b, h, 3, kv_len, device=DEV)
    side = (torch.cuda.Stream(), torch.cuda.Stream())

    def decide():
        begun = [kernels.cs4a_decide_begin_raw(q, k, v, gs, sums[i]) for i, (q, k, v) in enumerate(static)]
        return kernels.cs4a_decide_end_raw([(*t, dense) for t, (_, dense) in zip(static, begun)], sums, gs, topk,
                                           sinks, lanes=side)

    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):  # Triton's compilation and tuning outside the capture
        decide()
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed = decide()
    for (q, k, v), (fq, fk, fv) in zip(static, fresh):
        q.copy_(fq), k.copy_(fk), v.copy_(fv)
    graph.replay()
    want_sums = torch.empty_like(sums)
    begun = [kernels.cs4a_decide_begin_raw(q, k, v, gs, want_sums[i]) for i, (q, k, v) in enumerate(fresh)]
    want = kernels.cs4a_decide_end_raw([(*t, dense) for t, (_, dense) in zip(fresh, begun)], want_sums, gs, topk, sinks)
    for i, ((selected, cache), (want_selected, want_cache)) in enumerate(zip(graphed, want)):
        assert torch.equal(selected, want_selected), f"layer {i}: selection"
        assert torch.equal(cache, want_cache), f"layer {i}: residual cache"


def test_cs4a_decide_with_sinks_matches_reference():
    """HART: the first sink_len keys are never selected and always in the residual's key set."""
    dtype, b, h, d, gs, q_len, kv_len, topk, sinks = torch.float16, 1, 2, 64, 192, 400, 1500, 224, 300
    q = projected_q(b, h, q_len, d, dtype) * 4
    k, v = cache_view(b, h, kv_len, d, dtype), cache_view(b, h, kv_len, d, dtype)
    out, selected, o_cache = kernels.cs4a_decide(q, k, v, gs, topk, sinks)
    assert int(selected.min()) >= sinks and bool((selected[..., 1:] > selected[..., :-1]).all())
    ref_out, ref_selected, ref_cache = kernels.reference_cs4a_decide(q.float(), k.float(), v.float(), gs, topk, sinks)
    assert_close(out, ref_out, dtype, "decide with sinks: out")
    # rounding may swap near-ties; the residual is checked against the kernel's own selection
    def as_mask(sel):
        return torch.zeros(*sel.shape[:-1], kv_len, device=DEV).scatter_(-1, sel.long(), 1.0)

    assert (as_mask(selected) * as_mask(ref_selected)).sum() >= 0.98 * selected.numel()
    from sparvar.cs4a import with_sinks
    ref_cache = ref_out - kernels.reference_cs4a_attention(q.float(), k.float(), v.float(), with_sinks(selected, sinks), gs)
    assert_close(o_cache, ref_cache, dtype, "decide with sinks: o_cache")


# ------------------------------------------------------------------------------------------------ ops, plan, errors
def test_custom_ops_opcheck():
    dtype = torch.bfloat16
    q = torch.randn(1, 2, 100, 64, device=DEV, dtype=dtype)
    k, v = torch.randn(1, 2, 200, 64, device=DEV, dtype=dtype), torch.randn(1, 2, 200, 64, device=DEV, dtype=dtype)
    layout = random_layout(100, 200, 32, 32)
    order = kernels.query_block_order(layout.kv_num_blocks)
    torch.library.opcheck(torch.ops.sparvar.triton_csla_attention.default,
                          (q, k, v, layout.kv_num_blocks, layout.kv_indices, order, 32, 32, 1.0))
    key_idx = random_key_idx(1, 2, 7, 48, 150)
    band = torch.randint(150, 180, (7,), device=DEV, dtype=torch.int32)
    torch.library.opcheck(torch.ops.sparvar.triton_cs4a_attention.default, (q, k, v, key_idx, q.clone(), band, 16, 20, 1.0))
    torch.library.opcheck(torch.ops.sparvar.triton_cs4a_decide.default, (q, k, v, 16, 48, 0, 1.0))
    torch.library.opcheck(torch.ops.sparvar.triton_cs4a_decide.default, (q, k, v, 16, 48, 30, 1.0))
    token = token_layout(100, 200, 32, 32)
    num_full, tiles, tile_index = kernels.token_tiles(token.kv_num_blocks, token.kv_indices, token.partial_index)
    torch.library.opcheck(torch.ops.sparvar.triton_csla_attention_token.default,
                          (q, k, v, token.kv_num_blocks, tiles, num_full, tile_index, token.partial_masks, order, 32, 32,
                           1.0))


@pytest.mark.parametrize("granularity", ["block", "token"])
def test_sparse_ops_drive_the_tiny_plan(granularity):
    """The kernels as a SparseOps backend of SparVARPlan give the reference backend's outputs at every sparse scale."""
    from sparvar.schedule import get_schedule
    from sparvar.sparse import SparVARPlan, default_policy

    schedule = get_schedule(256)
    policy = default_policy("infinity-tiny", schedule, csla_granularity=granularity)
    ref_plan = SparVARPlan(policy, schedule, policy.num_layers)
    plan = SparVARPlan(policy, schedule, policy.num_layers)
    plan.ops = kernels.sparse_ops()
    dtype = torch.bfloat16
    for scale in policy.sparse_scales:
        q_len, kv_len = schedule.lengths[scale], schedule.kv_len(scale)
        for layer in range(policy.num_layers):
            q = projected_q(2, 2, q_len, 64, dtype)
            k, v = cache_view(2, 2, kv_len, 64, dtype), cache_view(2, 2, kv_len, 64, dtype)
            if policy.kind(layer, scale) == "cs4a_decide":
                out = plan.attend(q, k, v, layer=layer, scale=scale)
                assert_close(out, reference_attention(q, k, v), dtype, f"tiny decide layer {layer}")
                continue
            out = plan.attend(q, k, v, layer=layer, scale=scale)
            ref = ref_plan.attend(q, k, v, layer=layer, scale=scale)
            assert_close(out, ref, dtype, f"tiny {policy.kind(layer, scale)} layer {layer} scale {scale}")
        if scale == policy.decision_scale:  # every decision layer's state exists once the last one has run
            for layer in range(policy.cs4a_layers):
                ref_plan.load_state(layer, *[t.clone() for t in plan.state(layer)])


@pytest.mark.parametrize("model", ["infinity-tiny", "hart-tiny"])  # HART: sinks
def test_decision_scale_captured_in_a_cuda_graph_equals_eager(model):
    """The plan's decision (in two halves: one top-k launch for all decision layers, then the residuals, on two
    streams where there are two decision layers or more) captured with the rest of the decision scale as one CUDA graph and replayed gives the eager outputs
    and state bit for bit: every side stream is joined inside the scale (an unjoined stream fails the capture)."""
    from sparvar.config import get_config
    from sparvar.schedule import get_schedule
    from sparvar.sparse import SparVARPlan, default_policy

    schedule = get_schedule(get_config(model).default_resolution, model=model)
    policy = default_policy(model, schedule)
    plan = SparVARPlan(policy, schedule, policy.num_layers, backend="triton")
    assert plan.residual_lanes > 0  # infinity-tiny's two decision layers: their residuals on two streams
    dtype = torch.bfloat16
    decision = policy.decision_scale
    q_len, kv_len = schedule.lengths[decision], schedule.kv_len(decision)
    inputs = [(projected_q(2, 2, q_len, 64, dtype), cache_view(2, 2, kv_len, 64, dtype),
               cache_view(2, 2, kv_len, 64, dtype)) for _ in range(policy.num_layers)]
    eager = [plan.attend(*inputs[layer], layer=layer, scale=decision) for layer in range(policy.num_layers)]
    want_state = [[t.clone() for t in plan.state(layer)] for layer in range(policy.cs4a_layers)]
    assert any(out is not None for out in eager[:policy.cs4a_layers])
    plan.reset()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture (allocator, Triton compilation)
        for layer in range(policy.num_layers):
            plan.attend(*inputs[layer], layer=layer, scale=decision)
    torch.cuda.current_stream().wait_stream(stream)
    plan.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed = [plan.attend(*inputs[layer], layer=layer, scale=decision) for layer in range(policy.num_layers)]
    graph.replay()
    torch.cuda.synchronize()
    for layer, (out, want) in enumerate(zip(graphed, eager)):
        assert (out is None) == (want is None) and (out is None or torch.equal(out, want)), f"graphed layer {layer}"
    for layer in range(policy.cs4a_layers):
        for a, b in zip(plan.state(layer), want_state[layer]):
            assert torch.equal(a, b), f"layer {layer}: graphed decision state differs"


def test_gpu_validation_errors():
    dtype = torch.bfloat16
    q = torch.randn(1, 2, 100, 128, device=DEV, dtype=dtype)
    k = v = torch.randn(1, 2, 200, 128, device=DEV, dtype=dtype)
    layout = random_layout(100, 200, 64, 64)
    with pytest.raises(TypeError, match="int32"):
        kernels.csla_attention_blocks(q, k, v, layout.kv_num_blocks.long(), layout.kv_indices, 64, 64)
    with pytest.raises(ValueError, match="device"):
        kernels.csla_attention_blocks(q, k, v, layout.kv_num_blocks.cpu(), layout.kv_indices, 64, 64)
    with pytest.raises(ValueError, match="head dim"):
        kernels.csla_attention_blocks(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, layout.kv_num_blocks,
                                      layout.kv_indices, 64, 64)
    with pytest.raises(ValueError, match="kv_num_blocks"):
        check_layout_values(torch.zeros_like(layout.kv_num_blocks), layout.kv_indices, 200, 64)
    with pytest.raises(ValueError, match="outside"):
        check_key_values(torch.full((1, 2, 1, 4), 500, device=DEV, dtype=torch.int32), 200)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upsample_cache_kernel_matches_torch(dtype):
    """CS4A's residual cache, decision grid -> later grids (2B's 40 -> 48 / 64, HART's 27 -> 36, odd grids), from the
    decision's token-major O_cache: both compute fp32 weights and sums and round once (within one step)."""
    from sparvar.cs4a import upsample_cache

    for src, dst in (((40, 40), (48, 48)), ((40, 40), (64, 64)), ((27, 27), (36, 36)), ((5, 4), (9, 7))):
        cache = projected_q(2, 16, src[0] * src[1], 128, dtype) * 30  # O(1) values, as O_dense - O_sparse
        got = kernels.upsample_cache(cache, src, dst)
        assert got.is_contiguous() and got.shape == (2, 16, dst[0] * dst[1], 128)
        step = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
        torch.testing.assert_close(got.float(), upsample_cache(cache, src, dst).float(), rtol=step, atol=1e-4)


def test_attention_outputs_follow_a_token_major_q():
    """The projection after attention reads (B, L, H*D): a token-major q gives a token-major output (no copy)."""
    q = projected_q(2, 4, 70, 64, torch.bfloat16)
    k, v = cache_view(2, 4, 90, 64, torch.bfloat16), cache_view(2, 4, 90, 64, torch.bfloat16)
    out = kernels.dense_attention(q, k, v)
    assert out.stride() == q.stride()
    torch.testing.assert_close(out.float(), reference_attention(q, k, v).float(), atol=2e-2, rtol=2e-2)
    contiguous = kernels.dense_attention(q.contiguous(), k, v)
    assert contiguous.is_contiguous() and torch.equal(contiguous, out)


def test_engine_attention_for_the_smallest_calls_matches_sdpa():
    """The torch-cuda engine's dense attention ("engine": our kernel up to ENGINE_SELF_MAX_Q queries, cuDNN above)
    and its cross-attention (our kernel over each row's real text, up to ENGINE_CROSS_MAX_Q queries) against SDPA
    with the padding bias; CFG rows with different text lengths, one of them a whole tile."""
    import math

    from sparvar.attention import ENGINE_CROSS_MAX_Q, cross_attention, dense_attention, engine_cross_attention

    for q_len in (1, 36, 144, 576, ENGINE_CROSS_MAX_Q):
        q = projected_q(4, 16, q_len, 128, torch.bfloat16)
        k, v = cache_view(4, 16, 265, 128, torch.bfloat16), cache_view(4, 16, 265, 128, torch.bfloat16)
        torch.testing.assert_close(dense_attention(q, k, v, "engine").float(),
                                   reference_attention(q, k, v).float(), atol=2e-2, rtol=2e-2)
        text_k, text_v = (torch.randn(4, 16, 64, 128, device=DEV, dtype=torch.bfloat16) for _ in range(2))
        lens = torch.tensor([7, 64, 1, 30], device=DEV, dtype=torch.int32)
        real = torch.arange(64, device=DEV)[None, :] < lens[:, None]
        bias = torch.zeros(4, 64, device=DEV, dtype=torch.bfloat16).masked_fill(~real, -math.inf)[:, None, None, :]
        got = engine_cross_attention(q, text_k, text_v, bias, lens)
        assert not got.isnan().any()
        torch.testing.assert_close(got.float(), cross_attention(q, text_k, text_v, bias).float(), atol=2e-2, rtol=2e-2)
