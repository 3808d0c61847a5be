"""End-to-end latency on one GPU: Infinity 2B/8B at 1024², batch 1 with CFG (`--batch N`: N prompts per
generation, throughput in images/s), dense vs SparVAR, side by side.

Protocol (the paper's): warm-up runs, then the median of timed runs; every run covers text conditioning
(the T5 encoder itself excluded), all scales, CFG, sampling and the VAE decode. Random weights (the images are
noise, the work is the same). Every row runs the same `sparvar.generate.generate` loop — only the runner differs.
Rows run one after another by default; `--interleave` builds them all first and times them in rounds, one
generation each (time_interleaved), so that no row runs later in the GPU's thermal and power history than another.

    PYTHONPATH=. python bench/e2e.py --model infinity-2b   # writes bench/results/e2e_<device>.json
    sparvar bench e2e --model infinity-8b --weights infinity_8b_weights --vae infinity_vae_d56_f8_14_patchify.pth  # real weights
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import ClockSampler, bench_prompts, result_path, save_figure, summarize, write_result  # noqa: E402

# dense FLOPs of one 1024² image at ~790 TFLOP/s: INFINITY.md; HART.md (transformer ~44 TF + diffusion MLP ~4.8 TF,
# VAE excluded)
FLOP_FLOOR_MS = {"infinity-2b": 146, "infinity-8b": 485, "hart-0.7b": 62}

PROMPT = "a photo of a red fox sitting in the snow, highly detailed"
# the honest baseline; results from before commit 3f9aa02 call it "dense engine (CUDA graphs, cuDNN)", though its
# smallest attention calls had run our Triton kernel since commit 7cea0d2
DENSE_ENGINE_ROW = "dense engine (CUDA graphs)"
SPARVAR_ENGINE_ROW = "SparVAR engine (CUDA graphs, Triton kernels)"
# the same engine with the decision layers' residual-cache launches one after another on one stream
# (SparVARPlan(residual_lanes=0)) instead of side by side on two: what the side-by-side launches gain
RESIDUALS_IN_LINE_ROW = "SparVAR engine (CUDA graphs, Triton kernels), decision residuals on one stream"
# the ablation of the engines' absorbed cross-attention (sparvar.model.AbsorbedText): the same engine without it
UNABSORBED = ", cross-attention unabsorbed"
DENSE_FP8_ROW, SPARVAR_FP8_ROW = "dense engine, FP8 linears", "SparVAR engine, FP8 linears"
# the SparVAR engine with its CSLA layers run by cuDNN's paged SDPA (sparvar/kernels/cudnn_csla.py) instead of the
# Triton kernel: on the policy's tiles at every scale, or on 128x64 tiles (cuDNN's query tile is 128 rows) at the
# scales whose queries are whole 128-row tiles and the policy's tiles by Triton elsewhere (csla_by_cudnn): row ->
# CSLA tile there (None: the policy's everywhere). Rows of machines with nvidia-cudnn-frontend only; the last one
# with FP8 linears.
CUDNN_TILED = ", CSLA by cuDNN paged SDPA on 128x64 tiles where the queries are whole tiles"
CSLA_CUDNN_ROWS = {SPARVAR_ENGINE_ROW + ", CSLA by cuDNN paged SDPA": None,
                   SPARVAR_ENGINE_ROW + CUDNN_TILED: (128, 64),
                   SPARVAR_FP8_ROW + CUDNN_TILED: (128, 64)}


def flop_floor_ms(model_name: str, resolution: int, batch: int) -> float | None:
    """The dense bf16 FLOP floor of one generation of `batch` 1024² images; None where none is known (another
    resolution, a model without a figure)."""
    return FLOP_FLOOR_MS[model_name] * batch if model_name in FLOP_FLOOR_MS and resolution == 1024 else None


# the SparVAR engine with CSLA over 2-D query tiles (the policy's csla_query_tile: sparvar.csla.TileLayout, keys
# gathered) instead of raster blocks: row -> query tile (rows, cols)
QUERY_TILES = ", CSLA on 8x8 query tiles"
CSLA_QUERY_TILE_ROWS = {SPARVAR_ENGINE_ROW + QUERY_TILES: (8, 8), SPARVAR_FP8_ROW + QUERY_TILES: (8, 8)}


def _csla_tuner():
    try:
        from sparvar.kernels import csla
    except ImportError:
        return None
    return getattr(csla, "_csla_fwd_tuned", None)


def forget_csla_timings() -> None:
    """Before a row: Triton's autotuner keeps the timings of its last tuning, and a row whose every CSLA call hits
    the tuning cache (an earlier row tuned the same keys) would report another row's (csla_tuning)."""
    tuner = _csla_tuner()
    if tuner is not None and hasattr(tuner, "configs_timings"):
        tuner.configs_timings = None


def csla_tuning() -> dict:
    """The CSLA autotuner's choice at its last call (the last sparse scale) and whether it tuned during this row
    (after forget_csla_timings). Empty without Triton or before any call."""
    tuner = _csla_tuner()
    best = getattr(tuner, "best_config", None)
    if best is None:
        return {}
    timed = getattr(tuner, "configs_timings", None) or {}
    return {"csla_config_last_scale": str(best), "csla_tuned_in_row": bool(timed)}


def generate_once(pipe, features, lengths, sampling, per_scale_runs: list | None = None) -> float:
    """One timed generation (ms); with `per_scale_runs`, its per-scale times are appended to it."""
    marks = []
    progress = (lambda s, t: marks.append(_event())) if per_scale_runs is not None else None
    start = _event()
    pipe.generate(features, lengths, sampling=sampling, seed=0, progress=progress)
    end = _event()
    torch.cuda.synchronize()
    if per_scale_runs is not None:
        edges = [start] + marks
        per_scale_runs.append([a.elapsed_time(b) for a, b in zip(edges[:-1], edges[1:])])
    return start.elapsed_time(end)


def time_generation(pipe, features, lengths, warmup: int, runs: int, sampling) -> tuple[dict, list]:
    """One pipeline's warm-ups, then its `runs` timed generations: (timing with the clocks they ran at, median
    per-scale times)."""
    for _ in range(warmup):
        generate_once(pipe, features, lengths, sampling)
    return time_interleaved([pipe], features, lengths, runs, sampling)[0]


def interleaved_order(rows: int, rounds: int) -> list[list[int]]:
    """The row order of each round: round pairs 2i, 2i + 1 run the rows rotated by i, forward then backward, so that
    each row runs first equally often (when `rounds` is a multiple of 2 * `rows`) and does not always follow the same
    row (two rows: 0 1, 1 0, 1 0, 0 1, ...)."""
    orders = []
    for r in range(rounds):
        order = [(r // 2 + j) % rows for j in range(rows)]
        orders.append(order[::-1] if r % 2 else order)
    return orders


def time_interleaved(pipes: list, features, lengths, runs: int, sampling) -> list[tuple[dict, list]]:
    """Every (warmed-up) pipeline's `runs` timed generations in rounds, one generation each per round
    (interleaved_order): several rows then run at the same point of the GPU's thermal and power history, which a row
    timed after another (the sequential protocol: dense first) does not. Per pipeline: (timing with the clocks the
    rounds ran at, median per-scale times)."""
    times, per_scale_runs = [[] for _ in pipes], [[] for _ in pipes]
    with ClockSampler() as clocks:  # the clocks the timed runs ran at (a GPU may slow them under sustained load)
        for order in interleaved_order(len(pipes), runs):
            for i in order:
                times[i].append(generate_once(pipes[i], features, lengths, sampling, per_scale_runs[i]))
    clock = clocks.summary()  # one span for all rows: they shared it
    return [({**summarize(t), "gpu_clocks": clock}, [statistics.median(col) for col in zip(*p)])
            for t, p in zip(times, per_scale_runs)]


def _event():
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def cudnn_acceptance(cfg, schedule) -> dict:
    """Which scales' self-attention cuDNN SDPA takes, with the model's exact strides (KV cache views)."""
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sparvar.model import KVCache

    H, D, out = cfg.heads, cfg.head_dim, {}
    cache = KVCache(1, 2, H, schedule.total_tokens, D, torch.bfloat16, "cuda")  # its page-padded allocation's strides
    for s, n in enumerate(schedule.lengths):
        qkv = torch.zeros(2, n, 3, H, D, device="cuda", dtype=torch.bfloat16).permute(2, 0, 3, 1, 4)
        k = cache.k[0, :, :, : schedule.kv_len(s)]
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.nn.functional.scaled_dot_product_attention(qkv[0], k, k, scale=1.0)
            out[s] = True
        except RuntimeError:
            out[s] = False
    return out


DEFAULT_MODELS = ["infinity-2b", "infinity-8b"]


def rows_for(model_name: str):
    """(row name, attention, runner kind, sdpa backend, skip_last, fp8 linears)"""
    rows = [
        ("dense eager, SDPA FlashAttention-2", "dense", "eager", "flash", 0, False),
        ("dense eager, SDPA cuDNN", "dense", "eager", "cudnn", 0, False),
        # the engines' dense attention: cuDNN, our Triton kernel for the smallest calls (sparvar.attention "engine")
        (DENSE_ENGINE_ROW, "dense", "graphs", "engine", 0, False),
        (SPARVAR_ENGINE_ROW, "sparvar", "graphs", "engine", 0, False),
        (RESIDUALS_IN_LINE_ROW, "sparvar", "graphs", "engine", 0, False),
        ("SparVAR engine + skip last 2", "sparvar", "graphs", "engine", 2, False),
        ("dense engine + skip last 2", "dense", "graphs", "engine", 2, False),
    ]
    from sparvar.config import get_config

    if getattr(get_config(model_name), "family", "infinity") == "infinity":  # only Infinity has cross-attention
        rows.insert(4, (SPARVAR_ENGINE_ROW + QUERY_TILES, "sparvar", "graphs", "engine", 0, False))  # measured there only
        rows += [(DENSE_ENGINE_ROW + UNABSORBED, "dense", "graphs", "engine", 0, False),
                 (SPARVAR_ENGINE_ROW + UNABSORBED, "sparvar", "graphs", "engine", 0, False)]
        from sparvar.kernels.cudnn_csla import HAS_CUDNN_FRONTEND

        cudnn_rows = [(name, "sparvar", "graphs", "engine", 0, name.startswith(SPARVAR_FP8_ROW))
                      for name in CSLA_CUDNN_ROWS] if HAS_CUDNN_FRONTEND else []
        rows += [row for row in cudnn_rows if not row[5]]
        # opt-in precision: its own rows
        rows += [(DENSE_FP8_ROW, "dense", "graphs", "engine", 0, True),
                 (SPARVAR_FP8_ROW, "sparvar", "graphs", "engine", 0, True),
                 (SPARVAR_FP8_ROW + QUERY_TILES, "sparvar", "graphs", "engine", 0, True),
                 (DENSE_FP8_ROW + UNABSORBED, "dense", "graphs", "engine", 0, True),
                 (SPARVAR_FP8_ROW + UNABSORBED, "sparvar", "graphs", "engine", 0, True)]
        rows += [row for row in cudnn_rows if row[5]]
    return rows


def select_rows(model_name: str, specs: list[str] | None):
    """The rows of `rows_for(model_name)` that the --rows values `specs` name (None: all), in the benchmark's order.
    A value starting with '=' is the one row of exactly that name (row names hold commas, and the SparVAR engine
    row's name is contained in its ablations' names, so only this selects it alone); any other value is
    comma-separated terms, each selecting every row whose name contains it. A value or term that selects no row is
    an error naming it, not a run that measures less than asked."""
    from sparvar.cli import UsageError

    rows = rows_for(model_name)
    if specs is None:
        return rows
    terms = [t for spec in specs for t in ([spec] if spec.startswith("=") else
                                           [w.strip() for w in spec.split(",") if w.strip()])]
    if not terms:
        raise UsageError("bench e2e: --rows names no row")

    def selects(term, name):
        return name == term[1:] if term.startswith("=") else term in name

    for term in terms:
        if not any(selects(term, r[0]) for r in rows):
            raise UsageError(f"bench e2e: --rows term {term!r} selects none of {model_name}'s rows: "
                             + "; ".join(r[0] for r in rows))
    return [r for r in rows if any(selects(t, r[0]) for t in terms)]


def family_parts(model_name: str, resolution: int, device, weights: str | None = None, vae: str | None = None,
                 embeddings: str | None = None, batch: int = 1):
    """(pipeline, decoder, text features, text lengths/mask, sampling, make_runner, make_pipeline) of a model family;
    the rows then run the same timing code for Infinity and HART.

    The model and tokenizer come from the same `Pipeline.create` as `sparvar generate`: random bf16 weights, or the
    official checkpoints `weights` and `vae`. The text encoder is outside the timing (the paper's protocol), so its
    features are the hashed stand-ins unless `embeddings` (precomputed features) are given: the work is the same.
    `batch` prompts make `batch` images per generation (each with its CFG row)."""
    from sparvar.cuda_engine import CudaGraphRunner, GraphedDecoder
    from sparvar.pipeline import Pipeline

    base = Pipeline.create(model_name, resolution, weights=weights, vae=vae, device=device, dtype=torch.bfloat16)
    cfg, schedule, model = base.cfg, base.schedule, base.runner.model
    prompts = bench_prompts(model_name, [PROMPT] + [f"{PROMPT}, view {i}" for i in range(1, batch)])  # one image each
    features, lengths = base.text_features(prompts, embeddings=embeddings, allow_hashed=True)
    if features.shape[0] != batch:
        raise ValueError(f"the text features hold {features.shape[0]} prompts; the run asks for batch {batch}")
    random_weights = base.random_weights
    if getattr(cfg, "family", "infinity") == "hart":
        from sparvar.hart.cuda_engine import HartCudaGraphRunner
        from sparvar.hart.generate import HartPipeline, HartTorchRunner
        from sparvar.hart.sampling import HartSampling

        # every row decodes in fp16 as the official inference (fp16 autocast); f_hat accumulates in fp32
        decoder = base.tokenizer.half_decoder()
        # the engine rows decode as the torch-cuda engine does; GraphedDecoder fixes the sub-pixel weights of the
        # decoder it is given, which switches that module's eager decodes to the sub-pixel form too: the eager rows
        # keep their own
        graphed_tokenizer = GraphedDecoder(copy.deepcopy(decoder))

        def make_hart_pipeline(runner, skip):
            tokenizer = graphed_tokenizer if isinstance(runner, HartCudaGraphRunner) else decoder
            return HartPipeline(cfg, schedule, runner, tokenizer, random_weights, skip_last=skip)

        return (base, decoder, features, lengths, HartSampling(),
                lambda kind, plan, backend, fp8, skip, absorb: (
                    HartCudaGraphRunner(model, schedule, plan, backend=backend, skip_last=skip) if kind == "graphs"
                    else HartTorchRunner(model, schedule, plan, backend=backend)),
                make_hart_pipeline)
    from sparvar.fp8 import DEFAULT_MIN_TOKENS
    from sparvar.generate import Sampling, TorchRunner

    decoder = base.decoder
    graphed_decoder = GraphedDecoder(copy.deepcopy(decoder))  # the eager rows keep their own, as HART's above

    def make_runner(kind, plan, backend, fp8, skip, absorb):
        if kind == "graphs":
            return CudaGraphRunner(model, schedule, plan, backend=backend, fp8_min_tokens=DEFAULT_MIN_TOKENS if fp8 else None,
                                   skip_last=skip, absorb=absorb)
        return TorchRunner(model, schedule, plan, backend=backend)

    return (base, decoder, features, lengths, Sampling(cfg=4.0, tau=1.0, top_p=0.97), make_runner,
            lambda runner, skip: Pipeline(cfg, schedule, runner, graphed_decoder if isinstance(runner, CudaGraphRunner)
                                          else decoder, random_weights, skip_last=skip))


def add_ratios(model_name: str, results: list[dict], resolution: int = 1024, batch: int = 1) -> None:
    """Each row's speedups over the baselines measured in the same process (and its distance from the FLOP floor)."""
    medians = {r["row"]: r["median_ms"] for r in results if "median_ms" in r}
    floor = flop_floor_ms(model_name, resolution, batch)
    fa2 = medians.get("dense eager, SDPA FlashAttention-2")
    for r in results:
        if "median_ms" not in r:
            continue
        if fa2:
            r["speedup_vs_dense_eager_fa2"] = fa2 / r["median_ms"]
        # the unabsorbed ablation against the dense engine of its own form (as the rows before absorbing were)
        suffix = UNABSORBED if r["row"].endswith(UNABSORBED) else ""
        baseline = medians.get(DENSE_ENGINE_ROW + suffix)
        if baseline:
            r["speedup_vs_dense_engine"] = baseline / r["median_ms"]
        dense_fp8 = medians.get(DENSE_FP8_ROW + suffix)
        if r.get("fp8") and dense_fp8:  # SparVAR's own gain at the same precision
            r["speedup_vs_dense_fp8_engine"] = dense_fp8 / r["median_ms"]
        # a skipping row against the full dense engine is the paper's "+ skip 2" figure; against the dense engine
        # skipping as much, SparVAR's own gain on the scales that run
        same_skip = medians.get(f"dense engine + skip last {r.get('skip_last')}")
        if r.get("skip_last") and same_skip:
            r["speedup_vs_dense_engine_same_skip"] = same_skip / r["median_ms"]
        # the floor is the dense bf16 FLOPs of one whole image: a row that skips scales or runs FP8 GEMMs has another
        if floor and not r.get("skip_last") and not r.get("fp8"):
            r["x_flop_floor"] = r["median_ms"] / floor


def csla_by_cudnn(cfg, schedule, skip: int, tile: tuple[int, int] | None):
    """The SparVAR plan of CSLA_CUDNN_ROWS and the scales whose CSLA cuDNN's paged SDPA runs: with `tile`, the scales
    whose queries are whole tiles of it get its layouts and cuDNN, the others keep the policy's layouts and the
    Triton kernel; without, cuDNN runs every scale whose queries are whole tiles of the policy's. (The paged call
    refuses the rest: sparvar.kernels.cudnn_csla.check_paged_csla.) The call is dispatched by its layout's tile
    shape: at 2f1d060 only whole tiles were asked for, which gave cuDNN scale 10's 64-row tiles in the 128x64 rows."""
    from sparvar.kernels.cudnn_csla import csla_attention_cudnn
    from sparvar.pipeline import make_plan
    from sparvar.sparse import default_policy

    plan = make_plan(cfg, schedule, "sparvar", backend="triton", skip_last=skip)
    tiled = default_policy(cfg.name, schedule, csla_block=tile) if tile else None
    by_cudnn = set()
    for scale, layout in plan.csla_layouts.items():
        if schedule.lengths[scale] % (tile or (layout.block_m,))[0] == 0:
            if tiled:
                plan.csla_layouts[scale] = tiled.csla_layout(schedule, scale)
            by_cudnn.add(scale)
    blocks = {(plan.csla_layouts[scale].block_m, plan.csla_layouts[scale].block_n) for scale in by_cudnn}
    triton_csla = plan.ops.csla  # dispatched by tile shape, not layout identity: the plan hands over device copies

    def csla(q, k, v, layout):
        cudnn = layout.q_len % layout.block_m == 0 and (layout.block_m, layout.block_n) in blocks
        return (csla_attention_cudnn if cudnn else triton_csla)(q, k, v, layout)

    plan.ops = plan.ops._replace(csla=csla)
    return plan, sorted(by_cudnn)


def bench_model(model_name: str, resolution: int, warmup: int, runs: int, rows=None, weights: str | None = None,
                vae: str | None = None, embeddings: str | None = None, save=None, device="cuda", batch: int = 1,
                interleave: bool = False) -> dict:
    """The rows of one model, side by side in this process: one row after another (each its warm-ups, then its
    timed runs), or with `interleave` all rows built first and timed in rounds (time_interleaved). `save(result)` is
    called after every row (every set, interleaved) with the result so far, so that a run cut short (a time limit, a
    lost machine) keeps the rows it finished."""
    from sparvar.pipeline import make_plan

    device = torch.device(device)
    torch.cuda.reset_peak_memory_stats()
    base, decoder, features, lengths, sampling, make_runner, make_pipeline = family_parts(
        model_name, resolution, device, weights, vae, embeddings, batch)
    cfg, schedule = base.cfg, base.schedule
    results = []
    result = {"model": model_name, "resolution": resolution, "batch": batch, "cfg": True, "dtype": "bf16",
              "weights": {"transformer": weights, "tokenizer": vae} if weights else "random",
              "text_features": embeddings or "hashed stand-ins (the text encoder is not timed)",
              "cudnn_takes_scale": cudnn_acceptance(cfg, schedule),
              "schedule": [list(g) for g in schedule.grids], "flop_floor_ms": flop_floor_ms(model_name, resolution, batch),
              "protocol": "interleaved" if interleave else "sequential", "rows": results}

    def build(name, attention, kind, backend, skip, fp8):
        """(plan, runner, pipeline, what the row records besides its timing)"""
        extra = {}
        if name in CSLA_CUDNN_ROWS:
            plan, extra["csla_by_cudnn_scales"] = csla_by_cudnn(cfg, schedule, skip, CSLA_CUDNN_ROWS[name])
        elif name in CSLA_QUERY_TILE_ROWS:
            plan = make_plan(cfg, schedule, attention, backend="triton", skip_last=skip,
                             csla_query_tile=CSLA_QUERY_TILE_ROWS[name])
            extra["csla_query_tile"] = list(CSLA_QUERY_TILE_ROWS[name])
        else:
            plan = make_plan(cfg, schedule, attention, backend="triton", skip_last=skip)
        if name == RESIDUALS_IN_LINE_ROW:
            plan.residual_lanes = 0
        forget_csla_timings()
        runner = make_runner(kind, plan, backend, fp8, skip, not name.endswith(UNABSORBED))  # tunes, captures at begin()
        if attention == "sparvar":
            extra["residual_lanes"] = plan.residual_lanes  # side streams of the decision's residual launches
        return plan, runner, make_pipeline(runner, skip), extra

    def after_first_run(name, attention, runner) -> dict:
        """What a row can record once it has generated: whether its graph runner absorbed the cross-attention (known
        at its first begin()) and the CSLA kernel's choice at the last sparse scale (each scale is tuned alone)."""
        text = getattr(getattr(runner, "current", None), "text", None)  # Infinity's graph runner
        seen = {"cross_attention_absorbed": getattr(text, "absorbed", None) is not None}
        if name in CSLA_QUERY_TILE_ROWS:
            from sparvar.kernels.csla import tuned_config

            return {**seen, "csla_tile_config_last_scale": tuned_config("csla_tiles")}
        return {**seen, **(csla_tuning() if attention == "sparvar" else {})}

    def record(spec, extra, timing, per_scale, seconds) -> dict:
        name, attention, kind, backend, skip, fp8 = spec
        row = {"row": name, "attention": attention, "runner": kind, "sdpa_backend": backend, "skip_last": skip,
               "fp8": fp8, **timing, "images_per_s": 1000 * batch / timing["median_ms"], "per_scale_ms": per_scale,
               "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "bench_seconds": seconds, **extra}
        clocks = timing.get("gpu_clocks", {})
        clock = f", SM {clocks['sm_clock_mhz']['median']:.0f} MHz" if clocks.get("sampled") else ""
        print(f"{model_name:12s} {name:48s} {timing['median_ms']:8.1f} ms  (peak {row['peak_memory_gib']:.1f} GiB"
              f"{clock})", flush=True)
        return row

    def failed(spec, e) -> dict:  # one broken row must not lose the others: record it
        print(f"{model_name:12s} {spec[0]:48s} FAILED: {type(e).__name__}: {e}", flush=True)
        return {"row": spec[0], "error": f"{type(e).__name__}: {e}"}

    specs = rows or rows_for(model_name)
    if interleave:
        # every row in memory at once: a row that fails to build or warm up is recorded and left out; peak memory
        # and bench_seconds are then the whole set's (builds, warm-ups and rounds)
        built, t0 = [], time.perf_counter()
        for spec in specs:
            try:
                plan, runner, pipe, extra = build(*spec)
                for _ in range(warmup):
                    generate_once(pipe, features, lengths, sampling)
                built.append((spec, plan, pipe, {**extra, **after_first_run(spec[0], spec[1], runner)}))
            except Exception as e:
                results.append(failed(spec, e))
            plan = runner = pipe = None  # what is kept is in `built`
        torch.cuda.synchronize()
        try:
            timings = time_interleaved([pipe for _, _, pipe, _ in built], features, lengths, runs, sampling)
        except Exception as e:  # a failure mid-rounds leaves no row with its full set of runs
            results.extend(failed(spec, e) for spec, *_ in built)
        else:
            seconds = time.perf_counter() - t0
            results.extend(record(spec, extra, timing, per_scale, seconds)
                           for (spec, _, _, extra), (timing, per_scale) in zip(built, timings))
        order = {spec[0]: i for i, spec in enumerate(specs)}
        results.sort(key=lambda row: order[row["row"]])  # the benchmark's order, failed rows included
        del built
        specs = []
        add_ratios(model_name, results, resolution, batch)
        if save is not None:
            save(result)
    for spec in specs:
        plan, runner, pipe, extra = build(*spec)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            timing, per_scale = time_generation(pipe, features, lengths, warmup, runs, sampling)
        except Exception as e:
            results.append(failed(spec, e))
        else:
            results.append(record(spec, {**extra, **after_first_run(spec[0], spec[1], runner)}, timing, per_scale,
                                  time.perf_counter() - t0))
        del pipe, plan, runner
        gc.collect()
        torch.cuda.empty_cache()
        add_ratios(model_name, results, resolution, batch)
        if save is not None:
            save(result)
    del base, decoder, build  # the model's weights go with the last references to them
    gc.collect()
    torch.cuda.empty_cache()
    return result


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result["models"]), figsize=(7 * len(result["models"]), 4), squeeze=False)
    for ax, m in zip(axes[0], result["models"]):
        rows = [r for r in m["rows"] if "median_ms" in r]
        ax.barh([r["row"] for r in rows], [r["median_ms"] for r in rows])
        if m["flop_floor_ms"]:
            ax.axvline(m["flop_floor_ms"], color="k", linestyle="--", label="dense FLOP floor")
        ax.set_title(f"{m['model']} {m['resolution']}² ({torch.cuda.get_device_name()}, bf16, CFG, batch {m['batch']})")
        ax.set_xlabel("ms per generation (median)")
        ax.invert_yaxis()
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def check_args(args) -> None:
    """Refuse a bad option before any model is built (sparvar.cli.UsageError, a message naming it)."""
    from sparvar.cli import UsageError
    from sparvar.config import get_config

    for m in args.model or []:
        try:
            get_config(m)
        except ValueError as e:
            raise UsageError(str(e)) from None
    for m in args.model or DEFAULT_MODELS:
        select_rows(m, args.rows)
    if (args.weights is None) != (args.vae is None):
        raise UsageError("bench e2e: give both --weights and --vae (official checkpoints), or neither (random weights)")
    if args.weights and len(args.model or []) != 1:
        raise UsageError("bench e2e: --weights/--vae are one model's checkpoints; name that model with one --model")
    if args.batch < 1:
        raise UsageError(f"bench e2e: --batch must be >= 1, got {args.batch}")
    if args.runs < 1 or args.warmup < 0:  # a median of no runs failed every row, after building each
        raise UsageError(f"bench e2e: --runs must be >= 1 and --warmup >= 0, got {args.runs} and {args.warmup}")
    if args.engine_cross_max_q is not None and args.engine_cross_max_q < 0:
        raise UsageError(f"bench e2e: --engine-cross-max-q must be >= 0, got {args.engine_cross_max_q}")
    from sparvar.schedule import get_schedule

    for m in args.model or DEFAULT_MODELS:  # a resolution without a schedule failed at the first row's build
        try:
            get_schedule(args.resolution, model=m)
        except ValueError as e:
            raise UsageError(f"bench e2e: {e}") from None
    if args.out and os.path.isdir(args.out):  # found only when the first row's result was written
        raise UsageError(f"bench e2e: --out {args.out} is a directory; give a .json file name")
    if args.text_embeddings and len(args.model or []) != 1:
        raise UsageError("bench e2e: --text-embeddings are one model's features; name that model with one --model")
    for flag, path in (("--weights", args.weights), ("--vae", args.vae), ("--text-embeddings", args.text_embeddings)):
        if path and not os.path.exists(path):
            raise UsageError(f"bench e2e: {flag} {path}: no such file or directory")


def main(args=None) -> int:
    from sparvar.cli import UsageError, add_bench_e2e_args

    if args is None or isinstance(args, list):  # run as a script; `sparvar bench e2e` parses the same options
        ap = argparse.ArgumentParser(description="end-to-end latency, dense vs SparVAR")
        add_bench_e2e_args(ap)
        args = ap.parse_args(args)
    try:
        check_args(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench e2e needs a CUDA GPU; none is available on this machine", file=sys.stderr)
        return 2
    import sparvar.attention

    if args.engine_cross_max_q is not None:
        sparvar.attention.ENGINE_CROSS_MAX_Q = args.engine_cross_max_q
    models = args.model or DEFAULT_MODELS
    args.out = args.out or result_path("e2e" if args.batch == 1 else f"e2e_batch{args.batch}")
    out = {"benchmark": "end-to-end latency per image", "protocol": f"{args.warmup} warm-up + median of {args.runs} timed runs"
           + (" in rounds, one generation per row each (--interleave); " if args.interleave else "; ") +
           "text conditioning, all scales, CFG, sampling and VAE decode included; T5 encoder excluded; "
           + ("official weights" if args.weights else "random weights"),
           "engine_cross_max_q": sparvar.attention.ENGINE_CROSS_MAX_Q, "models": []}
    for m in models:  # written after every row, so a run cut short keeps what it measured
        rows = select_rows(m, args.rows)
        done = list(out["models"])
        out["models"].append(bench_model(m, args.resolution, args.warmup, args.runs, rows, args.weights, args.vae,
                                         args.text_embeddings,
                                         save=lambda partial: write_result(args.out, {**out, "models": done + [partial]}),
                                         batch=args.batch, interleave=args.interleave))
        path = write_result(args.out, out)
    plot(out, os.path.splitext(path)[0] + ".png")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
