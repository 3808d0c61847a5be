"""`sparvar serve` on the CPU: a warm infinity-tiny onnxruntime engine behind HTTP answers with the image
`sparvar generate --engine` writes for the same prompt and seed, and refuses bad requests with a 400 naming them."""
import http.client
import io
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from sparvar.cli import main
from sparvar.pipeline import image_arrays
from sparvar.serve import GenerationService, make_server


@pytest.fixture(scope="module")
def server(engines):
    service = GenerationService(engines["sparvar"])
    httpd = make_server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", service
    httpd.shutdown()
    httpd.server_close()


def _post(url, body, raw=False):
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url + "/generate", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_generate_returns_the_cli_image(server, engines, tmp_path, capsys):
    url, _ = server
    status, headers, png = _post(url, {"prompt": "a red car", "seed": 5, "cfg": 3.0})
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert headers["X-Sparvar-Seed"] == "5" and float(headers["X-Sparvar-Latency-Ms"]) > 0
    out = str(tmp_path / "cli.png")
    assert main(["generate", "--engine", engines["sparvar"], "--prompt", "a red car", "--seed", "5", "--cfg", "3",
                 "--out", out]) == 0
    capsys.readouterr()
    served = _pixels(png)
    assert served.shape == (256, 256, 3)
    np.testing.assert_array_equal(served, np.asarray(Image.open(out)))
    again = _post(url, {"prompt": "a red car", "seed": 5, "cfg": 3.0})[2]
    other = _post(url, {"prompt": "a red car", "seed": 6, "cfg": 3.0})[2]
    assert again == png and not np.array_equal(_pixels(other), served)


@pytest.mark.parametrize("body,message", [
    ({}, "'prompt' must be a non-empty string"),
    ({"prompt": "  "}, "'prompt' must be a non-empty string"),
    # a lone surrogate (a JSON escape no UTF-8 holds) failed in the text encoder, for every request batched with it
    ({"prompt": "a \ud800 cat"}, "'prompt' must be valid UTF-8 text"),
    ({"prompt": "a cat", "temperature": 2}, "unknown field(s) temperature"),
    ({"prompt": "a cat", "seed": -1}, "'seed' must be an integer"),
    ({"prompt": "a cat", "seed": "3"}, "'seed' must be an integer"),
    ({"prompt": "a cat", "top_k": 5}, "top_k must be 0, 1 or 2"),
    ({"prompt": "a cat", "tau": 0}, "tau must be > 0"),
    ({"prompt": "a cat", "cfg": "high"}, "'cfg' must be a finite number"),
    ({"prompt": "a cat", "top_p": float("nan")}, "'top_p' must be a finite number"),
    ({"prompt": "a cat", "cfg": 10**400}, "'cfg' must be a finite number"),  # an int beyond float's range
    ({"prompt": "a cat", "cfg": 1.0}, "built with classifier-free guidance"),  # the engine's own refusal
    (["a cat"], "must be a JSON object"),
])
def test_bad_requests_get_400_naming_the_problem(server, body, message):
    url, service = server
    status, headers, payload = _post(url, body)
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert message in json.loads(payload)["error"]
    assert service.engine_dir not in json.loads(payload)["error"]  # a client is not told the server's paths


def test_malformed_body_unknown_path_and_health(server):
    url, service = server
    # not JSON; an integer json refuses to convert (over 4,300 digits); nesting deeper than the parser's recursion
    for body in (b"{not json", b'{"prompt": "a cat", "seed": ' + b"1" * 5000 + b"}", b"[" * 60_000):
        status, _, payload = _post(url, body, raw=True)
        assert status == 400 and "not a JSON request" in json.loads(payload)["error"], body[:40]
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/generate")
    conn.putheader("Content-Length", "abc")
    conn.endheaders()
    reply = conn.getresponse()
    assert reply.status == 400 and "got 'abc'" in json.loads(reply.read())["error"]
    conn.close()
    conn = http.client.HTTPConnection(host, int(port), timeout=30)  # no length at all (a chunked body): 411
    conn.putrequest("POST", "/generate")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"0\r\n\r\n")
    reply = conn.getresponse()
    assert reply.status == 411 and "got None" in json.loads(reply.read())["error"]
    conn.close()
    from sparvar.serve import MAX_BODY_BYTES

    conn = http.client.HTTPConnection(host, int(port), timeout=30)  # an empty body
    conn.putrequest("POST", "/generate")
    conn.putheader("Content-Length", "0")
    conn.endheaders()
    reply = conn.getresponse()
    assert reply.status == 400 and f"1 to {MAX_BODY_BYTES} bytes, got 0" in json.loads(reply.read())["error"]
    conn.close()
    # bodies over the limit, sent whole (a pasted document): 413 with the reason, not a reset connection (the
    # server replied before reading them, and the client, still sending, got a broken pipe)
    for length in (MAX_BODY_BYTES + 1, 5 << 20):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url + "/generate", data=b" " * length), timeout=60)
        assert e.value.code == 413
        assert f"1 to {MAX_BODY_BYTES} bytes, got {length}" in json.loads(e.value.read())["error"]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "/nope", timeout=30)
    assert e.value.code == 404
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        health = json.loads(r.read())
    assert health["model"] == "infinity-tiny" and health["attention"] == "sparvar"
    assert health["backend"] == "onnxruntime" and health["served"] == service.served and health["failed"] == service.failed


def test_warm_up_generates_without_counting_a_request(server):
    _, service = server
    before = service.served
    assert service.warm_up() > 0 and service.served == before


def test_service_refuses_what_it_cannot_serve(engines, tmp_path):
    with pytest.raises(ValueError, match="--t5 is Infinity's text encoder|drop --qwen|--qwen is HART's"):
        GenerationService(engines["sparvar"], qwen="somewhere")
    with pytest.raises(ValueError, match="manifest"):
        GenerationService(str(tmp_path))  # not an engine directory
    with pytest.raises(ValueError, match="--t5 .*nope: no such directory"):  # at start, not as a 500 per request
        GenerationService(engines["sparvar"], t5=str(tmp_path / "nope"))


def test_an_engine_with_real_weights_is_not_served_on_hashed_text(engines, tmp_path):
    """Without its text encoder a real-weights engine would answer every prompt from made-up embeddings: refused at
    start, before its weights load."""
    manifest = json.loads(open(os.path.join(engines["sparvar"], "manifest.json")).read())
    manifest["spec"]["weights"], manifest["spec"]["vae"] = "transformer.safetensors", "tokenizer.pth"
    os.makedirs(tmp_path / "real")
    (tmp_path / "real" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="runs real weights: give its text encoder \\(--t5 DIR\\)"):
        GenerationService(str(tmp_path / "real"))


@pytest.mark.parametrize("args,code,message", [
    (["--skip-last", "-1"], 2, "--skip-last must be >= 0"),
    # at start, not per request (port 0: the port check comes first, and 8000 may be taken on this machine)
    (["--skip-last", "13", "--no-warmup", "--port", "0"], 1, "skip_last must be in [0, 6]"),
    (["--port", "70000"], 2, "--port must be in [0, 65535]"),
    (["--qwen", "q", "--port", "0"], 1, "--qwen is HART's text encoder"),
    (["--batch-wait-ms", "-1"], 2, "--batch-wait-ms must be in"),
    (["--host", "999.1.1.1", "--no-warmup"], 2, "cannot listen on 999.1.1.1:8000"),
])
def test_serve_command_refuses_bad_options(engines, args, code, message, capsys):
    assert main(["serve", "--engine", engines["sparvar"], *args]) == code
    assert message in capsys.readouterr().err


def test_a_taken_port_is_refused_before_the_engine_loads(tmp_path, capsys):
    """The port is tried first: the engine directory here does not even exist, and the error is about the port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--engine", str(tmp_path / "no-engine"), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_a_client_that_never_sends_its_body_is_let_go(engines, monkeypatch):
    """A socket that stalls past SOCKET_TIMEOUT_S is closed, so a client announcing a body it never sends does not
    hold a server thread for good; the server keeps answering others."""
    import sparvar.serve as serve

    monkeypatch.setattr(serve, "SOCKET_TIMEOUT_S", 0.5)
    httpd = make_server(GenerationService(engines["sparvar"]), "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with socket.create_connection(("127.0.0.1", httpd.server_port), timeout=30) as stalled:
            stalled.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
            t0 = time.monotonic()
            assert stalled.recv(1024) == b""  # closed by the server, without an answer
            assert time.monotonic() - t0 < 10
        with urllib.request.urlopen(f"http://127.0.0.1:{httpd.server_port}/health", timeout=30) as r:
            assert r.status == 200
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.gpu
def test_serves_a_torch_cuda_engine(tmp_path):
    """The GPU engine behind the service: graphs captured by the first request, replayed by the next ones (the same
    image for the same request, another for another seed)."""
    from sparvar.engine import EngineSpec, build_engine

    path = str(tmp_path / "cuda")
    build_engine(EngineSpec(model="infinity-tiny", resolution=256, attention="sparvar", backend="torch-cuda",
                            dtype="bf16"), path, log=lambda *a, **k: None)
    service = GenerationService(path)
    first, _ = service.generate({"prompt": "a red car", "seed": 1})
    again, _ = service.generate({"prompt": "a red car", "seed": 1})
    other, _ = service.generate({"prompt": "a red car", "seed": 2})
    assert _pixels(first).shape == (256, 256, 3)
    assert first == again and first != other
    assert service.info()["backend"] == "torch-cuda" and service.served == 3


def test_concurrent_requests_each_get_their_own_image(server, monkeypatch):
    """Requests arrive on threads. Each image reaches host memory while its generation holds the engine: on the GPU the
    image is a graph's static output that the next request's replay overwrites."""
    import sparvar.pipeline

    url, service = server
    to_host = sparvar.pipeline.image_arrays
    held = []

    def checked(images):
        held.append(service.lock.locked())
        return to_host(images)

    monkeypatch.setattr(sparvar.pipeline, "image_arrays", checked)
    want = {seed: _post(url, {"prompt": "a red car", "seed": seed, "cfg": 3.0})[2] for seed in (7, 8, 9)}
    got = {}
    threads = [threading.Thread(target=lambda s=seed: got.__setitem__(s, _post(url, {"prompt": "a red car", "seed": s,
                                                                                    "cfg": 3.0})[2]))
               for seed in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want and len(set(want.values())) == 3
    assert held == [True] * 6


def test_engine_failure_is_a_500_and_the_service_keeps_serving(server, monkeypatch):
    """The engine's failures are 500s, counted as failed: an EngineError too (a graph changed on disk since the load),
    which had been a 400 blaming the client, and uncounted. A request the engine cannot run is a 400 before any call."""
    from sparvar.engine import EngineError

    url, service = server
    calls = []

    def broken(error):
        def generate(*args, **kwargs):
            calls.append(1)
            raise error
        return generate

    failed = service.failed
    for error, message in ((RuntimeError("device lost"), "RuntimeError: device lost"),
                           (EngineError("optimize/text.onnx changed on disk"), "EngineError: optimize/text.onnx changed")):
        with monkeypatch.context() as m:
            m.setattr(service.pipe, "generate", broken(error))
            status, _, payload = _post(url, {"prompt": "a cat"})
        assert status == 500 and json.loads(payload)["error"].startswith(message) and calls
        failed += 1
        assert service.failed == failed
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(service.pipe, "generate", broken(RuntimeError("no call expected")))
        status, _, payload = _post(url, {"prompt": "a cat", "cfg": 1.0})
    assert status == 400 and "built with classifier-free guidance" in json.loads(payload)["error"] and not calls
    assert service.failed == failed
    assert _post(url, {"prompt": "a cat"})[0] == 200


@pytest.fixture(scope="module")
def batch2_engine(tmp_path_factory):
    from sparvar.engine import EngineSpec, build_engine

    path = str(tmp_path_factory.mktemp("batch2") / "e")
    build_engine(EngineSpec(model="infinity-tiny", resolution=256, attention="sparvar", batch=2), path,
                 log=lambda *a, **k: None)
    return path


def test_a_batch_engine_serves_concurrent_requests_in_one_call(batch2_engine, monkeypatch):
    """An engine built for 2 prompts per call: two concurrent requests with the same sampling share one call, each
    getting its own row (its own seed); a lone request is padded; other sampling options never share a call. Each
    request encodes its own PNG in its own thread: the batcher encoding them in turn (~0.1 s per 1024² image) held
    back the next engine call."""
    from PIL import Image

    from sparvar.runtime import load_engine_pipeline

    encoders = []
    save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", lambda im, *a, **k: (encoders.append(threading.current_thread().name),
                                                                   save(im, *a, **k))[1])
    service = GenerationService(batch2_engine, batch_wait_ms=3000)
    requests = [{"prompt": "a red car", "seed": 5, "cfg": 3.0}, {"prompt": "a small dog", "seed": 6, "cfg": 3.0}]
    results = [None, None]

    def ask(i):
        results[i] = service.submit(requests[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r[2] for r in results] == [2, 2] and service.calls == 1 and service.served == 2
    assert sorted(encoders) == sorted(t.name for t in threads)  # one PNG per request, each in the request's thread
    pipe = load_engine_pipeline(batch2_engine)
    f, l = pipe.text_features(["a red car", "a small dog"], allow_hashed=True)
    want = image_arrays(pipe.generate(f, l, pipe.sampling(cfg=3.0), seed=[5, 6]).image)
    for i in range(2):
        np.testing.assert_array_equal(_pixels(results[i][0]), want[i])
    # alone: padded with a copy of itself, and (per-row seeds) its row does not depend on what shares the call
    png, _, shared = GenerationService(batch2_engine, batch_wait_ms=0).submit(requests[1])
    assert shared == 1
    np.testing.assert_array_equal(_pixels(png), want[1])
    # other sampling options: two calls, one request each
    mixed = [{"prompt": "a red car", "seed": 5, "cfg": 3.0}, {"prompt": "a red car", "seed": 5, "cfg": 2.0}]
    threads = [threading.Thread(target=lambda r=r: results.append(service.submit(r))) for r in mixed]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r[2] for r in results[2:]] == [1, 1] and service.calls == 3


def _wait_for(condition, timeout: float = 30.0):
    """Poll until `condition()` holds: a test waits for the state it needs, not for a guessed time."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.005)


def test_batching_never_holds_a_full_group_and_survives_any_engine_exception(batch2_engine, monkeypatch):
    """A request waiting for company does not hold back a group that is already full (it runs alone at once), and an
    engine call that dies of a non-Exception answers every request with an error and leaves the batcher serving."""
    service = GenerationService(batch2_engine, batch_wait_ms=60_000)  # longer than this test may take
    results = {}

    def ask(name, cfg):
        results[name] = service.submit({"prompt": name, "seed": 1, "cfg": cfg})[2]

    threads = [threading.Thread(target=ask, args=("a fox", 3.0))]
    threads[0].start()
    # the batcher holds "a fox" (queued, then taken) while it waits for company with cfg 3
    _wait_for(lambda: service.queue.unfinished_tasks == 1 and service.queue.empty())
    threads += [threading.Thread(target=ask, args=(p, 5.0)) for p in ("a cat", "a dog")]
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(timeout=50)
    assert results == {"a fox": 1, "a cat": 2, "a dog": 2} and service.calls == 2

    real = service.pipe.generate
    monkeypatch.setattr(service.pipe, "generate", lambda *a, **k: (_ for _ in ()).throw(SystemExit("gone")))
    errors = []

    def doomed(seed):
        try:
            service.submit({"prompt": "a cat", "seed": seed, "cfg": 5.0})
        except RuntimeError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=doomed, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=50)
    assert errors == ["the engine call was interrupted (SystemExit)"] * 2 and service.failed == 2
    monkeypatch.setattr(service.pipe, "generate", real)
    threads = [threading.Thread(target=ask, args=(p, 5.0)) for p in ("a cow", "a hen")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=50)
    assert results["a cow"] == results["a hen"] == 2  # the batcher is still serving


def test_a_request_that_waited_out_a_busy_engine_still_gets_company(batch2_engine, monkeypatch):
    """A request arriving while the engine is busy waits for company from the moment the engine frees, not from its
    arrival: the clients of the call that just ended come back right after it. Counted from its arrival, it ran alone
    at once, its company waited out the next call, and concurrent clients never shared a call again. Without company
    it still runs, alone; and a request of other sampling than the call that just ended keeps its own window."""
    window = 0.4
    service = GenerationService(batch2_engine, batch_wait_ms=1000 * window)
    real_generate, real_run = service.pipe.generate, service._run
    calls, started = [], []  # (start, end, prompts) of each engine call; the prompts of each call begun

    def slow(*args, **kwargs):
        time.sleep(0.6)
        return real_generate(*args, **kwargs)

    def timed(jobs, count=True):
        t0 = time.monotonic()
        started.append(sorted(j.prompt for j in jobs))
        real_run(jobs, count)
        calls.append((t0, time.monotonic(), sorted(j.prompt for j in jobs)))

    monkeypatch.setattr(service.pipe, "generate", slow)
    monkeypatch.setattr(service, "_run", timed)
    shared = {}

    def ask(name, cfg=3.0):
        thread = threading.Thread(target=lambda: shared.__setitem__(name, service.submit(
            {"prompt": name, "seed": 1, "cfg": cfg})[2]))
        thread.start()
        return thread

    def idle_before(prompt):  # how long the engine sat free before the call holding `prompt` started
        i = next(i for i, c in enumerate(calls) if prompt in c[2])
        return calls[i][0] - calls[i - 1][1]

    # company: "a fox" runs alone after its window; "a cat" arrives during that call, "a dog" just after it
    first = ask("a fox")
    _wait_for(lambda: len(started) == 1)  # its call has begun (and takes 0.6 s)
    busy = ask("a cat")
    first.join(timeout=60)
    time.sleep(0.05)
    late = ask("a dog")
    for t in (busy, late):
        t.join(timeout=60)
    assert shared == {"a fox": 1, "a cat": 2, "a dog": 2}
    # no company: "a bee" arrives during the call of "an owl" and runs alone once its window after that call is out
    first = ask("an owl")
    _wait_for(lambda: len(started) == 3)
    busy = ask("a bee")
    for t in (first, busy):
        t.join(timeout=60)
    assert shared["a bee"] == 1 and window - 0.05 <= idle_before("a bee") < window + 0.3
    # other sampling: "a hen" (cfg 5) arrives during a cfg-3 call and runs as soon as the engine frees
    first = ask("a pig")
    _wait_for(lambda: len(started) == 5)
    busy = ask("a hen", cfg=5.0)
    for t in (first, busy):
        t.join(timeout=60)
    assert shared["a hen"] == 1 and idle_before("a hen") < window / 2
    assert service.calls == 6


def test_a_fault_while_forming_a_call_answers_the_waiting_requests_and_the_batcher_goes_on(batch2_engine, monkeypatch):
    """The batcher thread must outlive a fault of its own (not only the engine's): otherwise every later request of
    a batch engine waits forever while /health still says 200."""
    service = GenerationService(batch2_engine, batch_wait_ms=50)
    faults = iter([RuntimeError("boom")])

    def flaky(waiting, sampling):
        fault = next(faults, None)
        if fault is not None:
            raise fault
        return False

    monkeypatch.setattr(service, "_another_group_full", flaky)
    answers = []

    def ask():
        try:
            answers.append(service.submit({"prompt": "a cat", "seed": 1}))
        except RuntimeError as e:
            answers.append(str(e))

    asking = threading.Thread(target=ask, daemon=True)  # a dead batcher would leave it waiting: fail, don't hang
    asking.start()
    asking.join(timeout=60)
    assert answers == ["the request batcher failed (RuntimeError: boom)"]
    png, _, shared = service.submit({"prompt": "a cat", "seed": 1})  # the same thread, still forming calls
    assert png.startswith(b"\x89PNG") and shared == 1 and service.calls == 1


def test_a_class_conditional_engine_answers_only_its_class_names(monkeypatch):
    """An infinity-cifar engine's server refuses a prompt outside CIFAR-10's class names with a 400 naming them
    (it would draw noise), takes a class name however spaced or cased, and warms up on its first class."""
    from types import SimpleNamespace

    from sparvar.config import get_config
    from sparvar.generate import Sampling
    from sparvar.serve import GenerationService, RequestError

    service = GenerationService.__new__(GenerationService)  # parse and warm-up only: no engine to build
    service.manifest, service.batch = {"spec": {"backend": "torch-cuda"}}, 1  # runs any batch, guided or not
    service.pipe = SimpleNamespace(cfg=get_config("infinity-cifar"), sampling=lambda **o: Sampling(
        **{k: v for k, v in o.items() if v is not None}))
    with pytest.raises(RequestError, match="the prompt must be one of airplane, automobile, .* got 'a red car'"):
        service.parse({"prompt": "a red car"})
    assert service.parse({"prompt": " Ship ", "seed": 3})[:2] == (" Ship ", 3)
    warmed = []
    monkeypatch.setattr(service, "_run", lambda jobs, count: warmed.append(jobs[0].prompt) or
                        setattr(jobs[0], "error", RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        service.warm_up()
    assert warmed == ["airplane"]
