"""`sparvar serve`: one built engine, loaded once and kept warm, answering generation requests over HTTP.

A one-shot `sparvar generate --engine` pays the engine's load (and, on the GPU, the CUDA-graph capture and the
kernels' autotuning) on every call; the latencies in bench/results are those of a warm engine, which is what a
long-lived process serves. Requests run one at a time (one engine, one device); a health check answers meanwhile.

    POST /generate   {"prompt": "a red fox", "seed": 0, "cfg": 4.0, "tau": 1.0, "top_k": 0, "top_p": 0.97}
                     -> 200 image/png (headers X-Sparvar-Seed, X-Sparvar-Latency-Ms); only "prompt" is required,
                     the sampling options default to the model family's
    GET  /health     -> 200 application/json: the engine (model, resolution, attention, backend, dtype) and counts
    bad input        -> 400 application/json {"error": "..."} naming the problem; unknown path 404
"""
from __future__ import annotations

import io
import json
import math
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

MAX_BODY_BYTES = 64 << 10
SAMPLING_FIELDS = ("cfg", "tau", "top_k", "top_p")
REQUEST_FIELDS = ("prompt", "seed") + SAMPLING_FIELDS


class RequestError(ValueError):
    """A request the service refuses (HTTP 400), with a message naming the problem."""


class GenerationService:
    """A loaded engine pipeline and its text source; `generate(request) -> PNG bytes`, one request at a time."""

    def __init__(self, engine_dir: str, t5: str | None = None, qwen: str | None = None, skip_last: int = 0):
        from .config import get_config
        from .engine import read_manifest
        from .pipeline import check_text_sources
        from .runtime import load_engine_pipeline

        self.engine_dir = engine_dir
        self.spec = read_manifest(engine_dir)["spec"]
        if self.spec.get("batch", 1) != 1:
            raise ValueError(f"{engine_dir} was built for batch {self.spec['batch']}; sparvar serve answers one prompt "
                             "per request and runs batch-1 engines")
        cfg = get_config(self.spec["model"])  # the text source is checked before the (large) weights load
        check_text_sources(cfg, t5=t5, qwen=qwen)
        if not (t5 or qwen or self.spec["weights"] is None or cfg.text_encoder == "hashed"):
            encoder = "--qwen DIR" if getattr(cfg, "family", "infinity") == "hart" else "--t5 DIR"
            raise ValueError(f"{engine_dir} runs real weights: give its text encoder ({encoder}) to serve prompts")
        self.pipe = load_engine_pipeline(engine_dir, skip_last=skip_last)
        self.t5, self.qwen = t5, qwen
        self.lock = threading.Lock()
        self.served = 0
        self.failed = 0

    def info(self) -> dict:
        keys = ("model", "resolution", "aspect", "attention", "backend", "dtype", "weights")
        return {"engine": self.engine_dir, **{k: self.spec.get(k) for k in keys}, "skip_last": self.pipe.skip_last,
                "served": self.served, "failed": self.failed}

    def warm_up(self) -> float:
        """One generation before serving (the engine's first loads sessions or captures graphs and tunes kernels, which
        should not be a client's wait); not counted as served. Returns its milliseconds."""
        _, ms = self.generate({"prompt": "warm-up"})
        self.served -= 1
        return ms

    def parse(self, request) -> tuple[str, int, object]:
        """(prompt, seed, sampling) of a request body, or a RequestError naming what is wrong."""
        if not isinstance(request, dict):
            raise RequestError(f"the request must be a JSON object, got {type(request).__name__}")
        unknown = sorted(set(request) - set(REQUEST_FIELDS))
        if unknown:
            raise RequestError(f"unknown field(s) {', '.join(unknown)}; a request takes {', '.join(REQUEST_FIELDS)}")
        prompt = request.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError("'prompt' must be a non-empty string")
        seed = request.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise RequestError(f"'seed' must be an integer in [0, 2^63), got {seed!r}")
        options = {k: request.get(k) for k in SAMPLING_FIELDS}
        for name, value in options.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise RequestError(f"'{name}' must be a finite number, got {value!r}")
        try:  # the family's own checks (Sampling / HartSampling): tau > 0, top_k in {0, 1, 2}, top_p in [0, 1]
            sampling = self.pipe.sampling(**options)
        except (TypeError, ValueError) as e:
            raise RequestError(str(e)) from None
        return prompt, seed, sampling

    def generate(self, request) -> tuple[bytes, float]:
        """(PNG bytes, milliseconds the generation took) for one request."""
        from PIL import Image

        from .engine import EngineError
        from .pipeline import image_arrays

        prompt, seed, sampling = self.parse(request)
        with self.lock:
            t0 = time.perf_counter()
            try:
                features, lengths = self.pipe.text_features([prompt], t5=self.t5, qwen=self.qwen,
                                                            allow_hashed=self.pipe.random_weights)
                with torch.no_grad():
                    image = self.pipe.generate(features, lengths, sampling=sampling, seed=seed).image
                # to host memory under the lock: the image may be a graph's static output that the next request's
                # replay overwrites, and GPU work from this thread must not overlap another request's graph capture
                pixels = image_arrays(image)[0]
            except EngineError as e:  # what this engine cannot run (e.g. cfg 1 on an engine built with guidance)
                raise RequestError(str(e)) from None
            except Exception:
                self.failed += 1
                raise
            ms = 1000 * (time.perf_counter() - t0)
            self.served += 1
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return buf.getvalue(), ms


def make_handler(service: GenerationService, log=None):
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: dict):
            self._send(status, json.dumps(payload).encode(), "application/json")

        def do_GET(self):
            if self.path != "/health":
                return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}; try POST /generate"})
            self._json(HTTPStatus.OK, service.info())

        def do_POST(self):
            if self.path != "/generate":
                return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}; try POST /generate"})
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "a Content-Length header is required"})
            if not 0 < length <= MAX_BODY_BYTES:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": f"the body must be 1 to {MAX_BODY_BYTES} bytes, "
                                                                    f"got {length}"})
            try:
                request = json.loads(self.rfile.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": f"the body is not JSON: {e}"})
            try:
                png, ms = service.generate(request)
            except RequestError as e:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            except Exception as e:  # the engine failed: say so, keep serving
                return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})
            self._send(HTTPStatus.OK, png, "image/png",
                       {"X-Sparvar-Seed": str(request.get("seed", 0)), "X-Sparvar-Latency-Ms": f"{ms:.1f}"})

        def log_message(self, format, *args):  # noqa: A002 (the base class's name)
            if log is not None:
                log(f"{self.address_string()} {format % args}")

    return Handler


def make_server(service: GenerationService, host: str = "127.0.0.1", port: int = 8000, log=None) -> ThreadingHTTPServer:
    """The HTTP server (not started): `serve_forever()` runs it; port 0 picks a free port (`server.server_port`)."""
    return ThreadingHTTPServer((host, port), make_handler(service, log))
