"""SparVAR policy and plan: dispatch, per-layer CS4A state, defaults per model (CPU)."""
import dataclasses

import pytest
import torch

from sparvar.attention import reference_attention, self_attention
from sparvar.config import get_config
from sparvar.cs4a import cs4a_attention_ref, upsample_cache
from sparvar.csla import csla_attention_ref
from sparvar.schedule import get_schedule
from sparvar.sparse import KINDS, SparVARPlan, default_policy, get_sparse_ops


def qkv_for(schedule, scale, b=2, h=2, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lq, lk = schedule.lengths[scale], schedule.kv_len(scale)
    return tuple(torch.randn(b, h, n, d, generator=g) for n in (lq, lk, lk))


@pytest.mark.parametrize("model", ["infinity-2b", "infinity-8b"])
def test_paper_policy_at_1024(model):
    s = get_schedule(1024)
    p = default_policy(model, s)
    assert p.num_layers == get_config(model).depth and p.decision_scale == 10 and p.cs4a_layers == 11
    assert list(p.sparse_scales) == [10, 11, 12]
    assert p.topk(s) == 784 and p.cs4a_band_sides == (7, 9)
    assert [p.kind(0, sc) for sc in (9, 10, 11, 12)] == ["dense", "cs4a_decide", "cs4a", "cs4a"]
    assert [p.kind(10, sc) for sc in (9, 10, 11, 12)] == ["dense", "cs4a_decide", "cs4a", "cs4a"]
    assert [p.kind(11, sc) for sc in (9, 10, 11, 12)] == ["dense", "csla", "csla", "csla"]
    assert p.csla_block == (64, 64)  # our default tiles; the paper's 128x128 density is checked below
    assert p.csla_layout(s, 12).density == pytest.approx(0.121, abs=1e-3)
    paper = default_policy(model, s, csla_block=(128, 128))
    assert paper.csla_layout(s, 12).density == pytest.approx(0.164, abs=1e-3)
    assert p.cs4a_geometry(s, 12).key_count == 2128


def test_policy_is_relative_to_schedule_end():
    for res, decision in ((512, 7), (256, 4), (768, 9)):
        s = get_schedule(res)
        p = default_policy("infinity-2b", s)
        assert p.decision_scale == decision and list(p.sparse_scales) == list(range(decision, s.num_scales))
        assert p.kind(0, decision - 1) == "dense" and p.kind(0, s.num_scales - 1) == "cs4a"


def test_policy_overrides_and_validation():
    s = get_schedule(1024)
    p = default_policy("infinity-2b", s, cs4a_use_cache=False, csla_block=(128, 64))
    assert not p.cs4a_use_cache
    with pytest.raises(TypeError, match="skip_last"):  # skipping is the loop's (skip_last), not the policy's
        default_policy("infinity-2b", s, skip_last=2)
    assert p.csla_layout(s, 12).density == pytest.approx(0.135, abs=1e-3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.cs4a_use_cache = True
    with pytest.raises(ValueError, match="band_sides"):
        dataclasses.replace(p, cs4a_band_sides=(7,))
    with pytest.raises(ValueError, match="granularity"):
        dataclasses.replace(p, csla_granularity="tile")
    with pytest.raises(ValueError, match="layer 32"):
        p.kind(32, 12)
    with pytest.raises(ValueError, match="unknown model"):
        default_policy("infinity-20b", s)
    with pytest.raises(ValueError, match="backend"):
        get_sparse_ops("cuda-magic")
    with pytest.raises(ValueError, match="layers"):
        SparVARPlan(p, s, num_layers=40)
    # overrides of the wrong type had been taken: "False" kept the cache (bool("False")), 10.5 layers acted as 11
    for field, value, message in (("cs4a_use_cache", "False", "cs4a_use_cache must be True or False"),
                                  ("cs4a_layers", 10.5, "cs4a_layers must be an int"),
                                  ("decision_scale", 10.0, "decision_scale must be an int"),
                                  ("cs4a_sinks", True, "cs4a_sinks must be an int"),
                                  ("cs4a_group_size", 192.0, "cs4a_group_size must be an int"),
                                  ("cs4a_band_sides", (7.0, 9), "cs4a_band_sides must be ints"),
                                  ("cs4a_band_sides", (True, 9), "cs4a_band_sides must be ints"),
                                  ("cs4a_topk_ratio", True, "cs4a_topk_ratio must be a number")):
        with pytest.raises(ValueError, match=message):
            default_policy("infinity-2b", s, **{field: value})


def test_list_fields_from_json_make_the_same_policy_as_tuples():
    s = get_schedule(1024)
    as_tuples = default_policy("infinity-8b", s, csla_block=(128, 64), csla_query_tile=(8, 8),
                               csla_window_sides=(-1, -1, -1, 1, 1, 3, 5, 7), cs4a_band_sides=(7, 9))
    as_lists = default_policy("infinity-8b", s, csla_block=[128, 64], csla_query_tile=[8, 8],
                              csla_window_sides=[-1, -1, -1, 1, 1, 3, 5, 7], cs4a_band_sides=[7, 9])
    assert as_lists == as_tuples and hash(as_lists) == hash(as_tuples) and as_lists.record() == as_tuples.record()
    assert isinstance(as_lists.csla_block, tuple) and isinstance(as_lists.csla_query_tile, tuple)
    for bad in ((64, 64, 1), (64, 0), (64, 64.0), (True, 64), 64):
        with pytest.raises(ValueError, match="csla_block must be two positive ints"):
            default_policy("infinity-8b", s, csla_block=bad)


def test_tiny_policy_runs_every_layer_and_scale():
    s = get_schedule(256)
    cfg = get_config("infinity-tiny")
    p = default_policy("infinity-tiny", s)
    plan = SparVARPlan(p, s, cfg.depth)
    seen = set()
    for scale in range(s.num_scales):
        for layer in range(cfg.depth):
            q, k, v = qkv_for(s, scale, h=cfg.heads, d=cfg.head_dim, seed=scale * 10 + layer)
            kind = p.kind(layer, scale)
            seen.add(kind)
            out = plan.attend(q, k, v, layer=layer, scale=scale)
            if kind == "dense":
                assert out is None
                continue
            assert out.shape == q.shape and torch.isfinite(out).all()
            if kind in ("csla", "cs4a"):  # genuinely sparse: differs from dense attention
                assert not torch.allclose(out, reference_attention(q, k, v), atol=1e-3)
            else:
                torch.testing.assert_close(out, reference_attention(q, k, v))
    assert seen == set(KINDS)
    for scale in p.sparse_scales:
        assert plan.csla_layouts[scale].density < 0.9
        if scale > p.decision_scale:
            assert plan.cs4a_geometries[scale].key_count < 0.35 * s.kv_len(scale)


def test_plan_cs4a_uses_selection_bands_and_cache():
    s = get_schedule(256)
    p = default_policy("infinity-tiny", s)
    results = {}
    for use_cache in (True, False):
        plan = SparVARPlan(dataclasses.replace(p, cs4a_use_cache=use_cache), s, p.num_layers)
        q4, k4, v4 = qkv_for(s, 4, seed=1)
        plan.attend(q4, k4, v4, layer=0, scale=4)
        q5, k5, v5 = qkv_for(s, 5, seed=2)
        results[use_cache] = plan.attend(q5, k5, v5, layer=0, scale=5)
    # the same result from the pure functions, called by hand
    _, selected, o_cache = get_sparse_ops("reference").cs4a_decide(q4, k4, v4, 16, p.topk(s))
    key_idx = p.cs4a_geometry(s, 5).key_indices(selected)
    up = upsample_cache(o_cache, s.grids[4], s.grids[5])
    torch.testing.assert_close(results[True], cs4a_attention_ref(q5, k5, v5, key_idx, 16, up))
    torch.testing.assert_close(results[False], cs4a_attention_ref(q5, k5, v5, key_idx, 16))
    assert not torch.allclose(results[True], results[False], atol=1e-4)


def test_plan_state_and_errors():
    s = get_schedule(256)
    p = default_policy("infinity-tiny", s)
    plan = SparVARPlan(p, s, p.num_layers)
    q5, k5, v5 = qkv_for(s, 5)
    with pytest.raises(RuntimeError, match="decision scale"):
        plan.attend(q5, k5, v5, layer=0, scale=5)
    plan.attend(*qkv_for(s, 4), layer=0, scale=4)
    assert plan.attend(q5, k5, v5, layer=0, scale=5) is not None
    with pytest.raises(RuntimeError, match="batch size"):
        plan.attend(*qkv_for(s, 5, b=4), layer=0, scale=5)
    plan.reset()
    with pytest.raises(RuntimeError, match="decision scale"):
        plan.attend(q5, k5, v5, layer=0, scale=5)
    with pytest.raises(ValueError, match="scale 6 expects"):
        plan.attend(q5, k5, v5, layer=3, scale=6)
    for lanes in (-1, 1.5, True):
        with pytest.raises(ValueError, match="residual_lanes"):
            SparVARPlan(p, s, p.num_layers, residual_lanes=lanes)


def test_a_plan_for_a_loop_that_skips_every_later_scale_makes_no_decision():
    """SparVAR + skip 2: no scale after the decision scale runs, so nothing reads a decision. The decision scale's
    CS4A layers run plain dense attention (what the decision outputs anyway); its CSLA layers stay sparse; skipping
    fewer scales keeps the decision; running a scale the plan was made to skip is an error naming it."""
    s = get_schedule(256)  # tiny: 7 scales, decision scale 4, CS4A layers 0-1, CSLA layers 2-3
    p = default_policy("infinity-tiny", s)
    deciding, skipping = SparVARPlan(p, s, p.num_layers), SparVARPlan(p, s, p.num_layers, skip_last=2)
    assert deciding.decides and not skipping.decides and SparVARPlan(p, s, p.num_layers, skip_last=1).decides
    q, k, v = qkv_for(s, 4, h=2, d=32)
    assert skipping.attend(q, k, v, layer=0, scale=4) is None  # dense: self_attention's dense path runs it
    torch.testing.assert_close(deciding.attend(q, k, v, layer=0, scale=4), reference_attention(q, k, v))
    assert skipping.attend(q, k, v, layer=3, scale=4) is not None  # CSLA is unchanged
    torch.testing.assert_close(skipping.attend(q, k, v, layer=3, scale=4), deciding.attend(q, k, v, layer=3, scale=4),
                               atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="skips the last 2 scales"):
        skipping.state(0)
    with pytest.raises(RuntimeError, match="made to skip"):
        skipping.attend(*qkv_for(s, 5, h=2, d=32), layer=0, scale=5)
    assert "CS4A: dense (the last 2 scales are skipped" in skipping.describe()
    assert "CS4A decide" in deciding.describe() and "CS4A decide" not in skipping.describe()
    for bad in (-1, 7, 2.0):
        with pytest.raises(ValueError, match="skip_last"):
            SparVARPlan(p, s, p.num_layers, skip_last=bad)


def test_self_attention_dispatch():
    s = get_schedule(256)
    p = default_policy("infinity-tiny", s)
    plan = SparVARPlan(p, s, p.num_layers)
    q, k, v = qkv_for(s, 6)
    dense = self_attention(q, k, v, layer=3, scale=6, plan=None, backend="reference")
    torch.testing.assert_close(dense, reference_attention(q, k, v))
    sparse = self_attention(q, k, v, layer=3, scale=6, plan=plan, backend="reference")
    torch.testing.assert_close(sparse, csla_attention_ref(q, k, v, p.csla_layout(s, 6)))
    q3, k3, v3 = qkv_for(s, 3)
    torch.testing.assert_close(self_attention(q3, k3, v3, layer=3, scale=3, plan=plan, backend="reference"),
                               reference_attention(q3, k3, v3))


def test_plan_describe_mentions_counts():
    s = get_schedule(1024)
    text = SparVARPlan(default_policy("infinity-2b", s, csla_block=(128, 128)), s, 32).describe()
    assert "2128 of 10521 keys" in text and "density=16.38%" in text


def test_saved_plan_round_trips_token_layouts_and_sinks(tmp_path):
    """SparVARPlan.save / load_plan keep every field: token-granular CSLA layouts (masks, partial tiles) and CS4A
    geometries with sinks (HART's policy); a file that is not a plan is refused."""
    import dataclasses

    from sparvar.sparse import load_plan
    from sparvar.schedule import get_schedule

    schedule = get_schedule(1024, model="hart-0.7b")
    policy = dataclasses.replace(default_policy("hart-0.7b", schedule), csla_granularity="token")
    plan = SparVARPlan(policy, schedule, policy.num_layers)
    path = str(tmp_path / "plan.safetensors")
    plan.save(path)
    back = load_plan(path, policy, schedule, policy.num_layers)
    for s, layout in plan.csla_layouts.items():
        got = back.csla_layouts[s]
        assert got.granularity == "token" and got.token_density == layout.token_density
        for name in ("kv_num_blocks", "kv_indices", "token_mask", "partial_index", "partial_masks"):
            assert torch.equal(getattr(got, name), getattr(layout, name)), (s, name)
    for s, geometry in plan.cs4a_geometries.items():
        got = back.cs4a_geometries[s]
        assert got.sink_len == geometry.sink_len > 0 and got.band_lengths == geometry.band_lengths
        assert torch.equal(got.sink_keys, geometry.sink_keys) and torch.equal(got.band_keys, geometry.band_keys)
        assert torch.equal(got.selected_group, geometry.selected_group)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a saved SparVAR plan"):
        load_plan(str(tmp_path / "other.safetensors"), policy, schedule, policy.num_layers)


def test_a_saved_plan_is_refused_for_another_policy(tmp_path):
    """An engine built before a policy preset changed must not run its old layouts: other window sides make other
    blocks of the same sizes (which every shape check passed), another top-k ratio or sink count other geometries."""
    from sparvar.sparse import load_plan

    schedule = get_schedule(256)
    policy = default_policy("infinity-tiny", schedule)
    path = str(tmp_path / "plan.safetensors")
    SparVARPlan(policy, schedule, policy.num_layers).save(path)
    load_plan(path, policy, schedule, policy.num_layers)
    wider = dataclasses.replace(policy, csla_window_sides=tuple(w + 2 if w > 0 else w for w in policy.csla_window_sides))
    assert all((a.q_len, a.kv_len) == (b.q_len, b.kv_len) for a, b in
               zip(SparVARPlan(wider, schedule, 4).csla_layouts.values(), SparVARPlan(policy, schedule, 4).csla_layouts.values()))
    for other, field in ((wider, "csla_window_sides"), (dataclasses.replace(policy, cs4a_topk_ratio=0.3), "cs4a_topk_ratio"),
                         (dataclasses.replace(policy, cs4a_sinks=1), "cs4a_sinks")):
        with pytest.raises(ValueError, match=f"made for another SparVAR policy \\({field}: stored"):
            load_plan(path, other, schedule, policy.num_layers)


@pytest.mark.parametrize("tile", [None, (4, 4)])
def test_a_saved_plan_with_indices_out_of_range_is_refused(tmp_path, tile):
    """The kernels read a layout's indices unchecked (a block past the KV cache is attention over other memory): a
    plan file's, an engine's input, are checked once at load, raster blocks and query tiles alike."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sparvar.sparse import load_plan

    schedule = get_schedule(256)
    policy = default_policy("infinity-tiny", schedule, csla_query_tile=tile)
    path = str(tmp_path / "plan.safetensors")
    SparVARPlan(policy, schedule, policy.num_layers).save(path)
    load_plan(path, policy, schedule, policy.num_layers)
    with safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    last = max(policy.sparse_scales)
    name = f"csla.{last}.{'kv_keys' if tile else 'kv_indices'}"
    tensors[name][0, 0] = 10**6
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match=rf"the CSLA layout of scale {last} is corrupt \(kv_"):
        load_plan(path, policy, schedule, policy.num_layers)


def test_full_policy_equals_dense_through_the_whole_model():
    """Where the policy drops nothing (windows over every scale, top-k of every key, bands over their whole scale,
    so the residual cache is zero), SparVAR through every Infinity layer and scale gives the dense logits."""
    from sparvar.generate import TorchRunner
    from sparvar.model import build_model
    from sparvar.text import hashed_embeddings

    cfg = get_config("infinity-tiny")
    s = get_schedule(256)
    model = build_model(cfg, seed=0)
    features, lengths = hashed_embeddings(["a red car", "a cat"], cfg.text_dim, cfg.text_maxlen)
    g = torch.Generator().manual_seed(0)
    codes = [None] + [torch.randn(2, h * w, cfg.bits, generator=g).sign() for h, w in s.grids[1:]]

    def logits(plan):
        runner = TorchRunner(model, s, plan)
        runner.begin(features, lengths, guided=True)
        return [runner.step(scale, codes[scale]) for scale in range(s.num_scales)]

    full = dataclasses.replace(default_policy("infinity-tiny", s), csla_window_sides=(99,) * 8, cs4a_topk_ratio=1.0,
                               cs4a_multiple=1, cs4a_band_sides=(99, 99))
    dense, sparse = logits(None), logits(SparVARPlan(full, s, cfg.depth))
    assert {full.kind(layer, s.num_scales - 1) for layer in range(cfg.depth)} == {"cs4a", "csla"}
    for a, b in zip(dense, sparse):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    default = logits(SparVARPlan(default_policy("infinity-tiny", s), s, cfg.depth))
    assert not torch.allclose(default[-1], dense[-1], atol=1e-3)  # the default policy does drop keys
