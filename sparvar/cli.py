"""`sparvar` command line: generate, engine build/info/verify, serve, bench.

Every argument is checked before any heavy work starts; a bad one exits with a message naming it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class UsageError(Exception):
    pass


def nonempty(value: str) -> str:
    """argparse type of a name or path: an empty one (what "$VAR" gives for an unset variable) is an error, not
    the option's default."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", type=nonempty, help="model name: infinity-2b, infinity-8b, infinity-tiny (default), hart-0.7b, hart-tiny")
    g.add_argument("--weights", type=nonempty, help="official transformer checkpoint: a .pth / .safetensors file, or a folder of shards (Infinity-8B: infinity_8b_weights; HART: its llm/ folder)")
    g.add_argument("--vae", type=nonempty, help="official tokenizer checkpoint (.pth or .safetensors; HART: the tokenizer file)")
    g.add_argument("--random-weights", action="store_true", help="random transformer and tokenizer (smoke and speed runs)")
    g.add_argument("--resolution", type=int, help="256, 512, 768 or 1024 (default: the model's)")
    g.add_argument("--aspect", type=nonempty, help="aspect ratio H:W of an official template (default 1:1)")
    g.add_argument("--device", type=nonempty, help="cpu (default) or cuda")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="fp32 (default on cpu) or bf16 (default on cuda)")
    g.add_argument("--attention", choices=("dense", "sparvar"), help="dense (default) or SparVAR sparse attention")
    g.add_argument("--skip-last", type=int, default=0, help="skip the transformer on the last N scales")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--prompt", action="append", help="text prompt (repeat for a batch)")
    g.add_argument("--t5", type=nonempty, help="local directory of the flan-t5-xl encoder (Infinity)")
    g.add_argument("--qwen", type=nonempty, help="local directory of the Qwen2-VL-1.5B-Instruct text model (HART)")
    g.add_argument("--text-embeddings", type=nonempty, help="precomputed text features (.safetensors/.pt with 'features', 'lengths')")
    g.add_argument("--seed", type=int, default=0)
    # None keeps the model family's default (sparvar.generate.Sampling, sparvar.hart.sampling.HartSampling)
    g.add_argument("--cfg", type=float, help="classifier-free guidance (default: Infinity 4.0, HART 4.5)")
    g.add_argument("--tau", type=float, help="temperature (Infinity only; default 1.0)")
    g.add_argument("--top-k", type=int, help="top-k of the bitwise sampler (Infinity only; default 0)")
    g.add_argument("--top-p", type=float, help="top-p (default: Infinity 0.97, HART 0 = off)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparvar", description="Fast VAR inference with SparVAR sparse attention")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images (eager torch, or through a built engine with --engine)")
    _add_model_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("--engine", type=nonempty, help="engine directory built by `sparvar engine build` (model options come from it)")
    gen.add_argument("--out", default="image.png", help="output PNG (a batch writes NAME-<i>.png)")

    eng = sub.add_parser("engine", help="build and inspect engines")
    esub = eng.add_subparsers(dest="engine_command", required=True)
    build = esub.add_parser("build", help="export -> optimize -> build, skipping unchanged stages")
    _add_model_args(build)
    build.add_argument("--backend", default="onnxruntime", help="onnxruntime, tensorrt, tensorrt-rtx or torch-cuda")
    build.add_argument("--engine-dir", type=nonempty, help="output directory (default engines/<model>-<resolution>-<attention>[-tiles<RxC>][-fp8]-"
                       "<backend>; a build there with another aspect, dtype, batch or weights replaces that engine, "
                       "so give each variant you keep its own directory)")
    build.add_argument("--force", action="store_true", help="rebuild every stage")
    build.add_argument("--fp8", action="store_true", help="FP8 block linears at the large scales (torch-cuda, Infinity; "
                       "changes the numbers: see bench/results/fidelity_fp8.json)")
    build.add_argument("--csla-query-tile", metavar="RxC", default=None,
                       help="SparVAR's CSLA over RxC tiles of query positions (e.g. 8x8), each attending the union of "
                            "its queries' windows, instead of raster blocks (Infinity; faster, and changes the numbers: "
                            "see bench/results/fidelity_tiles_cpu.json)")
    build.add_argument("--batch", type=int, default=1, help="prompts per engine call (default 1); `sparvar serve` "
                       "batches up to this many concurrent requests into one call")
    for name in ("info", "verify"):
        e = esub.add_parser(name, help=f"{name} an engine directory")
        e.add_argument("engine_dir", type=nonempty)

    serve = sub.add_parser("serve", help="serve generation requests over HTTP from one warm engine (sparvar/serve.py)")
    serve.add_argument("--engine", type=nonempty, required=True, help="engine directory built by `sparvar engine build`")
    serve.add_argument("--t5", type=nonempty, help="local flan-t5-xl directory (Infinity engines with real weights)")
    serve.add_argument("--qwen", type=nonempty, help="local Qwen2-VL-1.5B-Instruct directory (HART engines with real weights)")
    serve.add_argument("--host", type=nonempty, default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    serve.add_argument("--skip-last", type=int, default=0, help="skip the transformer on the last N scales")
    serve.add_argument("--batch-wait-ms", type=float, default=10.0,
                       help="engines built with --batch N: how long the oldest request waits for others to share "
                            "its engine call, from its arrival or the previous call's end (default 10 ms)")
    serve.add_argument("--no-warmup", action="store_true",
                       help="do not generate once before listening (the first request then pays capture and tuning)")

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    add_bench_e2e_args(bsub.add_parser("e2e", help="end-to-end latency, dense vs SparVAR (bench/e2e.py)"))
    return parser


def add_bench_e2e_args(p: argparse.ArgumentParser) -> None:
    """The options of `sparvar bench e2e`, also parsed by `python bench/e2e.py` (one definition)."""
    p.add_argument("--model", type=nonempty, action="append", help="model(s) to bench (default infinity-2b and infinity-8b)")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1, help="prompts per generation (default 1, the paper's protocol)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--weights", type=nonempty, help="official transformer checkpoint of the one --model (default: random weights)")
    p.add_argument("--vae", type=nonempty, help="official tokenizer checkpoint, with --weights")
    p.add_argument("--text-embeddings", type=nonempty, help="precomputed text features of the one --model (default: hashed stand-ins; "
                   "the text encoder is not timed)")
    p.add_argument("--out", type=nonempty, default=None, help="default: bench/results/e2e_<device>.json (e2e_batch<N>_<device>.json)")
    p.add_argument("--rows", action="append", default=None,
                   help="only these rows (repeatable): comma-separated terms, each selecting the rows whose name "
                   "contains it; or '=' and one row's exact name (names hold commas)")
    p.add_argument("--interleave", action="store_true",
                   help="build every selected row first and time them in rounds (one generation each, order rotated), "
                        "so that no row runs later in the GPU's thermal and power history than another; the rows "
                        "must fit in GPU memory together")
    p.add_argument("--engine-cross-max-q", type=int, default=None,
                   help="an experiment on the crossover: the engines' cross-attention runs our kernel up to this many "
                        "query tokens instead of sparvar.attention.ENGINE_CROSS_MAX_Q (recorded in the result)")


def resolve_device_dtype(device: str, dtype: str | None):
    import torch

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is available on this machine")
    index = device.partition(":")[2]
    if device.startswith("cuda:") and not (index.isascii() and index.isdigit() and int(index) < torch.cuda.device_count()):
        raise UsageError(f"--device {device}: this machine's GPUs are cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    dtype = dtype or ("bf16" if device.startswith("cuda") else "fp32")
    return torch.device(device), getattr(torch, DTYPES[dtype])


def check_model_args(args) -> None:
    from .config import get_config
    from .engine import EngineSpec
    from .schedule import get_schedule

    args.model = args.model or "infinity-tiny"
    args.aspect = args.aspect or EngineSpec.aspect  # unset: the defaults an engine spec has (1:1, dense)
    args.attention = args.attention or EngineSpec.attention
    if args.resolution is not None and args.resolution <= 0:
        raise UsageError(f"--resolution must be positive, got {args.resolution}")
    try:
        cfg = get_config(args.model)
        args.resolution = args.resolution or cfg.default_resolution
        schedule = get_schedule(args.resolution, args.aspect, model=args.model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.random_weights and (args.weights or args.vae):
        raise UsageError("--random-weights cannot be combined with --weights/--vae")
    if not args.random_weights and not (args.weights and args.vae):
        raise UsageError("give both --weights and --vae (official checkpoints), or --random-weights")
    if args.skip_last < 0:
        raise UsageError(f"--skip-last must be >= 0, got {args.skip_last}")
    if args.skip_last >= schedule.num_scales:  # the loop would say so only after the weights load
        raise UsageError(f"--skip-last must be below the {schedule.num_scales} scales of {args.model} at "
                         f"{args.resolution} ({args.aspect}), got {args.skip_last}")


def check_checkpoint_paths(args) -> None:
    """--weights and --vae exist (a file or a folder of shards; the loaders say more of what they find there)."""
    for path in (args.weights, args.vae):
        if path and not os.path.exists(path):
            raise UsageError(f"checkpoint not found: {path}")


def check_out_path(out: str, images: int) -> None:
    """Refuse, before generating, an --out that cannot become the image file(s) of `images` prompts (a batch writes
    NAME-<i>.EXT: sparvar.pipeline.image_paths)."""
    import os

    from .pipeline import image_format, image_paths

    if not out or os.path.basename(out) in ("", ".", ".."):
        raise UsageError(f"--out must name an image file, got {out!r}")
    if os.path.isdir(out):
        raise UsageError(f"--out {out} is a directory; give a file name (e.g. {os.path.join(out, 'image.png')})")
    taken = [p for p in image_paths(out, images) if os.path.isdir(p)]
    if taken:
        raise UsageError(f"--out {out}: the batch's image {taken[0]} is a directory; give another --out")
    if image_format(out) is None:  # Pillow would say so only after the whole generation
        raise UsageError(f"--out {out}: no image format writes {os.path.splitext(out)[1]!r} files; use .png, .jpg or "
                         ".webp")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):  # the first existing ancestor must be a writable directory
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--out {out}: cannot write in {parent}")


def cmd_generate(args) -> int:
    import torch

    from .config import get_config
    from .pipeline import Pipeline, check_text_sources, default_prompt, sampling_for, save_images
    from .text import check_prompt

    def check_text_args(cfg, real_weights) -> int:
        """The text options against the model; returns the number of prompts (rows of --text-embeddings)."""
        from .text import load_embeddings

        try:
            check_text_sources(cfg, t5=args.t5, qwen=args.qwen, embeddings=args.text_embeddings,
                               real_weights=real_weights, prompts=args.prompt)
            # a small file: read here as the generation will read it (its width; HART's every slot and lengths), not
            # after the weights load
            if args.text_embeddings and getattr(cfg, "family", "infinity") == "hart":
                from .hart.text import load_hart_embeddings

                return load_hart_embeddings(args.text_embeddings, cfg)[0].shape[0]
            if args.text_embeddings:
                return load_embeddings(args.text_embeddings, cfg.text_dim)[0].shape[0]
        except ValueError as e:
            raise UsageError(str(e)) from None
        return len(args.prompt or [default_prompt(cfg)])

    def check_sampling(cfg):
        """--cfg/--tau/--top-k/--top-p as the model's family samples (Infinity's Sampling or HART's HartSampling; unset
        options keep its defaults), checked before anything loads."""
        try:
            return sampling_for(cfg, cfg=args.cfg, tau=args.tau, top_k=args.top_k, top_p=args.top_p)
        except ValueError as e:
            raise UsageError(str(e)) from None

    if args.prompt and args.text_embeddings:
        raise UsageError("give --prompt or --text-embeddings (precomputed prompts), not both")
    for prompt in args.prompt or ():
        try:
            check_prompt(prompt)
        except ValueError as e:
            raise UsageError(f"--prompt {e}") from None
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be an integer in [0, 2^63), got {args.seed}")
    if args.engine:
        from .runtime import check_engine_code, check_engine_request, load_engine_pipeline

        if args.weights or args.vae or args.random_weights:
            raise UsageError("--engine runs the weights the engine was built with; drop --weights/--vae/--random-weights")
        if args.device:
            raise UsageError("--engine runs on its backend's device (onnxruntime: the CPU; torch-cuda, tensorrt, "
                             "tensorrt-rtx: the GPU); drop --device")
        from .engine import check_compatible, read_manifest

        # what the engine was built for is fixed: an option that says otherwise is refused, not ignored; one no
        # engine could have been built for is refused as such (not "build an engine with model='foo'")
        if args.resolution is not None and args.resolution <= 0:
            raise UsageError(f"--resolution must be positive, got {args.resolution}")
        if args.model is not None:
            try:
                get_config(args.model)
            except ValueError as e:
                raise UsageError(str(e)) from None
        expected = dict(model=args.model, resolution=args.resolution, aspect=args.aspect, attention=args.attention,
                        dtype=args.dtype)
        manifest = read_manifest(args.engine)  # cheap: the options are checked before the engine loads
        check_compatible(manifest, args.engine, **expected)
        try:
            engine_cfg = get_config(manifest["spec"]["model"])
        except ValueError as e:
            raise UsageError(f"{args.engine}: {e}; rebuild the engine") from None
        sampling = check_sampling(engine_cfg)
        prompts = check_text_args(engine_cfg, real_weights=manifest["spec"]["weights"] is not None)
        check_out_path(args.out, prompts)  # once the prompts are counted (a batch writes NAME-<i>), before any load
        check_engine_code(args.engine, manifest)  # the spec's values, before the request is checked against them
        check_engine_request(manifest, prompts, guided=sampling.guided)
        pipe = load_engine_pipeline(args.engine, skip_last=args.skip_last, **expected)
    else:
        check_model_args(args)
        sampling = check_sampling(get_config(args.model))
        check_out_path(args.out, check_text_args(get_config(args.model), real_weights=not args.random_weights))
        check_checkpoint_paths(args)
        device, dtype = resolve_device_dtype(args.device or "cpu", args.dtype)
        pipe = Pipeline.from_args(args, device, dtype)
    prompts = args.prompt or [default_prompt(pipe.cfg)]
    features, lengths = pipe.text_features(prompts, t5=args.t5, embeddings=args.text_embeddings,
                                           allow_hashed=pipe.random_weights, qwen=args.qwen)
    t0 = time.perf_counter()
    last = [t0]

    def progress(scale, total):
        now = time.perf_counter()
        h, w = pipe.schedule.grids[scale]
        print(f"  scale {scale + 1:2d}/{total} {h:3d}x{w:<3d} {1000 * (now - last[0]):8.1f} ms", file=sys.stderr)
        last[0] = now

    with torch.no_grad():
        result = pipe.generate(features, lengths, sampling=sampling, seed=args.seed, progress=progress)
    paths = save_images(result.image, args.out)
    print(f"wrote {', '.join(paths)} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return 0


def cmd_engine(args) -> int:
    from . import runtime

    if args.engine_command == "build":
        check_model_args(args)
        check_checkpoint_paths(args)
        if args.device:
            raise UsageError(f"--device: an engine runs on its backend's device ({args.backend}); drop --device")
        if args.skip_last:
            raise UsageError("--skip-last is chosen when generating (sparvar generate/serve --skip-last), not at build")
        if args.batch < 1:
            raise UsageError(f"--batch must be >= 1, got {args.batch}")
        runtime.build_engine_from_args(args)
    elif args.engine_command == "info":
        runtime.print_engine_info(args.engine_dir)
    else:
        runtime.verify_engine(args.engine_dir)
    return 0


def cmd_serve(args) -> int:
    from .serve import GenerationService, check_listen_address, make_server

    if args.skip_last < 0:
        raise UsageError(f"--skip-last must be >= 0, got {args.skip_last}")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if not 0 <= args.batch_wait_ms <= 10_000:
        raise UsageError(f"--batch-wait-ms must be in [0, 10000], got {args.batch_wait_ms}")
    def listen(bind):
        try:
            return bind()
        except OSError as e:  # the port is taken, or the host is not an address of this machine
            raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None

    listen(lambda: check_listen_address(args.host, args.port))  # before the engine loads (minutes at 8B)
    service = GenerationService(args.engine, t5=args.t5, qwen=args.qwen, skip_last=args.skip_last,
                                batch_wait_ms=args.batch_wait_ms)
    if not args.no_warmup:
        print(f"warm-up generation: {service.warm_up():.1f} ms", file=sys.stderr)
    server = listen(lambda: make_server(service, args.host, args.port, log=lambda m: print(m, file=sys.stderr)))
    print(f"serving {args.engine} on http://{args.host}:{server.server_port} (POST /generate, GET /health)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_bench(args) -> int:
    try:
        from bench.e2e import main as e2e_main  # benchmarks live in the repository's bench/, not in the package
    except ModuleNotFoundError as e:
        if e.name != "bench":
            raise
        raise UsageError("sparvar bench runs the repository's bench/ scripts: run it from the repository root as "
                         "`python -m sparvar.cli bench e2e` (or `make bench`)") from None
    return e2e_main(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "engine": cmd_engine, "serve": cmd_serve, "bench": cmd_bench}[args.command](args)
    except UsageError as e:
        print(f"sparvar: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # bad checkpoint, engine or input file, or a path it cannot read or write
        print(f"sparvar: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # builds write to a temporary directory and rename: an interrupted one leaves nothing
        print("sparvar: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
