"""The tokenizer decode at 1024², side by side in one process: what the engines run and its alternatives.

Rows (each the median of many runs, CUDA events; random weights, the shapes of the real models):
- Infinity-2B's and -8B's BSQ decoder: eager bf16, and the engine's CUDA graph (GraphedDecoder), with cuDNN's
  heuristic convolution algorithms (the default) and with cudnn.benchmark (timed algorithm choice; a candidate).
- HART-0.7B's VQ decoder: eager fp32 (the engines before 946937e), and the engine's fp16 channels-last CUDA graph
  (`half_decoder`), also with cudnn.benchmark.
- For each, the engine's graph with the 2x upsampling convolutions in their official form (nearest upsample, then
  the 3x3 convolution at the 2x grid) beside the default sub-pixel form (sparvar.vae.upsample_conv).

    PYTHONPATH=. python bench/decode.py   # writes bench/results/decode_<device>.json
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import cuda_time_ms, result_path, write_result  # noqa: E402


OFFICIAL_UPSAMPLING_ROW = "engine: CUDA graph, official upsampling (nearest 2x + 3x3 conv)"


def decoders(model_name: str):
    """(latent, {row name: (decode function, cudnn.benchmark, sub-pixel upsampling)}) of one model's tokenizer on the
    GPU."""
    from sparvar.config import get_config
    from sparvar.cuda_engine import GraphedDecoder
    from sparvar.schedule import get_schedule

    cfg = get_config(model_name)
    schedule = get_schedule(1024, model=model_name)
    g = torch.Generator(device="cuda").manual_seed(0)
    if getattr(cfg, "family", "infinity") == "hart":
        from sparvar.hart.tokenizer import build_hart_vq

        full = build_hart_vq(cfg.vq, seed=0, device="cuda")
        P = cfg.patch_nums[-1]
        latent = torch.randn(1, cfg.vq.z_channels, P, P, generator=g, device="cuda")
        half = copy.deepcopy(full).half_decoder()
        return latent, {"eager fp32 (before 946937e)": (full.decode, False, True),
                        "engine: fp16 channels-last, CUDA graph": (GraphedDecoder(half).decode, False, True),
                        OFFICIAL_UPSAMPLING_ROW: (GraphedDecoder(copy.deepcopy(half)).decode, False, False),
                        "engine + cudnn.benchmark": (GraphedDecoder(copy.deepcopy(full).half_decoder()).decode, True,
                                                     True)}
    from sparvar.pipeline import build_decoder

    decoder = build_decoder(cfg, None, "cuda", torch.bfloat16)
    h, w = schedule.final_grid
    patch = 2 if cfg.vae.spatial_patchify else 1
    latent = torch.randn(1, cfg.vae.codebook_dim, h * patch, w * patch, generator=g, device="cuda").bfloat16()
    # the eager row: a decoder no engine wrapped (GraphedDecoder fixes the weights of the one it wraps: sub-pixel form)
    return latent, {"eager bf16 (official upsampling)": (build_decoder(cfg, None, "cuda", torch.bfloat16).decode, False, True),
                    "engine: CUDA graph": (GraphedDecoder(decoder).decode, False, True),
                    OFFICIAL_UPSAMPLING_ROW: (GraphedDecoder(decoder).decode, False, False),
                    "engine + cudnn.benchmark": (GraphedDecoder(build_decoder(cfg, None, "cuda", torch.bfloat16)).decode,
                                                 True, True)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", help="default: infinity-2b, infinity-8b, hart-0.7b")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/decode.py needs a CUDA GPU; none is available on this machine", file=sys.stderr)
        return 2
    out = {"benchmark": "tokenizer decode at 1024², batch 1", "runs": args.runs, "models": []}
    import sparvar.vae

    for name in args.model or ["infinity-2b", "infinity-8b", "hart-0.7b"]:
        latent, rows = decoders(name)
        result = {"model": name, "latent": list(latent.shape), "rows": {}}
        with torch.no_grad():
            for row, (decode, benchmark, subpixel) in rows.items():
                # the form is fixed when a graph is captured (the first, warm-up call): eager rows read it every call
                default, sparvar.vae.SUBPIXEL_UPSAMPLE = sparvar.vae.SUBPIXEL_UPSAMPLE, subpixel
                try:
                    with torch.backends.cudnn.flags(enabled=True, benchmark=benchmark):
                        result["rows"][row] = cuda_time_ms(lambda: decode(latent), warmup=3, runs=args.runs)
                finally:
                    sparvar.vae.SUBPIXEL_UPSAMPLE = default
                print(f"{name:12s} {row:62s} {result['rows'][row]['median_ms']:8.2f} ms", flush=True)
            engine = result["rows"].get("engine: CUDA graph") or result["rows"]["engine: fp16 channels-last, CUDA graph"]
            result["official_upsampling_over_subpixel"] = (result["rows"][OFFICIAL_UPSAMPLING_ROW]["median_ms"]
                                                           / engine["median_ms"])
        out["models"].append(result)
        path = write_result(args.out or result_path("decode"), out)
        del rows
        torch.cuda.empty_cache()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
