"""The cross-attention of one scale step, absorbed against unabsorbed, side by side on one GPU.

For each model and each scale of the 1024² schedule, batch 1 with CFG (2 rows): every block's cross-attention
(its query projection, our attention kernel over the real text, its output projection) against the same blocks
absorbed (sparvar.model.AbsorbedText: sparvar/kernels/absorbed.py's scores kernel, then cuBLAS P @ values, b_o by
P's bias columns; and with b_o added by torch.baddbmm instead, the form up to 6dcca35), each as
one CUDA graph of `depth` calls with every layer's own weights, as a step runs them. Also the absorption itself,
once per prompt, and how far the absorbed outputs are from the unabsorbed ones. Writes
bench/results/cross_attention_<device>.json.

    python bench/cross_attention.py [--model infinity-2b --model infinity-8b] [--text 15] [--bucket 64]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import cuda_time_ms, environment, result_path, write_result  # noqa: E402


def graph_of(fn):
    """fn captured as a CUDA graph as the engine captures a step (sparvar.cuda_engine.capture_scales: after a warm-up
    on a side stream); returns its replay and its static output."""
    from sparvar.cuda_engine import capture_scales

    graphs, outputs = capture_scales(lambda _: fn(), 1, None)
    return graphs[0].replay, outputs[0]


@torch.no_grad()
def bench_model(name: str, text_len: int, bucket: int, warmup: int, runs: int) -> dict:
    from sparvar.config import get_config
    from sparvar.kernels import absorbed as absorbed_kernels
    from sparvar.kernels.pointwise import triton_block_ops
    from sparvar.model import CrossAttention, absorption_pays
    from sparvar.schedule import get_schedule

    cfg = get_config(name)
    schedule = get_schedule(1024, model=name)
    C, H, D, B = cfg.width, cfg.heads, cfg.head_dim, 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = []
    for _ in range(cfg.depth):
        ca = CrossAttention(C, C, H).to("cuda", torch.bfloat16)
        for p in ca.parameters():
            p.normal_(0, 0.02, generator=gen)
        layers.append(ca)
    # the text's k and v laid out as CrossAttention.text_kv gives them (views of one (B, L, 2C) projection)
    kv = [torch.randn(B, bucket, 2 * C, device="cuda", dtype=torch.bfloat16, generator=gen)
          .view(B, bucket, 2, H, D).permute(2, 0, 3, 1, 4) for _ in layers]
    k, v = [t[0] for t in kv], [t[1] for t in kv]
    key_lens = torch.full((B,), text_len, device="cuda", dtype=torch.int32)
    key_bias = torch.zeros(B, 1, 1, bucket, device="cuda", dtype=torch.bfloat16)
    key_bias[..., text_len:] = float("-inf")
    ops = triton_block_ops()
    reference = copy.deepcopy(layers[0]).float()
    absorb_replay, absorbed = graph_of(lambda: [ca.absorb(k[i], v[i], key_bias) for i, ca in enumerate(layers)])
    absorb_ms = cuda_time_ms(absorb_replay, warmup, runs)
    rows = []
    for scale, n in enumerate(schedule.lengths):
        x = torch.randn(B, n, C, device="cuda", dtype=torch.bfloat16, generator=gen)
        plain, plain_out = graph_of(lambda: [ca(x, k[i], v[i], key_bias, ops, key_lens) for i, ca in enumerate(layers)])
        folded, folded_out = graph_of(lambda: [ca(x, k[i], v[i], key_bias, ops, key_lens, absorbed[i])
                                               for i, ca in enumerate(layers)])
        tuned = str(getattr(absorbed_kernels._absorbed_scores_tuned, "best_config", None))

        def baddbmm_form(i):  # b_o added by torch.baddbmm (as up to 6dcca35): a fill of the output, then the GEMM
            text = absorbed[i]
            probs = absorbed_kernels.absorbed_scores(x, text.keys, text.bias, text.scale, bias_columns=False)
            hl = probs.shape[-1]
            return torch.baddbmm(text.values[:, hl: hl + 1], probs, text.values[:, :hl])

        filled, filled_out = graph_of(lambda: [baddbmm_form(i) for i in range(len(layers))])
        plain_ms, folded_ms = cuda_time_ms(plain, warmup, runs), cuda_time_ms(folded, warmup, runs)
        filled_ms = cuda_time_ms(filled, warmup, runs)
        plain_ms2 = cuda_time_ms(plain, warmup, runs)  # again after the other: the spread of side-by-side timings
        rel = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(folded_out, plain_out))
        # both bf16 forms against the first block in fp32 (eager, unabsorbed): is the absorbed form less accurate?
        exact = reference(x.float(), k[0].float(), v[0].float(), key_bias.float())
        err = {form: ((out[0].float() - exact).norm() / exact.norm()).item()
               for form, out in (("unabsorbed", plain_out), ("absorbed", folded_out))}
        row = {"scale": scale, "tokens": n, "rows": B * n, "unabsorbed": plain_ms, "absorbed": folded_ms,
               "absorbed_bias_by_baddbmm": filled_ms, "unabsorbed_again": plain_ms2,
               "baddbmm_form_max_relative_difference": max(((a.float() - b.float()).norm() / b.float().norm()).item()
                                                           for a, b in zip(filled_out, folded_out)),
               "speedup": plain_ms["median_ms"] / folded_ms["median_ms"],
               "max_relative_difference": rel, "relative_error_vs_fp32_layer0": err, "scores_kernel_config": tuned}
        rows.append(row)
        print(f"{name} scale {scale:2d} ({n:5d} tokens): unabsorbed {plain_ms['median_ms']:.3f} / "
              f"{plain_ms2['median_ms']:.3f} ms, absorbed {folded_ms['median_ms']:.3f} ms "
              f"(b_o by baddbmm {filled_ms['median_ms']:.3f}) "
              f"({row['speedup']:.2f}x), rel diff {rel:.2e}, vs fp32 {err['unabsorbed']:.2e} / {err['absorbed']:.2e}, "
              f"{tuned}", flush=True)
        del plain, folded, filled, plain_out, folded_out, filled_out
    saved = sum(r["unabsorbed"]["median_ms"] - r["absorbed"]["median_ms"] for r in rows)
    print(f"{name}: absorbing costs {absorb_ms['median_ms']:.3f} ms per prompt; all scales save {saved:.2f} ms", flush=True)
    return {"model": name, "width": C, "heads": H, "depth": cfg.depth, "batch_rows": B, "text_tokens": text_len,
            "text_bucket": bucket, "absorption_pays": absorption_pays(cfg, bucket, B), "absorb_per_prompt": absorb_ms,
            "saved_ms_all_scales": saved, "scales": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="infinity-2b and infinity-8b by default")
    ap.add_argument("--text", type=int, default=15, help="real text tokens per row (the e2e prompt's hashed stand-in has 12)")
    ap.add_argument("--bucket", type=int, default=64, help="the padded text length (sparvar.cuda_engine.text_bucket: 16, 32, 64, then multiples of 64)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/cross_attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if not 1 <= args.text <= args.bucket:
        print(f"--text must be in [1, --bucket {args.bucket}], got {args.text}", file=sys.stderr)
        return 2
    out = {"environment": environment(), "benchmark": "cross-attention of every block per scale step, absorbed vs not "
           "(CUDA graphs, median of runs)", "models": []}
    path = args.out or result_path("cross_attention")
    for name in args.model or ["infinity-2b", "infinity-8b"]:
        out["models"].append(bench_model(name, args.text, args.bucket, args.warmup, args.runs))
        write_result(path, out)
        torch.cuda.empty_cache()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
