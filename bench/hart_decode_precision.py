"""How far the HART engines' fp16 decode is from the fp32 decode, next to the official inference's precision.

The official HART inference runs under fp16 autocast (its sample.py), so its decode convolutions see fp16. The
torch-cuda engine decodes with `HartVQDecoder.half_decoder()` (fp16 weights and activations, f_hat accumulated in
fp32). This compares, on the same f_hat (accumulated from random code indices, as generation does): our fp16
decode, a bf16 decode, and the fp32 modules under CPU fp16 autocast (the official precision, emulated), each
against the fp32 decode. Random weights: the numbers describe arithmetic, not image quality.

    python bench/hart_decode_precision.py [--model hart-tiny] [--samples 4]   # writes hart_decode_precision_<device>.json
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import result_path, write_result  # noqa: E402


def errors(got: torch.Tensor, want: torch.Tensor) -> dict:
    err = (got.float() - want).abs()
    return {"max_abs": err.max().item(), "mean_abs": err.mean().item(),
            "psnr_db": (10 * torch.log10(4 / err.square().mean())).item()}  # images in [-1, 1]: peak-to-peak 2


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="hart-tiny")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from sparvar.config import get_config
    from sparvar.hart.tokenizer import build_hart_vq

    cfg = get_config(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    full = build_hart_vq(cfg.vq, seed=0, device=device)
    from sparvar.vae import freeze_subpixel_weights

    variants = {"fp16 (engine)": copy.deepcopy(full).half_decoder(torch.float16),
                "bf16": copy.deepcopy(full).half_decoder(torch.bfloat16)}
    for tok in variants.values():  # as the engine's GraphedDecoder does (its upsampling in the sub-pixel form)
        freeze_subpixel_weights(tok)
    g = torch.Generator().manual_seed(0)
    indices = [torch.randint(0, cfg.vq.vocab_size, (args.samples, pn * pn), generator=g).to(device) for pn in cfg.patch_nums]
    with torch.no_grad():
        f_hat = full.indices_to_fhat(indices, cfg.patch_nums)
        want = full.decode(f_hat)
        rows = {name: errors(tok.decode(f_hat), want) for name, tok in variants.items()}
        with torch.autocast(device, dtype=torch.float16):
            rows["fp32 modules under fp16 autocast (official precision)"] = errors(full.decode(f_hat), want)
    result = {"benchmark": "HART tokenizer decode precision against the fp32 decode", "model": args.model,
              "vq": cfg.vq.name, "samples": args.samples, "image": list(want.shape[1:]), "weights": "random (seed 0)",
              "rows": rows}
    path = write_result(args.out or result_path("hart_decode_precision"), result)
    for name, r in rows.items():
        print(f"{name:55s} PSNR {r['psnr_db']:6.1f} dB  max {r['max_abs']:.4f}  mean {r['mean_abs']:.5f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
