"""Microbenchmarks behind the engine's design choices, one call on the GPU (results: bench/results/step_parts_<dev>.json).

1. ceilings: device-to-device copy bandwidth, a large bf16 GEMM's rate;
2. the linears of one block (Infinity-2B / 8B shapes) at the row counts of small and large scales: bf16 (cuBLAS),
   FP8 e4m3 with per-row activation / per-channel weight scales (torch._scaled_mm), with and without quantising the
   activation; FC1 + GELU as two kernels vs cuBLASLt's fused GELU epilogue;
3. each scale step's CUDA-graph replay alone (dense and SparVAR engines) vs the loop's per-scale time: the gap is
   sampling and the code bookkeeping between steps;
4. the VAE decode at 1024²: eager vs captured in a CUDA graph vs torch.compile.

    PYTHONPATH=. python bench/step_parts.py --model infinity-2b
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import cuda_time_ms, result_path, write_result  # noqa: E402

def graph_time_ms(fn, runs: int = 30) -> dict:
    """Median time of fn captured in a CUDA graph (launch gaps removed, as in the engine)."""
    from sparvar.cuda_engine import capture_scales

    graphs, _ = capture_scales(lambda _: fn(), 1, None)
    return cuda_time_ms(graphs[0].replay, warmup=3, runs=runs)


def ceilings() -> dict:
    x = torch.randn(1 << 30, dtype=torch.bfloat16, device="cuda")  # 2 GiB
    y = torch.empty_like(x)
    copy = cuda_time_ms(lambda: y.copy_(x), runs=20)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm = cuda_time_ms(lambda: a @ b, runs=20)
    del x, y
    return {"copy_tb_per_s": 2 * 2**31 / mm_s(copy) / 1e12, "bf16_gemm_tflops": 2 * 8192**3 / mm_s(mm) / 1e12}


def mm_s(t: dict) -> float:
    return t["median_ms"] / 1000.0


def linears(cfg, rows: list[int]) -> list[dict]:
    from sparvar.fp8 import quantize_rows_ref  # eager torch: the quantisation cost before its Triton kernel

    C, Hm = cfg.width, cfg.mlp_dim
    shapes = {"qkv": (C, 3 * C), "proj": (C, C), "fc1": (C, Hm), "fc2": (Hm, C)}
    out = []
    for M in rows:
        for name, (K, N) in shapes.items():
            x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
            w = torch.randn(N, K, dtype=torch.bfloat16, device="cuda") / K**0.5
            bias = torch.randn(N, dtype=torch.bfloat16, device="cuda")
            wq, ws = quantize_rows_ref(w)  # per output channel
            xq, xs = quantize_rows_ref(x)
            wq_t = wq.t()  # (K, N) column-major, as _scaled_mm wants its second operand
            ref = F.linear(x.float(), w.float(), bias.float())
            bf16 = graph_time_ms(lambda: F.linear(x, w, bias))
            try:
                fp8 = graph_time_ms(lambda: torch._scaled_mm(xq, wq_t, scale_a=xs, scale_b=ws.t(), bias=bias,
                                                             out_dtype=torch.bfloat16))
                fast = graph_time_ms(lambda: torch._scaled_mm(xq, wq_t, scale_a=xs, scale_b=ws.t(), bias=bias,
                                                              out_dtype=torch.bfloat16, use_fast_accum=True))
            except RuntimeError as e:  # record and go on: the other measurements still count
                print(f"  fp8 {name} M={M}: {e}", flush=True)
                out.append({"rows": M, "linear": name, "error": str(e)[:300]})
                continue

            def quant_and_mm():
                q, s = quantize_rows_ref(x)
                return torch._scaled_mm(q, wq_t, scale_a=s, scale_b=ws.t(), bias=bias, out_dtype=torch.bfloat16)

            fp8_q = graph_time_ms(quant_and_mm)
            err = (quant_and_mm().float() - ref).norm() / ref.norm()
            flop = 2 * M * K * N
            row = {"rows": M, "linear": name, "K": K, "N": N, "bf16_ms": bf16["median_ms"], "fp8_ms": fp8["median_ms"],
                   "fp8_fast_accum_ms": fast["median_ms"],
                   "fp8_with_quant_ms": fp8_q["median_ms"], "fp8_rel_err": err.item(),
                   "bf16_tflops": flop / bf16["median_ms"] / 1e9, "fp8_tflops": flop / fp8["median_ms"] / 1e9}
            if name == "qkv":  # its input is the AdaLN-modulated residual: norm then quantise, or both in one pass
                from sparvar.kernels.fp8 import quantize_rows_triton
                from sparvar.kernels.pointwise import residual_norm

                xs = x.view(1, M, K)
                ada = torch.randn(1, 1, 6, K, device="cuda") * 0.5
                sep = graph_time_ms(lambda: quantize_rows_triton(
                    residual_norm(xs, scale=ada[:, :, 2], shift=ada[:, :, 4])[1].view(M, K)))
                fused = graph_time_ms(lambda: residual_norm(xs, scale=ada[:, :, 2], shift=ada[:, :, 4], quantize=True))
                row.update(norm_then_quant_ms=sep["median_ms"], norm_quant_fused_ms=fused["median_ms"])
            if name == "fc2":  # its input is the GELU of fc1's output: GELU then quantise, or both in one pass
                from sparvar.kernels.fp8 import quantize_rows_triton

                sep = graph_time_ms(lambda: quantize_rows_triton(F.gelu(x, approximate="tanh")))
                fused = graph_time_ms(lambda: quantize_rows_triton(x, gelu=True))
                row.update(gelu_then_quant_ms=sep["median_ms"], gelu_quant_fused_ms=fused["median_ms"])
            if name == "fc1":
                two = graph_time_ms(lambda: F.gelu(F.linear(x, w, bias), approximate="tanh"))
                fused = graph_time_ms(lambda: torch._addmm_activation(bias, x, w.t(), use_gelu=True))
                gerr = (torch._addmm_activation(bias, x, w.t(), use_gelu=True).float()
                        - F.gelu(ref, approximate="tanh")).norm() / F.gelu(ref, approximate="tanh").norm()
                row.update(linear_then_gelu_ms=two["median_ms"], addmm_gelu_epilogue_ms=fused["median_ms"],
                           addmm_gelu_rel_err=gerr.item())
            out.append(row)
            print(f"  M={M:5d} {name:4s} bf16 {row['bf16_ms']:.3f} ms ({row['bf16_tflops']:.0f} TF/s)  fp8 {row['fp8_ms']:.3f}"
                  f" (+quant {row['fp8_with_quant_ms']:.3f}) err {row['fp8_rel_err']:.4f}"
                  + (f"  fc1+gelu {row['linear_then_gelu_ms']:.3f} vs epilogue {row['addmm_gelu_epilogue_ms']:.3f}"
                     if name == "fc1" else ""), flush=True)
    return out


def scale_replays(model_name: str) -> list[dict]:
    """Each scale's captured step replayed alone, for the dense and the SparVAR engine."""
    from sparvar.config import get_config
    from sparvar.cuda_engine import CudaGraphRunner
    from sparvar.model import build_model
    from sparvar.pipeline import make_plan
    from sparvar.schedule import get_schedule
    from sparvar.text import hashed_embeddings

    cfg, schedule = get_config(model_name), get_schedule(1024)
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16)
    f, l = hashed_embeddings(["a red fox in the snow"], cfg.text_dim, cfg.text_maxlen)
    out = []
    for attention in ("dense", "sparvar"):
        runner = CudaGraphRunner(model, schedule, make_plan(cfg, schedule, attention, backend="triton"))
        runner.begin(f, l, True)
        begin = cuda_time_ms(lambda: runner.begin(f, l, True), warmup=2, runs=10)
        g = runner.current
        for s in range(schedule.num_scales):  # replay in order once so CS4A state is realistic
            g.graphs[s].replay()
        times = [cuda_time_ms(g.graphs[s].replay, warmup=2, runs=15)["median_ms"] for s in range(schedule.num_scales)]
        out.append({"attention": attention, "begin_ms": begin["median_ms"], "replay_ms": times})
        print(f"  {attention}: begin {begin['median_ms']:.2f} ms; replay per scale "
              + " ".join(f"{t:.1f}" for t in times) + f"; sum {sum(times):.1f}", flush=True)
        del runner, g
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    return out


def vae_decode(model_name: str) -> dict:
    from sparvar.config import get_config
    from sparvar.pipeline import build_decoder

    cfg = get_config(model_name)
    decoder = build_decoder(cfg, None, "cuda", torch.bfloat16)
    patch = 2 if decoder.patchify else 1
    latent = torch.randn(1, decoder.codebook_dim, 64 * patch, 64 * patch, device="cuda")
    eager = cuda_time_ms(lambda: decoder.decode(latent), warmup=2, runs=10)
    graphed = graph_time_ms(lambda: decoder.decode(latent), runs=10)
    ref = decoder.decode(latent)
    compiled_module = torch.compile(decoder.module.decode)
    with torch.no_grad():
        comp_fn = lambda: compiled_module(latent.to(torch.bfloat16)).float()  # noqa: E731
        comp = graph_time_ms(comp_fn, runs=10)
        err = (comp_fn() - ref).abs().max().item()
    row = {"eager_ms": eager["median_ms"], "cuda_graph_ms": graphed["median_ms"], "compiled_graph_ms": comp["median_ms"],
           "compiled_max_abs_diff": err}
    print(f"  VAE decode 1024²: eager {row['eager_ms']:.1f} ms, graph {row['cuda_graph_ms']:.1f}, "
          f"compiled+graph {row['compiled_graph_ms']:.1f} (max diff {err:.3g})", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="infinity-2b")
    ap.add_argument("--parts", default="ceilings,linears,replays,vae")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from sparvar.config import get_config

    torch.backends.cuda.matmul.allow_tf32 = False
    parts = args.parts.split(",")
    result = {"benchmark": "engine design microbenchmarks", "model": args.model}
    with torch.no_grad():
        if "ceilings" in parts:
            result["ceilings"] = ceilings()
            print("ceilings:", result["ceilings"], flush=True)
        if "linears" in parts:
            result["linears"] = linears(get_config(args.model), [2, 512, 2048, 8192])
        if "vae" in parts:
            result["vae_decode"] = vae_decode(args.model)
        if "replays" in parts:
            result["scale_replays"] = scale_replays(args.model)
    write_result(args.out or result_path(f"step_parts_{args.model.replace('infinity-', '')}"), result)


if __name__ == "__main__":
    main()
