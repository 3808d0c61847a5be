"""Where the GPU time of one generation goes, per scale: attention kernels, GEMMs (linears), everything else.

Kernel times come from torch.profiler (CUPTI), so they are device time only (no launch overhead). One eager
generation per attention mode after a warm-up; 2B or 8B random weights, 1024², CFG, bf16.

    PYTHONPATH=. python bench/profile_step.py --model infinity-2b --out bench/results/profile_h100.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import write_result  # noqa: E402

ATTENTION_MARKERS = ("flash", "fmha", "cudnn", "attention", "attn", "csla", "cs4a", "softmax")
GEMM_MARKERS = ("gemm", "xmma", "cutlass", "sm90", "matmul", "cublas", "nvjet")


def category(kernel_name: str) -> str:
    name = kernel_name.lower()
    if any(m in name for m in ATTENTION_MARKERS):
        return "attention"
    if any(m in name for m in GEMM_MARKERS):
        return "gemm"
    return "other"


def profile(model_name: str, attention: str) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    from sparvar.config import get_config
    from sparvar.generate import Sampling, TorchRunner, generate
    from sparvar.model import build_model
    from sparvar.pipeline import build_decoder, make_plan
    from sparvar.schedule import get_schedule
    from sparvar.text import hashed_embeddings

    cfg, schedule = get_config(model_name), get_schedule(1024)
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16)
    decoder = build_decoder(cfg, None, "cuda", torch.bfloat16)
    runner = TorchRunner(model, schedule, make_plan(cfg, schedule, attention, backend="triton"), backend="cudnn")
    step = runner.step

    def marked_step(scale, codes):
        with record_function(f"scale_{scale:02d}"):
            return step(scale, codes)

    runner.step = marked_step
    f, l = hashed_embeddings(["a red fox in the snow"], cfg.text_dim, cfg.text_maxlen)
    generate(runner, decoder, schedule, f, l, Sampling(), seed=0)  # warm-up (Triton autotuning, cuDNN plans)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        generate(runner, decoder, schedule, f, l, Sampling(), seed=0)
        torch.cuda.synchronize()
    # each scale's kernels: those launched by the CPU ops under its record_function range
    per_scale = {s: {"attention": 0.0, "gemm": 0.0, "other": 0.0} for s in range(schedule.num_scales)}

    def add_kernels(op, into):
        for k in op.kernels:
            into[category(k.name)] += k.duration / 1000.0
        for child in op.cpu_children:
            add_kernels(child, into)

    for e in prof.events():
        if e.name.startswith("scale_"):
            add_kernels(e, per_scale[int(e.name.split("_")[1])])
    outside = {"attention": 0.0, "gemm": 0.0, "other": 0.0}
    all_kernels = {"attention": 0.0, "gemm": 0.0, "other": 0.0}
    for e in prof.events():
        for k in e.kernels:
            all_kernels[category(k.name)] += k.duration / 1000.0
    for key in outside:  # sampling, resampling, text conditioning and the VAE decode
        outside[key] = all_kernels[key] - sum(v[key] for v in per_scale.values())
    total = {k: sum(v[k] for v in per_scale.values()) + outside[k] for k in outside}
    del runner, model, decoder
    torch.cuda.empty_cache()
    return {"attention": attention, "per_scale_ms": per_scale, "outside_steps_ms": outside, "total_kernel_ms": total}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="infinity-2b")
    ap.add_argument("--out", default="bench/results/profile_h100.json")
    args = ap.parse_args()
    runs = [profile(args.model, a) for a in ("dense", "sparvar")]
    for r in runs:
        t = r["total_kernel_ms"]
        print(f"{args.model} {r['attention']:8s} kernel time: attention {t['attention']:.1f} ms, GEMM {t['gemm']:.1f} ms, "
              f"other {t['other']:.1f} ms")
        for s in (9, 10, 11, 12):
            p = r["per_scale_ms"][s]
            print(f"   scale {s}: attention {p['attention']:.2f}  gemm {p['gemm']:.2f}  other {p['other']:.2f} ms")
    write_result(args.out, {"benchmark": "GPU kernel time per scale and category (torch.profiler)", "model": args.model,
                            "resolution": 1024, "dtype": "bf16", "runs": runs})


if __name__ == "__main__":
    main()
