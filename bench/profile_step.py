"""Where the GPU time of one generation goes, per scale: attention kernels, GEMMs (linears), everything else,
and the kernels that cost most in each group of scales.

Kernel times come from torch.profiler (CUPTI), so they are device time only (no launch gaps); each scale step and
the VAE decode is profiled in its own session (sampling between steps is not counted). The engine's own
configuration is profiled (`--runner engine`: the CUDA-graph runner's step functions, run without graph capture
so that each kernel is seen) or the plain eager model (`--runner eager`). One generation per attention mode after
a warm-up; random weights, 1024², CFG, bf16.

    PYTHONPATH=. python bench/profile_step.py --model infinity-2b   # writes bench/results/profile_<device>.json

`--timeline` instead traces one whole generation as the engine runs it (graphs, sampling, decode) and reports how
long the GPU sat idle, in launch gaps between kernels and in larger gaps (waiting for the host): the per-scale wall
times of bench/e2e.py exceed these kernel times by 0.2-0.5 ms per scale, and this says where that goes. It also
sums each kernel's time in that generation (kernel_totals): at 8B the last scales' wall times exceeded the profiled
kernel times by 4-15 ms, more than launch gaps explain, so the kernels themselves may run slower back to back.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import result_path, write_result  # noqa: E402

ATTENTION_MARKERS = ("flash", "fmha", "cudnn", "attention", "attn", "csla", "cs4a", "softmax", "absorbed")
GEMM_MARKERS = ("gemm", "xmma", "cutlass", "sm90", "matmul", "cublas", "nvjet")
# scale groups whose kernels are listed: small scales are launch/bandwidth bound, the last three compute bound
GROUPS = {"scales 0-5": range(0, 6), "scales 6-9": range(6, 10), "scale 10": [10], "scale 11": [11], "scale 12": [12]}
TOP = 14


CONVOLUTION_MARKERS = ("implicit_gemm", "conv")  # cuDNN's convolutions (the decode); its SDPA kernels say "fprop" too


def category(kernel_name: str) -> str:
    name = kernel_name.lower()
    if any(m in name for m in CONVOLUTION_MARKERS):  # before the attention markers: their names hold "cudnn" too
        return "gemm"
    if any(m in name for m in ATTENTION_MARKERS):
        return "attention"
    if any(m in name for m in GEMM_MARKERS):
        return "gemm"
    return "other"


def kernel_times(prof) -> tuple[collections.Counter, collections.Counter]:
    """Device time (ms) and launch count per kernel name of one profiler session; kernels launched outside any
    torch op (Triton's own launcher) included."""
    ms, count = collections.Counter(), collections.Counter()
    for row in prof.key_averages():
        if row.device_type == torch.autograd.DeviceType.CUDA:
            ms[row.key] += row.self_device_time_total / 1000.0
            count[row.key] += row.count
    return ms, count


def profile(model_name: str, attention: str, runner_kind: str) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from sparvar.config import get_config
    from sparvar.cuda_engine import CudaGraphRunner
    from sparvar.generate import Sampling, TorchRunner, generate
    from sparvar.model import build_model
    from sparvar.pipeline import build_decoder, make_plan
    from sparvar.schedule import get_schedule
    from sparvar.text import hashed_embeddings

    cfg, schedule = get_config(model_name), get_schedule(1024)
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16)
    decoder = build_decoder(cfg, None, "cuda", torch.bfloat16)
    plan = make_plan(cfg, schedule, attention, backend="triton")
    if runner_kind == "engine":
        runner = CudaGraphRunner(model, schedule, plan, use_graphs=False)
    else:
        runner = TorchRunner(model, schedule, plan, backend="cudnn")
    step, decode = runner.step, decoder.decode
    regions: dict[str, tuple] = {}
    recording = [False]

    def profiled(name, fn, *args):
        """Each region in its own profiler session, the GPU drained before and after: every kernel in the session
        belongs to the region, whichever way it was launched."""
        if not recording[0]:
            return fn(*args)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = fn(*args)
            torch.cuda.synchronize()
        regions[name] = kernel_times(prof)
        return out

    runner.step = lambda scale, codes: profiled(f"scale_{scale:02d}", step, scale, codes)
    decoder.decode = lambda latent: profiled("vae_decode", decode, latent)
    f, l = hashed_embeddings(["a red fox in the snow"], cfg.text_dim, cfg.text_maxlen)
    for _ in range(2):  # warm-up (Triton autotuning, cuDNN plans, torch.compile)
        generate(runner, decoder, schedule, f, l, Sampling(), seed=0)
    recording[0] = True
    generate(runner, decoder, schedule, f, l, Sampling(), seed=0)

    def split(counter):
        out = {"attention": 0.0, "gemm": 0.0, "other": 0.0}
        for name, ms in counter.items():
            out[category(name)] += ms
        return out

    per_scale = {s: split(regions[f"scale_{s:02d}"][0]) for s in range(schedule.num_scales)}
    groups = {}
    for name, keys in [*((g, [f"scale_{s:02d}" for s in scales]) for g, scales in GROUPS.items()),
                       ("vae decode", ["vae_decode"])]:
        ms = sum((regions[k][0] for k in keys), collections.Counter())
        n = sum((regions[k][1] for k in keys), collections.Counter())
        groups[name] = {"kernel_ms": sum(ms.values()), "launches": sum(n.values()), "by_category": split(ms),
                        "top": [{"kernel": k[:120], "ms": round(v, 3), "launches": n[k], "category": category(k)}
                                for k, v in ms.most_common(TOP)]}
    total = sum((r[0] for r in regions.values()), collections.Counter())
    del runner, model, decoder
    torch.cuda.empty_cache()
    return {"attention": attention, "runner": runner_kind, "per_scale_ms": per_scale,
            "total_kernel_ms": split(total), "groups": groups}


MIN_TRACED_KERNELS = 2000  # fewer in a whole generation's trace: the graphs' kernels are missing from it
GAP_SMALL_US = 20.0  # gaps below this are launch gaps between dependent kernels; above, the GPU waited for the host


def idle_gaps(kernels: list[tuple[float, float, str]], top: int = TOP) -> dict:
    """What a GPU timeline of (start_us, end_us, name) kernels says about idle time: the busy time (the union of
    the intervals), the idle time between the first start and the last end, how much of it is small gaps (below
    GAP_SMALL_US: the launch gap between one kernel and the next, inside a graph or a stream) and the largest
    gaps, each with the kernels on both sides (the one that ended last before it, the one that starts it)."""
    if not kernels:
        raise ValueError("idle_gaps: no kernels in the timeline")
    ordered = sorted(kernels)
    busy = idle = small = 0.0
    small_count, large = 0, []
    start, end, last_name = ordered[0]
    for k_start, k_end, name in ordered[1:]:
        if k_start > end:  # a gap: close the busy run
            gap = k_start - end
            idle += gap
            if gap < GAP_SMALL_US:
                small += gap
                small_count += 1
            else:
                large.append({"gap_us": round(gap, 2), "after": last_name[:100], "before": name[:100]})
            busy += end - start
            start, end, last_name = k_start, k_end, name
        elif k_end > end:
            end, last_name = k_end, name
    busy += end - start
    large.sort(key=lambda g: -g["gap_us"])
    return {"span_ms": (end - ordered[0][0]) / 1000,  # `end`: the last busy run's end, the timeline's
            "busy_ms": busy / 1000, "idle_ms": idle / 1000, "small_gaps": small_count, "small_gaps_ms": small / 1000,
            "large_gaps": len(large), "large_gaps_ms": sum(g["gap_us"] for g in large) / 1000,
            "largest_gaps": large[:top], "kernels": len(ordered)}


def kernel_totals(kernels: list[tuple[float, float, str]], top: int = TOP) -> dict:
    """Device time per category and the kernels that cost most, from a timeline's (start_us, end_us, name)
    intervals (copies and memsets among them count as "other"): the kernels as a graphed generation runs them back
    to back, to set beside `profile`'s, which runs each scale alone with the GPU drained around it (a cooler GPU
    than the end-to-end rows' sustained load)."""
    ms, count = collections.Counter(), collections.Counter()
    for start, end, name in kernels:
        ms[name] += (end - start) / 1000
        count[name] += 1
    by_category = {"attention": 0.0, "gemm": 0.0, "other": 0.0}
    for name, t in ms.items():
        by_category[category(name)] += t
    return {"by_category_ms": by_category,
            "top": [{"kernel": k[:120], "ms": round(v, 3), "launches": count[k], "category": category(k)}
                    for k, v in ms.most_common(top)]}


def timeline(model_name: str, attention: str) -> dict:
    """One generation exactly as the engine rows of bench/e2e.py run it (CUDA graphs, the graphed decode, the
    eager sampling between scales), traced by the profiler, and its GPU idle time (idle_gaps)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile as torch_profile
    from torch.profiler._utils import _init_for_cuda_graphs

    from bench.e2e import DENSE_ENGINE_ROW, SPARVAR_ENGINE_ROW, family_parts
    from sparvar.pipeline import make_plan

    base, _, f, l, sampling, make_runner, make_pipeline = family_parts(model_name, 1024, torch.device("cuda"))
    plan = make_plan(base.cfg, base.schedule, attention, backend="triton")
    pipe = make_pipeline(make_runner("graphs", plan, "engine", False, 0, True), 0)  # the rows' runner kind and SDPA backend
    # CUPTI traces the kernels inside a graph replay only if it was initialised before the graph was instantiated
    # (torch's own helper for this, an empty profiler session): without it a trace can hold the eager kernels alone
    _init_for_cuda_graphs()
    for _ in range(3):  # capture, autotuning, cuDNN plans
        pipe.generate(f, l, sampling=sampling, seed=0)
    torch.cuda.synchronize()
    # CUDA activity only: recording the host's ops too would slow the host and could create the waits measured here
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        pipe.generate(f, l, sampling=sampling, seed=0)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:  # the Chrome trace: a stable format with every kernel's interval
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    kernels = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("name", "?")) for e in events
               if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if len(kernels) < MIN_TRACED_KERNELS:  # a graphed 1024² generation launches thousands (~8,000 at 2B)
        raise RuntimeError(f"the trace holds {len(kernels)} kernels: the graph replays' kernels were not traced, so its "
                           "idle time would describe the eager kernels alone")
    del pipe, plan, base, make_runner, make_pipeline
    torch.cuda.empty_cache()
    row = DENSE_ENGINE_ROW if attention == "dense" else SPARVAR_ENGINE_ROW
    return {"attention": attention, "row": row, **idle_gaps(kernels), **kernel_totals(kernels)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="infinity-2b")
    ap.add_argument("--runner", choices=("engine", "eager"), default="engine")
    ap.add_argument("--timeline", action="store_true",
                    help="trace one whole graphed generation instead and report the GPU's idle time and largest gaps")
    ap.add_argument("--out", default=None, help="default: bench/results/profile_<device>.json")
    args = ap.parse_args()
    if args.timeline:
        runs = [timeline(args.model, a) for a in ("dense", "sparvar")]
        for r in runs:
            print(f"{args.model} {r['attention']:8s} span {r['span_ms']:.1f} ms: busy {r['busy_ms']:.1f}, idle "
                  f"{r['idle_ms']:.1f} ({r['small_gaps']} gaps < {GAP_SMALL_US:.0f} us: {r['small_gaps_ms']:.1f} ms; "
                  f"{r['large_gaps']} larger: {r['large_gaps_ms']:.1f} ms) over {r['kernels']} kernels")
            for g in r["largest_gaps"][:6]:
                print(f"     {g['gap_us']:8.1f} us  after {g['after'][:50]}  before {g['before'][:50]}")
            c = r["by_category_ms"]
            print(f"   kernel time: attention {c['attention']:.1f} ms, GEMM {c['gemm']:.1f} ms, other {c['other']:.1f} ms")
            for k in r["top"][:10]:
                print(f"     {k['ms']:8.3f} ms {k['launches']:5d}x  {k['kernel'][:90]}")
        write_result(args.out or result_path("timeline"), {
            "benchmark": "GPU idle time of one graphed generation (torch.profiler trace)", "model": args.model,
            "resolution": 1024, "dtype": "bf16", "small_gap_us": GAP_SMALL_US, "runs": runs})
        return
    runs = [profile(args.model, a, args.runner) for a in ("dense", "sparvar")]
    for r in runs:
        t = r["total_kernel_ms"]
        print(f"{args.model} {r['runner']} {r['attention']:8s} kernel time: attention {t['attention']:.1f} ms, "
              f"GEMM {t['gemm']:.1f} ms, other {t['other']:.1f} ms")
        for s in range(len(r["per_scale_ms"])):
            p = r["per_scale_ms"][s]
            print(f"   scale {s:2d}: attention {p['attention']:6.2f}  gemm {p['gemm']:6.2f}  other {p['other']:6.2f} ms")
        for g, d in r["groups"].items():
            print(f"  {g}: {d['kernel_ms']:.2f} ms in {d['launches']} launches")
            for k in d["top"][:10]:
                print(f"     {k['ms']:8.3f} ms {k['launches']:5d}x  {k['kernel'][:90]}")
    write_result(args.out or result_path("profile"), {
        "benchmark": "GPU kernel time per scale and category (torch.profiler)", "model": args.model,
        "resolution": 1024, "dtype": "bf16", "runs": runs})


if __name__ == "__main__":
    main()
