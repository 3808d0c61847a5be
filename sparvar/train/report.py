"""Loss-curve PNGs of a training log (the JSON `train_loop` writes).

    python -m sparvar.train.report weights/tokenizer_log.json weights/loss_tokenizer.png
"""
from __future__ import annotations

import json
import os
import sys

# what to draw per stage: (record key, axis label); the first one is the loss
PANELS = {
    "tokenizer": (("loss", "MSE + L1 (pixels in [-1, 1])"), ("psnr", "batch PSNR (dB)")),
    "transformer": (("loss", "bit cross-entropy (nats)"), ("bit_acc", "bit accuracy")),
}


def plot_log(log: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = log.get("name")
    if name not in PANELS:
        raise ValueError(f"log of an unknown stage {name!r}; expected one of {list(PANELS)}")
    records = log["records"]
    if not records:
        raise ValueError(f"the {name} log has no records")
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, len(PANELS[name]), figsize=(10, 3.4))
    for ax, (key, label) in zip(axes, PANELS[name]):
        ax.plot(steps, [r[key] for r in records], lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    batch, seconds = log["settings"]["batch"], log["seconds"]
    title = f"{name}: {log['total_steps']} steps x batch {batch}, {seconds:.0f} s on {log.get('device', '?')}"
    if "eval" in log:
        title += "\nheld-out: " + ", ".join(f"{k} {v}" for k, v in log["eval"].items() if not isinstance(v, list))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit("usage: python -m sparvar.train.report LOG.json OUT.png")
    with open(argv[0]) as f:
        plot_log(json.load(f), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
