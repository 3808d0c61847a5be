"""CSLA through cuDNN's paged-cache SDPA, side by side with our Triton CSLA kernel and cuDNN's dense SDPA.

Why: at 8B our sparse kernels run at 58-65% of cuDNN's dense rate (docs/performance.md), and every Triton and Gluon
variant tried stayed there. cuDNN's fused SDPA takes paged K/V caches (a page table per sequence, for LLM serving),
and a block-granular CSLA layout is exactly that: each query block of block_m queries is one "sequence" whose
pages are its active key blocks of block_n keys (the same key set for every head and both CFG rows). So cuDNN's
Hopper kernel can run CSLA with no copy, if it is fast on pages this size.

Tensor geometry, as the torch-cuda engine holds it: q token-major (a (B, Lq, H, D) tensor seen as (B, H, Lq, D)), so
(batch b, query block i) folds into one cuDNN batch row b * nq + i with a uniform stride; the K/V cache a
(B, H, T, D) tensor with T a multiple of block_n, seen as a container of (B-1) * H * T/bn + T/bn pages of
(H, block_n, D) (page n of head h at n * bn * D + h * T * D: batch row b's page j is n = b * H * T/bn + j).
The output is written token-major, as attention_output_like gives it.

`--cpu-check` runs the page-table construction through a torch emulation of paged attention on the CPU against
the masked fp32 reference (no cuDNN needed), so the index arithmetic is checked before a GPU is.

    PYTHONPATH=. python bench/csla_cudnn.py            # bench/results/csla_cudnn_<device>.json
    PYTHONPATH=. python bench/csla_cudnn.py --cpu-check
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.attention import MODELS, Bench, csla_computed_pairs, max_abs_err  # noqa: E402
from bench.common import device_tag, write_result  # noqa: E402

TOLERANCE = 2e-2  # bf16 max abs error against the fp32 reference, as the GPU tests


def padded_cache_len(kv_len: int, block_n: int) -> int:
    return -(-kv_len // block_n) * block_n


def paged_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int, layout) -> dict:
    """The views and tables of one paged cuDNN call (see the module docstring); pure torch, any device."""
    b, h, q_len, d = q.shape
    bm, bn, nq = layout.block_m, layout.block_n, layout.num_q_blocks
    t = k_cache.shape[2]
    if q_len % bm:
        raise ValueError(f"paged CSLA needs whole query blocks: {q_len} queries, blocks of {bm}")
    if t % bn or t < kv_len or k_cache.shape != v_cache.shape or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError(f"paged CSLA needs contiguous (B, H, T, D) caches with T a multiple of {bn} and >= {kv_len}")
    if not q.transpose(1, 2).is_contiguous():
        raise ValueError("paged CSLA needs q token-major: a contiguous (B, Lq, H, D) tensor seen as (B, H, Lq, D)")
    pages_per_head = t // bn
    rows = b * nq
    q_paged = q.as_strided((rows, h, bm, d), (bm * h * d, d, h * d, 1), q.storage_offset())
    out = torch.empty((b, q_len, h, d), dtype=q.dtype, device=q.device)
    o_paged = out.as_strided((rows, h, bm, d), (bm * h * d, d, h * d, 1))
    num_pages = (b - 1) * h * pages_per_head + pages_per_head
    container_k = k_cache.as_strided((num_pages, h, bn, d), (bn * d, t * d, d, 1), k_cache.storage_offset())
    container_v = v_cache.as_strided((num_pages, h, bn, d), (bn * d, t * d, d, 1), v_cache.storage_offset())
    counts = layout.kv_num_blocks.to(torch.int64).cpu()
    width = int(counts.max())
    indices = layout.kv_indices[:, :width].to(torch.int64).cpu()
    valid = torch.arange(width)[None, :] < counts[:, None]
    indices = torch.where(valid, indices, torch.zeros_like(indices))
    base = (torch.arange(b) * h * pages_per_head)[:, None, None]
    table = (base + indices[None]).reshape(rows, 1, width, 1).to(torch.int32)
    last = indices.gather(1, (counts - 1).clamp(min=0)[:, None])[:, 0]
    overhang = ((last + 1) * bn - kv_len).clamp(min=0)  # the final key block may be partial
    seq_kv = (counts * bn - overhang).repeat(b).reshape(rows, 1, 1, 1).to(torch.int32)
    seq_q = torch.full((rows, 1, 1, 1), bm, dtype=torch.int32)
    dev = q.device
    return dict(q=q_paged, k=container_k, v=container_v, o=o_paged, out=out, table=table.to(dev),
                seq_q=seq_q.to(dev), seq_kv=seq_kv.to(dev), max_seq_kv=width * bn)


def emulate_paged(inputs: dict, scale: float = 1.0) -> torch.Tensor:
    """Paged attention in plain torch (fp32) over `paged_inputs`: what cuDNN is asked to compute. (B, H, Lq, D)."""
    q, k, v, table = inputs["q"], inputs["k"], inputs["v"], inputs["table"]
    rows, h, bm, d = q.shape
    bn = k.shape[2]
    o = torch.empty(rows, h, bm, d)
    for r in range(rows):
        pages = table[r, 0, :, 0].long()
        keys = k[pages].permute(1, 0, 2, 3).reshape(h, -1, d)[:, : int(inputs["seq_kv"][r])].float()
        vals = v[pages].permute(1, 0, 2, 3).reshape(h, -1, d)[:, : int(inputs["seq_kv"][r])].float()
        p = torch.softmax(q[r].float() @ keys.transpose(1, 2) * scale, dim=-1)
        o[r] = p @ vals
    b = inputs["out"].shape[0]
    return o.reshape(b, rows // b, h, bm, d).permute(0, 2, 1, 3, 4).reshape(b, h, -1, d)


class PagedCudnnCSLA:
    """One cuDNN graph for one (shape, layout): built once, executed on the current stream (capturable)."""

    def __init__(self, inputs: dict, scale: float = 1.0):
        import cudnn

        self.cudnn, self.inputs = cudnn, inputs
        self.handle = cudnn.create_handle()
        g = cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=self.handle)
        tq, tk, tv = g.tensor_like(inputs["q"]), g.tensor_like(inputs["k"]), g.tensor_like(inputs["v"])
        tpk, tpv = g.tensor_like(inputs["table"]), g.tensor_like(inputs["table"])
        tsq, tskv = g.tensor_like(inputs["seq_q"]), g.tensor_like(inputs["seq_kv"])
        o, _ = g.sdpa(name="csla", q=tq, k=tk, v=tv, is_inference=True, attn_scale=scale, use_padding_mask=True,
                      seq_len_q=tsq, seq_len_kv=tskv, paged_attention_k_table=tpk, paged_attention_v_table=tpv,
                      paged_attention_max_seq_len_kv=inputs["max_seq_kv"])
        o.set_output(True).set_dim(list(inputs["o"].shape)).set_stride(list(inputs["o"].stride()))
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.graph = g
        self.workspace = torch.empty(max(g.get_workspace_size(), 1), device="cuda", dtype=torch.uint8)
        self.pack = {tq: inputs["q"], tk: inputs["k"], tv: inputs["v"], tpk: inputs["table"], tpv: inputs["table"],
                     tsq: inputs["seq_q"], tskv: inputs["seq_kv"], o: inputs["o"]}

    def __call__(self) -> torch.Tensor:
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        self.graph.execute(self.pack, self.workspace, handle=self.handle)
        return self.inputs["out"].transpose(1, 2)


def layouts(model: str, blocks, scales=None, resolution: int = 1024):
    from sparvar.schedule import get_schedule
    from sparvar.sparse import default_policy

    schedule = get_schedule(resolution, model=model)
    for block in blocks:
        policy = default_policy(model, schedule, csla_block=block)
        for scale in policy.sparse_scales:
            if scales is None or scale in scales:
                yield scale, policy.csla_layout(schedule, scale)


def cpu_check(model: str = "infinity-tiny", resolution: int = 256) -> None:
    """The page tables against the masked reference through emulate_paged, on the tiny model's layouts."""
    from sparvar.attention import reference_attention

    torch.manual_seed(0)
    b, h, d = 2, 3, 16
    worst = 0.0
    for scale, layout in layouts(model, [(16, 16), (16, 32)], resolution=resolution):
        if layout.q_len % layout.block_m:
            continue
        t = padded_cache_len(layout.kv_len, layout.block_n) + layout.block_n  # room after the visible keys, as a cache has
        k_cache, v_cache = torch.randn(b, h, t, d), torch.randn(b, h, t, d)
        q = (torch.randn(b, layout.q_len, h, d) * d**-0.5).transpose(1, 2)
        inputs = paged_inputs(q, k_cache, v_cache, layout.kv_len, layout)
        got = emulate_paged(inputs)
        ref = reference_attention(q, k_cache[:, :, :layout.kv_len], v_cache[:, :, :layout.kv_len],
                                  mask=layout.to_dense())
        err = max_abs_err(got, ref)
        worst = max(worst, err)
        print(f"{model} s{scale} {layout.block_m}x{layout.block_n}: max abs err {err:.2e} over {layout.q_len} x "
              f"{layout.kv_len} (density {layout.density:.3f})")
    if not worst < 1e-4:
        raise SystemExit(f"the emulated paged CSLA is off the reference by {worst}")
    print("paged tables match the reference")


def run(models, blocks, runs: int, warmup: int, partial_path: str | None) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sparvar.attention import reference_attention
    from sparvar.kernels import csla as C

    bench, batch, dtype = Bench(runs, warmup, partial_path), 2, torch.bfloat16
    dense_done = set()
    for model in models:
        heads, head_dim = MODELS[model]
        for scale, layout in layouts(model, blocks):
            layout = layout.to("cuda")
            q_len, kv_len = layout.q_len, layout.kv_len
            torch.manual_seed(0)
            t = padded_cache_len(kv_len, 128) + 128
            k_cache, v_cache = (torch.randn(batch, heads, t, head_dim, device="cuda", dtype=dtype) for _ in range(2))
            q = (torch.randn(batch, q_len, heads, head_dim, device="cuda", dtype=dtype) * head_dim**-0.5).transpose(1, 2)
            k, v = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
            info = dict(block=f"{layout.block_m}x{layout.block_n}", block_density=layout.density, q_len=q_len,
                        kv_len=kv_len, heads=heads, head_dim=head_dim, batch=batch)
            flops_dense = 4 * batch * heads * q_len * kv_len * head_dim
            flops_computed = 4 * batch * heads * csla_computed_pairs(layout) * head_dim
            ref = reference_attention(q[:1, :2], k[:1, :2], v[:1, :2], mask=layout.to_dense())

            def check(fn):
                def checked():
                    err = max_abs_err(fn()[:1, :2], ref)
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
            try:
                paged = PagedCudnnCSLA(paged_inputs(q, k_cache, v_cache, kv_len, layout))
            except Exception as e:  # a layout cuDNN does not take is a row with its reason
                bench.rows.append(dict(model=model, name="CSLA cuDNN paged", scale=scale, **info,
                                       error=f"{type(e).__name__}: {e}"[:400]))
                print(f"{model} s{scale} {info['block']} cuDNN paged: {bench.rows[-1]['error']}")
                continue
            bench.add(model, "CSLA cuDNN paged", scale, paged, flops_dense=flops_dense, flops_computed=flops_computed,
                      check=check(paged), **info)
            del paged, k_cache, v_cache, q
            torch.cuda.empty_cache()
    return dict(rows=bench.rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["infinity-8b", "infinity-2b"], choices=list(MODELS))
    parser.add_argument("--blocks", nargs="+", default=["64x64", "128x64", "128x128"])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--cpu-check", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.cpu_check:
        cpu_check()
        return
    import cudnn

    blocks = [tuple(int(x) for x in b.split("x")) for b in args.blocks]
    out = args.out or os.path.join(ROOT, "bench", "results", f"csla_cudnn_{device_tag()}.json")
    partial = os.path.splitext(out)[0] + "_partial.json"
    result = run(args.models, blocks, args.runs, args.warmup, partial)
    path = write_result(out, dict(benchmark="CSLA: Triton kernel vs cuDNN paged-cache SDPA vs dense cuDNN SDPA",
                                  cudnn_frontend=getattr(cudnn, "__version__", "?"),
                                  cudnn_backend=cudnn.backend_version(),
                                  protocol=dict(runs=args.runs, warmup=args.warmup, dtype="bfloat16", batch=2,
                                                timing="as bench/attention.py (L2 flushed; eager and CUDA-graph medians)"),
                                  **result))
    if os.path.exists(partial):
        os.remove(partial)
    print(f"wrote {path}")
    for r in result["rows"]:
        if "graph_median_ms" in r:
            print(f"{r['model']:12s} s{r['scale']} {r.get('block', '-'):8s} {r['name']:26s} graph {r['graph_median_ms']:.4f} ms "
                  f"{r.get('tflops_computed', 0):6.0f} TFLOP/s")


if __name__ == "__main__":
    main()
