"""Where the small scales' time goes, per kernel call inside a CUDA graph (the engine's setting).

Scales 0-8 of Infinity at 1024^2 run 2-1,152 rows through every linear and attend over at most 1,241 keys: each
kernel is short, so its fixed cost decides. This measures, per scale, each candidate for the two kinds of call:
- self-attention (q: the scale's tokens, k/v: the KV cache so far) and cross-attention (k/v: 64 text slots with
  the additive padding bias), through each SDPA kernel and our Triton dense kernel;
- the block's four linear shapes through cuBLAS (F.linear, bias);
- (section "decide") the CS4A decision at scale 10 and each of its passes, with the alternatives of each;
- (section "later") CS4A at scales 11 and 12, composed from its parts and in one launch.
Each candidate is captured as a graph of `calls` back-to-back calls on distinct tensors (distinct weights: a real
step streams every layer's weights from HBM) and timed by replay; the result is microseconds per call.

    python bench/small_scales.py --out bench/results/small_scales_h200.json
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from bench.common import result_path, write_result

SIDES = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)  # Infinity's 1024^2 schedule
TEXT_SLOTS = 64  # a text bucket of cuda_engine.text_bucket (a 33-64 token prompt)
MODELS = {"infinity-2b": dict(width=2048, heads=16, mlp=8192, depth=32),
          "infinity-8b": dict(width=3584, heads=28, mlp=14336, depth=40)}


def graph_us(make_call, calls: int, replays: int = 20) -> float:
    """Median microseconds per call of `calls` back-to-back calls captured as one CUDA graph."""
    from sparvar.cuda_engine import capture_scales

    fns = [make_call(i) for i in range(calls)]
    graph = capture_scales(lambda _: [f() for f in fns], 1, None)[0][0]
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]

    def run(q, k, v, bias=None):
        with sdpa_kernel([kind]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    return run


def triton_dense(q, k, v, bias=None):
    from sparvar.kernels.csla import dense_attention

    assert bias is None
    return dense_attention(q, k, v, block_m=64, block_n=64)


def triton_dense_lens(lens):
    """The engine's cross-attention kernel call (sparvar.attention.engine_cross_attention): each row's real text."""
    def run(q, k, v, bias=None):
        from sparvar.kernels.csla import dense_attention

        return dense_attention(q, k, v, scale=q.shape[-1] ** -0.5, block_m=64, block_n=64, kv_lens=lens)
    return run


def attention_rows(model: str, scales, calls: int) -> list[dict]:
    m = MODELS[model]
    H, D, B = m["heads"], m["width"] // m["heads"], 2
    rows = []
    for s in scales:
        n = SIDES[s] ** 2
        kv = sum(x * x for x in SIDES[: s + 1])
        for kind, lk in (("self", kv), ("cross", TEXT_SLOTS)):
            sets = [[torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for L in (n, lk, lk)]
                    for _ in range(4)]
            bias = torch.zeros(B, 1, 1, lk, device="cuda", dtype=torch.bfloat16)
            bias[1, ..., 1:] = float("-inf")  # the unconditional row: one real token
            lens = torch.tensor([lk, 1], device="cuda", dtype=torch.int32)  # the same mask as the bias
            row = {"model": model, "scale": s, "kind": kind, "q_len": n, "kv_len": lk, "heads": H, "batch": B}
            candidates = [("cudnn", sdpa("cudnn")), ("flash", sdpa("flash")), ("efficient", sdpa("efficient")),
                          ("triton_dense", triton_dense)]
            if kind == "cross":
                candidates.append(("triton_dense_lens", triton_dense_lens(lens)))
            for name, fn in candidates:
                use_bias = kind == "cross" and name in ("cudnn", "efficient")
                try:
                    row[f"{name}_us"] = graph_us(lambda i: (lambda t=sets[i % 4]: fn(*t, bias if use_bias else None)),
                                                 calls)
                    if kind == "cross" and name in ("flash", "triton_dense"):
                        row[f"{name}_note"] = "no bias (the padding mask): time only"
                except Exception as e:  # a backend that declines the shape
                    row[f"{name}_us"] = None
                    row[f"{name}_error"] = str(e).splitlines()[0][:160]
            rows.append(row)
            print(model, s, kind, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items() if k.endswith("_us")})
    return rows


def linear_rows(model: str, scales, calls: int) -> list[dict]:
    m = MODELS[model]
    C, F_ = m["width"], m["mlp"]
    shapes = {"qkv": (C, 3 * C), "proj": (C, C), "fc1": (C, F_), "fc2": (F_, C)}
    rows = []
    for name, (K, N) in shapes.items():
        weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(calls)]
        biases = [torch.randn(N, device="cuda", dtype=torch.bfloat16) for _ in range(calls)]
        for s in scales:
            M = 2 * SIDES[s] ** 2
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            row = {"model": model, "linear": name, "scale": s, "rows": M, "K": K, "N": N,
                   "weight_mb": N * K * 2 / 1e6}
            row["cublas_us"] = graph_us(lambda i: (lambda: F.linear(x, weights[i], biases[i])), calls)
            row["cublas_tb_per_s"] = row["weight_mb"] / row["cublas_us"]  # MB/us = TB/s
            rows.append(row)
            print(model, name, "M", M, "cublas %.2f us" % row["cublas_us"])
    return rows


def upsample_rows(model: str, calls: int) -> list[dict]:
    """CS4A's residual-cache upsample (decision scale 10 -> scales 11, 12): one call per CS4A layer, through torch
    (sparvar.cs4a.upsample_cache) and the Triton kernel (sparvar.kernels.upsample_cache), side by side."""
    from sparvar.cs4a import upsample_cache
    from sparvar.kernels import upsample_cache as upsample_cache_triton

    m = MODELS[model]
    H, D = m["heads"], m["width"] // m["heads"]
    src = torch.randn(2, H, SIDES[10] ** 2, D, device="cuda", dtype=torch.bfloat16)
    rows = []
    for s in (11, 12):
        grids = (SIDES[10],) * 2, (SIDES[s],) * 2
        row = {"model": model, "scale": s, "output_mb": 2 * H * SIDES[s] ** 2 * D * 2 / 1e6,
               "torch_us": graph_us(lambda i: (lambda: upsample_cache(src, *grids)), calls),
               "triton_us": graph_us(lambda i: (lambda: upsample_cache_triton(src, *grids)), calls)}
        rows.append(row)
        print(model, "upsample to scale", s, "torch %.1f us, triton %.1f us" % (row["torch_us"], row["triton_us"]))
    return rows


def decide_rows(model: str, calls: int) -> list[dict]:
    """The CS4A decision at 1024^2 scale 10 (one call per CS4A layer), and each of its passes, side by side: the
    dense pass through cuDNN (with its softmax statistics) and through our kernel, the column sums, select_topk per
    launch (radix bits, chunk width, warps), the whole decision with either dense pass, and plain cuDNN attention
    (what the dense engine runs there)."""
    from sparvar.kernels import cs4a as cs4a_kernels
    from sparvar.schedule import get_schedule
    from sparvar.sparse import default_policy

    m = MODELS[model]
    H, D, B = m["heads"], m["width"] // m["heads"], 2
    schedule = get_schedule(1024)
    policy = default_policy(model, schedule)
    s = policy.decision_scale
    n, kv, gs, topk = schedule.lengths[s], schedule.kv_len(s), policy.cs4a_group_size, policy.topk(schedule)
    # the engine's layouts: q a token-major projection, k/v views of a longer cache
    sets = [((torch.randn(B, n, H, D, device="cuda", dtype=torch.bfloat16) * D**-0.5 * 4).transpose(1, 2),
             *(torch.randn(B, H, kv + 512, D, device="cuda", dtype=torch.bfloat16)[:, :, :kv] for _ in range(2)))
            for _ in range(4)]
    lses = [cs4a_kernels.decision_dense_pass(*t)[1] for t in sets]
    sums = [cs4a_kernels.cs4a_column_sums(t[0], t[1], lse, gs) for t, lse in zip(sets, lses)]
    row = {"model": model, "scale": s, "q_len": n, "kv_len": kv, "heads": H, "batch": B, "group_size": gs, "topk": topk,
           "topk_rows": sums[0].numel() // kv, "calls_per_graph": calls}
    cudnn = sdpa("cudnn")
    row["sdpa_cudnn_us"] = graph_us(lambda i: (lambda t=sets[i % 4]: cudnn(*t)), calls)
    for dense_pass in cs4a_kernels.DECISION_DENSE_PASSES:
        row[f"dense_pass_{dense_pass}_us"] = graph_us(
            lambda i: (lambda t=sets[i % 4]: cs4a_kernels.decision_dense_pass(*t, dense_pass=dense_pass)), calls)
    row["column_sums_us"] = graph_us(
        lambda i: (lambda t=sets[i % 4], lse=lses[i % 4]: cs4a_kernels.cs4a_column_sums(t[0], t[1], lse, gs)), calls)
    row["column_sums_us_per_launch"] = {}  # (query tile, key tile, warps, stages)
    for launch in [(64, 128, 4, 3), (64, 128, 4, 2), (64, 128, 4, 4), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4),
                   (32, 128, 4, 2), (32, 128, 4, 3), (64, 128, 8, 2), (64, 128, 8, 3), (64, 256, 8, 2), (64, 256, 8, 3)]:
        row["column_sums_us_per_launch"][str(launch)] = graph_us(lambda i: (lambda t=sets[i % 4], lse=lses[i % 4]: (
            cs4a_kernels.cs4a_column_sums(t[0], t[1], lse, gs, launch=launch))), calls)
        assert torch.allclose(cs4a_kernels.cs4a_column_sums(sets[0][0], sets[0][1], lses[0], gs, launch=launch), sums[0],
                              rtol=1e-4, atol=1e-6), launch
    row["column_sums_default"] = str(cs4a_kernels.COLUMN_SUMS_LAUNCH)
    # the top-k of every CS4A layer in one launch (calls x the rows of one layer), against one launch per layer
    stacked = torch.stack([sums[i % 4] for i in range(calls)])
    row["select_topk_batched_us_per_layer"] = graph_us(
        lambda i: (lambda x=stacked: cs4a_kernels.select_topk(x, topk)), 1) / calls
    assert torch.equal(cs4a_kernels.select_topk(stacked, topk)[1], cs4a_kernels.select_topk(sums[1], topk))
    row["select_topk_us"] = {}
    for launch in [(1, 1024, 4), (2, 512, 4), (4, 256, 4), (4, 512, 4), (4, 512, 8), (4, 1024, 8)]:
        row["select_topk_us"][str(launch)] = graph_us(
            lambda i: (lambda x=sums[i % 4]: cs4a_kernels.select_topk(x, topk, launch=launch)), calls)
    row["select_topk_default"] = str(cs4a_kernels.TOPK_LAUNCH)
    for dense_pass in cs4a_kernels.DECISION_DENSE_PASSES:
        row[f"decide_{dense_pass}_us"] = graph_us(
            lambda i: (lambda t=sets[i % 4]: cs4a_kernels.cs4a_decide_raw(*t, gs, topk, dense_pass=dense_pass)), calls)
    print(model, "decision", {k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()
                              if "_us" in k})
    return [row]


def later_rows(model: str, calls: int) -> list[dict]:
    """CS4A at the later scales 11 and 12 (one call per CS4A layer), side by side: composed from its parts as before
    (the key sets, the upsampled residual cache, then the gather kernel: three launches more) and in one launch
    (sparvar.kernels.cs4a_attention_from_selection)."""
    from sparvar.cs4a import cs4a_from_selection_ref
    from sparvar.kernels import cs4a_attention, cs4a_attention_from_selection, upsample_cache
    from sparvar.schedule import get_schedule
    from sparvar.sparse import default_policy

    m = MODELS[model]
    H, D, B = m["heads"], m["width"] // m["heads"], 2
    schedule = get_schedule(1024)
    policy = default_policy(model, schedule)
    s10 = policy.decision_scale
    rows = []
    for s in policy.sparse_scales[1:]:
        geometry = policy.cs4a_geometry(schedule, s).to("cuda")
        n, kv, dec = schedule.lengths[s], schedule.kv_len(s), schedule.kv_len(s10)
        grids = schedule.grids[s10], schedule.grids[s]
        sets = []
        for _ in range(4):  # the engine's layouts: q a token-major projection, k/v views of a longer cache
            q = (torch.randn(B, n, H, D, device="cuda", dtype=torch.bfloat16) * D**-0.5 * 4).transpose(1, 2)
            k, v = (torch.randn(B, H, kv + 512, D, device="cuda", dtype=torch.bfloat16)[:, :, :kv] for _ in range(2))
            selected = torch.rand(B, H, geometry.num_decision_groups, dec, device="cuda").topk(
                geometry.topk, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
            cache = 0.1 * torch.randn(B, H, schedule.lengths[s10], D, device="cuda", dtype=torch.bfloat16)
            sets.append((q, k, v, selected, geometry, cache, *grids))
        row = {"model": model, "scale": s, "q_len": n, "kv_len": kv, "keys_per_group": geometry.key_count,
               "heads": H, "batch": B, "calls_per_graph": calls,
               "composed_us": graph_us(lambda i: (lambda t=sets[i % 4]: cs4a_from_selection_ref(
                   cs4a_attention, upsample_cache, *t)), calls),
               "one_launch_us": graph_us(lambda i: (lambda t=sets[i % 4]: cs4a_attention_from_selection(*t)), calls)}
        row["speedup"] = row["composed_us"] / row["one_launch_us"]
        rows.append(row)
        print(model, "CS4A scale", s, "composed %.1f us, one launch %.1f us" % (row["composed_us"], row["one_launch_us"]))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append")
    ap.add_argument("--scales", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--linear-scales", default="0,2,4,5,6,8")
    ap.add_argument("--calls", type=int, default=32)
    ap.add_argument("--sections", default="attention,upsample,linears,decide,later")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sections = args.sections.split(",")
    if not torch.cuda.is_available():
        raise SystemExit("bench/small_scales.py needs a CUDA GPU")
    models = args.model or ["infinity-2b", "infinity-8b"]
    scales = [int(s) for s in args.scales.split(",")]
    linear_scales = [int(s) for s in args.linear_scales.split(",")]
    result = {"benchmark": "small-scale kernel calls inside a CUDA graph (microseconds per call)",
              "protocol": f"graph of back-to-back calls on distinct tensors ({args.calls}; the CS4A decision and later "
                          "scales: 11, one per CS4A layer; each row's calls_per_graph where it has one), median of 20 "
                          "replays / calls",
              "attention": [], "linears": [], "cs4a_cache_upsample": [], "cs4a_decision": [], "cs4a_later": []}
    for model in models:
        if "attention" in sections:
            result["attention"] += attention_rows(model, scales, args.calls)
        if "upsample" in sections:
            result["cs4a_cache_upsample"] += upsample_rows(model, args.calls)
        if "decide" in sections:
            result["cs4a_decision"] += decide_rows(model, 11)  # one call per CS4A layer (2B and 8B: 11)
        if "later" in sections:
            result["cs4a_later"] += later_rows(model, 11)
        if "linears" in sections:
            result["linears"] += linear_rows(model, linear_scales, args.calls)
    print("wrote", write_result(args.out or result_path("small_scales"), result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
