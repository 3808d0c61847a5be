"""`sparvar serve`: one built engine, loaded once and kept warm, answering generation requests over HTTP.

A one-shot `sparvar generate --engine` pays the engine's load (and, on the GPU, the CUDA-graph capture and the
kernels' autotuning) on every call; the latencies in bench/results are those of a warm engine, which is what a
long-lived process serves. Engine calls run one at a time (one engine, one device); a health check answers meanwhile.
An engine built for N prompts per call (`sparvar engine build --batch N`) serves up to N concurrent requests with
the same sampling options in one call: the oldest waits for company up to --batch-wait-ms after its arrival or
after the previous call ended, whichever is later; a short batch is padded with copies of its last request, and
every row has its own seed, so a request's image does not depend on which requests shared its call
(sparvar.generate.SeededRows). The small scales cost about the same for N prompts as for one, which is where
batching gains throughput.

    POST /generate   {"prompt": "a red fox", "seed": 0, "cfg": 4.0, "tau": 1.0, "top_k": 0, "top_p": 0.97}
                     -> 200 image/png (headers X-Sparvar-Seed, X-Sparvar-Latency-Ms); only "prompt" is required,
                     the sampling options default to the model family's
                     (and X-Sparvar-Batch: how many requests shared the engine call)
    GET  /health     -> 200 application/json: the engine (model, resolution, attention, backend, dtype) and counts
    bad input        -> 400 application/json {"error": "..."} naming the problem; unknown path 404
"""
from __future__ import annotations

import io
import json
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from .generate import finite_number
from .text import check_prompt

MAX_BODY_BYTES = 64 << 10
# an over-long body is read and dropped up to this many bytes before the 413 goes out: a reply to a client still
# sending would be lost to the connection's reset (the client sees a broken pipe, not the error)
MAX_DRAINED_BYTES = 16 << 20
SOCKET_TIMEOUT_S = 60
SAMPLING_FIELDS = ("cfg", "tau", "top_k", "top_p")
REQUEST_FIELDS = ("prompt", "seed") + SAMPLING_FIELDS


class RequestError(ValueError):
    """A request the service refuses (HTTP 400), with a message naming the problem."""


@dataclass(eq=False)  # jobs are told apart by identity
class _Job:
    """One parsed request waiting for its row of an engine call."""
    prompt: str
    seed: int
    sampling: object
    arrival: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    pixels: object = None  # (H, W, 3) uint8 numpy: its row of the engine call's images
    ms: float = 0.0
    shared: int = 1  # requests in its engine call
    error: Exception | None = None


class GenerationService:
    """A loaded engine pipeline and its text source; `generate(request) -> (PNG bytes, ms)`. One engine call at a time,
    each serving up to the engine's batch of requests (see the module docstring)."""

    def __init__(self, engine_dir: str, t5: str | None = None, qwen: str | None = None, skip_last: int = 0,
                 batch_wait_ms: float = 10.0):
        from .config import get_config
        from .engine import read_manifest
        from .pipeline import check_text_sources
        from .runtime import load_engine_pipeline

        self.engine_dir = engine_dir
        self.manifest = read_manifest(engine_dir)
        self.spec = self.manifest["spec"]
        self.batch = self.spec.get("batch", 1)  # prompts per engine call
        self.batch_wait = batch_wait_ms / 1000
        cfg = get_config(self.spec["model"])  # the text source is checked before the (large) weights load
        check_text_sources(cfg, t5=t5, qwen=qwen)
        if not (t5 or qwen or self.spec["weights"] is None or cfg.text_encoder == "hashed"):
            encoder = "--qwen DIR" if getattr(cfg, "family", "infinity") == "hart" else "--t5 DIR"
            raise ValueError(f"{engine_dir} runs real weights: give its text encoder ({encoder}) to serve prompts")
        self.pipe = load_engine_pipeline(engine_dir, skip_last=skip_last)
        self.t5, self.qwen = t5, qwen
        self.lock = threading.Lock()  # one engine call at a time
        self.served = 0
        self.failed = 0
        self.calls = 0
        self.queue: queue.Queue[_Job] = queue.Queue()
        if self.batch > 1:  # one thread forms the batches; request threads wait for their row
            threading.Thread(target=self._batch_forever, name="sparvar-batcher", daemon=True).start()

    def info(self) -> dict:
        keys = ("model", "resolution", "aspect", "attention", "backend", "dtype", "weights", "batch")
        return {"engine": self.engine_dir, **{k: self.spec.get(k) for k in keys}, "skip_last": self.pipe.skip_last,
                "served": self.served, "failed": self.failed, "engine_calls": self.calls}

    def warm_up(self) -> float:
        """One generation before serving (the engine's first loads sessions or captures graphs and tunes kernels, which
        should not be a client's wait); not counted. Returns its milliseconds."""
        from .pipeline import default_prompt

        job = _Job(default_prompt(self.pipe.cfg), 0, self.pipe.sampling())
        self._run([job], count=False)
        if job.error is not None:
            raise job.error
        png_bytes(job.pixels)  # the PNG encoder's first use (imports, plugin) is not a client's wait either
        return job.ms

    def parse(self, request) -> tuple[str, int, object]:
        """(prompt, seed, sampling) of a request body, or a RequestError naming what is wrong."""
        from .engine import EngineError
        from .pipeline import check_known_prompts
        from .runtime import check_engine_request

        if not isinstance(request, dict):
            raise RequestError(f"the request must be a JSON object, got {type(request).__name__}")
        unknown = sorted(set(request) - set(REQUEST_FIELDS))
        if unknown:
            raise RequestError(f"unknown field(s) {', '.join(unknown)}; a request takes {', '.join(REQUEST_FIELDS)}")
        prompt = request.get("prompt")
        try:
            check_prompt(prompt)
        except ValueError as e:
            raise RequestError(f"'prompt' {e}") from None
        try:  # a class-conditional model's class names (the message names them)
            check_known_prompts(self.pipe.cfg, [prompt])
        except ValueError as e:
            raise RequestError(str(e)) from None
        seed = request.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise RequestError(f"'seed' must be an integer in [0, 2^63), got {seed!r}")
        options = {k: request.get(k) for k in SAMPLING_FIELDS}
        for name, value in options.items():
            if value is not None and not finite_number(value):
                raise RequestError(f"'{name}' must be a finite number, got {value!r}")
        try:  # the family's own checks (Sampling / HartSampling): tau > 0, top_k in {0, 1, 2}, top_p in [0, 1]
            sampling = self.pipe.sampling(**options)
        except (TypeError, ValueError) as e:
            raise RequestError(str(e)) from None
        try:  # what this engine runs (e.g. no cfg 1 on an engine built with guidance): the request's fault, a 400
            check_engine_request(self.manifest, self.batch, sampling.guided)
        except EngineError as e:
            raise RequestError(str(e)) from None
        return prompt, seed, sampling

    def generate(self, request) -> tuple[bytes, float]:
        """(PNG bytes, milliseconds of the engine call that made it) for one request."""
        return self.submit(request)[:2]

    def submit(self, request) -> tuple[bytes, float, int]:
        """(PNG, engine-call milliseconds, requests in that call) for one request; RequestError for a bad one."""
        prompt, seed, sampling = self.parse(request)
        job = _Job(prompt, seed, sampling)
        if self.batch == 1:
            self._run([job])
        else:
            self.queue.put(job)
            job.done.wait()
        if job.error is not None:
            raise job.error
        # each request encodes its own PNG, in its own thread and outside the engine lock: a 1024² image takes
        # ~0.1 s, and the batcher encoding a batch's images one after another held back the next engine call
        return png_bytes(job.pixels), job.ms, job.shared

    def _batch_forever(self) -> None:
        """Form engine calls: the oldest waiting request's group (same sampling), filled until the engine's batch, or
        until batch_wait has passed since that request arrived or since the previous call ended, whichever is later,
        or until another group is full (a full group never waits out another's window).

        Counting from the previous call's end (when that call had the same sampling): a request that arrived while
        the engine was busy lost nothing by waiting, and the clients that call just answered are about to come back.
        Counted from its arrival alone, it ran by itself the moment the engine freed, and its company then waited for
        the next call: concurrent clients fell out of step for good (on the CPU, 24 requests from 2 clients made 23
        calls of a batch-2 engine). A group of other sampling has no such clients coming: its window is its own."""
        waiting: list[_Job] = []  # taken from the queue, oldest first
        free_since, last_sampling = 0.0, None  # when the previous engine call ended, and its sampling
        while True:
            try:
                if not waiting:
                    waiting.append(self.queue.get())
                while not self.queue.empty():
                    waiting.append(self.queue.get_nowait())
                first = waiting[0]
                group = [j for j in waiting if j.sampling == first.sampling][: self.batch]
                since = max(first.arrival, free_since) if first.sampling == last_sampling else first.arrival
                deadline = since + self.batch_wait
                while len(group) < self.batch and not self._another_group_full(waiting, first.sampling):
                    try:
                        job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    waiting.append(job)
                    if job.sampling == first.sampling:
                        group.append(job)
                taken = {id(j) for j in group}
                waiting = [j for j in waiting if id(j) not in taken]
            except Exception as e:  # noqa: BLE001 (a fault while forming the call: answer whoever waits, keep serving)
                for job in waiting:
                    job.error = RuntimeError(f"the request batcher failed ({type(e).__name__}: {e})")
                    job.done.set()
                waiting = []
                continue
            try:
                self._run(group)
            except BaseException:  # noqa: BLE001 (every job of the call has its answer; the batcher keeps serving)
                pass
            free_since, last_sampling = time.monotonic(), first.sampling

    def _another_group_full(self, waiting: list[_Job], sampling) -> bool:
        others = [j.sampling for j in waiting if j.sampling != sampling]
        return any(others.count(s) >= self.batch for s in set(others))

    def _run(self, jobs: list[_Job], count: bool = True) -> None:
        """One engine call for `jobs` (same sampling), padded to the engine's batch; each job gets its row of pixels or
        an error. count: whether the call shows in the served / failed / engine_calls counters (not the warm-up)."""
        from .pipeline import image_arrays

        pad = self.batch - len(jobs)  # the engine's graphs take exactly its batch
        prompts = [j.prompt for j in jobs] + [jobs[-1].prompt] * pad
        seeds = [j.seed for j in jobs] + [jobs[-1].seed] * pad
        try:
            with self.lock:
                t0 = time.perf_counter()
                try:
                    features, lengths = self.pipe.text_features(prompts, t5=self.t5, qwen=self.qwen,
                                                                allow_hashed=self.pipe.random_weights)
                    with torch.no_grad():
                        image = self.pipe.generate(features, lengths, sampling=jobs[0].sampling, seed=seeds).image
                    # to host memory under the lock: the image may be a graph's static output that the next call's
                    # replay overwrites, and GPU work from this thread must not overlap another call's graph capture
                    pixels = image_arrays(image)[: len(jobs)]
                except BaseException:  # a request this engine cannot run was refused in parse: this is the engine's
                    # (an EngineError too: a graph changed on disk since the load), a 500 counted as failed
                    self.failed += len(jobs) if count else 0
                    raise
                ms = 1000 * (time.perf_counter() - t0)
                if count:
                    self.served += len(jobs)
                    self.calls += 1
            for job, rgb in zip(jobs, pixels):
                job.pixels, job.ms, job.shared = rgb, ms, len(jobs)
        except BaseException as e:  # every request of the call hears of it
            error = e if isinstance(e, Exception) else RuntimeError(f"the engine call was interrupted ({type(e).__name__})")
            for job in jobs:
                job.error = error
            if not isinstance(e, Exception):
                raise
        finally:
            for job in jobs:
                if job.pixels is None and job.error is None:  # never leave a request without an answer
                    job.error = RuntimeError("the engine call ended without a result")
                job.done.set()


def png_bytes(rgb) -> bytes:
    """(H, W, 3) uint8 pixels -> PNG file bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def make_handler(service: GenerationService, log=None):
    class Handler(BaseHTTPRequestHandler):
        # seconds a socket read or write may stall: a client that announces a body it never sends would otherwise
        # hold its thread for good (the wait for the engine is not a socket operation and is not limited by it)
        timeout = SOCKET_TIMEOUT_S

        def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _drop_body(self, size: int):
            """Read and discard `size` bytes of the request body (less if the client stops sending: the socket's
            timeout ends the wait)."""
            try:
                while size > 0:
                    chunk = self.rfile.read(min(size, 1 << 16))
                    if not chunk:
                        break
                    size -= len(chunk)
            except OSError:  # a timeout or a reset: the reply is best effort then
                pass

        def _json(self, status: int, payload: dict):
            self._send(status, json.dumps(payload).encode(), "application/json")

        def do_GET(self):
            if self.path != "/health":
                return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}; try POST /generate"})
            self._json(HTTPStatus.OK, service.info())

        def do_POST(self):
            if self.path != "/generate":
                return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}; try POST /generate"})
            declared = self.headers.get("Content-Length")
            try:
                length = int(declared if declared is not None else "")
            except ValueError:  # missing (a chunked body too): 411; present but not a number: a bad request
                status = HTTPStatus.LENGTH_REQUIRED if declared is None else HTTPStatus.BAD_REQUEST
                return self._json(status, {"error": "a Content-Length header with the body's size in bytes is "
                                                    f"required, got {declared!r}"})
            problem = {"error": f"the body must be 1 to {MAX_BODY_BYTES} bytes, got {length}"}
            if length <= 0:
                return self._json(HTTPStatus.BAD_REQUEST, problem)
            if length > MAX_BODY_BYTES:
                self._drop_body(min(length, MAX_DRAINED_BYTES))
                self.close_connection = True  # whatever of the body is left unread ends with the connection
                return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, problem)
            try:
                request = json.loads(self.rfile.read(length))
            except (ValueError, RecursionError) as e:  # not JSON or not UTF-8; an integer of over 4,300 digits; deep nesting
                return self._json(HTTPStatus.BAD_REQUEST, {"error": f"the body is not a JSON request: {e}"})
            try:
                png, ms, shared = service.submit(request)
            except RequestError as e:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            except Exception as e:  # the engine failed: say so, keep serving
                return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})
            self._send(HTTPStatus.OK, png, "image/png",
                       {"X-Sparvar-Seed": str(request.get("seed", 0)), "X-Sparvar-Latency-Ms": f"{ms:.1f}",
                        "X-Sparvar-Batch": str(shared)})

        def log_message(self, format, *args):  # noqa: A002 (the base class's name)
            if log is not None:
                log(f"{self.address_string()} {format % args}")

    return Handler


def check_listen_address(host: str, port: int) -> None:
    """Bind (host, port) as make_server will, and let go: OSError now for a taken port or a host that is not this
    machine's, rather than after the minutes an 8B engine takes to load and warm up."""
    with socket.socket(ThreadingHTTPServer.address_family, socket.SOCK_STREAM) as probe:
        if ThreadingHTTPServer.allow_reuse_address:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def make_server(service: GenerationService, host: str = "127.0.0.1", port: int = 8000, log=None) -> ThreadingHTTPServer:
    """The HTTP server (not started): `serve_forever()` runs it; port 0 picks a free port (`server.server_port`)."""
    return ThreadingHTTPServer((host, port), make_handler(service, log))
