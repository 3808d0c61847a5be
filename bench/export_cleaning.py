"""An engine unit's ONNX export, cleaned by export.custom_ops.fold_and_clean (what engines use) against the exporter's
full optimisation (onnxscript's optimizer with its pattern-rewrite rules, torch.onnx.export's default), timed in
turns in one process on this machine (CPU), with the node counts of each graph, as a JSON result.

    python bench/export_cleaning.py --model infinity-tiny --runs 3
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import write_result  # noqa: E402


def unit_exports(model_name: str, resolution: int):
    """(name, module, args, input names, output names) of the last scale step (dense) and the decode, with the
    engine builder's sample arguments (static shapes: the text length the builder samples with)."""
    from export.stages import _sample
    from export.step import DecodeUnit, StepUnit, TextUnit, decode_io, text_io
    from sparvar.config import get_config
    from sparvar.model import build_model
    from sparvar.pipeline import build_decoder
    from sparvar.schedule import get_schedule

    cfg, schedule = get_config(model_name), get_schedule(resolution)
    model = build_model(cfg, dtype=torch.float32, seed=0).eval()
    decoder = build_decoder(cfg, None, "cpu", torch.float32)
    text_len = 4
    text_args = [torch.randn(1, text_len, cfg.text_dim), torch.full((1,), text_len)]
    _, t_out = text_io(cfg, 1, torch.float32)
    with torch.no_grad():
        named = dict(zip((s.name for s in t_out), TextUnit(model)(*text_args)))
    step = StepUnit(model, schedule, schedule.num_scales - 1, 1, None)
    d_in, d_out = decode_io(cfg, schedule, 1)
    return [(f"step_{schedule.num_scales - 1:02d}", step, _sample(step.inputs, named, text_len), step.inputs, step.outputs),
            ("decode", DecodeUnit(decoder), _sample(d_in, {}, text_len), d_in, d_out)]


def export_once(module, args, inputs, outputs, cleaning: str) -> tuple[float, int]:
    """Seconds and graph nodes of one export; `cleaning` is 'fold_and_clean' or 'full_optimizer'."""
    from export.custom_ops import export_program

    names = dict(input_names=[s.name for s in inputs], output_names=[s.name for s in outputs])
    t0 = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        if cleaning == "fold_and_clean":
            program = export_program(module, tuple(args), flavour=None, **names)
        else:
            program = torch.onnx.export(module, tuple(args), dynamo=True, verbose=False, optimize=True, **names)
    seconds = time.perf_counter() - t0
    return seconds, len(program.model_proto.graph.node)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="infinity-tiny")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="bench/results/export_cleaning_cpu.json")
    args = ap.parse_args()
    kinds = ("fold_and_clean", "full_optimizer")
    units = {}
    for name, module, sample, inputs, outputs in unit_exports(args.model, args.resolution):
        times, nodes = {k: [] for k in kinds}, {}
        for run in range(args.runs):  # in turns, the order swapped every run
            for kind in (kinds if run % 2 == 0 else kinds[::-1]):
                seconds, nodes[kind] = export_once(module, sample, inputs, outputs, kind)
                times[kind].append(seconds)
        medians = {k: statistics.median(v) for k, v in times.items()}
        units[name] = {"seconds": times, "median_s": medians, "nodes": nodes,
                       "full_over_fold": medians["full_optimizer"] / medians["fold_and_clean"]}
        print(name, {k: round(v, 2) for k, v in medians.items()}, nodes, f"{units[name]['full_over_fold']:.2f}x")
    write_result(args.out, {"benchmark": "ONNX export of one unit: fold_and_clean vs the exporter's full optimizer, "
                                         "CPU, in turns in one process, median seconds",
                            "model": args.model, "resolution": args.resolution, "batch": 1, "dtype": "fp32",
                            "attention": "dense", "shapes": "static (the builder's sample text length 4)",
                            "runs": args.runs, "units": units})


if __name__ == "__main__":
    main()
