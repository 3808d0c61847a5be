"""A seeded, resumable training loop with an optional wall-clock budget.

Determinism: every random choice of step s (batch indices, flips, condition drop) comes from a generator
seeded by (seed, s) on the CPU, so a run resumed from a checkpoint, or re-run with the recorded step count,
sees the same data as the original (bit-exactness on a GPU still depends on its kernels).

Wall-clock budget: with `seconds`, the loop times steps `calibrate` (after a short warm-up) and fixes the
total step count so the run ends within the budget; the cosine schedule then decays over that count. The
count is recorded in the checkpoint and the log, and `steps=N` reproduces the run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

CALIBRATE = (5, 25)  # steps timed to fix the step count of a budgeted run (after compilation/cudnn warm-up)
RESUME_FREE = ("log_every", "checkpoint_every")  # settings a resumed run may change: they do not change its weights


@dataclass(frozen=True)
class LoopSettings:
    steps: int  # total steps; with `seconds`, the most steps (the budget may stop earlier)
    batch: int
    lr: float
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    seconds: float | None = None  # wall-clock budget of the step loop
    log_every: int = 25
    checkpoint_every: int = 500
    bf16: bool = False  # autocast the step in bf16 (GPU)

    def __post_init__(self):
        if self.steps <= 0 or self.batch <= 0:
            raise ValueError(f"steps and batch must be positive, got {self.steps} and {self.batch}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and min_lr_ratio in [0, 1], got {self.lr} and {self.min_lr_ratio}")
        if self.seconds is not None and self.seconds <= 0:
            raise ValueError(f"seconds must be positive, got {self.seconds}")
        if self.seconds is not None and self.warmup < CALIBRATE[1]:  # lr_at reads the step count only after warm-up
            raise ValueError(f"a run with a time budget fixes its step count at step {CALIBRATE[1]}, so its warm-up must "
                             f"last at least {CALIBRATE[1]} steps (got {self.warmup}); else re-running it with the "
                             "recorded steps would not reproduce it")


def lr_at(step: int, total: int, s: LoopSettings) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at `total`."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = min(1.0, (step - s.warmup) / max(1, total - s.warmup))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one step's random choices."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def batch_indices(step: int, batch: int, n: int, seed: int) -> torch.Tensor:
    """Indices of step `step`'s batch: epochs are seeded permutations, the last partial batch of each is dropped."""
    if batch > n:
        raise ValueError(f"batch {batch} is larger than the data set ({n} items)")
    per_epoch = n // batch
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))
    return perm[pos * batch:(pos + 1) * batch]


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay: tuple[str, ...] = ()) -> list[dict]:
    """Weight decay on matrices only (not on biases, norms, embeddings-like tensors named in no_decay)."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not any(name.endswith(n) for n in no_decay) else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def state_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes, values): which weights a later stage was trained on."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_atomic(obj, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_loop(name: str, model: torch.nn.Module, step_fn: Callable[[int], tuple[torch.Tensor, dict]],
               settings: LoopSettings, checkpoint: str, resume: bool = False, no_decay: tuple[str, ...] = (),
               print_fn=print, run_settings: dict | None = None) -> dict:
    """Run `step_fn(step) -> (loss, metrics)` with AdamW; checkpoints to `checkpoint` (model, optimizer, log).

    run_settings: what else decides the weights (the stage's own options, the inputs' digests), recorded beside the
    loop settings. A resumed run must have them all as its checkpoint records them (but RESUME_FREE).
    Returns the log: {'name', 'settings', 'total_steps', 'seconds', 'records': [{step, lr, loss, ...}, ...]}.
    """
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(param_groups(model, settings.weight_decay, no_decay), lr=settings.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    recorded = {**asdict(settings), **(run_settings or {})}
    log = {"name": name, "settings": recorded, "total_steps": settings.steps, "seconds": 0.0, "records": []}
    start_step = 0
    if resume and os.path.isfile(checkpoint):
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state["name"] != name:
            raise ValueError(f"{checkpoint} holds a {state['name']!r} run, not {name!r}")
        before = state["log"]["settings"]
        changed = sorted(k for k in set(before) | set(recorded)
                         if k not in RESUME_FREE and before.get(k, "(none)") != recorded.get(k, "(none)"))
        if changed:  # the rest of the run would follow other settings than the log says it did
            raise ValueError(f"{checkpoint}: the {name} run was started with "
                             + ", ".join(f"{k}={before.get(k, '(none)')!r}" for k in changed) + "; resuming it with "
                             + ", ".join(f"{k}={recorded.get(k, '(none)')!r}" for k in changed)
                             + " would change it: resume with the same settings, or start a new run in another --work")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        log, start_step = state["log"], state["step"]
        print_fn(f"[{name}] resumed at step {start_step} of {log['total_steps']}")
    elif resume:
        print_fn(f"[{name}] no checkpoint at {checkpoint}; starting from scratch")
    total = log["total_steps"]
    elapsed_before = log["seconds"]

    def save(step: int) -> None:
        log["seconds"] = elapsed_before + time.perf_counter() - t0
        save_atomic({"name": name, "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "log": log},
                    checkpoint)

    model.train()
    sums: dict[str, torch.Tensor] = {}
    count, t0, t_cal = 0, time.perf_counter(), None
    step = start_step
    while step < total:
        lr = lr_at(step, total, settings)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
            loss, metrics = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        for key, value in {"loss": loss.detach(), "grad_norm": grad_norm, **metrics}.items():
            sums[key] = sums.get(key, 0.0) + value.float()
        count += 1
        step += 1
        # fix the step count of a budgeted run from the speed of steps CALIBRATE[0]..CALIBRATE[1]
        if settings.seconds is not None and start_step == 0 and step in CALIBRATE:
            _sync(device)
            if step == CALIBRATE[0]:
                t_cal = time.perf_counter()
            else:
                per_step = (time.perf_counter() - t_cal) / (CALIBRATE[1] - CALIBRATE[0])
                left = settings.seconds - (time.perf_counter() - t0)
                total = log["total_steps"] = max(step + 1, min(settings.steps, step + int(left / per_step)))
                print_fn(f"[{name}] {per_step * 1000:.1f} ms/step -> {total} steps in the {settings.seconds:.0f} s budget")
        if step % settings.log_every == 0 or step == total:
            record = {"step": step, "lr": lr, "time": round(elapsed_before + time.perf_counter() - t0, 2)}
            record.update({k: round(float(v) / count, 5) for k, v in sums.items()})
            log["records"].append(record)
            print_fn(f"[{name}] " + " ".join(f"{k} {v}" for k, v in record.items()))
            sums, count = {}, 0
        if step % settings.checkpoint_every == 0 and step < total:
            save(step)
    save(step)
    model.eval()
    return log
