"""What a long-lived `sparvar serve` saves over one-shot `sparvar generate --engine`, side by side in one process.

The one-shot command loads the engine for every image (sessions on the CPU; weights, graph capture and kernel tuning
on the GPU); the server loads it once. Both make the same image for the same prompt and seed (tests/test_serve.py).
Timed here: the wall time of the one-shot command (a fresh Python process, as a user runs it), and the wall time of
an HTTP request to a warm server (request to PNG bytes), each the median of several runs.

    python bench/serve_latency.py [--model infinity-tiny] [--backend onnxruntime]   # writes serve_<device>.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import bench_prompts, result_path, summarize, write_result  # noqa: E402


def time_requests(url: str, runs: int, prompt: str) -> dict:
    times = []
    for i in range(runs):
        body = json.dumps({"prompt": prompt, "seed": i}).encode()
        t0 = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url + "/generate", data=body), timeout=600) as r:
            r.read()
        times.append(1000 * (time.perf_counter() - t0))
    return summarize(times)


def time_one_shot(engine_dir: str, runs: int, out_dir: str, prompt: str) -> dict:
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sparvar.cli", "generate", "--engine", engine_dir, "--prompt", prompt,
                        "--seed", str(i), "--out", os.path.join(out_dir, f"{i}.png")], check=True, cwd=ROOT,
                       capture_output=True)
        times.append(1000 * (time.perf_counter() - t0))
    return summarize(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="infinity-tiny")
    ap.add_argument("--attention", default="sparvar")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--one-shot-runs", type=int, default=5)
    ap.add_argument("--out", default=None, help="default: bench/results/serve_<device>.json")
    args = ap.parse_args()
    from sparvar.config import get_config
    from sparvar.engine import build_engine
    from sparvar.runtime import spec_from_args
    from sparvar.serve import GenerationService, make_server

    # the engine `sparvar engine build` makes for these options (its default resolution and dtype)
    spec = spec_from_args(argparse.Namespace(model=args.model, resolution=get_config(args.model).default_resolution,
                                             aspect="1:1", attention=args.attention, backend=args.backend, dtype=None,
                                             weights=None, vae=None))
    with tempfile.TemporaryDirectory() as tmp:
        engine_dir = os.path.join(tmp, "engine")
        build_engine(spec, engine_dir, log=lambda *a, **k: None)
        prompt = bench_prompts(args.model, ["a red car"])[0]
        one_shot = time_one_shot(engine_dir, args.one_shot_runs, tmp, prompt)
        t0 = time.perf_counter()
        service = GenerationService(engine_dir)
        load_ms = 1000 * (time.perf_counter() - t0)
        first_ms = service.warm_up()  # what `sparvar serve` does before it listens
        server = make_server(service, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            served = time_requests(f"http://127.0.0.1:{server.server_port}", args.requests, prompt)
        finally:
            server.shutdown()
            server.server_close()
    result = {"benchmark": "one-shot `sparvar generate --engine` vs a request to a warm `sparvar serve`",
              "engine": {"model": spec.model, "resolution": spec.resolution, "attention": spec.attention,
                         "backend": spec.backend, "dtype": spec.dtype, "weights": "random"},
              "one_shot_command": one_shot, "server_load_ms": load_ms, "server_first_generation_ms": first_ms,
              "warm_request": served, "one_shot_over_warm_request": one_shot["median_ms"] / served["median_ms"],
              "protocol": f"median of {args.one_shot_runs} one-shot commands (fresh processes) and of {args.requests} "
                          "HTTP requests (distinct seeds) to one server, in this order, in one process"}
    path = write_result(args.out or result_path("serve"), result)
    print(f"one-shot {one_shot['median_ms']:.0f} ms, warm request {served['median_ms']:.0f} ms "
          f"({result['one_shot_over_warm_request']:.1f}x); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
