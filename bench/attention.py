"""Attention kernels at the last scales of 1024^2 on one GPU, side by side in one process.

Rows per model shape (B=2 for CFG, bf16; 2B: 16 heads of 128, 8B: 28 of 128; HART-0.7b: 24 of 64, its scales shifted
by one — decision 10, CS4A at 11-13, CSLA at 13 over a 9,750-key cache that starts with 354 sink keys).
Infinity:
  scale 12 (4,096 queries x 10,521 keys): SDPA cuDNN, SDPA FlashAttention-2, our dense Triton kernel,
    compiled FlexAttention with the CSLA block mask (block-granular: all active blocks full) and our CSLA kernel
    with the same layout, at 128x128, 128x64 and 64x64 blocks, our token-exact CSLA (full tiles unmasked, partial
    tiles through their masks) at 128x64 and 64x64, our CS4A (2,128 keys per group);
  scale 11 (2,304 x 6,425): SDPA cuDNN, SDPA FA2, our CS4A (1,344 keys per group);
  scale 10 (1,600 x 4,121): SDPA cuDNN, SDPA FA2, our dense Triton kernel, our CS4A decision (dense + column sums
    + top-k + residual; target: <= 1.7x our dense kernel).
Timing: CUDA events around each call, median of `--runs` after `--warmup` calls; before each timed call a
512 MB buffer is overwritten, which evicts L2 (K/V are not L2-resident in the model either) and keeps the GPU
busy while the host enqueues the call, so host-side launch cost stays out of the numbers as long as it is
shorter than that write. Every row is also timed as a CUDA-graph replay (graph_* fields; no host cost at all,
as the runtime's CUDA-graph engine runs it), and the CS4A decision gets a per-kernel profile. Effective
TFLOP/s: dense FLOPs 4*B*H*Lq*Lk*D over the time, and the FLOPs of the tiles/keys actually computed.
Each of our kernels is also checked against the fp32 reference on two heads. Flex's kernel tiles must divide
its sparse block, so its 64x64 row runs with kernel_options BLOCK_M=BLOCK_N=64.

    PYTHONPATH=. python bench/attention.py            # writes bench/results/attention_<h100|h200|...>.json
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import device_tag, save_figure, summarize, write_result  # noqa: E402

# (heads, head dim) of each model's self-attention; HART's KV starts with its 300-slot text prefix (sinks)
MODELS = {"infinity-2b": (16, 128), "infinity-8b": (28, 128), "hart-0.7b": (24, 64)}
FLUSH_BYTES = 512 * 2**20


def time_ms(fn, runs: int, warmup: int, flush: torch.Tensor) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return summarize([start.elapsed_time(end) for start, end in events])


def graph_time_ms(fn, runs: int, flush: torch.Tensor) -> dict:
    """The same call captured in a CUDA graph and replayed: device time without any host launch cost
    (how the runtime runs it: the engine replays CUDA graphs)."""
    from sparvar.cuda_engine import capture_scales

    graph = capture_scales(lambda _: fn(), 1, None)[0][0]  # after a warm-up on a side stream, as the engine captures
    timing = time_ms(graph.replay, runs, 3, flush)
    del graph
    return {f"graph_{key}": value for key, value in timing.items()}


def profile_ms(fn, calls: int = 20) -> dict:
    """Per-call device time of each kernel (torch.profiler) and the host wall time per call (synchronized once)."""
    import time

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    host_ms = (time.perf_counter() - start) * 1000 / calls
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = []
    for event in prof.key_averages():
        if not str(event.device_type).endswith("CUDA"):  # host ops also carry their kernels' time: count kernels once
            continue
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0)
        if device_us > 0:
            kernels.append((event.key[:120], device_us / calls / 1000))
    kernels.sort(key=lambda kv: -kv[1])
    return dict(host_ms_per_call=host_ms, device_ms_per_call=sum(ms for _, ms in kernels),
                kernels_ms_per_call=dict(kernels[:12]))


def csla_computed_pairs(layout) -> int:
    """(query, key) pairs in the active tiles, partial last blocks counted at their real size."""
    blocks = layout.block_mask().cpu()
    rows = torch.full((layout.num_q_blocks,), layout.block_m)
    rows[-1] = layout.q_len - (layout.num_q_blocks - 1) * layout.block_m
    cols = torch.full((layout.num_kv_blocks,), layout.block_n)
    cols[-1] = layout.kv_len - (layout.num_kv_blocks - 1) * layout.block_n
    return int((blocks.long() * rows[:, None] * cols[None, :]).sum())


def flex_block_mask(layout, device):
    """The layout as a FlexAttention BlockMask whose active blocks are all 'full' (no mask_mod is evaluated)."""
    from torch.nn.attention.flex_attention import BlockMask

    blocks = layout.block_mask().to(device)
    counts = blocks.sum(dim=1).to(torch.int32)
    # Flex wants index rows as wide as the number of key blocks: active blocks first, ascending
    indices = torch.argsort(blocks.to(torch.int32), dim=1, descending=True, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(torch.zeros_like(counts)[None, None], indices[None, None].clone(),
                                    full_kv_num_blocks=counts[None, None], full_kv_indices=indices[None, None],
                                    BLOCK_SIZE=(layout.block_m, layout.block_n),
                                    seq_lengths=(layout.q_len, layout.kv_len))


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max())


def save_kernel_rows(out: str, partial: str, header: dict, result: dict, label: str) -> str:
    """Write a kernel benchmark's result (header + rows) to `out`, drop its partial file and print each row's graph
    time and rate; `label` is the row field that tells rows of one scale apart (e.g. the block or tile shape)."""
    path = write_result(out, dict(**header, **result))
    if os.path.exists(partial):
        os.remove(partial)
    print(f"wrote {path}")
    for r in result["rows"]:
        if "graph_median_ms" in r:
            print(f"{r['model']:12s} s{r['scale']} {r.get(label, '-'):12s} {r['name']:28s} graph "
                  f"{r['graph_median_ms']:.4f} ms {r.get('tflops_computed', 0):6.0f} TFLOP/s")
    return path


class Bench:
    def __init__(self, runs: int, warmup: int, partial_path: str | None = None):
        self.runs, self.warmup, self.partial_path = runs, warmup, partial_path
        self.flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
        self.rows: list[dict] = []

    def add(self, model, name, scale, fn, *, flops_dense=None, flops_computed=None, check=None, profile=False,
            **extra) -> dict | None:
        row = dict(model=model, name=name, scale=scale, **extra)
        try:
            fn()  # first call compiles / autotunes
            torch.cuda.synchronize()
            if check is not None:
                row.update(check())
            row.update(time_ms(fn, self.runs, self.warmup, self.flush))
            try:
                row.update(graph_time_ms(fn, self.runs, self.flush))
            except Exception as e:  # e.g. a backend that cannot be captured; the eager timing stands
                row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
            ms = row["median_ms"]
            if flops_dense is not None:
                row["tflops_dense"] = flops_dense / ms / 1e9
            if flops_computed is not None:
                row["tflops_computed"] = flops_computed / ms / 1e9
            if profile:
                try:
                    row["profile"] = profile_ms(fn)
                except Exception as e:  # the profile is an extra; keep the row's timings
                    row["profile_error"] = f"{type(e).__name__}: {e}"[:300]
        except Exception as e:  # a failing row is reported, the others still run
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        self.rows.append(row)
        if self.partial_path:  # rows so far survive a run that is cut off
            write_result(self.partial_path, dict(partial=True, rows=self.rows))
        shown = (f"{row['median_ms']:.4f} ms (graph {row.get('graph_median_ms', float('nan')):.4f})" if "median_ms" in row
                 else row["error"][:120])
        print(f"{model:12s} s{scale:<3d} {name:34s} {shown}", flush=True)
        return row


def run(models: list[str], runs: int, warmup: int, dtype: torch.dtype, partial_path: str | None = None) -> dict:
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    from sparvar import kernels
    from sparvar.attention import dense_attention, reference_attention
    from sparvar.cs4a import upsample_cache, with_sinks
    from sparvar.csla import csla_layout
    from sparvar.kernels import csla as csla_mod
    from sparvar.kernels import cs4a as cs4a_mod
    from sparvar.schedule import get_schedule
    from sparvar.sparse import default_policy

    # one compiled Flex graph per (shape, block size): raise the recompile limit so none falls back to eager
    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    flex = torch.compile(flex_attention, dynamic=False)

    bench = Bench(runs, warmup, partial_path)
    device = torch.device("cuda")
    batch = 2
    summary = {}
    for model in models:
        heads, head_dim = MODELS[model]
        schedule = get_schedule(1024, model=model)
        policy = default_policy(model, schedule)
        sink_len = policy.sink_len(schedule)
        torch.manual_seed(0)

        def qkv(scale):
            q_len, kv_len = schedule.lengths[scale], schedule.kv_len(scale)
            q = torch.randn(batch, heads, q_len, head_dim, device=device, dtype=dtype) * head_dim**-0.5
            k = torch.randn(batch, heads, kv_len, head_dim, device=device, dtype=dtype)
            v = torch.randn(batch, heads, kv_len, head_dim, device=device, dtype=dtype)
            return q, k, v

        def dense_flops(scale):
            return 4 * batch * heads * schedule.lengths[scale] * schedule.kv_len(scale) * head_dim

        def dense_rows(scale, q, k, v):
            shape = dict(q_len=q.shape[2], kv_len=k.shape[2], heads=heads, batch=batch)
            for backend, label in (("cudnn", "SDPA cuDNN"), ("flash", "SDPA FlashAttention-2")):
                bench.add(model, label, scale, lambda: dense_attention(q, k, v, backend), flops_dense=dense_flops(scale),
                          **shape)

        # --- scale 10: CS4A decision
        s10 = policy.decision_scale
        q, k, v = qkv(s10)
        dense_rows(s10, q, k, v)
        bench.add(model, "dense Triton (ours)", s10, lambda q=q, k=k, v=v: kernels.dense_attention(q, k, v),
                  flops_dense=dense_flops(s10), q_len=q.shape[2], kv_len=k.shape[2])
        topk = policy.topk(schedule)
        gs = policy.cs4a_group_size

        def check_decide(q=q, k=k, v=v):
            out, sel, cache = kernels.cs4a_decide(q[:1, :2], k[:1, :2], v[:1, :2], gs, topk, sink_len)
            ref_out = reference_attention(q[:1, :2], k[:1, :2], v[:1, :2])
            key_set = with_sinks(sel, sink_len)
            ref_cache = ref_out.float() - kernels.reference_cs4a_attention(q[:1, :2], k[:1, :2], v[:1, :2], key_set, gs).float()
            return dict(max_abs_err=max_abs_err(out, ref_out), max_abs_err_cache=max_abs_err(cache, ref_cache))

        groups = -(-q.shape[2] // gs)
        decide_flops = (dense_flops(s10) * 3 // 2  # dense pass + column-sum pass (QK^T only)
                        + 4 * batch * heads * q.shape[2] * topk * head_dim)  # residual over the selection
        bench.add(model, "CS4A decide (ours)", s10, lambda: kernels.cs4a_decide(q, k, v, gs, topk, sink_len),
                  flops_dense=dense_flops(s10), flops_computed=decide_flops, check=check_decide, profile=True,
                  q_len=q.shape[2], kv_len=k.shape[2], topk=topk, groups=groups)
        _, selected, o_cache10 = kernels.cs4a_decide(q, k, v, gs, topk, sink_len)
        summary.setdefault(model, {})["decide_tuned"] = {k_: cs4a_mod.tuned_config(k_) for k_ in ("cs4a", "column_sums")}
        summary[model]["decide_tuned"]["dense"] = csla_mod.tuned_config("dense")
        del q, k, v

        # --- the later scales: CS4A (and CSLA at the last)
        for scale in range(s10 + 1, schedule.num_scales):
            q, k, v = qkv(scale)
            dense_rows(scale, q, k, v)
            geometry = policy.cs4a_geometry(schedule, scale).to(device)
            key_idx = geometry.key_indices(selected)
            o_cache = upsample_cache(o_cache10, schedule.grids[s10], schedule.grids[scale])
            num_keys = key_idx.shape[-1]

            def check_cs4a(q=q, k=k, v=v, key_idx=key_idx, o_cache=o_cache):
                out = kernels.cs4a_attention(q[:1, :2], k[:1, :2], v[:1, :2], key_idx[:1, :2], gs, o_cache[:1, :2])
                ref = kernels.reference_cs4a_attention(q[:1, :2], k[:1, :2], v[:1, :2], key_idx[:1, :2], gs, o_cache[:1, :2])
                return dict(max_abs_err=max_abs_err(out, ref))

            bench.add(model, "CS4A (ours, + O_cache fused)", scale,
                      lambda q=q, k=k, v=v, key_idx=key_idx, o_cache=o_cache: kernels.cs4a_attention(q, k, v, key_idx, gs, o_cache),
                      flops_dense=dense_flops(scale), flops_computed=4 * batch * heads * q.shape[2] * num_keys * head_dim,
                      check=check_cs4a, q_len=q.shape[2], kv_len=k.shape[2], keys_per_group=num_keys,
                      key_density=num_keys / k.shape[2])
            bench.add(model, "O_cache bilinear upsample", scale,
                      lambda: upsample_cache(o_cache10, schedule.grids[s10], schedule.grids[scale]), flops_dense=None)
            summary[model][f"cs4a_tuned_s{scale}"] = cs4a_mod.tuned_config("cs4a")
            if scale != schedule.num_scales - 1:
                del q, k, v
                continue

            bench.add(model, "dense Triton (ours)", scale, lambda q=q, k=k, v=v: kernels.dense_attention(q, k, v),
                      flops_dense=dense_flops(scale), q_len=q.shape[2], kv_len=k.shape[2])
            summary[model]["dense_tuned"] = csla_mod.tuned_config("dense")
            for block in ((128, 128), (128, 64), (64, 64)):
                layout = csla_layout(schedule, scale, policy.csla_sinks, policy.csla_window_sides, *block).to(device)
                pairs = csla_computed_pairs(layout)
                info = dict(block=f"{block[0]}x{block[1]}", block_density=layout.density,
                            token_density=layout.token_density, q_len=q.shape[2], kv_len=k.shape[2])
                flops_computed = 4 * batch * heads * pairs * head_dim
                ours = lambda layout=layout: kernels.csla_attention(q, k, v, layout)  # noqa: E731

                def check_csla(layout=layout):
                    out = kernels.csla_attention(q, k, v, layout)[:1, :2]
                    ref = reference_attention(q[:1, :2], k[:1, :2], v[:1, :2], mask=layout.to_dense())
                    return dict(max_abs_err=max_abs_err(out, ref))

                block_mask = flex_block_mask(layout, device)
                # Flex's kernel tiles must divide the sparse block: 64x64 blocks need 64x64 tiles (default 128x64)
                options = {"BLOCK_M": 64, "BLOCK_N": 64} if block == (64, 64) else None
                flex_call = lambda block_mask=block_mask, options=options: flex(  # noqa: E731
                    q, k, v, block_mask=block_mask, scale=1.0, kernel_options=options)

                def check_flex(flex_call=flex_call, ours=ours):
                    return dict(max_abs_diff_vs_ours=max_abs_err(flex_call(), ours()))

                bench.add(model, "FlexAttention compiled (same blocks)", scale, flex_call, flops_dense=dense_flops(scale),
                          flops_computed=flops_computed, check=check_flex, **info)
                bench.add(model, "CSLA (ours)", scale, ours, flops_dense=dense_flops(scale), flops_computed=flops_computed,
                          check=check_csla, **info)
                summary[model][f"csla_tuned_{block[0]}x{block[1]}"] = csla_mod.tuned_config("csla")
                if block == (128, 128):
                    continue
                token = csla_layout(schedule, scale, policy.csla_sinks, policy.csla_window_sides, *block,
                                    "token").to(device)
                token_info = dict(info, partial_tiles=token.partial_masks.shape[0],
                                  full_tiles=int(token.kv_num_blocks.sum()) - token.partial_masks.shape[0])

                def check_token(token=token):
                    out = kernels.csla_attention(q, k, v, token)[:1, :2]
                    ref = reference_attention(q[:1, :2], k[:1, :2], v[:1, :2], mask=token.to_dense())
                    return dict(max_abs_err=max_abs_err(out, ref))

                bench.add(model, "CSLA token-exact (ours)", scale, lambda token=token: kernels.csla_attention(q, k, v, token),
                          flops_dense=dense_flops(scale), flops_computed=flops_computed, check=check_token, **token_info)
                summary[model][f"csla_token_tuned_{block[0]}x{block[1]}"] = csla_mod.tuned_config("csla")
            del q, k, v
        torch.cuda.empty_cache()
    return dict(rows=bench.rows, tuned_configs=summary)


def compiled_kernel_stats() -> list[dict]:
    """Registers, spills and shared memory of every compiled variant of our kernels (for tuning notes)."""
    from sparvar.kernels import csla as csla_mod
    from sparvar.kernels import cs4a as cs4a_mod

    out = []
    for name, fn in (("csla/dense", csla_mod._csla_fwd_kernel), ("cs4a", cs4a_mod._cs4a_fwd_kernel),
                     ("column_sums", cs4a_mod._column_sums_kernel), ("select_topk", cs4a_mod._select_topk_kernel)):
        try:
            for cache in fn.device_caches.values():
                for key, kernel in cache[0].items():
                    md = kernel.metadata
                    out.append(dict(kernel=name, n_regs=kernel.n_regs, n_spills=kernel.n_spills, shared=md.shared,
                                    num_warps=md.num_warps, num_stages=md.num_stages, key=str(key)[-400:]))
        except Exception as e:  # Triton internals differ between versions; the numbers are a nicety
            out.append(dict(kernel=name, error=repr(e)))
    return out


def ratios(rows: list[dict], key: str = "median_ms") -> dict:
    """Speed-ups of our kernels over the baselines measured in the same run, per model, on timing `key`."""
    def ms(model, name, scale, block=None):
        for r in rows:
            if r["model"] == model and r["name"] == name and r["scale"] == scale and r.get("block") == block and key in r:
                return r[key]
        return None

    out = {}
    for model in sorted({r["model"] for r in rows}):
        m = {}
        last = max(r["scale"] for r in rows if r["model"] == model)  # 12 for Infinity at 1024^2, 13 for HART
        decision = min(r["scale"] for r in rows if r["model"] == model)
        cudnn12, fa2_12 = ms(model, "SDPA cuDNN", last), ms(model, "SDPA FlashAttention-2", last)
        for block in ("128x128", "128x64", "64x64"):
            ours = ms(model, "CSLA (ours)", last, block)
            if ours is None:
                continue
            m[f"csla_{block}_vs_cudnn"] = cudnn12 / ours if cudnn12 else None
            m[f"csla_{block}_vs_fa2"] = fa2_12 / ours if fa2_12 else None
            flex = ms(model, "FlexAttention compiled (same blocks)", last, block)
            if flex:
                m[f"csla_{block}_vs_flex_same_blocks"] = flex / ours
            token = ms(model, "CSLA token-exact (ours)", last, block)
            if token:
                m[f"csla_token_{block}_vs_cudnn"] = cudnn12 / token if cudnn12 else None
                m[f"csla_token_{block}_vs_block_granular"] = ours / token
        for scale in range(decision + 1, last + 1):
            ours, cudnn = ms(model, "CS4A (ours, + O_cache fused)", scale), ms(model, "SDPA cuDNN", scale)
            if ours and cudnn:
                m[f"cs4a_s{scale}_vs_cudnn"] = cudnn / ours
        m["last_scale"] = last
        ours, cudnn = ms(model, "CS4A decide (ours)", decision), ms(model, "SDPA cuDNN", decision)
        if ours and cudnn:
            m[f"decide_s{decision}_vs_cudnn"] = cudnn / ours
        dense = ms(model, "dense Triton (ours)", decision)
        if ours and dense:
            m["decide_time_over_dense_triton"] = ours / dense  # target <= 1.7
        out[model] = m
    return out


def targets(rat: dict, rows: list[dict]) -> dict:
    """The brief's targets, checked on the best CSLA block shape of each model."""
    out = {}
    for model, m in rat.items():
        best = max((b for b in ("128x128", "128x64", "64x64") if m.get(f"csla_{b}_vs_cudnn")),
                   key=lambda b: m[f"csla_{b}_vs_cudnn"], default=None)
        if best is None:
            continue
        flex_best = max((m.get(f"csla_{b}_vs_flex_same_blocks") or 0) for b in ("128x128", "128x64", "64x64"))
        errs = [r["max_abs_err"] for r in rows if r["model"] == model and "max_abs_err" in r]
        out[model] = {
            "best_csla_block": best,
            "csla_ge_7x_fa2": m[f"csla_{best}_vs_fa2"] >= 7.0,
            "csla_ge_4.5x_cudnn": m[f"csla_{best}_vs_cudnn"] >= 4.5,
            "csla_faster_than_flex_128x128": (m.get("csla_128x128_vs_flex_same_blocks") or 0) > 1.0,
            "csla_faster_than_flex_128x64": (m.get("csla_128x64_vs_flex_same_blocks") or 0) > 1.0,
            "csla_best_vs_best_flex": flex_best,
            "cs4a_last_scale_ge_3x_cudnn": (m.get(f"cs4a_s{m['last_scale']}_vs_cudnn") or 0) >= 3.0,
            "decide_le_1.7x_dense_triton": (m.get("decide_time_over_dense_triton") or 99) <= 1.7,
            "max_abs_err_le_2e-2": bool(errs) and max(errs) <= 2e-2,
        }
    return out


def chart(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(8 * len(models), 7), squeeze=False)
    for ax, model in zip(axes[0], models):
        sel = [r for r in rows if r["model"] == model and "median_ms" in r and r["name"] != "O_cache bilinear upsample"]
        labels = [f"s{r['scale']} {r['name']}" + (f" {r['block']}" if r.get("block") else "") for r in sel]
        values = [r["median_ms"] for r in sel]
        colors = ["tab:green" if "ours" in r["name"] else "tab:gray" for r in sel]
        ax.barh(range(len(sel)), values, color=colors)
        ax.set_yticks(range(len(sel)), labels, fontsize=8)
        ax.invert_yaxis()
        for i, val in enumerate(values):
            ax.text(val, i, f" {val:.3f}", va="center", fontsize=7)
        ax.set_xlabel("ms (median, lower is better)")
        ax.set_title(f"{model}: B=2, H={MODELS[model][0]}, D={MODELS[model][1]}, bf16")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--out", default=None, help="default: bench/results/attention_<device>.json (h100, h200, ...)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/attention.py needs a CUDA GPU")
    if args.out is None:
        args.out = os.path.join(ROOT, "bench", "results", f"attention_{device_tag()}.json")
    partial = os.path.splitext(args.out)[0] + "_partial.json"
    result = run(args.models, args.runs, args.warmup, getattr(torch, args.dtype), partial)
    rat = ratios(result["rows"])
    rat_graph = ratios(result["rows"], "graph_median_ms")
    result = dict(protocol=dict(runs=args.runs, warmup=args.warmup, dtype=args.dtype, batch=2,
                                heads_head_dim={m: MODELS[m] for m in args.models},
                                timing="CUDA events per call, median; 512 MB L2-evicting write before each call",
                                dense_flops="4*B*H*Lq*Lk*D", softmax_scale=1.0),
                  **result, ratios=rat, ratios_cuda_graph=rat_graph, targets=targets(rat, result["rows"]),
                  targets_cuda_graph=targets(rat_graph, result["rows"]), compiled_kernels=compiled_kernel_stats())
    path = write_result(args.out, result)
    chart(result["rows"], os.path.splitext(path)[0] + ".png")
    if os.path.exists(partial):
        os.remove(partial)
    print(f"wrote {path}")
    for label, table in (("eager", rat), ("cuda graph", rat_graph)):
        for model, m in table.items():
            print(label, model, {k: round(v, 2) for k, v in m.items() if v is not None})
    print("targets (eager):", result["targets"])
    print("targets (cuda graph):", result["targets_cuda_graph"])


if __name__ == "__main__":
    main()
