"""Draw the CSLA masks of the default policy into docs/*.png (needs matplotlib).

    python tools/plot_masks.py [--model infinity-2b] [--resolution 1024] [--query-row 20 --query-col 45] [--out docs]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: bench.common
from bench.common import save_figure  # noqa: E402
from sparvar.schedule import get_schedule  # noqa: E402
from sparvar.sparse import default_policy  # noqa: E402

# 0 = skipped, 1 = attended only because its block is active, 2 = in the token-exact mask (sink or window)
COLORS = ListedColormap(["#eeeeee", "#f4a259", "#2a6f97"])


def plot_query_windows(policy, schedule, scale: int, row: int, col: int, path: Path) -> None:
    layout = policy.csla_layout(schedule, scale)
    token = replace(policy, csla_granularity="token").csla_layout(schedule, scale)
    query = row * schedule.grids[scale][1] + col
    token_row = token.to_dense()[query].numpy()
    block_row = layout.to_dense()[query].numpy()
    state = block_row.astype(np.int8) + token_row.astype(np.int8)  # 0, 1 (block only) or 2 (token)
    n = scale + 1
    cols = 7
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(2.2 * cols, 2.9 * -(-n // cols)))
    for j, ax in enumerate(axes.flat):
        ax.axis("off")
        if j >= n:
            continue
        h, w = schedule.grids[j]
        grid = state[schedule.offsets[j]: schedule.offsets[j + 1]].reshape(h, w)
        ax.imshow(grid, cmap=COLORS, vmin=0, vmax=2, interpolation="nearest")
        if j == scale:
            ax.plot(col, row, "w+", markersize=6)
        kept = int(token_row[schedule.offsets[j]: schedule.offsets[j + 1]].sum())
        ax.set_title(f"scale {j}: {h}x{w}\n{kept} window keys", fontsize=8)
    fig.suptitle(f"CSLA keys of query ({row}, {col}) at scale {scale} {schedule.grids[scale]}: blue = sinks/windows, "
                 f"orange = extra keys of active {layout.block_m}x{layout.block_n} blocks", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_block_masks(policy, schedule, scale: int, blocks: list[tuple[int, int]], path: Path) -> None:
    fig, axes = plt.subplots(len(blocks), 1, figsize=(12, 3.2 * len(blocks)))
    for ax, (bm, bn) in zip(np.atleast_1d(axes), blocks):
        layout = replace(policy, csla_block=(bm, bn)).csla_layout(schedule, scale)
        ax.imshow(layout.block_mask().numpy(), cmap="Greys", aspect="auto", interpolation="nearest")
        for start in schedule.offsets[1: scale + 1]:  # scale boundaries along the key axis
            ax.axvline(start / bn - 0.5, color="#c0392b", linewidth=0.4)
        ax.set_title(f"{bm}x{bn} blocks: {layout.density:.1%} of tiles computed (token density {layout.token_density:.2%})",
                     fontsize=10)
        ax.set_xlabel("key block (raster order, red lines = scale boundaries)")
        ax.set_ylabel("query block")
    fig.suptitle(f"CSLA block mask at scale {scale} {schedule.grids[scale]}, KV {schedule.kv_len(scale)}")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="infinity-2b")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--query-row", type=int, default=20)
    parser.add_argument("--query-col", type=int, default=45)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    schedule = get_schedule(args.resolution)
    policy = default_policy(args.model, schedule)
    scale = schedule.num_scales - 1
    h, w = schedule.grids[scale]
    if not (0 <= args.query_row < h and 0 <= args.query_col < w):
        parser.error(f"query ({args.query_row}, {args.query_col}) is outside the last grid {h}x{w}")
    args.out.mkdir(parents=True, exist_ok=True)
    plot_query_windows(policy, schedule, scale, args.query_row, args.query_col, args.out / "csla_query_windows.png")
    plot_block_masks(policy, schedule, scale, [(128, 128), (128, 64)], args.out / "csla_block_mask.png")
    print(f"wrote {args.out / 'csla_query_windows.png'} and {args.out / 'csla_block_mask.png'}")


if __name__ == "__main__":
    main()
