"""Throughput of `sparvar serve` with request batching, side by side in one process: the same model's engine built
for 1 and for N prompts per call, each behind a warm server, each sent the same requests by the same
concurrent clients (--clients, default N).

With the batch-N engine, concurrent requests with the same sampling share one engine call (sparvar/serve.py). Timed:
the wall time from the first request to the last image (images/s), and each request's latency (request to PNG
bytes), median and spread. Every request has its own seed; the images do not depend on the batching.

    python bench/serve_batching.py [--model infinity-tiny] [--batch 2] [--requests 24]   # serve_batching_<device>.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import bench_prompts, result_path, summarize, write_result  # noqa: E402


def drive(url: str, requests: int, clients: int, prompts: list[str]) -> dict:
    """`requests` POSTs from `clients` threads at once, `prompts` alternating; wall time, images/s and per-request
    latencies."""
    def one(i):
        body = json.dumps({"prompt": prompts[i % len(prompts)], "seed": i}).encode()
        t0 = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url + "/generate", data=body), timeout=600) as r:
            r.read()
            shared, engine_ms = int(r.headers["X-Sparvar-Batch"]), float(r.headers["X-Sparvar-Latency-Ms"])
        return 1000 * (time.perf_counter() - t0), shared, engine_ms

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    # the engine call's own time (text, generation, pixels to the host; under the engine lock) beside the request's:
    # the difference is queueing, PNG encoding and HTTP. Summed over requests as each one's share of its call, it
    # counts every call once: the engine's busy time
    busy_s = sum(e / s for _, s, e in results) / 1000
    return {"wall_s": wall, "images_per_s": requests / wall, "latency": summarize([ms for ms, _, _ in results]),
            "engine_call": summarize([e for _, _, e in results]), "engine_busy_fraction": busy_s / wall,
            "mean_requests_per_engine_call": sum(s for _, s, _ in results) / len(results)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="infinity-tiny")
    ap.add_argument("--attention", default="sparvar")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--batch", type=int, default=2, help="prompts per call of the batched engine")
    ap.add_argument("--clients", type=int, default=None,
                    help="concurrent clients, each sending its next request when answered (default: --batch). With "
                         "only as many clients as the batch, every call waits for the slowest client to come back")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--batch-wait-ms", type=float, default=10.0)
    ap.add_argument("--out", default=None, help="default: bench/results/serve_batching_<device>.json")
    args = ap.parse_args()
    clients = args.batch if args.clients is None else args.clients
    if args.batch < 2 or clients < 1 or args.requests < 1:
        ap.error("--batch must be at least 2 (batch 1 is the baseline row), --clients and --requests at least 1")
    from sparvar.config import get_config
    from sparvar.engine import build_engine
    from sparvar.runtime import spec_from_args
    from sparvar.serve import GenerationService, make_server

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (1, args.batch):
            spec = spec_from_args(argparse.Namespace(
                model=args.model, resolution=get_config(args.model).default_resolution, aspect=None,
                attention=args.attention, backend=args.backend, dtype=None, weights=None, vae=None, batch=batch))
            engine_dir = os.path.join(tmp, f"batch{batch}")
            build_engine(spec, engine_dir, log=lambda *a, **k: None)
            service = GenerationService(engine_dir, batch_wait_ms=args.batch_wait_ms)
            service.warm_up()  # what `sparvar serve` does before it listens
            server = make_server(service, "127.0.0.1", 0)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            try:
                prompts = bench_prompts(args.model, ["a small dog on the grass", "a red car"])
                rows[f"engine batch {batch}"] = {**drive(f"http://127.0.0.1:{server.server_port}", args.requests,
                                                         clients, prompts), "engine_calls": service.calls}
            finally:
                server.shutdown()
                server.server_close()
            row = rows[f"engine batch {batch}"]
            print(f"batch {batch}: {row['images_per_s']:.2f} images/s, latency median {row['latency']['median_ms']:.0f} "
                  f"ms, engine call median {row['engine_call']['median_ms']:.0f} ms, engine busy "
                  f"{100 * row['engine_busy_fraction']:.0f}%", flush=True)
    one, many = rows["engine batch 1"], rows[f"engine batch {args.batch}"]
    result = {"benchmark": "sparvar serve throughput, batch-1 vs batch-N engine, concurrent clients",
              "engine": {"model": spec.model, "resolution": spec.resolution, "attention": spec.attention,
                         "backend": spec.backend, "dtype": spec.dtype, "weights": "random"},
              "rows": rows, "throughput_ratio": many["images_per_s"] / one["images_per_s"],
              "protocol": f"{args.requests} requests (distinct seeds, two prompts alternating, default sampling) from "
                          f"{clients} concurrent clients to each warm server, batch 1 first, in one process; "
                          f"--batch-wait-ms {args.batch_wait_ms}"}
    path = write_result(args.out or result_path("serve_batching"), result)
    print(f"throughput x{result['throughput_ratio']:.2f}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
