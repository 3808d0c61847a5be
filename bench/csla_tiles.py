"""CSLA over 2-D query tiles (sparvar.csla.TileLayout) side by side with CSLA over raster blocks, per call.

A raster query block of 64 queries is one row of the 64-wide last scale, so its key blocks span whole rows of every
key scale; a tile of 8x8 query positions attends only the union of its queries' windows (0.38-0.47x the pairs at
1024^2 scales 10-12), with its keys gathered. Rows per (model, sparse scale): the engine's dense cuDNN call (the
rate), the autotuned Triton kernel on the policy's raster blocks, and the tile kernel (autotuned) on each query
tile asked for, each checked against the fp32 masked reference of its own layout on two heads of both CFG rows
before it is timed. K/V are slices of a KVCache as in the engine.

    PYTHONPATH=. python bench/csla_tiles.py            # bench/results/csla_tiles_<device>.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.attention import MODELS, Bench, csla_computed_pairs, max_abs_err, save_kernel_rows  # noqa: E402
from bench.common import device_tag  # noqa: E402

TOLERANCE = 2e-2  # bf16 max abs error against the fp32 reference, as the GPU tests


def computed_pairs(layout) -> int:
    """(query, key) pairs the kernel computes, for its TFLOP/s: for query tiles each tile's real queries times its
    keys (the masked padding of its last key tile and of border tiles not counted), for raster blocks their tiles."""
    if layout.granularity == "tile":
        return layout.pairs
    return csla_computed_pairs(layout)


def run(models, tiles, runs: int, warmup: int, partial_path: str | None, resolution: int = 1024) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sparvar.attention import reference_attention
    from sparvar.kernels import csla as C
    from sparvar.model import KVCache
    from sparvar.schedule import get_schedule
    from sparvar.sparse import default_policy

    bench, batch, dtype = Bench(runs, warmup, partial_path), 2, torch.bfloat16
    for model in models:
        heads, head_dim = MODELS[model]
        schedule = get_schedule(resolution, model=model)
        policies = [default_policy(model, schedule)] + [default_policy(model, schedule, csla_query_tile=t) for t in tiles]
        for scale in policies[0].sparse_scales:
            q_len, kv_len = schedule.lengths[scale], schedule.kv_len(scale)
            torch.manual_seed(0)
            cache = KVCache(1, batch, heads, kv_len + 128, head_dim, dtype, "cuda")  # as the engine's: room past kv_len
            k_cache, v_cache = cache.k[0].normal_(), cache.v[0].normal_()
            q = (torch.randn(batch, q_len, heads, head_dim, device="cuda", dtype=dtype) * head_dim**-0.5).transpose(1, 2)
            k, v = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
            flops_dense = 4 * batch * heads * q_len * kv_len * head_dim
            common = dict(q_len=q_len, kv_len=kv_len, heads=heads, head_dim=head_dim, batch=batch)

            def dense():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, scale=1.0)
            bench.add(model, "dense SDPA cuDNN", scale, dense, flops_dense=flops_dense, flops_computed=flops_dense,
                      **common)
            for policy in policies:
                layout = policy.csla_layout(schedule, scale).to("cuda")
                ref = reference_attention(q[:, :2], k[:, :2], v[:, :2], mask=layout.to_dense())  # both CFG rows

                def checked(fn=lambda layout=layout: C.csla_attention(q, k, v, layout), ref=ref):
                    err = max_abs_err(fn()[:, :2], ref)
                    if not err <= TOLERANCE:
                        raise AssertionError(f"max abs error {err} against the fp32 reference > {TOLERANCE}")
                    return dict(max_abs_err=err)

                if layout.granularity == "tile":
                    name, shape = "CSLA Triton, query tiles", f"{layout.tile[0]}x{layout.tile[1]} tile"
                    C._csla_tiles_fwd_tuned.cache.clear()
                else:
                    name, shape = "CSLA Triton, raster blocks", f"{layout.block_m}x{layout.block_n} block"
                    C._csla_fwd_tuned.cache.clear()
                row = bench.add(model, name, scale, lambda layout=layout: C.csla_attention(q, k, v, layout),
                                flops_dense=flops_dense, flops_computed=4 * batch * heads * computed_pairs(layout) * head_dim,
                                check=checked, shape=shape, density=layout.density, **common)
                if row is not None:
                    row["tuned_config"] = C.tuned_config("csla_tiles" if layout.granularity == "tile" else "csla")
            del cache, k_cache, v_cache
            torch.cuda.empty_cache()
    return dict(rows=bench.rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["infinity-8b", "infinity-2b"], choices=list(MODELS)[:2])
    parser.add_argument("--tiles", nargs="+", default=["8x8", "4x16", "8x16"], help="query tiles, rows x cols")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    tiles = [tuple(int(x) for x in t.split("x")) for t in args.tiles]
    out = args.out or os.path.join(ROOT, "bench", "results", f"csla_tiles_{device_tag()}.json")
    partial = os.path.splitext(out)[0] + "_partial.json"
    result = run(args.models, tiles, args.runs, args.warmup, partial)
    save_kernel_rows(out, partial, dict(
        benchmark="CSLA: 2-D query tiles (gathered keys) vs raster blocks vs dense cuDNN SDPA",
        protocol=dict(runs=args.runs, warmup=args.warmup, dtype="bfloat16", batch=2,
                      timing="as bench/attention.py (L2 flushed; eager and CUDA-graph medians)")), result, "shape")

if __name__ == "__main__":
    main()
