"""Launch each SparVAR-only kernel of an Infinity 1024^2 generation at its real shape, for Nsight Compute to profile
(this script measures nothing itself):

    ncu --profile-from-start off -k regex:_column_sums --section SpeedOfLight ... python tools/ncu_sparse_kernels.py 2b

The kernels: the decision's column sums and top-k (scale 10), CS4A from a selection and CSLA at scale 12. Each runs
twice first, unprofiled: with autotuning on (the engines' default) the first launches are the tuner's trials of its
configs. Then the profiler range opens and each runs once with the config the tuner kept.
(bench/results/ncu_sparse_kernels_2b_h100.json was taken before this warm-up existed: see its note.)
"""
from __future__ import annotations

import sys

import torch


def main(size: str = "2b") -> None:
    from sparvar.config import get_config
    from sparvar.kernels import cs4a as cs4a_kernels
    from sparvar.kernels import csla_attention, cs4a_attention_from_selection
    from sparvar.schedule import get_schedule
    from sparvar.sparse import default_policy

    model = f"infinity-{size}"
    cfg = get_config(model)
    heads, D, B = cfg.heads, cfg.head_dim, 2  # batch 2: one image with CFG
    schedule = get_schedule(1024)
    policy = default_policy(model, schedule)
    s10, s12 = policy.decision_scale, schedule.num_scales - 1

    def token_major_q(n):
        return (torch.randn(B, n, heads, D, device="cuda", dtype=torch.bfloat16) * D**-0.5 * 4).transpose(1, 2)

    def cache_view(kv):
        return torch.randn(B, heads, kv + 512, D, device="cuda", dtype=torch.bfloat16)[:, :, :kv]

    n10, kv10 = schedule.lengths[s10], schedule.kv_len(s10)
    q10, k10, v10 = token_major_q(n10), cache_view(kv10), cache_view(kv10)
    _, lse = cs4a_kernels.decision_dense_pass(q10, k10, v10)
    n12, kv12 = schedule.lengths[s12], schedule.kv_len(s12)
    q12, k12, v12 = token_major_q(n12), cache_view(kv12), cache_view(kv12)
    geometry = policy.cs4a_geometry(schedule, s12).to("cuda")
    selected = torch.rand(B, heads, geometry.num_decision_groups, kv10, device="cuda").topk(
        geometry.topk, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    cache = 0.1 * torch.randn(B, heads, n10, D, device="cuda", dtype=torch.bfloat16)
    layout = policy.csla_layout(schedule, s12).to("cuda")

    def each_kernel_once():
        sums = cs4a_kernels.cs4a_column_sums(q10, k10, lse, policy.cs4a_group_size)
        cs4a_kernels.select_topk(sums, policy.topk(schedule))
        cs4a_attention_from_selection(q12, k12, v12, selected, geometry, cache, schedule.grids[s10], schedule.grids[s12])
        csla_attention(q12, k12, v12, layout)

    for _ in range(2):  # the autotuner's trials happen here, outside the profiled range
        each_kernel_once()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    each_kernel_once()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main(*sys.argv[1:])
