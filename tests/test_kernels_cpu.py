"""CPU checks of sparvar.kernels: input validation, the reference functions, the fake kernels, and (when triton is
installed) the kernels themselves under Triton's CPU interpreter on tiny fp16 inputs."""
from __future__ import annotations

import textwrap

import pytest
import torch

import sparvar.kernels as kernels
from sparvar.csla import block_layout_from_mask
from sparvar.kernels.csla import check_layout_values
from sparvar.kernels.cs4a import check_key_values, query_tile
from triton_interpreter import run_interpreted

BF16 = torch.bfloat16


def qkv(b=1, h=2, q_len=40, kv_len=70, d=64, dtype=BF16):
    return (torch.randn(b, h, q_len, d, dtype=dtype), torch.randn(b, h, kv_len, d, dtype=dtype),
            torch.randn(b, h, kv_len, d, dtype=dtype))


def layout_tensors(q_len=40, kv_len=70, bm=16, bn=16):
    nq, nk = -(-q_len // bm), -(-kv_len // bn)
    blocks = torch.rand(nq, nk) < 0.4
    blocks[:, 0] = True
    mask = blocks.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:q_len, :kv_len]
    layout = block_layout_from_mask(mask, bm, bn)
    return layout, layout.kv_num_blocks, layout.kv_indices


# ------------------------------------------------------------------------------------------------ validation
def test_csla_wrapper_rejects_bad_inputs():
    q, k, v = qkv()
    _, nb, idx = layout_tensors()
    call = kernels.csla_attention_blocks
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        call(q.float(), k.float(), v.float(), nb, idx, 16, 16)
    with pytest.raises(TypeError, match="share one dtype"):
        call(q, k.half(), v, nb, idx, 16, 16)
    with pytest.raises(ValueError, match="4-D"):
        call(q[0], k, v, nb, idx, 16, 16)
    with pytest.raises(ValueError, match="expected q"):
        call(q, k[:, :1], v, nb, idx, 16, 16)
    with pytest.raises(ValueError, match="head dim 96"):
        call(*qkv(d=96), nb, idx, 16, 16)
    with pytest.raises(TypeError, match="kv_indices must be int32"):
        call(q, k, v, nb, idx.long(), 16, 16)
    with pytest.raises(ValueError, match="block_n must be one of"):
        call(q, k, v, nb, idx, 16, 48)
    with pytest.raises(ValueError, match="need 3 rows"):
        call(q, k, v, nb[:2], idx[:2], 16, 16)
    with pytest.raises(ValueError, match="columns"):
        call(q, k, v, nb, torch.zeros(3, 9, dtype=torch.int32), 16, 16)
    with pytest.raises(ValueError, match="CUDA device"):
        call(q, k, v, nb, idx, 16, 16)
    with pytest.raises(TypeError, match="torch.Tensor"):
        call("q", k, v, nb, idx, 16, 16)
    # every dimension's span fits in int32 (the largest, the batch's, is 2.01e9) but their sum, the last element's
    # offset, is 4.03e9: the kernels' int32 offsets would wrap
    big = torch.empty((2, 15, 2 ** 20, 128), dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match="spans more than 2\\*\\*31 elements"):
        call(big, big, big, nb, idx, 16, 16)


def test_csla_layout_object_checks():
    import dataclasses

    from sparvar.csla import csla_layout
    from sparvar.schedule import get_schedule

    schedule = get_schedule(256)
    token = csla_layout(schedule, 6, 3, (1, 3, 5), 16, 16, "token")
    q, k, v = qkv(q_len=token.q_len, kv_len=token.kv_len)
    with pytest.raises(ValueError, match="CUDA device"):  # token layouts are accepted (and run on the GPU)
        kernels.csla_attention(q, k, v, token)
    with pytest.raises(ValueError, match="partial_index"):
        kernels.csla_attention(q, k, v, dataclasses.replace(token, partial_index=None))
    with pytest.raises(ValueError, match="granularity"):
        kernels.csla_attention(q, k, v, token.token_mask)
    block = csla_layout(schedule, 6, 3, (1, 3, 5), 16, 16)
    with pytest.raises(ValueError, match="layout is for"):
        kernels.csla_attention(q[:, :, :-1], k, v, block)
    nb, idx = token.kv_num_blocks, token.kv_indices
    num_full, tiles, tile_index = kernels.token_tiles(nb, idx, token.partial_index)
    call = kernels.csla_attention_blocks
    with pytest.raises(TypeError, match="partial_masks must be a bool"):
        call(q, k, v, nb, tiles, 16, 16, num_full=num_full, tile_index=tile_index, partial_masks=token.partial_masks.int())
    with pytest.raises(ValueError, match=r"\(num_partial, 16, 16\)"):
        call(q, k, v, nb, tiles, 16, 16, num_full=num_full, tile_index=tile_index, partial_masks=token.partial_masks[:, :8])
    with pytest.raises(ValueError, match="must match"):
        call(q, k, v, nb, tiles, 16, 16, num_full=num_full[:-1], tile_index=tile_index, partial_masks=token.partial_masks)
    wide = torch.zeros(tile_index.shape[0], tile_index.shape[1] + 3, dtype=tile_index.dtype)
    wide[:, :tile_index.shape[1]] = tile_index  # the same values in a wider buffer: rows 3 entries further apart
    with pytest.raises(ValueError, match="tile_index strides .* must equal kv_indices'"):
        call(q, k, v, nb, tiles, 16, 16, num_full=num_full, tile_index=wide[:, :tile_index.shape[1]],
             partial_masks=token.partial_masks)


def tile_of(mask, i, n, bm, bn):
    """Tile (query block i, key block n) of a token mask, zero-padded past its ends."""
    tile = torch.zeros(bm, bn, dtype=torch.bool)
    part = mask[i * bm:(i + 1) * bm, n * bn:(n + 1) * bn]
    tile[:part.shape[0], :part.shape[1]] = part
    return tile


@pytest.mark.parametrize("bm,bn", [(16, 16), (32, 16)])
def test_token_layout_stores_only_partial_tiles(bm, bn):
    """Full tiles are marked -1 and stored nowhere; each partial tile's stored mask is its slice of the token mask;
    token_tiles puts each row's full tiles first and keeps the (tile, mask) pairs together."""
    from sparvar.csla import csla_layout
    from sparvar.schedule import get_schedule

    layout = csla_layout(get_schedule(256), 6, 3, (1, 3, 5), bm, bn, "token")
    mask, idx, index = layout.token_mask, layout.kv_indices, layout.partial_index
    full_tiles = 0
    for i in range(layout.num_q_blocks):
        count = int(layout.kv_num_blocks[i])
        assert bool((index[i, count:] == -1).all())
        for slot in range(count):
            tile = tile_of(mask, i, int(idx[i, slot]), bm, bn)
            assert tile.any()
            if int(index[i, slot]) < 0:
                full_tiles += 1
                assert bool(tile.all())
            else:
                assert not bool(tile.all()) and torch.equal(layout.partial_masks[int(index[i, slot])], tile)
    assert 0 < full_tiles and layout.partial_masks.shape[0] == int((index >= 0).sum())  # both kinds occur, none stored twice
    num_full, tiles, tile_index = kernels.token_tiles(layout.kv_num_blocks, idx, index)
    for i in range(layout.num_q_blocks):
        count, nf = int(layout.kv_num_blocks[i]), int(num_full[i])
        assert bool((tile_index[i, :nf] == -1).all()) and bool((tile_index[i, nf:count] >= 0).all())
        assert sorted(tiles[i, :count].tolist()) == idx[i, :count].tolist()
        pairs = {(int(a), int(b)) for a, b in zip(idx[i, :count], index[i, :count])}
        assert pairs == {(int(a), int(b)) for a, b in zip(tiles[i, :count], tile_index[i, :count])}
    moved = layout.to("cpu")
    assert torch.equal(moved.partial_index, index) and torch.equal(moved.partial_masks, layout.partial_masks)


def test_cs4a_wrappers_reject_bad_inputs():
    q, k, v = qkv(q_len=40, kv_len=70)
    key_idx = torch.zeros(1, 2, 3, 8, dtype=torch.int32)
    call = kernels.cs4a_attention_raw
    with pytest.raises(ValueError, match="multiple of 16"):
        call(q, k, v, key_idx, 20)
    with pytest.raises(ValueError, match=r"\(B, H, G, K\)"):
        call(q, k, v, key_idx[:, :, :2], 16)
    with pytest.raises(TypeError, match="key_idx must be int32"):
        call(q, k, v, key_idx.long(), 16)
    with pytest.raises(ValueError, match="without band_start"):
        call(q, k, v, key_idx, 16, band_len=8)
    with pytest.raises(ValueError, match="one start per group"):
        call(q, k, v, key_idx, 16, band_start=torch.zeros(2, dtype=torch.int32), band_len=8)
    with pytest.raises(ValueError, match="only 70"):
        call(q, k, v, torch.zeros(1, 2, 3, 80, dtype=torch.int32), 16)
    with pytest.raises(ValueError, match="o_cache"):
        call(q, k, v, key_idx, 16, q[:, :, :-1])
    with pytest.raises(ValueError, match="CUDA device"):
        call(q, k, v, key_idx, 16)
    with pytest.raises(ValueError, match="topk must be"):
        kernels.cs4a_decide_raw(q, k, v, 16, 71)
    with pytest.raises(ValueError, match="minus 10 sinks"):
        kernels.cs4a_decide_raw(q, k, v, 16, 61, 10)
    with pytest.raises(ValueError, match="sink_len must be"):
        kernels.cs4a_decide_raw(q, k, v, 16, 8, -1)
    with pytest.raises(ValueError, match="lse must be"):
        kernels.cs4a_column_sums(q, k, torch.zeros(1, 2, 39), 32)
    with pytest.raises(ValueError, match="launch must be"):
        kernels.cs4a_column_sums(q, k, torch.zeros(1, 2, 40), 32, launch=(64, 96, 4, 3))
    with pytest.raises(ValueError, match="sums must be"):
        kernels.cs4a_decide_end_raw([(q, k, v, q)], torch.zeros(2, 1, 2, 3, 80), 16, 8)
    with pytest.raises(ValueError, match="topk must be"):
        kernels.select_topk(torch.rand(2, 10), 11)
    with pytest.raises(ValueError, match=r"positions \[4, 10\)"):
        kernels.select_topk(torch.rand(2, 10), 7, 4)
    with pytest.raises(ValueError, match="float32"):
        kernels.select_topk(torch.rand(2, 10).double(), 3)
    with pytest.raises(ValueError, match="radix bits"):
        kernels.select_topk(torch.rand(2, 10), 3, launch=(3, 512, 4))
    from sparvar.kernels.cs4a import decision_dense_pass
    with pytest.raises(ValueError, match="unknown dense_pass 'flash'"):
        decision_dense_pass(q, k, v, dense_pass="flash")
    with pytest.raises(RuntimeError, match="'cudnn' needs CUDA tensors"):
        decision_dense_pass(q, k, v, dense_pass="cudnn")
    assert query_tile(192) == 64 and query_tile(16) == 16 and query_tile(256) == 128


def test_cs4a_from_selection_rejects_bad_inputs():
    from sparvar.cs4a import cs4a_geometry
    from sparvar.schedule import get_schedule

    s = get_schedule(256)
    geo = cs4a_geometry(s, 4, 6, 16, (3, 5), 16, 32, sink_len=21)
    q, k, v = qkv(q_len=s.lengths[6], kv_len=s.kv_len(6))
    sel = torch.zeros(1, 2, geo.num_decision_groups, 32, dtype=torch.int32)
    cache = torch.zeros(1, 2, s.lengths[4], 64, dtype=BF16)
    ranges, lengths = geo.range_starts, geo.range_lengths
    assert lengths == (21, *geo.band_lengths) and ranges.shape == (3, geo.num_groups)
    call = kernels.cs4a_attention_from_selection_raw

    def args(**over):
        a = dict(selected=sel, group_map=geo.selected_group, range_starts=ranges, range_lengths=lengths, group_size=16,
                 o_cache=cache, cache_grid=s.grids[4], grid=s.grids[6])
        a.update(over)
        return a
    with pytest.raises(ValueError, match=r"selected .* must be \(B, H, G_S, topk"):
        call(q, k, v, **args(selected=sel[:, :1]))
    with pytest.raises(TypeError, match="group_map must be int32"):
        call(q, k, v, **args(group_map=geo.selected_group.long()))
    with pytest.raises(ValueError, match="one decision group per query group"):
        call(q, k, v, **args(group_map=geo.selected_group[:-1]))
    with pytest.raises(ValueError, match="at most 4 positive ints"):
        call(q, k, v, **args(range_lengths=(*lengths, 4, 4)))
    with pytest.raises(ValueError, match="at most 4 positive ints"):
        call(q, k, v, **args(range_lengths=(0, *lengths[1:])))
    with pytest.raises(ValueError, match="one start per range"):
        call(q, k, v, **args(range_starts=ranges[:2]))
    with pytest.raises(ValueError, match="KV cache holds only"):
        call(q, k, v, **args(range_lengths=(21, 500, 5)))
    with pytest.raises(ValueError, match="this scale's"):
        call(q, k, v, **args(grid=(16, 8)))
    with pytest.raises(ValueError, match="cache_grid"):
        call(q, k, v, **args(cache_grid=None))
    with pytest.raises(ValueError, match=r"cache_h \* cache_w"):
        call(q, k, v, **args(cache_grid=(8, 4)))
    with pytest.raises(TypeError, match="o_cache must be"):
        call(q, k, v, **args(o_cache=cache.half()))
    with pytest.raises(ValueError, match="CUDA device"):
        call(q, k, v, **args())
    with pytest.raises(ValueError, match=r"selection .* must be \(B, H, 4, 32\)"):  # the geometry's wrapper
        kernels.cs4a_attention_from_selection(q, k, v, sel[:, :, :, :16], geo, cache, s.grids[4], s.grids[6])


@pytest.mark.parametrize("model", ["infinity-2b", "infinity-8b", "infinity-tiny", "infinity-cifar", "hart-0.7b",
                                   "hart-tiny"])
@pytest.mark.parametrize("aspect", ["1:1", "16:9"])
def test_every_presets_cs4a_ranges_fit_the_one_launch_kernel(model, aspect):
    """Each model's default policy at its resolution: every later scale's sinks + bands are ranges the kernel reads
    (HART-0.7b at 1024² has four at scale 13)."""
    from sparvar.config import get_config
    from sparvar.kernels.cs4a import MAX_BANDS
    from sparvar.schedule import get_schedule
    from sparvar.sparse import default_policy

    cfg = get_config(model)
    try:
        schedule = get_schedule(cfg.default_resolution, aspect, model=model)
    except ValueError:
        pytest.skip(f"{model} has no {aspect} schedule")
    policy = default_policy(model, schedule)
    ranges = [len(policy.cs4a_geometry(schedule, s).range_lengths) for s in policy.sparse_scales[1:]]
    assert ranges and max(ranges) <= MAX_BANDS, f"{model}: CS4A ranges per scale {ranges}, kernel takes {MAX_BANDS}"


def test_value_checks():
    _, nb, idx = layout_tensors()
    check_layout_values(nb, idx, 70, 16)
    with pytest.raises(ValueError, match="ascending"):
        check_layout_values(nb.clamp(min=2), torch.zeros_like(idx), 70, 16)
    with pytest.raises(ValueError, match="outside"):
        check_layout_values(nb, idx + 5, 70, 16)
    check_key_values(torch.tensor([[[[0, 69]]]], dtype=torch.int32), 70)
    with pytest.raises(ValueError, match="leave the KV cache"):
        check_key_values(torch.zeros(1, 1, 1, 1, dtype=torch.int32), 70, torch.tensor([60], dtype=torch.int32), 16)


def test_query_block_order_is_heaviest_first():
    order = kernels.query_block_order(torch.tensor([3, 7, 1, 7], dtype=torch.int32))
    assert order.dtype == torch.int32 and order.tolist() == [1, 3, 0, 2]


# ------------------------------------------------------------------------------------------------ references
def brute_force_attention(q, k, v, allowed):
    """Per (batch, head, query): float64 softmax over the allowed keys, one query at a time."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                keys = allowed(b, h, i)
                s = k[b, h, keys].double() @ q[b, h, i].double()
                out[b, h, i] = torch.softmax(s, 0) @ v[b, h, keys].double()
    return out


def test_reference_csla_attention_is_block_granular_attention():
    torch.manual_seed(0)
    q, k, v = qkv(q_len=37, kv_len=50, d=64, dtype=torch.float32)
    layout, nb, idx = layout_tensors(37, 50, 16, 16)
    blocks = layout.block_mask()
    out = kernels.reference_csla_attention(q, k, v, nb, idx, 16, 16, scale=0.5)

    def allowed(b, h, i):
        return torch.tensor([j for j in range(50) if blocks[i // 16, j // 16]])

    ref = brute_force_attention(q * 0.5, k, v, allowed)
    assert (out.double() - ref).abs().max() < 1e-5


def test_reference_cs4a_attention_with_band():
    torch.manual_seed(0)
    q, k, v = qkv(b=1, h=2, q_len=40, kv_len=90, d=64, dtype=torch.float32)
    key_idx = torch.rand(1, 2, 3, 60).topk(10, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    band_start = torch.tensor([60, 65, 70], dtype=torch.int32)
    o_cache = torch.randn_like(q)
    out = kernels.reference_cs4a_attention(q, k, v, key_idx, 16, o_cache, band_start=band_start, band_len=12)

    def allowed(b, h, i):
        g = i // 16
        return torch.cat([key_idx[b, h, g].long(), torch.arange(int(band_start[g]), int(band_start[g]) + 12)])

    ref = brute_force_attention(q, k, v, allowed) + o_cache.double()
    assert (out.double() - ref).abs().max() < 1e-5


def test_reference_column_sums():
    torch.manual_seed(0)
    q, k, _ = qkv(b=1, h=2, q_len=40, kv_len=30, d=64, dtype=torch.float32)
    sums = kernels.reference_column_sums(q, k, 16)
    assert sums.shape == (1, 2, 3, 30)
    # each softmax row sums to one: a group's column sums add up to its query count (16, 16, 8)
    assert torch.allclose(sums.sum(-1), torch.tensor([16.0, 16.0, 8.0]).expand(1, 2, 3), atol=1e-4)
    probs = (q.double() @ k.double().transpose(-1, -2)).softmax(-1)
    assert torch.allclose(sums[0, 1, 2].double(), probs[0, 1, 32:].sum(0), atol=1e-5)
    # the decision reference selects the top-k of exactly these sums
    _, selected, _ = kernels.reference_cs4a_decide(q, k, k, 16, 5)
    assert torch.equal(selected.long(), sums.topk(5, dim=-1).indices.sort(dim=-1).values)


# ------------------------------------------------------------------------------------------------ AOT
def test_aot_kernel_rejects_what_it_cannot_run():
    pytest.importorskip("triton")
    with pytest.raises(NotImplementedError, match="CS4AAttention"):
        kernels.aot_kernel("CS4AAttention", dtype="bfloat16", head_dim=128, attrs={})
    with pytest.raises(ValueError, match="float32"):
        kernels.aot_kernel("CSLAAttention", dtype="float32", head_dim=128, attrs=dict(block_m=64, block_n=64))
    with pytest.raises(ValueError, match="head dim 96"):
        kernels.aot_kernel("CSLAAttention", dtype="float16", head_dim=96, attrs=dict(block_m=64, block_n=64))
    with pytest.raises(ValueError, match="block_m, block_n"):
        kernels.aot_kernel("CSLAAttention", dtype="float16", head_dim=64, attrs=dict(block_m=64, block_n=48))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_aot_csla_compiles_to_sm90_ptx_without_a_gpu(head_dim):
    """Triton compiles the CSLA AOT entry for Hopper on this CPU machine, in TensorRT's argument order."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from plugins import csla
    from plugins.aot import compile_aot, signature
    from plugins.spec import IntDims

    kernel = kernels.aot_kernel("CSLAAttention", dtype="bfloat16", head_dim=head_dim, attrs=dict(block_m=64, block_n=64))
    dtypes = ["bfloat16"] * 3 + ["int32"] * 2 + ["bfloat16"]
    assert list(signature(csla.SPEC, kernel, dtypes).values()) == (
        ["*bf16"] * 3 + ["*i32"] * 2 + ["i32"] * 4 + ["*bf16"] + ["constexpr"] * 3)
    compiled = compile_aot(csla.SPEC, kernel, dtypes, target=GPUTarget("cuda", 90, 32))
    assert ".target sm_90" in compiled.ptx and f".entry {compiled.name}" in compiled.ptx
    assert "wgmma" in compiled.ptx  # Hopper's warpgroup MMA, not a generic fallback
    assert compiled.threads == 32 * kernel.num_warps
    sizes = {"q": [2, 16, 4096, head_dim], "k": [2, 16, 10521, head_dim], "kv_indices": [64, 30]}
    assert kernel.grid(sizes, IntDims()) == (64, 32, 1)
    assert kernel.scalars(sizes, IntDims()) == [16, 4096, 10521, 30]


def test_csla_autotune_configs_suit_each_tile_and_compile_for_hopper():
    """The autotuner's configs kept per tile (_prune_by_tile): at least one for every tile an engine or the dense pass
    uses, 8 warps (two warpgroups) exactly for 128-row tiles (4 would spill the accumulator), at most 2 stages for
    tiles of 32x32 or less; and each kept config of the engines' tiles compiles for sm_90 with asynchronous copies
    (the autotuner skips configs that run out of shared memory, not ones that fail to compile)."""
    pytest.importorskip("triton")
    from bench.csla_variants import compile_stats
    from sparvar.kernels import csla as C

    for block_m in C.TILE_SIZES:
        for block_n in C.TILE_SIZES:
            kept = C._prune_by_tile(C._CSLA_CONFIGS, {}, BLOCK_M=block_m, BLOCK_N=block_n)
            assert kept and all(c in C._CSLA_CONFIGS for c in kept), (block_m, block_n)
            assert all((c.num_warps == 8) == (block_m == 128) for c in kept), (block_m, block_n, kept)
            if block_m * block_n <= 32 * 32:
                assert all(c.num_stages <= 2 for c in kept), (block_m, block_n, kept)
    rows = compile_stats(tiles=((64, 64), (128, 64)), head_dims=(128,))
    assert len(rows) == sum(len(C._prune_by_tile(C._CSLA_CONFIGS, {}, BLOCK_M=m, BLOCK_N=64)) for m in (64, 128))
    for row in rows:
        assert row["async_copies"] and row["registers"] and row["warps_launched"] == row["num_warps"], row


def test_csla_pointer_config_compiles_with_pipelined_loads():
    """The default variant's loads are software-pipelined (cp.async) once the launch is specialised as the JIT does
    (bench/csla_variants.compile_for_sm90, which the variants' register and shared-memory reports rely on)."""
    pytest.importorskip("triton")
    constexprs = dict(HEAD_DIM=128, BLOCK_M=64, BLOCK_N=64, DENSE=False, EVEN_N=False, USE_ORDER=True,
                      STORE_LSE=False, TOKEN=False, ROW_LEN=False, CLAMP_LAYOUT=False)
    from bench.csla_variants import compile_for_sm90

    ptx = compile_for_sm90(constexprs, 4, 3).asm["ptx"]
    assert "cp.async.cg" in ptx and "wgmma" in ptx


# ------------------------------------------------------------------------------------------------ fake kernels
def test_fake_kernels_give_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = (torch.empty(2, 3, 40, 64, dtype=BF16), torch.empty(2, 3, 70, 64, dtype=BF16),
                   torch.empty(2, 3, 70, 64, dtype=BF16))
        nb, idx = torch.empty(3, dtype=torch.int32), torch.empty(3, 4, dtype=torch.int32)
        out = torch.ops.sparvar.triton_csla_attention(q, k, v, nb, idx, None, 16, 16, 1.0)
        assert out.shape == q.shape and out.dtype == BF16
        masks = torch.empty(5, 16, 16, dtype=torch.bool)
        out = torch.ops.sparvar.triton_csla_attention_token(q, k, v, nb, idx, nb, idx, masks, None, 16, 16, 1.0)
        assert out.shape == q.shape and out.dtype == BF16
        key_idx = torch.empty(2, 3, 3, 8, dtype=torch.int32)
        out = torch.ops.sparvar.triton_cs4a_attention(q, k, v, key_idx, None, None, 16, 0, 1.0)
        assert out.shape == q.shape
        group_map, starts = torch.empty(3, dtype=torch.int32), torch.empty(2, 3, dtype=torch.int32)
        out = torch.ops.sparvar.triton_cs4a_from_selection(q, k, v, key_idx, group_map, starts, [8, 8], 16,
                                                           torch.empty(2, 3, 16, 64, dtype=BF16), [4, 4], [8, 5], 1.0)
        assert out.shape == q.shape and out.dtype == BF16
        out, selected, cache = torch.ops.sparvar.triton_cs4a_decide(q, k, v, 16, 20, 0, 1.0)
        assert out.shape == q.shape and cache.shape == q.shape
        assert selected.shape == (2, 3, 3, 20) and selected.dtype == torch.int32


# ------------------------------------------------------------------------------------------------ interpreter
INTERPRETER_SCRIPT = textwrap.dedent('''
    import torch

    from sparvar.attention import reference_attention
    from sparvar.csla import block_layout_from_mask, csla_attention_ref
    import sparvar.kernels as K

    torch.manual_seed(0)
    dt = torch.float16  # the interpreter mis-handles bf16 dots
    worst = 0.0
    def err(a, b):
        global worst
        worst = max(worst, (a.float() - b.float()).abs().nan_to_num(nan=float("inf")).max().item())  # NaN: not lost
    for bm, bn, lq, lk, d in [(32, 32, 70, 100, 64), (16, 32, 40, 64, 64), (64, 32, 64, 130, 128)]:
        q = torch.randn(1, 2, lq, d, dtype=dt) * d ** -0.5
        k, v = (torch.randn(1, 2, lk + 5, d, dtype=dt)[:, :, :lk] for _ in range(2))
        nq, nk = -(-lq // bm), -(-lk // bn)
        blocks = torch.rand(nq, nk) < 0.4
        blocks[torch.arange(nq), torch.randint(0, nk, (nq,))] = True
        blocks[0, -1] = True
        lay = block_layout_from_mask(blocks.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:lq, :lk], bm, bn)
        order = K.query_block_order(lay.kv_num_blocks)
        out = K.csla_attention_blocks(q, k, v, lay.kv_num_blocks, lay.kv_indices, bm, bn, q_order=order)
        ref = reference_attention(q, k, v, mask=lay.to_dense())
        err(out, ref)
        # the TensorRT AOT entry (contiguous tensors, strides from the shapes) on the same layout
        from sparvar.kernels.aot import _csla_aot_kernel
        qc, kc, vc, aot_out = q.contiguous(), k.contiguous(), v.contiguous(), torch.empty_like(q)
        _csla_aot_kernel[(nq, 2)](qc, kc, vc, lay.kv_num_blocks, lay.kv_indices, 2, lq, lk, lay.kv_indices.shape[1],
                                  aot_out, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn)
        err(aot_out, ref)
        if bm == 32:  # TensorRT times tactics on layouts it never wrote: the AOT entry clamps counts and indices
            width = lay.kv_indices.shape[1]
            counts = torch.randint(-2**31, 2**31 - 1, lay.kv_num_blocks.shape, dtype=torch.int32)
            counts[:2] = torch.tensor([-3, 2**31 - 1])
            indices = torch.randint(-2**31, 2**31 - 1, lay.kv_indices.shape, dtype=torch.int32)
            indices[1, 0] = 2**31 - 1  # the partial last key block first in a row: no read past K either
            # K and V end in NaN rows: a key read past kv_len (the partial block's tail) turns a row NaN
            kn, vn = (torch.cat([t.flatten(), torch.full((bn * d,), float("nan"), dtype=dt)])[:t.numel()].view(t.shape)
                      for t in (kc, vc))
            _csla_aot_kernel[(nq, 2)](qc, kn, vn, counts, indices, 2, lq, lk, width, aot_out, HEAD_DIM=d, BLOCK_M=bm,
                                      BLOCK_N=bn)
            # what the clamped layout names: each row's first clamp(count, 0, width) entries, each clamped to a key
            # block, every key of them below kv_len (a block listed twice counts twice, as in the kernel)
            want = torch.zeros(1, 2, lq, d)
            for r, n in enumerate(counts.clamp(0, width).tolist()):
                keys = (indices[r, :n].clamp(0, nk - 1).long()[:, None] * bn + torch.arange(bn)).flatten()
                keys = keys[keys < lk]
                rows = slice(r * bm, min((r + 1) * bm, lq))
                if len(keys):
                    scores = qc[:, :, rows].float() @ kc[:, :, keys].float().transpose(-1, -2)
                    want[:, :, rows] = scores.softmax(-1) @ vc[:, :, keys].float()
            err(aot_out.nan_to_num(), want)  # a row listing no block: NaN (0 / 0) from the kernel, 0 here
        out, lse = K.dense_attention(q, k, v, block_m=bm, block_n=bn, return_lse=True)
        err(out, reference_attention(q, k, v))
        err(lse, torch.logsumexp(q.float() @ k.float().transpose(-1, -2), -1))
        # a softmax scale other than 1 (the engine's cross-attention passes D^-0.5): as q pre-scaled
        q4 = q * 4
        err(K.dense_attention(q4, k, v, scale=0.25, block_m=bm, block_n=bn), reference_attention(q, k, v))
        err(K.csla_attention_blocks(q4, k, v, lay.kv_num_blocks, lay.kv_indices, bm, bn, scale=0.25), ref)
    # token-exact CSLA: full tiles (first key block), partial tiles, and a query block whose tiles are all partial
    for bm, bn, lq, lk, d in [(16, 32, 70, 100, 64), (32, 16, 80, 90, 128)]:
        q = torch.randn(1, 2, lq, d, dtype=dt) * d ** -0.5
        k, v = (torch.randn(1, 2, lk, d, dtype=dt) for _ in range(2))
        mask = torch.rand(lq, lk) < 0.15
        mask[:, :bn] = True
        mask[bm:2 * bm] = torch.rand(min(bm, lq - bm), lk) < 0.1
        mask[bm:2 * bm, 0] = True
        lay = block_layout_from_mask(mask, bm, bn, "token")
        assert (lay.partial_index[0] == -1).any() and (lay.partial_index[1, :int(lay.kv_num_blocks[1])] >= 0).all()
        out = K.csla_attention(q, k, v, lay)
        err(out, csla_attention_ref(q.float(), k.float(), v.float(), lay))
        # block-granular on the same tiles differs: the token mask is really applied
        assert (out.float() - reference_attention(q, k, v, mask=lay.block_mask().repeat_interleave(bm, 0)
                .repeat_interleave(bn, 1)[:lq, :lk]).float()).abs().max() > 0.05
    sums = torch.rand(2, 3, 300)
    sums[0, 0] *= 0.5
    sums[0, 0, 100:160] = 0.9  # 60 ties at the threshold for the top 50: the lowest positions are taken
    sums[0, 1] = 0.0  # all equal (a row of zeros)
    selected = K.select_topk(sums, 50)
    assert torch.equal(selected[1].long(), sums[1].topk(50, -1).indices.sort(-1).values), "select_topk differs"
    tail = K.select_topk(sums, 50, 33)  # candidates [33, 300) only
    assert torch.equal(tail[1].long(), 33 + sums[1, :, 33:].topk(50, -1).indices.sort(-1).values)
    assert torch.equal(selected[0, 0].long(), torch.arange(100, 150)), "ties must take the lowest positions"
    assert torch.equal(selected[0, 1].long(), torch.arange(50))
    # every radix finds the same threshold: values spread over many exponents (every digit of the bit pattern
    # matters), exact zeros, ties at the threshold, huge values (top exponent bits) and the sink offset
    wide = torch.rand(3, 2, 500) * torch.logspace(-30, 30, 500)[torch.randperm(500)]
    wide[0, 0, :200] = 0.0
    wide[1, 1, 7:300:3] = torch.linspace(1e37, 3e38, 98)
    wide[2, 0] = torch.rand(500) * 0.5
    wide[2, 0, 10:400] = 1.0  # 390 ties for 60 places
    wide[2, 1] = (torch.tensor(1.0).view(torch.int32) + torch.randperm(500, dtype=torch.int32)).view(torch.float32)
    for radix, block in [(1, 128), (2, 256), (4, 128), (4, 512)]:
        for first in (0, 17):
            got = K.select_topk(wide, 60, first, launch=(radix, block, 4))
            want = first + wide[..., first:].topk(60, -1).indices.sort(-1).values
            assert torch.equal(got[:2].long(), want[:2]), f"radix {radix}, first {first}: select_topk differs"
            # consecutive floats (one ulp apart): every bit of the threshold must be found
            assert torch.equal(got[2, 1].long(), want[2, 1]), f"radix {radix}, first {first}: a low bit is lost"
            ties = torch.arange(10 if first == 0 else 17, 70 if first == 0 else 77)
            assert torch.equal(got[2, 0].long(), ties), f"radix {radix}: ties must take the lowest positions"
    for gs, lq, lk, d, nkeys, band in [(32, 70, 200, 64, 40, 0), (16, 40, 150, 128, 24, 20)]:
        q = torch.randn(2, 2, lq, d, dtype=dt) * d ** -0.5
        k, v = torch.randn(2, 2, lk, d, dtype=dt), torch.randn(2, 2, lk, d, dtype=dt)
        groups = -(-lq // gs)
        key_idx = torch.rand(2, 2, groups, lk - band - 5).topk(nkeys, -1).indices.sort(-1).values.to(torch.int32)
        band_start = torch.randint(lk - band - 5, lk - band + 1, (groups,), dtype=torch.int32) if band else None
        o_cache = torch.randn(2, 2, lq, d, dtype=dt)
        out = K.cs4a_attention_raw(q, k, v, key_idx, gs, o_cache, band_start=band_start, band_len=band)
        err(out, K.reference_cs4a_attention(q, k, v, key_idx, gs, o_cache, band_start=band_start, band_len=band))
        err(K.cs4a_attention_raw(q * 4, k, v, key_idx, gs, o_cache, band_start=band_start, band_len=band, scale=0.25),
            out)
        _, lse = K.dense_attention(q, k, v, return_lse=True)
        err(K.cs4a_column_sums(q, k, lse, gs), K.reference_column_sums(q, k, gs))  # the last group is partial
        out, selected, cache = K.cs4a_decide_raw(q, k, v, gs, 24)
        ref_out, ref_selected, _ = K.reference_cs4a_decide(q, k, v, gs, 24)
        err(out, ref_out)
        assert torch.equal(selected, ref_selected), "selection differs from the reference"
        err(cache, ref_out.float() - K.reference_cs4a_attention(q, k, v, selected, gs).float())
        # sinks (HART's text prefix): never selected, always in the residual's key set
        out, selected, cache = K.cs4a_decide_raw(q, k, v, gs, 24, 7)
        ref_out, ref_selected, ref_cache = K.reference_cs4a_decide(q, k, v, gs, 24, 7)
        assert torch.equal(selected, ref_selected) and int(selected.min()) >= 7, "selection with sinks differs"
        err(out, ref_out)
        err(cache, ref_cache)
    # per-row key lengths (the engine's cross-attention over a padded text): 64 keys (a whole number of tiles), 37
    # and 1; the keys past each row's length are NaN, so reading any of them would show
    q = torch.randn(3, 2, 20, 64, dtype=dt) * 0.125
    k, v = (torch.randn(3, 2, 64, 64, dtype=dt) for _ in range(2))
    lens = torch.tensor([64, 37, 1], dtype=torch.int32)
    real = (torch.arange(64)[None, :] < lens[:, None])[:, None, :, None]  # (B, 1, Lk, 1)
    k, v = k.masked_fill(~real, float("nan")), v.masked_fill(~real, float("nan"))
    out = K.dense_attention(q, k, v, block_m=16, block_n=32, kv_lens=lens)
    err(out, reference_attention(q, k.nan_to_num(), v.nan_to_num(), mask=real.transpose(2, 3)))
    # a length of 0 or below reads no key: k and v are views into buffers whose rows before them hold 7, which a
    # negative key tile would read (before the clamp, a graph's uninitialised text lengths did that on the GPU)
    buf = torch.full((2, 2, 64 + 64, 64), 7.0, dtype=dt)
    buf[:, :, 64:] = torch.randn(2, 2, 64, 64, dtype=dt)
    kb = buf[:, :, 64:]
    for lens in ([0, 5], [-1, 5], [-63, 5], [-100000, 5]):
        out = K.dense_attention(q[:2], kb, kb, block_m=16, block_n=32, kv_lens=torch.tensor(lens, dtype=torch.int32))
        assert out[0].isnan().all(), f"kv_lens {lens}: a row of no keys must give NaN, got {out[0].flatten()[:4]}"
        err(out[1:], reference_attention(q[1:2], kb[1:2, :, :5], kb[1:2, :, :5]))
    # a CSLA row that lists no key block gives NaN, as the reference does, on both paths (Lk a whole number of
    # blocks or not): before a clamp, with a partial last block the kernel ran the previous row's last entry
    q = torch.randn(1, 1, 32, 64, dtype=dt)
    for lk in (48, 64):
        k, v = torch.randn(1, 1, lk, 64, dtype=dt), torch.randn(1, 1, lk, 64, dtype=dt)
        counts, idx = torch.tensor([1, 0], dtype=torch.int32), torch.tensor([[1], [1]], dtype=torch.int32)
        out = K.csla_attention_blocks(q, k, v, counts, idx, 16, 32)
        assert out[0, 0, 16:].isnan().all(), f"Lk {lk}: a row of no key blocks must give NaN"
        err(out[:, :, :16], K.reference_csla_attention(q, k, v, counts, idx, 16, 32)[:, :, :16])
    # token-major q (the engine's layout): every output takes q's layout, so attention -> projection needs no copy,
    # and the numbers are the contiguous run's
    def token_major(t):
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    gs, lq, lk, d = 16, 40, 150, 64
    q = torch.randn(2, 2, lq, d, dtype=dt) * d ** -0.5
    k, v = torch.randn(2, 2, lk, d, dtype=dt), torch.randn(2, 2, lk, d, dtype=dt)
    key_idx = torch.rand(2, 2, -(-lq // gs), lk).topk(24, -1).indices.sort(-1).values.to(torch.int32)
    o_cache = torch.randn(2, 2, lq, d, dtype=dt)
    lay = block_layout_from_mask(torch.rand(lq, lk) < 0.5, 16, 16)
    runs = [lambda q: K.csla_attention_blocks(q, k, v, lay.kv_num_blocks, lay.kv_indices, 16, 16),
            lambda q: K.cs4a_attention_raw(q, k, v, key_idx, gs, o_cache),
            lambda q: K.cs4a_decide_raw(q, k, v, gs, 24)[0], lambda q: K.cs4a_decide_raw(q, k, v, gs, 24)[2]]
    for run in runs:
        want, got = run(q), run(token_major(q))
        assert got.stride() == token_major(q).stride(), got.stride()
        assert torch.equal(got, want), "a token-major q changes the numbers"
    # CS4A's residual cache upsample (any input strides, D contiguous) against the torch reference
    from sparvar.cs4a import upsample_cache
    for src, dst in [((5, 4), (9, 7)), ((3, 3), (3, 3)), ((4, 4), (6, 6))]:
        cache = torch.randn(2, 3, src[0] * src[1], 64)
        for c in (cache, token_major(cache)):
            up = K.upsample_cache(c, src, dst)
            assert up.is_contiguous() and up.shape == (2, 3, dst[0] * dst[1], 64)
            err(up, upsample_cache(cache, src, dst))
    print("WORST", worst)
''')


FROM_SELECTION_SCRIPT = textwrap.dedent('''
    import torch

    import sparvar.kernels as K
    from sparvar.cs4a import cs4a_from_selection_ref, cs4a_geometry, upsample_cache
    from sparvar.schedule import get_schedule

    torch.manual_seed(0)
    dt = torch.float16
    worst = 0.0
    def err(a, b):
        global worst
        worst = max(worst, (a.float() - b.float()).abs().nan_to_num(nan=float("inf")).max().item())
    reference = lambda q, k, v, idx, gs, cache: K.reference_cs4a_attention(q, k, v, idx, gs, cache)
    composed = lambda q, k, v, idx, gs, cache: K.cs4a_attention(q, k, v, idx, gs, cache)
    square, wide = get_schedule(256), get_schedule(256, "16:9")
    # (schedule, decision scale, later scale, sinks): one band (scale 5), two (6), sinks + two, sinks + three
    # (decision scale 3: the most ranges the kernel takes), on square and 16:9 grids
    for geometry, (s, decision, scale, sinks) in enumerate([(square, 4, 5, 0), (square, 4, 6, 0), (square, 4, 6, 21),
                                                           (square, 3, 6, 5), (wide, 4, 6, 0), (wide, 3, 6, 5)]):
        geo = cs4a_geometry(s, decision, scale, 16, (3, 5, 7), 16, 32, sink_len=sinks)
        lq, lk = s.lengths[scale], s.kv_len(scale)
        q = torch.randn(2, 2, lq, 64, dtype=dt) * 0.125
        k, v = torch.randn(2, 2, lk, 64, dtype=dt), torch.randn(2, 2, lk, 64, dtype=dt)
        sel = torch.stack([sinks + torch.randperm(s.kv_len(decision) - sinks)[:32].sort().values
                           for _ in range(4 * geo.num_decision_groups)]).view(2, 2, -1, 32).to(torch.int32)
        grids = s.grids[decision], s.grids[scale]
        n = s.lengths[decision]
        # one residual-cache kind per geometry, in turn (fp16, fp32, none: each twice, on two geometries), which
        # keeps this test's interpreter time down; the composed Triton path (key sets, upsampled cache, cs4a) on
        # the same inputs gives the same
        cache = (torch.randn(2, 2, n, 64, dtype=dt), torch.randn(2, 2, n, 64), None)[geometry % 3]
        got = K.cs4a_attention_from_selection(q, k, v, sel, geo, cache, *grids)
        assert got.shape == q.shape and got.dtype == dt
        err(got, cs4a_from_selection_ref(reference, upsample_cache, q, k, v, sel, geo, cache, *grids))
        err(got, cs4a_from_selection_ref(composed, K.upsample_cache, q, k, v, sel, geo, cache, *grids))
    print("WORST", worst)
''')


DECIDE_IN_HALVES_SCRIPT = textwrap.dedent('''
    import torch

    import sparvar.kernels as K
    from sparvar.schedule import get_schedule
    from sparvar.sparse import SparVARPlan, default_policy

    torch.manual_seed(0)
    dt = torch.float16
    # kernels: three layers decided in halves (one top-k launch) == each decided whole, bit for bit; with sinks
    gs, lq, lk, topk = 32, 70, 200, 24
    layers = [(torch.randn(2, 2, lq, 64, dtype=dt) * 0.5, torch.randn(2, 2, lk, 64, dtype=dt),
               torch.randn(2, 2, lk, 64, dtype=dt)) for _ in range(3)]
    for sinks in (0, 7):
        sums = torch.empty(3, 2, 2, 3, lk)
        begun = [K.cs4a_decide_begin_raw(q, k, v, gs, sums[i]) for i, (q, k, v) in enumerate(layers)]
        ended = K.cs4a_decide_end_raw([(*t, dense) for t, (_, dense) in zip(layers, begun)], sums, gs, topk, sinks)
        for (q, k, v), (out, _), (selected, cache) in zip(layers, begun, ended):
            want_out, want_selected, want_cache = K.cs4a_decide_raw(q, k, v, gs, topk, sinks)
            assert torch.equal(out, want_out), "the first half's output differs from cs4a_decide_raw's"
            assert torch.equal(selected, want_selected), f"selection differs ({sinks} sinks)"
            assert torch.equal(cache, want_cache), f"residual cache differs ({sinks} sinks)"
    # the plan: its triton ops decide in halves (state set at the last decision layer), the same state as per layer
    schedule = get_schedule(256)
    policy = default_policy("infinity-tiny", schedule)
    s, n_layers = policy.decision_scale, 4
    halves = SparVARPlan(policy, schedule, n_layers, backend="triton")
    assert halves.ops.cs4a_decide_begin is not None
    whole = SparVARPlan(policy, schedule, n_layers, backend="triton")
    whole.ops = whole.ops._replace(cs4a_decide_begin=None, cs4a_decide_end=None)
    lq, lk = schedule.lengths[s], schedule.kv_len(s)
    for layer in range(n_layers):
        q = torch.randn(2, 2, lq, 64, dtype=dt) * 0.5
        k, v = torch.randn(2, 2, lk, 64, dtype=dt), torch.randn(2, 2, lk, 64, dtype=dt)
        out_h, out_w = halves.attend(q, k, v, layer=layer, scale=s), whole.attend(q, k, v, layer=layer, scale=s)
        assert (out_h is None) == (out_w is None) and (out_h is None or torch.equal(out_h, out_w)), layer
        if layer == 0 and policy.cs4a_layers > 1:
            try:
                halves.state(0)
                raise AssertionError("a decision layer's state must wait for the last decision layer")
            except RuntimeError:
                pass
    for layer in range(policy.cs4a_layers):
        for a, b in zip(halves.state(layer), whole.state(layer)):
            assert torch.equal(a, b), f"layer {layer}: the plan's decision state differs"
    # a generation cut off partway through the decision scale: the pending state names it, a rerun of the scale
    # without reset() starts over, and a failing first half leaves nothing pending
    inputs = [(torch.randn(2, 2, lq, 64, dtype=dt) * 0.5, torch.randn(2, 2, lk, 64, dtype=dt),
               torch.randn(2, 2, lk, 64, dtype=dt)) for _ in range(n_layers)]
    halves.reset()
    halves.attend(*inputs[0], layer=0, scale=s)
    try:
        halves.state(0)
        raise AssertionError("no state while the decision is pending")
    except RuntimeError as e:
        assert "partway" in str(e) and "[0]" in str(e), e
    inputs = [tuple(torch.randn_like(t) for t in layer_inputs) for layer_inputs in inputs]  # the rerun's own
    for plan in (halves, whole):
        for layer in range(n_layers):
            plan.attend(*inputs[layer], layer=layer, scale=s)
    for layer in range(policy.cs4a_layers):
        for a, b in zip(halves.state(layer), whole.state(layer)):
            assert torch.equal(a, b), f"layer {layer}: a rerun decision scale differs"
    # a new decision drops the previous one's state until its own is made
    halves.attend(*inputs[0], layer=0, scale=s)
    try:
        halves.state(1)
        raise AssertionError("an older decision's state must not show while a new one is pending")
    except RuntimeError as e:
        assert "partway" in str(e), e
    halves.reset()
    halves.reset()
    try:
        halves.attend(inputs[0][0][:, :, :-1], inputs[0][1], inputs[0][2], layer=0, scale=s)
        raise AssertionError("a wrong query length must raise")
    except ValueError:
        pass
    halves.attend(*inputs[0], layer=0, scale=s)
    begin = halves.ops.cs4a_decide_begin
    def failing_begin(*args):
        raise RuntimeError("injected")
    halves.ops = halves.ops._replace(cs4a_decide_begin=failing_begin)
    try:
        halves.attend(*inputs[1], layer=1, scale=s)
        raise AssertionError("the injected failure must propagate")
    except RuntimeError as e:
        assert "injected" in str(e)
    assert halves._decision_inputs == {} and halves._decision_sums is None, "a failure left a pending decision"
    halves.ops = halves.ops._replace(cs4a_decide_begin=begin)
    # HART's policy: sinks lead every key set and never compete, through the plan too
    hs = get_schedule(256, model="hart-tiny")
    hpolicy = default_policy("hart-tiny", hs)
    assert hpolicy.sink_len(hs) > 0
    hplans = [SparVARPlan(hpolicy, hs, hpolicy.num_layers, backend="triton") for _ in range(2)]
    hplans[1].ops = hplans[1].ops._replace(cs4a_decide_begin=None, cs4a_decide_end=None)
    d = hpolicy.decision_scale
    for layer in range(hpolicy.num_layers):
        t = (torch.randn(2, 2, hs.lengths[d], 64, dtype=dt) * 0.5, torch.randn(2, 2, hs.kv_len(d), 64, dtype=dt),
             torch.randn(2, 2, hs.kv_len(d), 64, dtype=dt))
        outs = [p.attend(*t, layer=layer, scale=d) for p in hplans]
        assert (outs[0] is None) == (outs[1] is None) and (outs[0] is None or torch.equal(*outs)), layer
    for layer in range(hpolicy.cs4a_layers):
        for a, b in zip(hplans[0].state(layer), hplans[1].state(layer)):
            assert torch.equal(a, b), f"hart layer {layer}: the plan's decision state differs"
    # the second half's checks: a group size other than the first half's, a dense output of another shape
    q, k, v = layers[0]
    lq, lk = q.shape[2], k.shape[2]  # the kernel checks' shapes, not the plan's
    sums = torch.empty(1, 2, 2, 3, lk)
    _, dense = K.cs4a_decide_begin_raw(q, k, v, gs, sums[0])
    for bad, what in [(dict(group_size=16), "do not match the column sums"),
                      (dict(dense=dense[:, :, :-1]), "dense output must have q's shape"),
                      (dict(dense=dense.double()), "dense output must have q's shape"),
                      (dict(dense=dense.transpose(2, 3).contiguous().transpose(2, 3)), "contiguous head dim")]:
        try:
            K.cs4a_decide_end_raw([(q, k, v, bad.get("dense", dense))], sums, bad.get("group_size", gs), topk)
            raise AssertionError(f"cs4a_decide_end_raw must refuse: {what}")
        except ValueError as e:
            assert what in str(e), e
    try:
        K.cs4a_column_sums(q, k, torch.zeros(2, 2, lq), gs, out=torch.empty(2, 2, 2, lk))
        raise AssertionError("a wrong-shaped out must be refused")
    except ValueError as e:
        assert "out must be" in str(e), e
    for lanes, what in ((("not a stream",), "lanes must be CUDA streams"), ("xy", "a tuple of CUDA streams")):
        try:  # side streams for the residual launches: a tuple of CUDA streams on the tensors' device only
            K.cs4a_decide_end_raw([(q, k, v, dense)], sums, gs, topk, lanes=lanes)
            raise AssertionError("lanes that are not CUDA streams must be refused")
        except ValueError as e:
            assert what in str(e), e
    print("WORST", 0.0)
''')


def test_cs4a_decide_in_halves_under_triton_interpreter():
    """The decision in two halves (the engine's: every decision layer's top-k in one launch) gives each layer
    exactly what cs4a_decide_raw gives it, through the kernels and through the plan (Infinity's and HART's, with
    sinks); a decision cut off partway is named, restarts on a rerun, and leaves nothing pending after a failure;
    the second half refuses inputs that do not match the first."""
    pytest.importorskip("triton")
    assert float(run_interpreted(DECIDE_IN_HALVES_SCRIPT)) == 0.0


def test_cs4a_from_selection_under_triton_interpreter():
    """The one-launch CS4A of a later scale (selection rows through the group map, sinks and bands as contiguous
    ranges, the residual cache interpolated in the epilogue) against the composed reference, with 1-3 ranges and a
    bf16-like, an fp32 and no cache."""
    pytest.importorskip("triton")
    worst = float(run_interpreted(FROM_SELECTION_SCRIPT))
    assert worst < 5e-3, f"cs4a_attention_from_selection differs from the composed reference by {worst}"


def test_kernels_under_triton_interpreter():
    pytest.importorskip("triton")
    worst = float(run_interpreted(INTERPRETER_SCRIPT))
    assert worst < 5e-3, f"kernels under the interpreter differ from the references by {worst}"


def test_csla_variant_names_are_checked():
    q = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16)
    lay = block_layout_from_mask(torch.ones(64, 64, dtype=torch.bool), 64, 64)
    with pytest.raises(ValueError, match="unknown variant 'fast'"):
        kernels.csla_attention_blocks(q, q, q, lay.kv_num_blocks, lay.kv_indices, 64, 64, variant="fast")


BENCH_DRY_RUN_SCRIPT = textwrap.dedent('''
    import torch

    import bench.csla_variants as B

    import sparvar.kernels.csla as C

    class CallOnce:  # bench.attention.Bench without the CUDA timing: each row's call and check run once
        def __init__(self, *args, **kwargs):
            self.rows = []

        def add(self, model, name, scale, fn, check=None, **extra):
            row = dict(model=model, name=name, scale=scale, **extra)
            try:  # as Bench.add: a failing row is recorded, the others still run
                fn()
                row.update(check() if check else {})
            except Exception as e:
                row["error"] = str(e)
            self.rows.append(row)

    blocks = C.csla_attention_blocks

    def off_in_pointer(*args, variant=None, **kwargs):  # a variant that computes the wrong thing must not be timed
        out = blocks(*args, variant=variant, **kwargs)
        return out + 0.1 if variant == "pointer" else out

    C.CSLA_VARIANTS["pointer-copy"] = {}  # a second, right variant: checked, timed and in the ratios

    C.csla_attention_blocks = off_in_pointer
    B.Bench = CallOnce
    B.MODELS = {"infinity-2b": (2, 64)}  # 2B's policy (64x64 CSLA blocks) on 2 heads of 64 at 256^2
    rows = B.run(["infinity-2b"], 1, 0, resolution=256, device="cpu", dtype=torch.float16)["rows"]
    wrong = [r for r in rows if r["name"] == "CSLA pointer (fixed config)"]
    assert len(wrong) == 3 and all("max abs error" in r["error"] and "max_abs_err" not in r for r in wrong), wrong
    timed = [r if "error" in r else dict(r, graph_median_ms=1.0) for r in rows]  # Bench.add times only checked rows
    ratios = B.ratios(timed)
    assert len(ratios) == 3, ratios
    assert all(table == {B.AUTOTUNED: 1.0, "CSLA pointer-copy (fixed config)": 1.0} for table in ratios.values()), ratios
    rows = [r for r in rows if r not in wrong]
    assert not any("error" in r for r in rows), rows
    names = {(r["scale"], r["name"]) for r in rows + wrong}
    expected = {(s, n) for s in (4, 5, 6) for n in ("CSLA pointer (fixed config)", "CSLA pointer-copy (fixed config)",
                                                    B.AUTOTUNED)}
    assert names == expected, names
    print("WORST", max(r["max_abs_err"] for r in rows))
''')


def test_csla_variants_bench_dry_run_under_triton_interpreter():
    """bench/csla_variants.py's rows, run once each on the CPU (no timing): every row per sparse scale, each checked
    against the reference as the GPU run checks it, so the GPU run does not fail on the script's plumbing. Under
    the interpreter the "autotuned" row runs the fixed default config: the tuning itself runs only on the GPU."""
    pytest.importorskip("triton")
    worst = float(run_interpreted(BENCH_DRY_RUN_SCRIPT))
    assert worst < 5e-3, f"bench/csla_variants.py rows differ from the reference by {worst}"
