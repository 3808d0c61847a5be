"""CSLA over 2-D query tiles (sparvar.csla.TileLayout): the layout's semantics, the policy field, the plan file, the
tile kernel under Triton's CPU interpreter and (gpu marker) on a GPU against the fp32 masked reference."""
from __future__ import annotations

import pytest
import torch

from sparvar.attention import reference_attention
from sparvar.csla import (TileLayout, block_layout_from_mask, csla_attention_ref, csla_tile_layout, csla_token_mask,
                          tile_layout_from_mask)
from sparvar.schedule import get_schedule
from sparvar.sparse import SparVARPlan, default_policy, load_plan
from triton_interpreter import run_interpreted

PAPER_SIDES = (-1, -1, -1, 1, 1, 3, 5, 7)


def union_mask(mask: torch.Tensor, grid: tuple[int, int], tile: tuple[int, int]) -> torch.Tensor:
    """What a TileLayout must attend, written the slow way: each query attends every key some query of its tile keeps."""
    rows, cols = grid
    out = torch.zeros_like(mask)
    for y in range(rows):
        for x in range(cols):
            r0, c0 = y // tile[0] * tile[0], x // tile[1] * tile[1]
            members = [r * cols + c for r in range(r0, min(r0 + tile[0], rows)) for c in range(c0, min(c0 + tile[1], cols))]
            out[y * cols + x] = mask[members].any(dim=0)
    return out


@pytest.mark.parametrize("tile", [(4, 4), (2, 8), (3, 5)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_tile_layout_attends_the_union_of_its_queries_windows(tile):
    schedule = get_schedule(256, model="infinity-tiny")
    for scale in (4, 5, 6):  # 8x8, 12x12, 16x16: 3x5 tiles leave partial tiles at both borders
        mask = csla_token_mask(schedule, scale, 3, (1, 3, 5))
        layout = tile_layout_from_mask(mask, schedule.grids[scale], tile)
        dense = layout.to_dense()
        assert torch.equal(dense, union_mask(mask, schedule.grids[scale], tile)), f"scale {scale}"
        assert bool((dense | ~mask).all())  # a superset of every query's own window
        assert layout.density == pytest.approx(dense.float().mean().item())
        # each query sits in exactly one tile slot; padding slots hold q_len
        rows = layout.q_rows.reshape(-1)
        assert sorted(rows[rows < layout.q_len].tolist()) == list(range(layout.q_len))
        assert layout.num_tiles == -(-schedule.grids[scale][0] // tile[0]) * -(-schedule.grids[scale][1] // tile[1])
        # key lists ascending, padding repeats the last key
        for t in range(layout.num_tiles):
            n = int(layout.kv_count[t])
            keys = layout.kv_keys[t]
            assert bool((keys[1:n] > keys[: n - 1]).all()) and bool((keys[n:] == keys[n - 1]).all())


def test_query_tiles_at_1024_attend_fewer_pairs_than_raster_blocks():
    """The reason for the layout: 8x8 tiles compute 0.37-0.49x the pairs of the policy's 64x64 raster blocks."""
    schedule = get_schedule(1024)
    for scale, most in ((10, 0.50), (11, 0.46), (12, 0.38)):
        tiles = csla_tile_layout(schedule, scale, 5, PAPER_SIDES, (8, 8))
        raster = default_policy("infinity-8b", schedule).csla_layout(schedule, scale)
        assert tiles.token_density == pytest.approx(raster.token_density)
        # tiles: exact pairs over all pairs; raster: active blocks over all blocks (the same up to the partial last
        # query / key block)
        assert tiles.density / raster.density < most, scale
    assert repr(csla_tile_layout(schedule, 12, 5, PAPER_SIDES, (8, 8))).startswith(
        "TileLayout(q_len=4096, kv_len=10521, grid=64x64, tile=8x8, tiles=64")


def test_reference_csla_over_tiles_is_masked_attention():
    schedule = get_schedule(256, model="infinity-tiny")
    layout = csla_tile_layout(schedule, 5, 3, (1, 3, 5), (4, 4))
    q, k, v = torch.randn(1, 2, layout.q_len, 16), torch.randn(1, 2, layout.kv_len, 16), torch.randn(1, 2, layout.kv_len, 16)
    out = csla_attention_ref(q, k, v, layout)
    assert torch.allclose(out, reference_attention(q, k, v, mask=layout.to_dense()))
    # not the raster block layout's result: the tiles attend other keys
    raster = block_layout_from_mask(csla_token_mask(schedule, 5, 3, (1, 3, 5)), 16, 16)
    assert not torch.allclose(out, csla_attention_ref(q, k, v, raster), atol=1e-3)


def test_tile_layout_refuses_bad_input():
    mask = torch.ones(16, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match="4x5 query grid has 20 queries; the mask has 16"):
        tile_layout_from_mask(mask, (4, 5), (2, 2))
    with pytest.raises(ValueError, match="two positive ints"):
        tile_layout_from_mask(mask, (4, 4), (0, 2))
    mask[3] = False
    with pytest.raises(ValueError, match="1 query rows attend to no key"):
        tile_layout_from_mask(mask, (4, 4), (2, 2))
    with pytest.raises(TypeError, match="2-D bool"):
        tile_layout_from_mask(torch.ones(16, 10), (4, 4), (2, 2))


def test_policy_query_tile_field():
    schedule = get_schedule(1024)
    policy = default_policy("infinity-8b", schedule, csla_query_tile=(8, 8))
    assert isinstance(policy.csla_layout(schedule, 12), TileLayout)
    assert not isinstance(default_policy("infinity-8b", schedule).csla_layout(schedule, 12), TileLayout)
    with pytest.raises(ValueError, match="holds 48 queries; the kernel's query tile must hold one of"):
        default_policy("infinity-8b", schedule, csla_query_tile=(8, 6))
    with pytest.raises(ValueError, match="two positive ints"):
        default_policy("infinity-8b", schedule, csla_query_tile=(8, 8, 1))
    with pytest.raises(ValueError, match="two positive ints"):
        default_policy("infinity-8b", schedule, csla_query_tile=(8, 8.0))
    with pytest.raises(ValueError, match="needs csla_granularity 'block'"):
        default_policy("infinity-8b", schedule, csla_query_tile=(8, 8), csla_granularity="token")


def test_plan_file_keeps_tile_layouts(tmp_path):
    schedule = get_schedule(256, model="infinity-tiny")
    policy = default_policy("infinity-tiny", schedule, csla_query_tile=(4, 4))
    plan = SparVARPlan(policy, schedule, policy.num_layers)
    path = str(tmp_path / "plan.safetensors")
    plan.save(path)
    loaded = load_plan(path, policy, schedule, policy.num_layers)
    for scale, layout in plan.csla_layouts.items():
        got = loaded.csla_layouts[scale]
        assert isinstance(got, TileLayout) and got.tile == (4, 4) and got.grid == layout.grid
        assert torch.equal(got.to_dense(), layout.to_dense())
    # a plan of raster blocks is not one of query tiles: the stored policy says so
    with pytest.raises(ValueError, match=r"csla_query_tile: stored \[4, 4\], now None"):
        load_plan(path, default_policy("infinity-tiny", schedule), schedule, policy.num_layers)


def test_plan_file_with_an_unknown_layout_kind_is_refused(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    schedule = get_schedule(256, model="infinity-tiny")
    policy = default_policy("infinity-tiny", schedule, csla_query_tile=(4, 4))
    path = str(tmp_path / "plan.safetensors")
    SparVARPlan(policy, schedule, policy.num_layers).save(path)
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {n: f.get_tensor(n) for n in f.keys()}
    fields = json.loads(meta["sparvar_plan"])
    fields["csla"]["5"]["layout"] = "HexLayout"
    save_file(tensors, path, metadata={**meta, "sparvar_plan": json.dumps(fields)})
    with pytest.raises(ValueError, match="CSLA layout of scale 5 is a 'HexLayout'"):
        load_plan(path, policy, schedule, policy.num_layers)


def test_tile_kernel_wrapper_refuses_bad_layouts():
    from sparvar.kernels.csla import check_tile_values, csla_attention, csla_attention_query_tiles

    schedule = get_schedule(256, model="infinity-tiny")
    layout = csla_tile_layout(schedule, 5, 3, (1, 3, 5), (4, 4))
    q, k, v = (torch.randn(1, 2, n, 64, dtype=torch.float16) for n in (layout.q_len, layout.kv_len, layout.kv_len))
    args = (layout.q_rows, layout.kv_count, layout.kv_keys)
    with pytest.raises(ValueError, match="holds 12 queries; the kernel takes"):
        csla_attention_query_tiles(q, k, v, layout.q_rows[:, :12].contiguous(), *args[1:])
    with pytest.raises(ValueError, match="must agree on the number of tiles"):
        csla_attention_query_tiles(q, k, v, layout.q_rows, layout.kv_count[:-1], layout.kv_keys)
    with pytest.raises(TypeError, match="kv_keys must be int32"):
        csla_attention_query_tiles(q, k, v, layout.q_rows, layout.kv_count, layout.kv_keys.long())
    with pytest.raises(ValueError, match="layout is for 144 queries x 265 keys"):
        csla_attention(q[:, :, :100], k, v, layout)
    check_tile_values(layout.q_len, layout.kv_len, *args)
    with pytest.raises(ValueError, match="each of the 144 queries once"):
        check_tile_values(layout.q_len, layout.kv_len, torch.zeros_like(layout.q_rows), *args[1:])
    bad = layout.kv_keys.clone()
    bad[0, 0] = layout.kv_len
    with pytest.raises(ValueError, match="outside"):
        check_tile_values(layout.q_len, layout.kv_len, layout.q_rows, layout.kv_count, bad)


def test_tile_kernel_under_the_interpreter_matches_reference():
    worst = run_interpreted('''
        import torch
        from sparvar.csla import csla_tile_layout
        from sparvar.attention import reference_attention
        from sparvar.kernels.csla import csla_attention, csla_attention_query_tiles, query_block_order
        from sparvar.schedule import get_schedule

        torch.manual_seed(0)
        dt = torch.float16  # the interpreter mis-handles bf16 dots
        schedule = get_schedule(256, model="infinity-tiny")
        worst = 0.0
        # 2x8 tiles on the 12-wide scale 5 and 2x16 on the 8-wide scale 4 leave padding slots in border tiles
        for scale, tile, d in [(5, (2, 8), 64), (6, (4, 4), 128), (4, (2, 16), 64)]:
            lay = csla_tile_layout(schedule, scale, 3, (1, 3, 5), tile)
            assert bool((lay.q_rows == lay.q_len).any()) == (scale != 6)
            q = (torch.randn(2, lay.q_len, 2, d, dtype=dt) * d ** -0.5).transpose(1, 2)  # token-major, as projected
            k, v = (torch.randn(2, 2, lay.kv_len + 9, d, dtype=dt)[:, :, :lay.kv_len] for _ in range(2))
            ref = reference_attention(q, k, v, mask=lay.to_dense())
            outs = [csla_attention(q, k, v, lay),
                    csla_attention_query_tiles(q, k, v, lay.q_rows, lay.kv_count, lay.kv_keys),
                    csla_attention_query_tiles(q, k, v, lay.q_rows, lay.kv_count, lay.kv_keys,
                                               tile_order=query_block_order(lay.kv_count))]
            for out in outs:
                worst = max(worst, (out.float() - ref.float()).abs().nan_to_num(nan=float("inf")).max().item())
        print("WORST", worst)
    ''')
    assert float(worst) < 4e-3


def test_tile_aot_entry_under_the_interpreter_matches_reference_and_clamps_garbage():
    """The TensorRT AOT entry of CSLATileAttention (contiguous tensors, strides from the shapes, the default launch):
    the reference on a real layout; on the layouts TensorRT times tactics with, query slots, counts and keys are
    forced into range, so no read passes K / V (they end in NaN rows) and the result is the clamped layout's."""
    worst = run_interpreted('''
        import torch
        from sparvar.csla import csla_tile_layout
        from sparvar.attention import reference_attention
        from sparvar.kernels.aot import aot_kernel, _csla_tiles_aot_kernel
        from sparvar.schedule import get_schedule

        torch.manual_seed(0)
        dt = torch.float16  # the interpreter mis-handles bf16 dots
        schedule = get_schedule(256, model="infinity-tiny")
        worst = 0.0
        def err(a, b):
            global worst
            worst = max(worst, (a.float() - b.float()).abs().nan_to_num(nan=float("inf")).max().item())
        for scale, tile, d in [(5, (2, 8), 64), (6, (4, 4), 64)]:
            lay = csla_tile_layout(schedule, scale, 3, (1, 3, 5), tile)
            tiles, slots = lay.q_rows.shape
            width = lay.kv_keys.shape[1]
            kernel = aot_kernel("CSLATileAttention", dtype="float16", head_dim=d, attrs={},
                                static_dims={"q_rows": (tiles, slots)})
            assert kernel.constexprs["BLOCK_M"] == slots
            def launch(k, v, q_rows, kv_count, kv_keys):
                # out sits between two zero guards: a write outside it (a query slot out of range) shows there;
                # rows no slot names stay 0 (the reference has none such)
                guard = 64 * d
                buffer = torch.zeros(guard + q.numel() + guard, dtype=dt)
                out = buffer[guard:guard + q.numel()].view(q.shape)
                _csla_tiles_aot_kernel[(tiles, 4)](q, k, v, q_rows, kv_count, kv_keys, 2, lay.q_len, lay.kv_len, width,
                                                   out, **kernel.constexprs)
                assert not buffer[:guard].any() and not buffer[-guard:].any(), "a write outside the output"
                return out
            q = torch.randn(2, 2, lay.q_len, d, dtype=dt) * d ** -0.5
            # K and V are views of the front of NaN buffers: a key read past kv_len of the last head turns a row NaN
            k, v = (torch.cat([t.flatten(), torch.full((64 * d,), float("nan"), dtype=dt)])[:t.numel()].view(t.shape)
                    for t in (torch.randn(2, 2, lay.kv_len, d, dtype=dt) for _ in range(2)))
            assert k.untyped_storage().nbytes() > k.numel() * k.element_size()
            err(launch(k, v, lay.q_rows, lay.kv_count, lay.kv_keys), reference_attention(q, k, v, mask=lay.to_dense()))
            q_rows, kv_count, kv_keys = lay.q_rows.clone(), lay.kv_count.clone(), lay.kv_keys.clone()
            block_n = kernel.constexprs["BLOCK_N"]
            first = int((q_rows == 0).any(dim=1).nonzero()[0])  # the tile holding query 0 (its count stays valid)
            q_rows[first, -2:] = torch.tensor([-7, 2**31 - 1], dtype=torch.int32)  # -> query 0 again, padding
            others = [t for t in range(tiles) if t != first]
            kv_count[others[:3]] = torch.tensor([-3, 2**31 - 1, width + 5], dtype=torch.int32)
            kv_keys[others[3], :5] = torch.tensor([-2**31, -1, 2**31 - 1, lay.kv_len, 7], dtype=torch.int32)  # a full tile
            partial = next(t for t in others[4:] if int(kv_count[t]) % block_n > 3)
            n = int(kv_count[partial])
            kv_keys[partial, n - 3:n] = torch.tensor([lay.kv_len + 100, -5, 2**31 - 1], dtype=torch.int32)  # the masked one
            kv_keys[first, 0] = 2**31 - 1
            got = launch(k, v, q_rows, kv_count, kv_keys)
            want = torch.zeros(2, 2, lay.q_len, d)
            for t in range(tiles):
                rows = q_rows[t].clamp(0, lay.q_len)
                rows = rows[rows < lay.q_len].long().unique()
                n = min(int(kv_count[t]), width)
                if n <= 0 or not len(rows):
                    continue  # no key: 0 / 0 in the kernel, NaN, compared as 0
                keys = kv_keys[t, :n].clamp(0, lay.kv_len - 1).long()  # a key listed twice counts twice
                scores = q[:, :, rows].float() @ k[:, :, keys].float().transpose(-1, -2)
                want[:, :, rows] = scores.softmax(-1) @ v[:, :, keys].float()
            err(got.nan_to_num(), want)
        print("WORST", worst)
    ''')
    assert float(worst) < 4e-3


@pytest.mark.parametrize("head_dim", [64, 128])
def test_tile_aot_entry_compiles_to_sm90_ptx_and_names_what_it_cannot_run(head_dim):
    """Triton compiles the tile AOT entry for Hopper on this CPU machine in TensorRT's argument order; its query tile
    comes from q_rows' constant second dim, and a tile that is unknown or one the kernel lacks is refused by name."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from plugins import csla_tiles
    from plugins.aot import compile_aot, kernel_for, signature
    from plugins.spec import IntDims
    from sparvar import kernels

    kernel = kernel_for(csla_tiles.SPEC, "bfloat16", head_dim, {}, {"q_rows": (512, 64), "q": (2, 16, None, head_dim)})
    assert kernel.constexprs == {"HEAD_DIM": head_dim, "BLOCK_M": 64, "BLOCK_N": 64} and kernel.num_warps == 4
    dtypes = ["bfloat16"] * 3 + ["int32"] * 3 + ["bfloat16"]
    assert list(signature(csla_tiles.SPEC, kernel, dtypes).values()) == (
        ["*bf16"] * 3 + ["*i32"] * 3 + ["i32"] * 4 + ["*bf16"] + ["constexpr"] * 3)
    compiled = compile_aot(csla_tiles.SPEC, kernel, dtypes, target=GPUTarget("cuda", 90, 32))
    assert ".target sm_90" in compiled.ptx and "wgmma" in compiled.ptx and compiled.threads == 128
    sizes = {"q": [2, 16, 4096, head_dim], "k": [2, 16, 10521, head_dim], "q_rows": [64, 64], "kv_keys": [64, 700]}
    assert kernel.grid(sizes, IntDims()) == (64, 32, 1)
    assert kernel.scalars(sizes, IntDims()) == [16, 4096, 10521, 700]
    assert kernel_for(csla_tiles.SPEC, "float16", head_dim, {}, {"q_rows": (9, 128)}).num_warps == 8
    for static_dims in ({}, {"q_rows": (9, None)}, {"q_rows": (9, 48)}):
        with pytest.raises(ValueError, match="CSLATileAttention's query tile .q_rows' second dim. must be a constant"):
            kernels.aot_kernel("CSLATileAttention", dtype="bfloat16", head_dim=head_dim, attrs={}, static_dims=static_dims)


# ------------------------------------------------------------------------------------------------ GPU
def _gpu_kernels():
    kernels = pytest.importorskip("sparvar.kernels")
    if not kernels.HAS_TRITON:
        pytest.skip("triton is not installed")
    return kernels


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["infinity-2b", "infinity-8b"])
@pytest.mark.parametrize("tile", [(8, 8), (4, 16), (8, 16), (4, 4)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_gpu_tile_kernel_paper_layouts_at_1024(model, tile):
    """bf16 at every sparse scale of 1024^2, q token-major, K/V views of a longer cache holding NaN past kv_len."""
    kernels = _gpu_kernels()
    schedule = get_schedule(1024)
    policy = default_policy(model, schedule, csla_query_tile=tile)
    heads = 3  # a few heads of the model's 128-dim ones keep the fp32 reference small
    for scale in policy.sparse_scales:
        layout = policy.csla_layout(schedule, scale).to("cuda")
        q = (torch.randn(2, layout.q_len, heads, 128, device="cuda", dtype=torch.bfloat16) * 128**-0.5).transpose(1, 2)
        buf = torch.full((2, 2, heads, layout.kv_len + 128, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
        buf[..., : layout.kv_len, :] = torch.randn(2, 2, heads, layout.kv_len, 128, device="cuda", dtype=torch.bfloat16)
        k, v = buf[0, :, :, : layout.kv_len], buf[1, :, :, : layout.kv_len]
        out = kernels.csla_attention(q, k, v, layout)
        ref = reference_attention(q, k, v, mask=layout.to_dense())
        err = (out.float() - ref).abs().max().item()
        assert err < 2e-2, f"{model} scale {scale} tile {tile}: max abs error {err}"


@pytest.mark.gpu
def test_gpu_tile_kernel_captured_in_a_cuda_graph_equals_eager():
    kernels = _gpu_kernels()
    schedule = get_schedule(1024)
    layout = default_policy("infinity-2b", schedule, csla_query_tile=(8, 8)).csla_layout(schedule, 11).to("cuda")
    q = torch.randn(2, 16, layout.q_len, 128, device="cuda", dtype=torch.bfloat16) * 128**-0.5
    k, v = (torch.randn(2, 16, layout.kv_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    eager = kernels.csla_attention(q, k, v, layout)  # tunes and orders the tiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed = kernels.csla_attention(q, k, v, layout)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graphed, eager)


@pytest.mark.gpu
def test_gpu_sparse_ops_drive_a_tiny_plan_with_query_tiles():
    """The Triton backend of a plan with query tiles gives the reference backend's CSLA outputs."""
    _gpu_kernels()
    schedule = get_schedule(256, model="infinity-tiny")
    policy = default_policy("infinity-tiny", schedule, csla_query_tile=(4, 4))
    ref_plan = SparVARPlan(policy, schedule, policy.num_layers)
    plan = SparVARPlan(policy, schedule, policy.num_layers, backend="triton")
    for scale in policy.sparse_scales:
        q_len, kv_len = schedule.lengths[scale], schedule.kv_len(scale)
        layer = policy.num_layers - 1  # a CSLA layer
        q = torch.randn(2, 2, q_len, 64, device="cuda", dtype=torch.bfloat16) * 0.125
        k, v = (torch.randn(2, 2, kv_len, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out = plan.attend(q, k, v, layer=layer, scale=scale)
        ref = ref_plan.attend(q, k, v, layer=layer, scale=scale)
        assert (out.float() - ref.float()).abs().max().item() < 2e-2, scale


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [(8, 8), (8, 16)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_gpu_tile_aot_entry_at_8b_scale_12(tile):
    """The TensorRT AOT entry of CSLATileAttention launched through Triton with TensorRT's arguments and the AOT
    launch config (contiguous bf16 tensors, 8B's head dim and layout at the last scale of 1024^2, 4 heads): the fp32
    masked reference."""
    kernels = _gpu_kernels()
    from sparvar.kernels.aot import _csla_tiles_aot_kernel

    schedule = get_schedule(1024)
    policy = default_policy("infinity-8b", schedule, csla_query_tile=tile)
    layout = policy.csla_layout(schedule, 12).to("cuda")
    b, h, d = 2, 4, 128
    q = torch.randn(b, h, layout.q_len, d, device="cuda", dtype=torch.bfloat16) * d ** -0.5
    k, v = (torch.randn(b, h, layout.kv_len, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kernel = kernels.aot_kernel("CSLATileAttention", dtype="bfloat16", head_dim=d, attrs={},
                                static_dims={"q_rows": tuple(layout.q_rows.shape)})
    out = torch.full_like(q, float("nan"))  # a row no tile writes stays NaN
    _csla_tiles_aot_kernel[(layout.q_rows.shape[0], b * h)](
        q, k, v, layout.q_rows, layout.kv_count, layout.kv_keys, h, layout.q_len, layout.kv_len,
        layout.kv_keys.shape[1], out, **kernel.constexprs, num_warps=kernel.num_warps, num_stages=kernel.num_stages)
    ref = reference_attention(q.float(), k.float(), v.float(), mask=layout.to_dense())
    assert (out.float() - ref).abs().nan_to_num(nan=float("inf")).max().item() < 2e-2


def test_tile_node_runs_the_reference_and_survives_tensorrts_timing_inputs():
    """The CSLATileAttention node's torch-level run: the reference result on a real layout; on the garbage TensorRT
    times tactics with, its clamps keep every read in bounds; a tile size the kernel lacks is refused by the check."""
    from plugins import RUNS, SPECS
    from sparvar.sparse import get_sparse_ops

    schedule = get_schedule(256, model="infinity-tiny")
    layout = csla_tile_layout(schedule, 5, 3, (1, 3, 5), (2, 8))
    q, k, v = (torch.randn(1, 2, n, 16) for n in (layout.q_len, layout.kv_len, layout.kv_len))
    reference = get_sparse_ops("reference")
    inputs = [q, k, v, layout.q_rows, layout.kv_count, layout.kv_keys]
    (got,) = RUNS["CSLATileAttention"](inputs, {}, reference)
    torch.testing.assert_close(got, csla_attention_ref(q, k, v, layout), atol=0, rtol=0)
    g = torch.Generator().manual_seed(0)
    garbage = [torch.randint(-2**31, 2**31 - 1, t.shape, dtype=torch.int32, generator=g) for t in inputs[3:]]
    (out,) = RUNS["CSLATileAttention"]([q, k, v, *garbage], {}, reference)
    assert out.shape == q.shape
    spec = SPECS["CSLATileAttention"]
    spec.check([tuple(t.shape) for t in inputs], {})
    with pytest.raises(ValueError, match="a tile holds 12 query slots; the kernel takes"):
        spec.check([q.shape, k.shape, v.shape, (12, 12), (12,), tuple(layout.kv_keys.shape)], {})
    with pytest.raises(ValueError, match="must agree on the number of tiles"):
        spec.check([q.shape, k.shape, v.shape, (12, 16), (11,), tuple(layout.kv_keys.shape)], {})


def test_the_opt_in_field_leaves_recorded_policies_as_they_were():
    """Engines key their stages on the policy's record and plan files store it: with csla_query_tile at None it is
    left out, so engines built before the field existed stay current; set, it is recorded."""
    import dataclasses

    schedule = get_schedule(1024)
    policy = default_policy("infinity-8b", schedule)
    assert "csla_query_tile" not in policy.record()
    assert policy.record() == {k: v for k, v in dataclasses.asdict(policy).items() if k != "csla_query_tile"}
    assert default_policy("infinity-8b", schedule, csla_query_tile=(8, 8)).record()["csla_query_tile"] == (8, 8)
