"""What every benchmark result carries: device, versions, commit, shapes, medians; written atomically."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import threading
import time

import torch


def git_commit() -> str:
    if os.environ.get("SPARVAR_COMMIT"):  # the GPU machine gets the work tree without .git: the caller says which
        return os.environ["SPARVAR_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SPARVAR_COMMIT", "uncommitted")


def environment() -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    for name in ("triton", "onnxruntime", "onnx"):  # the runtimes a result may have measured
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            pass
    return env


def device_tag() -> str:
    """Short name of this machine's accelerator for result file names: 'h100', 'h200', ... or 'cpu'."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4"):
        if tag in name:
            return tag
    return name.replace("nvidia", "").strip().replace(" ", "-")


def bench_prompts(model_name: str, texts: list[str]) -> list[str]:
    """The benchmarks' prompts for `model_name`: `texts`, or for a class-conditional model (sparvar.config.CLASS_PROMPTS,
    which refuses free text) as many of its class names, in turn. The work per image is the same."""
    from sparvar.config import CLASS_PROMPTS

    known = CLASS_PROMPTS.get(model_name)
    return [known[i % len(known)] for i in range(len(texts))] if known else list(texts)


def result_path(name: str) -> str:
    """bench/results/<name>_<device tag>.json: results of different machines never overwrite each other."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}_{device_tag()}.json")


def cuda_time_ms(fn, warmup: int = 5, runs: int = 50) -> dict:
    """Median (and spread) of `runs` timings of fn() with CUDA events; warm-up runs excluded."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return summarize(times)


def gpu_clock_reader():
    """(read, why_not): read() -> (SM clock in MHz, power in W) of the current GPU through torch's NVML helpers, or
    None and the reason it cannot (no GPU, no pynvml)."""
    if not torch.cuda.is_available():
        return None, "no CUDA GPU"

    def read():
        return float(torch.cuda.clock_rate()), torch.cuda.power_draw() / 1000.0  # power_draw: milliwatts

    try:
        read()
    except Exception as e:  # torch raises ModuleNotFoundError without pynvml, or NVML's own errors
        return None, f"{type(e).__name__}: {e}"
    return read, None


class ClockSampler:
    """While entered, samples the GPU's SM clock and power every `interval_s` in a background thread. A GPU that
    slows its clocks under sustained load times one row slower than another for that reason alone, so the e2e rows
    record the clocks they ran at (`summary()`). `read` (tests): a function returning (MHz, W)."""

    def __init__(self, read=None, interval_s: float = 0.02):
        self.read, self.why_not = (read, None) if read is not None else gpu_clock_reader()
        self.interval_s, self.samples = interval_s, []
        self._stop, self._thread = threading.Event(), None

    def _run(self):
        while not self._stop.is_set():
            try:
                self.samples.append(self.read())
            except Exception as e:  # NVML failing mid-run ends the sampling, not the benchmark
                self.why_not = f"sampling stopped: {type(e).__name__}: {e}"
                return
            self._stop.wait(self.interval_s)

    def __enter__(self):
        if self.read is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return False

    def summary(self) -> dict:
        if not self.samples:
            return {"sampled": False, "why": self.why_not or "no sample taken"}
        clocks, power = [c for c, _ in self.samples], [w for _, w in self.samples]
        return {"sampled": True, "samples": len(self.samples), "interval_s": self.interval_s, "stopped": self.why_not,
                "sm_clock_mhz": {"median": statistics.median(clocks), "min": min(clocks), "max": max(clocks)},
                "power_w": {"median": statistics.median(power), "max": max(power)}}


def summarize(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": len(times)}


def save_figure(fig, path: str, dpi: int = 110) -> str:
    """A matplotlib figure to `path` through a temp file (a killed run never leaves half a PNG)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp-{os.getpid()}{ext}"  # the extension tells matplotlib the format
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    return path


def write_result(path: str, result: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    result = {"environment": environment(), **result}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2, default=str)
        os.replace(tmp, path)
    finally:  # a failed write or rename (disk full, `path` a directory) leaves no temp file behind
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
