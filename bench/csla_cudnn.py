"""CSLA through cuDNN's paged-cache SDPA, side by side with our Triton CSLA kernel and cuDNN's dense SDPA.

The paged call, its geometry and why it may pay: sparvar/kernels/cudnn_csla.py. Rows per (model, sparse scale,
CSLA block): the engine's dense cuDNN call (the rate to reach), the autotuned Triton kernel and the cuDNN paged
call on the same layout, each checked against the fp32 masked reference on two heads of both CFG rows before it
is timed. The page tables are checked on the CPU by tests/test_cudnn_csla.py.

    PYTHONPATH=. python bench/csla_cudnn.py            # bench/results/csla_cudnn_<device>.json
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


def layouts(model: str, blocks, scales=None, resolution: int = 1024):
    from sparvar.schedule import get_schedule
    from sparvar.sparse import default_policy

    schedule = get_schedule(resolution, model=model)
    for block in blocks:
        policy = default_policy(model, schedule, csla_block=block)
        for scale in policy.sparse_scales:
            if scales is None or scale in scales:
                yield scale, policy.csla_layout(schedule, scale)


def run(models, blocks, runs: int, warmup: int, partial_path: str | None, scales=None) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sparvar.attention import reference_attention
    from sparvar.kernels import csla as C
    from sparvar.kernels.cudnn_csla import csla_attention_cudnn
    from sparvar.model import KVCache

    bench, batch, dtype = Bench(runs, warmup, partial_path), 2, torch.bfloat16
    dense_done = set()
    for model in models:
        heads, head_dim = MODELS[model]
        for scale, layout in layouts(model, blocks, scales):
            layout = layout.to("cuda")
            q_len, kv_len = layout.q_len, layout.kv_len
            torch.manual_seed(0)
            cache = KVCache(1, batch, heads, kv_len + 128, head_dim, dtype, "cuda")  # as the engine's: room past kv_len
            k_cache, v_cache = cache.k[0].normal_(), cache.v[0].normal_()
            q = (torch.randn(batch, q_len, heads, head_dim, device="cuda", dtype=dtype) * head_dim**-0.5).transpose(1, 2)
            k, v = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
            info = dict(block=f"{layout.block_m}x{layout.block_n}", block_density=layout.density, q_len=q_len,
                        kv_len=kv_len, heads=heads, head_dim=head_dim, batch=batch)
            flops_dense = 4 * batch * heads * q_len * kv_len * head_dim
            flops_computed = 4 * batch * heads * csla_computed_pairs(layout) * head_dim
            ref = reference_attention(q[:, :2], k[:, :2], v[:, :2], mask=layout.to_dense())  # both CFG rows

            def check(fn):
                def checked():
                    err = max_abs_err(fn()[:, :2], ref)
                    if not err <= TOLERANCE:
                        raise AssertionError(f"max abs error {err} against the fp32 reference > {TOLERANCE}")
                    return dict(max_abs_err=err)
                return checked

            if (model, scale) not in dense_done:  # the dense engine's call at this scale, for the rate
                dense_done.add((model, scale))

                def dense():
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        return F.scaled_dot_product_attention(q, k, v, scale=1.0)
                bench.add(model, "dense SDPA cuDNN", scale, dense, flops_dense=flops_dense, flops_computed=flops_dense,
                          q_len=q_len, kv_len=kv_len, heads=heads, head_dim=head_dim, batch=batch)
            C._csla_fwd_tuned.cache.clear()
            triton_fn = lambda: C.csla_attention(q, k, v, layout)  # noqa: E731
            bench.add(model, "CSLA Triton (autotuned)", scale, triton_fn, flops_dense=flops_dense,
                      flops_computed=flops_computed, check=check(triton_fn), **info)
            paged = lambda: csla_attention_cudnn(q, k, v, layout)  # noqa: E731  (a failure is a row with its reason)
            bench.add(model, "CSLA cuDNN paged", scale, paged, flops_dense=flops_dense, flops_computed=flops_computed,
                      check=check(paged), **info)
            del cache, k_cache, v_cache
            torch.cuda.empty_cache()
    return dict(rows=bench.rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["infinity-8b", "infinity-2b"], choices=list(MODELS))
    parser.add_argument("--blocks", nargs="+", default=["64x64", "128x64", "128x128"])
    parser.add_argument("--scales", nargs="+", type=int, default=None, help="default: every sparse scale")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import cudnn

    blocks = [tuple(int(x) for x in b.split("x")) for b in args.blocks]
    out = args.out or os.path.join(ROOT, "bench", "results", f"csla_cudnn_{device_tag()}.json")
    partial = os.path.splitext(out)[0] + "_partial.json"
    result = run(args.models, blocks, args.runs, args.warmup, partial, args.scales)
    save_kernel_rows(out, partial, dict(
        benchmark="CSLA: Triton kernel vs cuDNN paged-cache SDPA vs dense cuDNN SDPA",
        cudnn_frontend=getattr(cudnn, "__version__", "?"), cudnn_backend=cudnn.backend_version(),
        protocol=dict(runs=args.runs, warmup=args.warmup, dtype="bfloat16", batch=2,
                      timing="as bench/attention.py (L2 flushed; eager and CUDA-graph medians)")), result, "block")

if __name__ == "__main__":
    main()
