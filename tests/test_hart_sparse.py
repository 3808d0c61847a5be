"""SparVAR on HART's KV layout [text prefix | 2^2 | ... ]: sinks cover the prefix, sparse == dense where nothing is
dropped, and the default policy runs every sparse kind on a real model step (CPU, reference ops)."""
import dataclasses

import torch

from sparvar.config import get_config
from sparvar.csla import csla_token_mask
from sparvar.hart.model import rope_tables
from sparvar.model import build_model
from sparvar.schedule import get_schedule
from sparvar.sparse import SparVARPlan, default_policy

TINY = get_config("hart-tiny")


def run(model, schedule, plan, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = model.encode_text(torch.randn(2, TINY.text_len, TINY.text_dim, generator=g), torch.tensor([5, 16]))
    codes = [None] + [torch.randn(2, n, TINY.latent_dim, generator=g) for n in schedule.lengths[1:]]
    ropes = rope_tables(schedule, TINY.head_dim, text.positions)
    cache = model.new_cache(text.batch, schedule)
    if plan is not None:
        plan.reset()
    out = []
    for scale in range(schedule.num_scales):
        cache.offset = schedule.offsets[scale]
        out.append(model.step(model.scale_input(scale, codes[scale], text), scale, text, cache, ropes[scale], plan))
    return out


def test_hart_policy_sinks_are_the_text_prefix_and_first_scales():
    s = get_schedule(1024, model="hart-0.7b")
    p = default_policy("hart-0.7b", s)
    assert (p.decision_scale, p.sink_len(s)) == (10, 354)  # 300 text slots + 2^2 + 3^2 + 4^2 + 5^2
    mask = csla_token_mask(s, 13, p.csla_sinks, p.csla_window_sides)
    assert mask.shape == (4096, 9750) and mask[:, :354].all()  # the prefix and first scales: sinks for every query
    assert not mask[:, 354:628].any()  # 7^2, 9^2, 12^2: dropped (outside the windows)
    plan = SparVARPlan(p, s, 24)
    assert plan.cs4a_geometries[13].key_count == 354 + plan.topk + sum(plan.cs4a_geometries[13].band_lengths)


def test_hart_full_policy_equals_dense():
    s = get_schedule(256, model="hart-tiny")
    model = build_model(TINY, seed=0)
    dense = run(model, s, None)
    # windows cover every scale, top-k takes every non-sink key, bands cover their whole scale: nothing is dropped
    full = dataclasses.replace(default_policy("hart-tiny", s), csla_window_sides=(99,) * 8, cs4a_topk_ratio=1.0, cs4a_multiple=1,
                               cs4a_band_sides=(99, 99))
    sparse = run(model, s, SparVARPlan(full, s, TINY.depth))
    for a, b in zip(dense, sparse):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_hart_default_policy_runs_and_stays_close():
    s = get_schedule(256, model="hart-tiny")
    model = build_model(TINY, seed=0)
    dense = run(model, s, None)
    sparse = run(model, s, SparVARPlan(default_policy("hart-tiny", s), s, TINY.depth))
    for scale, (a, b) in enumerate(zip(dense, sparse)):
        if scale < 5:
            torch.testing.assert_close(a, b, atol=0, rtol=0)  # dense scales are untouched
        else:
            assert not torch.equal(a, b)  # sparse scales do drop keys
            assert (a - b).abs().max() < 0.5 * a.abs().max()
