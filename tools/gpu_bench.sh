#!/usr/bin/env bash
# One device call: GPU checks of the engine runner, parity with the official code, end-to-end latency.
# Usage (device machine, repo root; .official carried): bash tools/gpu_bench.sh "$OUT"
set -uo pipefail
OUT=${1:-bench/results}
export PYTHONPATH=$PWD
nvidia-smi -L
python -m pytest -q -x tests/test_cuda_engine.py 2>&1 | tail -4
python bench/parity_infinity.py --out "$OUT/parity_infinity.json" 2>&1 | grep -v Warning | tail -34
python bench/e2e.py --model infinity-2b --model infinity-8b --warmup 3 --runs 20 --out "$OUT/e2e_h100.json" 2>&1 | grep -v Warning | tail -20
