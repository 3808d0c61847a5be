#!/usr/bin/env bash
# Device calls (repo root on the GPU machine; carry .official for parity):
#   bash tools/gpu_bench.sh "$OUT" parity   # GPU engine checks + parity with the official code
#   bash tools/gpu_bench.sh "$OUT" e2e      # end-to-end latency, 2B and 8B
#   bash tools/gpu_bench.sh "$OUT" profile  # kernel time per scale and category
set -uo pipefail
OUT=${1:-bench/results}
export PYTHONPATH=$PWD
nvidia-smi -L
for what in "${@:2}"; do
  case "$what" in
    parity)
      python -m pytest -q tests/test_cuda_engine.py 2>&1 | tail -4
      python bench/parity_infinity.py --out "$OUT/parity_infinity.json" 2>&1 | grep -v Warning | tail -34 ;;
    e2e)
      python bench/e2e.py --model infinity-2b --model infinity-8b --warmup 3 --runs 20 --out "$OUT/e2e_h100.json" 2>&1 \
        | grep -v Warning | tail -20 ;;
    profile)
      python bench/profile_step.py --model infinity-2b --out "$OUT/profile_h100.json" 2>&1 | grep -v Warning | tail -12 ;;
  esac
done
