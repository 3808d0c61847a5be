"""Time and peak memory of `sparvar engine build` on this machine (CPU), as a JSON result.

    python bench/engine_build.py --model infinity-2b -- --random-weights --attention sparvar
runs the build under `/usr/bin/time -v`; `--from-log LOG` parses the output of such a run instead. Stage times,
file counts and sizes come from the built directory's manifest where the build names it (`--engine-dir DIR`, or
`--manifest-of DIR` with `--from-log`), else from `sparvar engine info` lines in the log.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import write_result  # noqa: E402


def parse(log: str) -> dict:
    def grab(pattern, cast=str):
        m = re.search(pattern, log)
        return cast(m.group(1)) if m else None

    wall = grab(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)")
    parts = [float(p) for p in wall.split(":")] if wall else []
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts))) if parts else None
    stages = {m.group(1): {"seconds": float(m.group(4)), "files": int(m.group(2)), "mib": float(m.group(3))}
              for m in re.finditer(r"stage (\w+)\s+key \w+\s+(\d+) files, ([\d.]+) MiB, ([\d.]+) s", log)}
    if not stages:  # the build's own log: "[engine] export   done in 879.6 s (key ...)"
        stages = {m.group(1): {"seconds": float(m.group(2))}
                  for m in re.finditer(r"\[engine\] (\w+)\s+done in ([\d.]+) s", log)}
    return {"command": grab(r'Command being timed: "(.*)"'), "wall_seconds": seconds,
            "peak_rss_gib": (grab(r"Maximum resident set size \(kbytes\): (\d+)", int) or 0) / 2**20,
            "exit_status": grab(r"Exit status: (\d+)", int), "stages": stages}


def stages_from_manifest(engine_dir: str) -> dict:
    """Each stage's recorded seconds, its file count and their size (MiB), from a built engine's manifest."""
    with open(os.path.join(engine_dir, "manifest.json")) as f:
        stages = json.load(f)["stages"]
    size = lambda files: sum(os.path.getsize(os.path.join(engine_dir, name)) for name in files)  # noqa: E731
    return {name: {"seconds": round(rec["seconds"], 1), "files": len(rec["files"]), "mib": round(size(rec["files"]) / 2**20, 1)}
            for name, rec in stages.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="infinity-2b")
    ap.add_argument("--from-log")
    ap.add_argument("--out", default="bench/results/engine_build_cpu.json")
    ap.add_argument("--manifest-of", help="with --from-log: the engine directory that run built")
    ap.add_argument("build_args", nargs="*")
    args = ap.parse_args()
    if args.from_log:
        log = open(args.from_log).read()
    else:
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "sparvar.cli", "engine", "build", "--model", args.model,
               *args.build_args]
        log = subprocess.run(cmd, capture_output=True, text=True).stderr
    result = parse(log)
    built = args.manifest_of or (args.build_args[args.build_args.index("--engine-dir") + 1]
                                 if "--engine-dir" in args.build_args[:-1] else None)
    if built and result["exit_status"] == 0:
        result["stages"] = stages_from_manifest(built)
    print(result)
    write_result(args.out, {"benchmark": "engine build on the CPU machine (2 cores, 24 GiB)", "model": args.model, **result})


if __name__ == "__main__":
    main()
