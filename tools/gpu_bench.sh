#!/usr/bin/env bash
# Device calls (repo root on the GPU machine; carry .official for parity). Results are named by device (h100, h200);
# E2E_TIMEOUT (seconds, default 560) bounds each issue* mode's benchmark process (rows finished before it are kept):
#   bash tools/gpu_bench.sh "$OUT" parity    # GPU engine checks + parity with the official code
#   bash tools/gpu_bench.sh "$OUT" e2e       # end-to-end latency, 2B and 8B
#   bash tools/gpu_bench.sh "$OUT" profile   # kernel time per scale and category, 2B
#   bash tools/gpu_bench.sh "$OUT" profile8b # the same for 8B
#   bash tools/gpu_bench.sh "$OUT" generate  # `make engine`/`sparvar generate --engine` with a torch-cuda engine
#   bash tools/gpu_bench.sh "$OUT" kernels   # GPU kernel tests + attention benchmark
#   bash tools/gpu_bench.sh "$OUT" gputests  # every gpu-marked test
#   bash tools/gpu_bench.sh "$OUT" parts     # step microbenchmarks (linears, FP8, GELU+quantise), 2B
#   bash tools/gpu_bench.sh "$OUT" engines   # end-to-end, only the engine rows (bf16 and FP8 side by side)
#   bash tools/gpu_bench.sh "$OUT" small     # small-scale kernel calls in CUDA graphs (attention, linears, cache upsample)
#   bash tools/gpu_bench.sh "$OUT" hart      # end-to-end HART-0.7B engine rows
#   bash tools/gpu_bench.sh "$OUT" decide    # the CS4A decision's passes and their alternatives (2B, 8B)
#   bash tools/gpu_bench.sh "$OUT" later     # CS4A at scales 11-12: composed from its parts vs one launch (2B, 8B)
#   bash tools/gpu_bench.sh "$OUT" csla      # CSLA GPU tests, then its variants side by side with the autotuned kernel (bench/csla_variants.py)
#   bash tools/gpu_bench.sh "$OUT" e2e2b     # end-to-end, 2B bf16 engine rows (dense, SparVAR, its ablations, skip 2)
#   bash tools/gpu_bench.sh "$OUT" e2e8b     # the same for 8B
#   bash tools/gpu_bench.sh "$OUT" pair2b    # only the dense and SparVAR engines, side by side (the 1.2x ratio, in short)
#   bash tools/gpu_bench.sh "$OUT" pair8b    # the same for 8B
#   bash tools/gpu_bench.sh "$OUT" lanes2b   # dense and SparVAR engines beside SparVAR with the decision residuals on one stream
#   bash tools/gpu_bench.sh "$OUT" lanes8b   # the same for 8B
#   bash tools/gpu_bench.sh "$OUT" decision  # the CS4A decision's GPU tests, then its passes timed (decide)
#   bash tools/gpu_bench.sh "$OUT" ncu       # Nsight Compute on the SparVAR-only kernels at 2B shapes, after autotuning (text reports)
#   bash tools/gpu_bench.sh "$OUT" timeline  # GPU idle time of one graphed 2B generation (launch gaps vs host waits)
#   bash tools/gpu_bench.sh "$OUT" timeline8b # the same for 8B
#   bash tools/gpu_bench.sh "$OUT" decode    # the tokenizer decodes at 1024² (Infinity 2B/8B, HART fp32 vs fp16 graph, cudnn.benchmark)
#   bash tools/gpu_bench.sh "$OUT" batch4    # throughput: 2B and 8B dense and SparVAR engines at 4 prompts per generation
#   bash tools/gpu_bench.sh "$OUT" servebatch # sparvar serve throughput, 2B torch-cuda engine, batch 1 vs 4, 8 clients
#   bash tools/gpu_bench.sh "$OUT" crossattn # the absorbed cross-attention's GPU tests, then it against the unabsorbed one per scale (2B, 8B; text buckets 64, 16)
#   bash tools/gpu_bench.sh "$OUT" absorb2b  # dense and SparVAR engines beside the same engines with the cross-attention unabsorbed
#   bash tools/gpu_bench.sh "$OUT" absorb8b  # the same for 8B
#   bash tools/gpu_bench.sh "$OUT" fp8absorb2b # FP8-linear dense and SparVAR engines, absorbed (default) and unabsorbed
#   bash tools/gpu_bench.sh "$OUT" fp8absorb8b # the same for 8B
#   bash tools/gpu_bench.sh "$OUT" cudnncsla8b # CSLA by cuDNN's paged SDPA: kernel rows, then the engines, bf16 and FP8 (needs nvidia-cudnn-frontend)
#   bash tools/gpu_bench.sh "$OUT" cudnncsla2b # the same for 2B
#   bash tools/gpu_bench.sh "$OUT" tiles8b   # CSLA on 2-D query tiles: its GPU tests, kernel rows, then the 8B engines side by side, bf16 and FP8
#   bash tools/gpu_bench.sh "$OUT" tiles2b   # the kernel rows and engines for 2B
#   bash tools/gpu_bench.sh "$OUT" interleave8b # dense, SparVAR and query-tile SparVAR engines timed in rotated rounds (--interleave), then the first two one after the other
#   bash tools/gpu_bench.sh "$OUT" interleave2b # the same for 2B
#   bash tools/gpu_bench.sh "$OUT" issue8b   # every row of issue 7 in one process (eager FA2 / cuDNN, engines, skip 2, query tiles, FP8), 8B
#   bash tools/gpu_bench.sh "$OUT" issue2b   # the same for 2B
#   bash tools/gpu_bench.sh "$OUT" issuehart # the same for HART-0.7B (no query tiles or FP8 there), then the query tiles' GPU tests
#   bash tools/gpu_bench.sh "$OUT" fidelitygpu # infinity-cifar: eager fp32 policy vs 4x4 / 8x8 query tiles, then the torch-cuda engines (bf16, graphs) scored
#   bash tools/gpu_bench.sh "$OUT" multigpu  # (kind nvidia-h100-x2) the two-GPU test, then an eager SparVAR `sparvar generate --device cuda:1`
set -uo pipefail
# the GPU machine gets the work tree without .git: results record the commit only if the caller names it (commit
# first, then pass the full sha), so refuse to produce results that would say "uncommitted"
if [ -z "${SPARVAR_COMMIT:-}" ] && ! git rev-parse HEAD >/dev/null 2>&1; then
  echo "gpu_bench.sh: set SPARVAR_COMMIT=<the committed sha this tree is> (results must name their commit)" >&2
  exit 2
fi
OUT=${1:-bench/results}
# every mode is checked before any runs: a mistyped or removed one would otherwise spend a device call on nothing
MODES=" $(sed -n 's/^#   bash tools\/gpu_bench.sh "\$OUT" \([a-z0-9]*\) .*/\1/p' "$0" | tr '\n' ' ')"
for what in "${@:2}"; do
  case "$MODES" in
    *" $what "*) ;;
    *) echo "gpu_bench.sh: unknown mode '$what'; the modes:$MODES" >&2; exit 2 ;;
  esac
done
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # a caller's carried wheels (e.g. nvidia-cudnn-frontend) stay importable
nvidia-smi -L
TAG=$(python -c "from bench.common import device_tag; print(device_tag())")
for what in "${@:2}"; do
  case "$what" in
    parity)
      python -m pytest -q tests/test_cuda_engine.py 2>&1 | tail -4
      python bench/parity_infinity.py --out "$OUT/parity_infinity.json" 2>&1 | grep -v Warning | tail -34 ;;
    e2e)
      python bench/e2e.py --model infinity-2b --model infinity-8b --warmup 3 --runs 20 --out "$OUT/e2e_$TAG.json" 2>&1 \
        | grep -v Warning | tail -20 ;;
    profile|profile8b)
      size=$([ "$what" = profile8b ] && echo 8b || echo 2b)
      python bench/profile_step.py --model "infinity-$size" --out "$OUT/profile_${size}_$TAG.json" 2>&1 | grep -v Warning \
        | grep -v "^   scale [0-9] " | tail -90 ;;
    generate)
      python -m sparvar.cli engine build --model infinity-2b --random-weights --attention sparvar --backend torch-cuda \
        --engine-dir /tmp/engine-2b 2>&1 | tail -6
      /usr/bin/time -f "generate: %e s wall, %M KiB peak RSS" python -m sparvar.cli generate --engine /tmp/engine-2b \
        --prompt "a photo of a cat" --out "$OUT/generate_2b_random_$TAG.png" 2>&1 | tail -6 ;;
    gputests)
      python -m pytest -q -m gpu 2>&1 | tail -12 ;;
    multigpu)
      python -m pytest -q -m gpu tests/test_multi_gpu.py -rs --junitxml "$OUT/gpu_tests_multi_gpu_$TAG.xml" 2>&1 | tail -6
      python -m sparvar.cli generate --model infinity-tiny --random-weights --attention sparvar --device cuda:1 \
        --dtype bf16 --out "$OUT/tiny_sparvar_cuda1_$TAG.png" 2>&1 | grep -v Warning | tail -4 ;;
    parts)
      python bench/step_parts.py --model infinity-2b --out "$OUT/step_parts_2b_$TAG.json" 2>&1 | grep -v Warning | tail -30 ;;
    engines)
      python bench/e2e.py --model infinity-2b --model infinity-8b --warmup 3 --runs 20 --rows "=dense engine (CUDA graphs)" \
        --rows "=SparVAR engine (CUDA graphs, Triton kernels)" --rows "one stream,skip last 2" \
        --rows "=dense engine, FP8 linears" --rows "=SparVAR engine, FP8 linears" \
        --out "$OUT/e2e_engines_$TAG.json" 2>&1 | grep -v Warning | tail -20 ;;
    small)
      python bench/small_scales.py --out "$OUT/small_scales_$TAG.json" 2>&1 | grep -v Warning | tail -60 ;;
    timeline)
      python bench/profile_step.py --model infinity-2b --timeline --out "$OUT/timeline_$TAG.json" 2>&1 | grep -v Warning | tail -40 ;;
    timeline8b)
      python bench/profile_step.py --model infinity-8b --timeline --out "$OUT/timeline_8b_$TAG.json" 2>&1 | grep -v Warning | tail -40 ;;
    decide)
      python bench/small_scales.py --sections decide --out "$OUT/small_scales_decide_$TAG.json" 2>&1 | grep -v Warning | tail -8 ;;
    later)
      python bench/small_scales.py --sections later --out "$OUT/small_scales_later_$TAG.json" 2>&1 | grep -v Warning | tail -6 ;;
    csla)  # its GPU tests first, then the benchmark
      python -m pytest -q tests/test_kernels_gpu.py -k "csla" 2>&1 | tail -6
      python bench/csla_variants.py --runs 50 --warmup 5 --out "$OUT/csla_variants_$TAG.json" 2>&1 | grep -v Warning | tail -16 ;;
    e2e2b|e2e8b)  # the bf16 engine rows, the one-stream residuals ablation and the skip-2 rows
      size=${what#e2e}
      python bench/e2e.py --model "infinity-$size" --warmup 3 --runs 20 --rows "=dense engine (CUDA graphs)" \
        --rows "=SparVAR engine (CUDA graphs, Triton kernels)" --rows "decision residuals on one stream,skip last 2" \
        --out "$OUT/e2e_engines_${size}_$TAG.json" 2>&1 | grep -v Warning | tail -8 ;;
    pair2b|pair8b)  # for a session with little device time: the two rows of the 1.2x target, nothing else
      size=${what#pair}
      python bench/e2e.py --model "infinity-$size" --warmup 3 --runs 20 --rows "=dense engine (CUDA graphs)" \
        --rows "=SparVAR engine (CUDA graphs, Triton kernels)" \
        --out "$OUT/e2e_engines_${size}_pair_$TAG.json" 2>&1 | grep -v Warning | tail -6 ;;
    lanes2b|lanes8b)  # the decision's residual launches side by side (the default) against one after another
      size=${what#lanes}
      python bench/e2e.py --model "infinity-$size" --warmup 3 --runs 20 --rows "=dense engine (CUDA graphs)" \
        --rows "=SparVAR engine (CUDA graphs, Triton kernels)" --rows "decision residuals on one stream" \
        --out "$OUT/e2e_engines_${size}_lanes_$TAG.json" 2>&1 | grep -v Warning | tail -6 ;;
    ncu)  # one report per kernel, of a launch after the autotuner's trials (tools/ncu_sparse_kernels.py opens the range)
      for kernel in _column_sums _select_topk _cs4a_fwd _csla_fwd; do
        timeout 300 /usr/local/cuda/bin/ncu --profile-from-start off -k "regex:$kernel" --launch-count 1 \
          --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy \
          --section WarpStateStats --section LaunchStats --section SchedulerStats --print-details all \
          python tools/ncu_sparse_kernels.py 2b > "$OUT/ncu_2b${kernel}_$TAG.txt" 2>&1 || echo "ncu $kernel failed"
        grep -E "^  _|Duration|Pipe Tensor Cycles|Achieved Occupancy|Registers Per" "$OUT/ncu_2b${kernel}_$TAG.txt" | head -6
      done ;;
    decision)  # the decision's kernels against torch and the references first; no timing if one fails
      python -m pytest -q tests/test_kernels_gpu.py -k "topk or decide or decision" --junitxml="$OUT/gpu_tests_decision_$TAG.xml" \
        > /tmp/decision_tests.log 2>&1; ok=$?
      grep -E "FAILED|ERROR|passed|failed" /tmp/decision_tests.log | tail -12
      [ $ok -eq 0 ] || { echo "decision tests failed: no timing"; continue; }
      python bench/small_scales.py --sections decide --out "$OUT/small_scales_decide_$TAG.json" 2>&1 | grep -v Warning | tail -8 ;;
    decode)
      python bench/decode.py --out "$OUT/decode_$TAG.json" 2>&1 | grep -v Warning | tail -12 ;;
    batch4)
      python bench/e2e.py --model infinity-2b --model infinity-8b --batch 4 --warmup 2 --runs 10 \
        --rows "=dense engine (CUDA graphs)" --rows "=SparVAR engine (CUDA graphs, Triton kernels)" \
        --out "$OUT/e2e_batch4_$TAG.json" 2>&1 | grep -v Warning | tail -6 ;;
    servebatch)  # a 100 ms window: at 1024² a client asks again ~0.1 s or more after its call (its PNG is encoded first)
      python bench/serve_batching.py --model infinity-2b --backend torch-cuda --batch 4 --clients 8 --requests 48 \
        --batch-wait-ms 100 --out "$OUT/serve_batching_$TAG.json" 2>&1 | grep -v Warning | tail -4 ;;
    crossattn)  # the kernel and the runner's captured path against the references first; no timing if one fails
      python -m pytest -q tests/test_absorbed.py "tests/test_cuda_engine.py::test_captured_graphs_equal_eager_on_gpu" \
        --junitxml="$OUT/gpu_tests_absorbed_$TAG.xml" > /tmp/absorbed_tests.log 2>&1; ok=$?
      grep -E "FAILED|ERROR|Error|passed|failed" /tmp/absorbed_tests.log | tail -12
      [ $ok -eq 0 ] || { echo "absorbed cross-attention tests failed: no timing"; continue; }
      python bench/cross_attention.py --out "$OUT/cross_attention_$TAG.json" 2>&1 | grep -v Warning | tail -30
      # a finer text bucket: the absorbed form's cost grows with the padded length, the unabsorbed kernel's does not
      python bench/cross_attention.py --bucket 16 --out "$OUT/cross_attention_bucket16_$TAG.json" 2>&1 | grep -v Warning \
        | grep -E "save|scale +(0|6|9|1[0-2]) " ;;
    absorb2b|absorb8b)
      size=${what#absorb}
      python bench/e2e.py --model "infinity-$size" --warmup 3 --runs 20 --rows "=dense engine (CUDA graphs)" \
        --rows "=SparVAR engine (CUDA graphs, Triton kernels)" --rows "=dense engine (CUDA graphs), cross-attention unabsorbed" \
        --rows "=SparVAR engine (CUDA graphs, Triton kernels), cross-attention unabsorbed" \
        --out "$OUT/e2e_engines_${size}_absorb_$TAG.json" 2>&1 | grep -v Warning | tail -6 ;;
    fp8absorb2b|fp8absorb8b)
      size=${what#fp8absorb}
      python bench/e2e.py --model "infinity-$size" --warmup 3 --runs 20 --rows "=dense engine, FP8 linears" \
        --rows "=SparVAR engine, FP8 linears" --rows "=dense engine, FP8 linears, cross-attention unabsorbed" \
        --rows "=SparVAR engine, FP8 linears, cross-attention unabsorbed" \
        --out "$OUT/e2e_engines_${size}_fp8_absorb_$TAG.json" 2>&1 | grep -v Warning | tail -6 ;;
    cudnncsla2b|cudnncsla8b)  # the kernels side by side first (each row checked against the reference), then the engines
      size=${what#cudnncsla}
      timeout 200 python bench/csla_cudnn.py --models "infinity-$size" --blocks 64x64 128x64 --scales 11 12 --runs 30 \
        --out "$OUT/csla_cudnn_${size}_$TAG.json" 2>&1 | grep -v Warning | tail -16
      python bench/e2e.py --model "infinity-$size" --warmup 3 --runs 20 --rows "=dense engine (CUDA graphs)" \
        --rows "=SparVAR engine (CUDA graphs, Triton kernels)" --rows "CSLA by cuDNN" --rows "=dense engine, FP8 linears" \
        --rows "=SparVAR engine, FP8 linears" \
        --out "$OUT/e2e_engines_${size}_cudnn_csla_$TAG.json" 2>&1 | grep -v Warning | tail -8 ;;
    tiles8b|tiles2b)  # the tile kernel's GPU tests (8B call only), its rows beside the raster kernel's, then the engines
      size=${what#tiles}
      if [ "$size" = 8b ]; then
        python -m pytest -q -m gpu tests/test_csla_tiles.py --junitxml "$OUT/gpu_tests_csla_tiles_$TAG.xml" 2>&1 | tail -4
      fi
      timeout 200 python bench/csla_tiles.py --models "infinity-$size" --runs 30 --out "$OUT/csla_tiles_${size}_$TAG.json" \
        2>&1 | grep -v Warning | tail -16
      python bench/e2e.py --model "infinity-$size" --warmup 3 --runs 20 --rows "=dense engine (CUDA graphs)" \
        --rows "=SparVAR engine (CUDA graphs, Triton kernels)" --rows "query tiles" --rows "=dense engine, FP8 linears" \
        --rows "=SparVAR engine, FP8 linears" \
        --out "$OUT/e2e_engines_${size}_tiles_$TAG.json" 2>&1 | grep -v Warning | tail -8 ;;
    interleave8b|interleave2b)  # the same rows under both protocols, in one process each
      size=${what#interleave}
      python bench/e2e.py --model "infinity-$size" --warmup 3 --runs 20 --interleave --rows "=dense engine (CUDA graphs)" \
        --rows "=SparVAR engine (CUDA graphs, Triton kernels)" --rows "=SparVAR engine (CUDA graphs, Triton kernels), CSLA on 8x8 query tiles" \
        --out "$OUT/e2e_engines_${size}_interleaved_$TAG.json" 2>&1 | grep -v Warning | tail -4
      python bench/e2e.py --model "infinity-$size" --warmup 3 --runs 20 --rows "=dense engine (CUDA graphs)" \
        --rows "=SparVAR engine (CUDA graphs, Triton kernels)" \
        --out "$OUT/e2e_engines_${size}_sequential_$TAG.json" 2>&1 | grep -v Warning | tail -3 ;;
    issue2b|issue8b)  # one process per model, one row after another; each row is saved as it finishes
      size=${what#issue}
      timeout "${E2E_TIMEOUT:-560}" python bench/e2e.py --model "infinity-$size" --warmup 3 --runs 20 --rows "=dense eager, SDPA FlashAttention-2" \
        --rows "=dense eager, SDPA cuDNN" --rows "=dense engine (CUDA graphs)" --rows "=SparVAR engine (CUDA graphs, Triton kernels)" \
        --rows "=SparVAR engine + skip last 2" --rows "=dense engine + skip last 2" \
        --rows "=SparVAR engine (CUDA graphs, Triton kernels), CSLA on 8x8 query tiles" --rows "=dense engine, FP8 linears" \
        --rows "=SparVAR engine, FP8 linears" --rows "=SparVAR engine, FP8 linears, CSLA on 8x8 query tiles" \
        --out "$OUT/e2e_${size}_issue_$TAG.json" 2>&1 | grep -v Warning | tail -12 ;;
    issuehart)  # HART has no cross-attention to tile or FP8 rows; then the query tiles' GPU tests (kernel, AOT entry, engine)
      timeout "${E2E_TIMEOUT:-560}" python bench/e2e.py --model hart-0.7b --warmup 3 --runs 20 --rows "=dense eager, SDPA FlashAttention-2" \
        --rows "=dense eager, SDPA cuDNN" --rows "=dense engine (CUDA graphs)" --rows "=SparVAR engine (CUDA graphs, Triton kernels)" \
        --rows "=SparVAR engine + skip last 2" --rows "=dense engine + skip last 2" \
        --out "$OUT/e2e_hart_issue_$TAG.json" 2>&1 | grep -v Warning | tail -8
      python -m pytest -q -m gpu tests/test_csla_tiles.py \
        tests/test_cuda_engine.py::test_a_torch_cuda_engine_built_with_query_tiles_follows_the_tile_reference \
        --junitxml "$OUT/gpu_tests_tiles_$TAG.xml" 2>&1 | tail -4 ;;
    fidelitygpu)  # the deployed torch-cuda engines' fidelity (bf16, Triton kernels, CUDA graphs) against their dense engine
      python -m bench.fidelity --device cuda --seeds 10 --variants dense sparvar sparvar_tiles_4x4 sparvar_tiles_8x8 \
        --out "$OUT/fidelity_tiles_eager_$TAG.json" 2>&1 | grep -v Warning | tail -6
      dirs=$(mktemp -d)
      cifar=(--model infinity-cifar --weights weights/infinity-cifar.safetensors --vae weights/infinity-cifar-tokenizer.safetensors
             --backend torch-cuda)
      python -m sparvar.cli engine build "${cifar[@]}" --attention dense --engine-dir "$dirs/dense" >/dev/null
      python -m sparvar.cli engine build "${cifar[@]}" --attention sparvar --engine-dir "$dirs/sparvar" >/dev/null
      python -m sparvar.cli engine build "${cifar[@]}" --attention sparvar --csla-query-tile 8x8 --engine-dir "$dirs/tiles" >/dev/null
      python -m bench.fidelity --seeds 10 --engines dense="$dirs/dense" sparvar="$dirs/sparvar" sparvar_tiles_8x8="$dirs/tiles" \
        skip2="$dirs/dense" sparvar_skip2="$dirs/sparvar" --out "$OUT/fidelity_engines_torch_cuda_$TAG.json" 2>&1 | grep -v Warning | tail -8 ;;
    hart)
      python bench/e2e.py --model hart-0.7b --warmup 3 --runs 20 --rows engine \
        --out "$OUT/e2e_hart_engines_$TAG.json" 2>&1 | grep -v Warning | tail -8 ;;
    kernels)
      python -m pytest -q tests/test_kernels_gpu.py 2>&1 | tail -6
      python bench/attention.py --out "$OUT/attention_$TAG.json" 2>&1 | grep -v Warning | tail -40 ;;
  esac
done
