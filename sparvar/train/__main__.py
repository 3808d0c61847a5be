"""CLI: python -m sparvar.train {tokenizer,transformer,export,all} [options].

tokenizer   train the tokenizer          -> WORK/tokenizer.pt (resumable), WORK/tokenizer_log.json
transformer train the transformer        -> WORK/transformer.pt (resumable), WORK/transformer_log.json
export      evaluate and write weights   -> EXPORT/{model}.safetensors, {model}-tokenizer.safetensors, logs
all         the three in order
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from sparvar.config import get_config
from sparvar.schedule import MODEL_SCHEDULES, get_schedule
from sparvar.train.data import DEFAULT_DATA, load_cifar
from sparvar.train.loop import LoopSettings, state_digest, write_json
from sparvar.train.run import (evaluate_tokenizer, evaluate_transformer, export_weights, load_tokenizer, new_transformer,
                               train_tokenizer, train_transformer)
from sparvar.train.tokenizer import Tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparvar.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("tokenizer", "transformer", "export", "all"))
    p.add_argument("--model", default="infinity-cifar", choices=sorted(MODEL_SCHEDULES),
                   help="a config with its own schedule (sparvar/schedule.py MODEL_SCHEDULES)")
    p.add_argument("--data", default=DEFAULT_DATA, help="the CIFAR-10 JPEG tarball")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images of each split")
    p.add_argument("--work", required=True, help="folder of the resumable checkpoints and logs")
    p.add_argument("--export", default=None, help="folder to write the safetensors and logs to (export/all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work")
    for stage, steps, batch, lr, warmup in (("tokenizer", 20000, 128, 2e-3, 100), ("transformer", 20000, 64, 1.5e-3, 200)):
        p.add_argument(f"--{stage}-steps", type=int, default=steps, help="steps (the most steps with a time budget)")
        p.add_argument(f"--{stage}-seconds", type=float, default=None, help="wall-clock budget of the step loop")
        p.add_argument(f"--{stage}-batch", type=int, default=batch)
        p.add_argument(f"--{stage}-lr", type=float, default=lr)
        p.add_argument(f"--{stage}-warmup", type=int, default=warmup)
    p.add_argument("--transformer-weight-decay", type=float, default=0.05)
    p.add_argument("--cfg-drop", type=float, default=0.1, help="probability of training a row on the empty prompt")
    p.add_argument("--eval-images", type=int, default=512, help="test images for the transformer's held-out loss")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"), help="exported weights")
    return p


def settings_for(args, stage: str, device: torch.device) -> LoopSettings:
    get = lambda name: getattr(args, f"{stage}_{name}")  # noqa: E731
    return LoopSettings(steps=get("steps"), batch=get("batch"), lr=get("lr"), warmup=get("warmup"), seed=args.seed,
                        seconds=get("seconds"), bf16=device.type == "cuda",
                        weight_decay=args.transformer_weight_decay if stage == "transformer" else 0.0)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = get_config(args.model)
    schedule = get_schedule(cfg.default_resolution, model=cfg.name)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    os.makedirs(args.work, exist_ok=True)
    t0 = time.perf_counter()
    say = lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)  # noqa: E731
    data = {split: d.to(device) for split, d in load_cifar(args.data, args.limit).items()}
    if "train" not in data:
        raise ValueError(f"{args.data}: no train/ split")
    say("data: " + ", ".join(f"{s} {len(d)}" for s, d in data.items()) + f"; classes {data['train'].class_names}")
    tok_path, var_path = os.path.join(args.work, "tokenizer.pt"), os.path.join(args.work, "transformer.pt")

    if args.stage in ("tokenizer", "all"):
        _, log = train_tokenizer(cfg.vae, schedule, data["train"], settings_for(args, "tokenizer", device), args.work,
                                 args.resume, print_fn=say)
        write_json(log, os.path.join(args.work, "tokenizer_log.json"))
    if args.stage in ("transformer", "all", "export"):
        tokenizer = Tokenizer(cfg.vae, schedule.grids).to(device)
        tok_state = _finished_run(tok_path, "tokenizer", device)
        tokenizer.load_state_dict(tok_state["model"])
    if args.stage in ("transformer", "all"):
        _, log = train_transformer(cfg, schedule, tokenizer, data["train"], settings_for(args, "transformer", device),
                                   args.work, args.cfg_drop, args.resume, print_fn=say)
        write_json(log, os.path.join(args.work, "transformer_log.json"))
    if args.stage in ("export", "all"):
        if not args.export:
            raise ValueError("export needs --export DIR")
        var_state = _finished_run(var_path, "transformer", device)
        trained = var_state["log"]["settings"]
        if trained.get("tokenizer_sha256") != state_digest(tokenizer):  # the tokenizer stage ran again after it
            raise ValueError(f"{var_path} was trained on another tokenizer than {tok_path} holds now: train the "
                             "transformer stage again (same --work) before exporting")
        model = new_transformer(cfg, device, trained["seed"])
        model.load_state_dict(var_state["model"])
        dtype = getattr(torch, args.dtype)
        paths = export_weights(model, tokenizer, args.export, dtype, metadata={"seed": str(trained["seed"])})
        say(f"wrote {paths[0]} ({os.path.getsize(paths[0]) / 2**20:.1f} MiB), {paths[1]} ({os.path.getsize(paths[1]) / 2**20:.1f} MiB)")
        # evaluate what ships: the exported (rounded) weights
        shipped_tok = load_tokenizer(paths[1], cfg.vae, schedule.grids, device)
        split = "test" if "test" in data else "train"  # a tarball without test/: said in the logs' eval
        held_out = data[split]
        tok_eval = {**evaluate_tokenizer(shipped_tok, held_out), "split": split}
        say(f"tokenizer reconstruction on {split}: {tok_eval}")
        from sparvar.checkpoint import load_model

        shipped = load_model(cfg, paths[0], device=device)
        var_eval = {**evaluate_transformer(shipped, shipped_tok, held_out, schedule, images=args.eval_images,
                                           bf16=device.type == "cuda"), "split": split}
        say(f"transformer held-out teacher-forced: {var_eval}")
        for stage, ev, state in (("tokenizer", tok_eval, tok_state), ("transformer", var_eval, var_state)):
            log = dict(state["log"])  # the log of the run that made these weights (not a file another run left)
            log["eval"] = ev
            log["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            write_json(log, os.path.join(args.export, f"{stage}_log.json"))
    return 0


def _finished_run(path: str, name: str, device) -> dict:
    """The checkpoint of a finished `name` run: {'model', 'log', 'step', ...}. An interrupted run's weights are not
    what its settings describe: refused, with how to finish it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {name} checkpoint at {path}: train the {name} stage first (same --work)")
    state = torch.load(path, map_location=device, weights_only=False)
    if state.get("name") != name:
        raise ValueError(f"{path} holds a {state.get('name')!r} run, not {name!r}")
    total = state["log"]["total_steps"]
    if state["step"] < total:
        raise ValueError(f"{path}: the {name} run stopped at step {state['step']} of {total}; finish it first "
                         f"(--stage {name} --resume, same --work)")
    return state


if __name__ == "__main__":
    sys.exit(main())
