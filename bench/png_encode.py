"""What `sparvar serve` pays to encode its answers: one 1024² PNG (sparvar.serve.png_bytes), and a batch of 4
encoded one after another (what the batcher did before d88ba27) against 4 request threads at once (what it does now;
Pillow releases the GIL while it compresses). Random-weight models draw noise-like images, which compress worst; a
smooth gradient stands for the other end.

    python bench/png_encode.py   # writes bench/results/png_encode_<device>.json
"""
from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import result_path, summarize, write_result  # noqa: E402


def timed(fn, runs: int) -> dict:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return summarize(times)


def main() -> int:
    from sparvar.serve import png_bytes

    side, batch, runs = 1024, 4, 10
    ramp = np.linspace(0, 255, side)
    images = {"noise (random weights)": np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8),
              "smooth gradient": np.repeat(np.add.outer(ramp, ramp)[:, :, None] / 2, 3, axis=2).astype(np.uint8)}

    def in_threads(rgb):
        threads = [threading.Thread(target=png_bytes, args=(rgb,)) for _ in range(batch)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    rows = {}
    for name, rgb in images.items():
        png_bytes(rgb)  # warm-up: the plugin's first use
        rows[name] = {"png_bytes": len(png_bytes(rgb)), "one_image": timed(lambda: png_bytes(rgb), runs),
                      f"{batch}_one_after_another": timed(lambda: [png_bytes(rgb) for _ in range(batch)], runs),
                      f"{batch}_threads_at_once": timed(lambda: in_threads(rgb), runs)}
        r = rows[name]
        print(f"{name}: one {r['one_image']['median_ms']:.0f} ms; {batch} one after another "
              f"{r[f'{batch}_one_after_another']['median_ms']:.0f} ms, in {batch} threads "
              f"{r[f'{batch}_threads_at_once']['median_ms']:.0f} ms", flush=True)
    path = write_result(result_path("png_encode"), {
        "benchmark": "PNG encoding of one generated image (sparvar.serve.png_bytes)", "image": [side, side, 3],
        "protocol": f"median of {runs} runs after one warm-up, Pillow's default compression", "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
