"""Fidelity of SparVAR against dense attention, the paper's protocol, on our trained infinity-cifar model.

For every (prompt, seed) pair, each variant generates with the same sampling random stream as the dense
run; its image is compared with the dense image of the same pair (PSNR and SSIM on [0, 1] pixels, as the 8-bit
pixels a saved PNG holds: sparvar.pipeline.image_arrays). Every variant runs the eager fp32 model (the reference the
engines are checked against), so the scores measure the attention policy alone, not a precision (`--engines`
scores built engines instead). LPIPS(VGG), the spec's third metric, is not measured: its VGG weights are a
torchvision download this machine cannot make. Variants: dense, SparVAR (the model's default policy), dense with the
last two scales skipped, SparVAR + skip 2, and the paper's ablation (CS4A without / with residual cache in every layer,
then + CSLA = SparVAR; CSLA alone as a diagnostic). For the sparse variants, every sparse (layer, scale) also
records the relative error of its attention output against dense attention on the same q, k, v.

Pairs are batched by seed: one generation runs every prompt of the list with one seed (each row draws its own
random numbers from the seeded stream), so a pair is (prompt, seed) within that fixed prompt list.

    python -m bench.fidelity --seeds 10 --out bench/results/fidelity.json --grid bench/results/fidelity.png

bench/results/fidelity.json was generated on an H100 (`--device cuda --raw-out raw.npz`, 19 s for all 7 variants x
100 pairs), fidelity_cpu.json and fidelity_fp8.json on the CPU (an image takes 1-4 s on one core); each records where
(`generated_on`). `--from-raw raw.npz` re-scores a saved run without generating.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from sparvar.attention import reference_attention  # noqa: E402
from sparvar.checkpoint import file_digest, load_model  # noqa: E402
from sparvar.config import CIFAR10_CLASSES, get_config  # noqa: E402
from sparvar.fp8 import with_fp8_linears  # noqa: E402
from sparvar.generate import Sampling, TorchRunner, generate  # noqa: E402
from sparvar.model import EAGER  # noqa: E402
from sparvar.pipeline import build_decoder, check_known_prompts, image_arrays  # noqa: E402
from sparvar.schedule import get_schedule  # noqa: E402
from sparvar.sparse import SparVARPlan, default_policy  # noqa: E402
from sparvar.text import hashed_embeddings  # noqa: E402

MODEL = "infinity-cifar"
WEIGHTS = os.path.join(ROOT, "weights", f"{MODEL}.safetensors")
TOKENIZER = os.path.join(ROOT, "weights", f"{MODEL}-tokenizer.safetensors")
TARGETS = {"psnr_db": 29.5, "ssim": 0.92}  # the paper's SparVAR fidelity (Infinity-8B, 1024^2)
PSNR_CAP_DB = 100.0  # an image identical to the dense one counts as 100 dB in the mean (identical ones are also counted)

# name -> (policy overrides, or None for dense attention; skip_last). Overrides are for default_policy(MODEL, ...).
VARIANTS: dict[str, tuple[dict | None, int]] = {
    "dense": (None, 0),
    "sparvar": ({}, 0),
    "skip2": (None, 2),
    "sparvar_skip2": ({}, 2),
    "cs4a_nocache": ({"cs4a_layers": "all", "cs4a_use_cache": False}, 0),
    "cs4a_cache": ({"cs4a_layers": "all"}, 0),
    "csla_only": ({"cs4a_layers": 0}, 0),
}
# CSLA over 2-D query tiles (sparvar.csla.TileLayout) instead of the policy's raster blocks (32x32 here: one row of
# the 32-wide last scale): 4x4 tiles cover the grid's fraction that 8x8 tiles cover at 1024^2, 4x8 hold a raster
# block's 32 queries. Not in the default run: `--variants dense sparvar sparvar_tiles_4x4 ...`
TILE_VARIANTS = {f"{prefix}_tiles_{r}x{c}": ({**overrides, "csla_query_tile": (r, c)}, 0)
                 for r, c in ((4, 4), (4, 8), (8, 8))
                 for prefix, overrides in (("sparvar", {}), ("csla_only", {"cs4a_layers": 0}))}
# Query tiles with wider windows (the policy's csla_window_sides), to ask whether the keys raster blocks add beyond
# the windows could be had locally: the own-scale side 9 (sides ...,1,3,5,7,9) or 11 (...,3,5,7,9,11)
TILE_VARIANTS.update({f"sparvar_tiles_4x4_w{sides[-1]}": ({"csla_query_tile": (4, 4), "csla_window_sides": sides}, 0)
                      for sides in ((-1, -1, -1, 1, 3, 5, 7, 9), (-1, -1, -1, 3, 5, 7, 9, 11))})
VARIANTS.update(TILE_VARIANTS)
# FP8 linears (sparvar/fp8.py). "fp8" / "sparvar_fp8": FP8 at the last FP8_LAST_SCALES scales, as the torch-cuda
# engine's default threshold (1,024 tokens) gives for Infinity 2B/8B at 1024² (scales 9-12 of 13); "fp8_all": every
# scale, the worst case (an early scale's error changes which bits are sampled, and so the whole image). The
# cross-attention's projections stay in fp32, as the FP8 engine absorbs them (with_fp8_linears(cross_attention=False)).
VARIANTS.update({"fp8": (None, 0), "sparvar_fp8": ({}, 0), "fp8_all": (None, 0)})
FP8_VARIANTS = ("fp8", "sparvar_fp8", "fp8_all")
FP8_LAST_SCALES = 4
# scored engines (--engines) may differ from the dense engine in these spec fields only; the result records these
ENGINE_VARIANT_FIELDS = ("attention", "csla_query_tile")
ENGINE_SOURCE_FIELDS = ("attention", "csla_query_tile", "backend", "dtype", "fp8", "weights", "vae")


def fp8_min_tokens(name: str, schedule) -> int:
    """The FP8 threshold (tokens per image) of a variant."""
    return 0 if name == "fp8_all" else schedule.lengths[-FP8_LAST_SCALES]


class AttentionErrorProbe:
    """Wraps a SparVARPlan: where it runs sparse attention, also runs dense attention on the same q, k, v and
    records ||sparse - dense|| / ||dense|| per batch row, keyed by (layer, scale)."""

    def __init__(self, plan: SparVARPlan):
        self.plan = plan
        self.skip_last = plan.skip_last  # the loop's skipping it serves (sparvar.generate.check_runner_skip)
        self.errors: dict[tuple[int, int], list[float]] = defaultdict(list)

    def reset(self) -> None:
        self.plan.reset()

    def attend(self, q, k, v, *, layer: int, scale: int):
        out = self.plan.attend(q, k, v, layer=layer, scale=scale)
        if out is not None:
            ref = reference_attention(q.float(), k.float(), v.float())
            err = (out.float() - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-12)
            self.errors[(layer, scale)].extend(err.tolist())
        return out


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 images on [0, 1] pixels; inf when identical."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2) / 255.0**2
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity  # dev extra: pip install -e '.[dev]'

    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def summarize_pairs(psnrs: list[float], ssims: list[float] | None, mses: list[float]) -> dict:
    finite = np.array([min(p, PSNR_CAP_DB) for p in psnrs])
    out = {"psnr_db_mean": round(float(finite.mean()), 3), "psnr_db_median": round(float(np.median(finite)), 3),
           "psnr_db_pooled": round(float(10 * np.log10(1.0 / max(np.mean(mses), 1e-20))), 3),
           "identical_images": int(sum(np.isinf(psnrs))), "pairs": len(psnrs)}
    if ssims is not None:
        out["ssim_mean"] = round(float(np.mean(ssims)), 4)
    return out


def load(device: str, weights: str = WEIGHTS, tokenizer: str = TOKENIZER):
    cfg = get_config(MODEL)
    model = load_model(cfg, weights, device=device)
    decoder = build_decoder(cfg, tokenizer, device, torch.float32)
    return cfg, model, decoder


def make_plan(cfg, schedule, overrides: dict | None, skip_last: int = 0):
    if overrides is None:
        return None
    overrides = {k: (cfg.depth if v == "all" else v) for k, v in overrides.items()}
    policy = default_policy(cfg.name, schedule, **overrides)
    return AttentionErrorProbe(SparVARPlan(policy, schedule, cfg.depth, skip_last=skip_last))


def generate_variants(model, decoder, cfg, prompts: list[str], seeds: list[int], variants: list[str],
                      sampling: Sampling = Sampling(), progress=None) -> dict:
    """Generate every variant for every (prompt, seed). Returns the raw material of the scores:
    {'images': {variant: (pairs, H, W, 3) uint8, seed-major}, 'bit_mismatch': {variant: per scale},
     'attention_errors': {variant: {(layer, scale): [per row]}}, 'seconds_per_image': {variant: s}}."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "dense" not in variants:
        raise ValueError(f"variants must include 'dense' and come from {list(VARIANTS)}; unknown: {unknown}")
    if len(set(variants)) != len(variants):  # one image list per name: a repeat would pair seeds out of step
        raise ValueError(f"each variant once, got {variants}")
    schedule = get_schedule(cfg.default_resolution, model=cfg.name)
    features, lengths = hashed_embeddings(prompts, cfg.text_dim, cfg.text_maxlen)
    images: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    bits: dict[str, list[list[torch.Tensor]]] = {v: [] for v in variants}
    probes = {name: make_plan(cfg, schedule, *VARIANTS[name]) for name in variants}
    seconds: dict[str, float] = defaultdict(float)
    for seed in seeds:
        for name in variants:
            # the cross-attention out of FP8, as the engine runs it with absorbing on (CudaGraphRunner's default)
            ops = (with_fp8_linears(EAGER, model, fp8_min_tokens(name, schedule), cross_attention=False)
                   if name in FP8_VARIANTS else EAGER)
            runner = TorchRunner(model, schedule, plan=probes[name], ops=ops)
            t0 = time.perf_counter()
            gen = generate(runner, decoder, schedule, features, lengths, sampling, seed=seed, skip_last=VARIANTS[name][1])
            # the pixels a PNG holds; the host copy synchronises, so the time is the whole generation
            images[name].append(image_arrays(gen.image))
            seconds[name] += time.perf_counter() - t0
            bits[name].append([b.cpu() for b in gen.bits])
            if progress:
                progress(f"seed {seed} {name}: {time.perf_counter() - t0:.2f} s")
    return _raw(images, bits, seconds, len(seeds) * len(prompts),
                {k: dict(p.errors) for k, p in probes.items() if p is not None})


def _raw(images: dict, bits: dict, seconds: dict, pairs: int, attention_errors: dict) -> dict:
    """The raw material of the scores from per-variant lists of image arrays and sampled bits (seed-major)."""
    return {"images": {k: np.concatenate(v) for k, v in images.items()},
            "bit_mismatch": {k: _bit_mismatch(bits["dense"], v) for k, v in bits.items() if k != "dense"},
            "attention_errors": attention_errors,
            "seconds_per_image": {k: round(v / pairs, 4) for k, v in seconds.items()}}


def generate_engines(engines: dict[str, str], prompts: list[str], seeds: list[int], sampling: Sampling = Sampling(),
                     progress=None) -> dict:
    """The raw material of the scores (as generate_variants) from built engines: {variant: engine directory}, 'dense'
    among them, each an engine of MODEL with its own attention and dtype: the deployed artefacts, in their precision
    (onnxruntime fp16 by default), instead of the eager fp32 model. One prompt per generation, seeded by its pair's
    seed (the eager scoring batches the prompts of a seed), the same for every variant."""
    from sparvar.engine import parse_query_tile, read_manifest
    from sparvar.runtime import load_engine_pipeline

    # an engine is built with dense or the default SparVAR policy (its query tiles an engine option), in its own
    # precision: the ablations and FP8 variants are eager-only
    buildable = [k for k, (overrides, _) in VARIANTS.items()
                 if (overrides is None or set(overrides) <= {"csla_query_tile"}) and k not in FP8_VARIANTS]
    if "dense" not in engines or any(name not in buildable for name in engines):
        raise ValueError(f"engines need 'dense' and may add {buildable[1:]}; got {sorted(engines)}")
    for name, path in engines.items():  # each engine is built for its variant: a mix-up would score the wrong one
        spec = read_manifest(path)["spec"]
        overrides = VARIANTS[name][0]
        want = {"attention": "dense" if overrides is None else "sparvar",
                "csla_query_tile": None if overrides is None else overrides.get("csla_query_tile")}
        have = {"attention": spec["attention"],
                "csla_query_tile": parse_query_tile(spec["csla_query_tile"]) if spec.get("csla_query_tile") else None}
        if have != want:
            raise ValueError(f"engine {path} is built for {have}; variant {name!r} needs {want}")
    # the variants may differ in attention alone: another checkpoint, precision or backend would be scored as SparVAR's
    dense_spec = read_manifest(engines["dense"])["spec"]
    for name, path in engines.items():
        spec = read_manifest(path)["spec"]
        differ = sorted(k for k in set(spec) | set(dense_spec)
                        if k not in ENGINE_VARIANT_FIELDS and spec.get(k) != dense_spec.get(k))
        if differ:
            raise ValueError(f"engine {path} ({name}) differs from the dense engine {engines['dense']} in "
                             + ", ".join(f"{k} ({spec.get(k)!r} vs {dense_spec.get(k)!r})" for k in differ)
                             + ": the variants may differ only in " + " and ".join(ENGINE_VARIANT_FIELDS))
    pipes = {name: load_engine_pipeline(path, skip_last=VARIANTS[name][1], model=MODEL)
             for name, path in engines.items()}
    features, lengths = hashed_embeddings(prompts, pipes["dense"].cfg.text_dim, pipes["dense"].cfg.text_maxlen)
    images: dict[str, list[np.ndarray]] = {name: [] for name in engines}
    bits: dict[str, list[list[torch.Tensor]]] = {name: [] for name in engines}
    seconds: dict[str, float] = defaultdict(float)
    for seed in seeds:
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            for i in range(len(prompts)):  # one prompt per call (an engine's batch is fixed, 1 by default)
                gen = pipe.generate(features[i:i + 1], lengths[i:i + 1], sampling, seed=seed)
                images[name].append(image_arrays(gen.image))
                bits[name].append([b.cpu() for b in gen.bits])
            seconds[name] += time.perf_counter() - t0
            if progress:
                progress(f"seed {seed} {name} engine: {time.perf_counter() - t0:.2f} s")
    return _raw(images, bits, seconds, len(seeds) * len(prompts), {})


def score(raw: dict, depth: int, with_ssim: bool = True) -> dict:
    """Per variant: PSNR/SSIM against dense, bit mismatch per scale, attention error per layer."""
    results = {}
    ref = raw["images"]["dense"]
    for name, img in raw["images"].items():
        row = {"policy_overrides": VARIANTS[name][0], "skip_last": VARIANTS[name][1],
               "seconds_per_image": raw["seconds_per_image"][name]}
        if name != "dense":
            if len(img) != len(ref):
                raise ValueError(f"{name} has {len(img)} images and dense {len(ref)}: not one per (prompt, seed) pair")
            psnrs = [psnr_db(a, b) for a, b in zip(ref, img)]
            mses = [float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2) / 255.0**2) for a, b in zip(ref, img)]
            ssims = [ssim(a, b) for a, b in zip(ref, img)] if with_ssim else None
            row.update(summarize_pairs(psnrs, ssims, mses))
            row["bit_mismatch_per_scale"] = raw["bit_mismatch"][name]
        if name in raw["attention_errors"]:
            row["attention_rel_error"] = _attention_errors(raw["attention_errors"][name], depth)
        results[name] = row
    return results


def run_fidelity(model, decoder, cfg, prompts, seeds, variants, sampling: Sampling = Sampling(), with_ssim: bool = True,
                 progress=None) -> tuple[dict, dict]:
    """generate_variants + score; returns (results per variant, raw)."""
    raw = generate_variants(model, decoder, cfg, prompts, seeds, variants, sampling, progress)
    return score(raw, cfg.depth, with_ssim), raw


def save_raw(raw: dict, meta: dict, path: str) -> str:
    """Images as uint8 arrays plus everything else as one JSON string, in one .npz (written atomically)."""
    rest = {"meta": meta, "bit_mismatch": raw["bit_mismatch"], "seconds_per_image": raw["seconds_per_image"],
            "attention_errors": {k: [[layer, scale, v] for (layer, scale), v in errs.items()]
                                 for k, errs in raw["attention_errors"].items()}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez_compressed(tmp, json=np.array(json.dumps(rest)), **{f"images_{k}": v for k, v in raw["images"].items()})
    os.replace(tmp, path)
    return path


def load_raw(path: str) -> tuple[dict, dict]:
    with np.load(path) as f:
        rest = json.loads(str(f["json"]))
        images = {k[len("images_"):]: f[k] for k in f.files if k.startswith("images_")}
    errors = {k: {(layer, scale): v for layer, scale, v in rows} for k, rows in rest["attention_errors"].items()}
    raw = {"images": images, "bit_mismatch": rest["bit_mismatch"], "seconds_per_image": rest["seconds_per_image"],
           "attention_errors": errors}
    return raw, rest["meta"]


def _bit_mismatch(dense: list[list[torch.Tensor]], other: list[list[torch.Tensor]]) -> list[float]:
    """Fraction of sampled bits that differ from the dense run, per scale the variant ran."""
    out = []
    for scale in range(len(other[0])):
        diff = sum(float((a[scale] != b[scale]).float().sum()) for a, b in zip(dense, other))
        total = sum(a[scale].numel() for a in dense)
        out.append(round(diff / total, 6))
    return out


def _attention_errors(errors: dict[tuple[int, int], list[float]], depth: int) -> dict:
    per_layer_scale = {f"layer{layer}_scale{scale}": round(float(np.mean(v)), 5) for (layer, scale), v in sorted(errors.items())}
    per_layer = []
    for layer in range(depth):
        values = [x for (l, _), v in errors.items() if l == layer for x in v]
        per_layer.append(round(float(np.mean(values)), 5) if values else None)
    return {"per_layer": per_layer, "per_layer_scale": per_layer_scale,
            "note": "mean over batch rows (cond and uncond) of ||sparse - dense|| / ||dense|| on the same q, k, v"}


def save_grid(images: dict[str, np.ndarray], rows: tuple[str, ...], columns: int, path: str, zoom: int = 2) -> str:
    """One row per variant (first `columns` pairs), 2 px gaps, nearest-neighbour zoom; PNG written atomically."""
    from PIL import Image

    n = min(columns, len(images[rows[0]]))
    h, w = images[rows[0]].shape[1:3]
    gap = 2
    canvas = np.full((len(rows) * (h + gap) + gap, n * (w + gap) + gap, 3), 255, dtype=np.uint8)
    for r, name in enumerate(rows):
        for c in range(n):
            y, x = gap + r * (h + gap), gap + c * (w + gap)
            canvas[y:y + h, x:x + w] = images[name][c]
    image = Image.fromarray(canvas).resize((canvas.shape[1] * zoom, canvas.shape[0] * zoom), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    image.save(tmp)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    from bench.common import environment, write_result

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=WEIGHTS)
    p.add_argument("--tokenizer", default=TOKENIZER)
    p.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1; pairs = seeds x prompts")
    p.add_argument("--prompts", nargs="*", default=list(CIFAR10_CLASSES), help="class names of infinity-cifar")
    p.add_argument("--variants", nargs="*", default=[v for v in VARIANTS if v not in FP8_VARIANTS + tuple(TILE_VARIANTS)])
    p.add_argument("--cfg", type=float, default=Sampling.cfg)
    p.add_argument("--tau", type=float, default=Sampling.tau)
    p.add_argument("--top-p", type=float, default=Sampling.top_p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--raw-out", default=None, help="also save the generated images and raw measurements (.npz)")
    p.add_argument("--from-raw", default=None, help="score a saved .npz instead of generating (e.g. made on a GPU)")
    p.add_argument("--engines", nargs="*", metavar="VARIANT=DIR", default=None,
                   help="score built engines instead of the eager fp32 model: dense=DIR sparvar=DIR [skip2=DIR ...], "
                        "each an engine of infinity-cifar (its precision is the engine's)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "fidelity.json"))
    p.add_argument("--grid", default=None, help="image grid (PNG); default: --out with .png for .json")
    p.add_argument("--grid-columns", type=int, default=10)
    args = p.parse_args(argv)
    if args.seeds <= 0 or not args.prompts:
        raise ValueError("need at least one seed and one prompt")
    args.grid = args.grid or os.path.splitext(args.out)[0] + ".png"  # never another result's committed grid
    cfg = get_config(MODEL)
    check_known_prompts(cfg, args.prompts)  # the model's class names only
    schedule = get_schedule(cfg.default_resolution, model=cfg.name)
    t0 = time.perf_counter()
    if args.from_raw:
        raw, meta = load_raw(args.from_raw)
    else:
        sampling = Sampling(cfg=args.cfg, tau=args.tau, top_p=args.top_p)
        seeds = list(range(args.seeds))
        progress = lambda m: print(f"[{time.perf_counter() - t0:7.1f}s] {m}", flush=True)  # noqa: E731
        if args.engines is not None:
            from sparvar.engine import read_manifest

            engines = dict(item.split("=", 1) for item in args.engines)
            raw = generate_engines(engines, args.prompts, seeds, sampling, progress)
            source = {"engines": {name: {k: read_manifest(path)["spec"].get(k) for k in ENGINE_SOURCE_FIELDS}
                                  for name, path in engines.items()}}
        else:
            _, model, decoder = load(args.device, args.weights, args.tokenizer)
            raw = generate_variants(model, decoder, cfg, args.prompts, seeds, args.variants, sampling, progress)
            source = {"weights": {os.path.relpath(path, ROOT): file_digest(path)
                                  for path in (args.weights, args.tokenizer)}}
        meta = {**source,
                "sampling": {"cfg": sampling.cfg, "tau": sampling.tau, "top_p": sampling.top_p, "top_k": sampling.top_k},
                "prompts": args.prompts, "seeds": seeds, "generated_on": environment(),
                "generation_seconds": round(time.perf_counter() - t0, 1)}
        if args.raw_out:
            save_raw(raw, meta, args.raw_out)
    results = score(raw, cfg.depth)
    policy = default_policy(cfg.name, schedule)
    sparvar = results.get("sparvar")
    met = {}  # only for what was measured: a run without the sparvar variant says nothing about its targets
    if sparvar:
        met = {"psnr": sparvar["psnr_db_mean"] >= TARGETS["psnr_db"], "ssim": sparvar["ssim_mean"] >= TARGETS["ssim"]}
    if "skip2" in results and sparvar:
        met["skip2_clearly_lower"] = results["skip2"]["psnr_db_mean"] + 3.0 < sparvar["psnr_db_mean"]
    source = "the engine named in 'engines', in its precision" if "engines" in meta else "the eager fp32 model"
    result = {
        "model": cfg.name, **meta, "pairs": len(meta["prompts"]) * len(meta["seeds"]),
        "schedule": [list(g) for g in schedule.grids],
        "policy": {"fields": dict(policy.__dict__), "plan": SparVARPlan(policy, schedule, cfg.depth).describe().splitlines()},
        "metric_notes": f"PSNR/SSIM of uint8 images (sparvar.pipeline.image_arrays) against the dense image of the same "
                        f"(prompt, seed), every variant {source}; SSIM is scikit-image's default (7x7 "
                        f"uniform window, sample covariance, data_range 255); LPIPS(VGG) not measured (no VGG weights "
                        f"here); psnr_db_mean caps identical images at {PSNR_CAP_DB} dB (their count is "
                        f"identical_images); psnr_db_pooled = 10 log10(1 / mean MSE) over all pairs; "
                        f"skip2_clearly_lower = skip2 at least 3 dB below SparVAR",
        "targets": TARGETS, "targets_met": met,
        "variants": results,
    }
    write_result(args.out, result)
    rows = tuple(v for v in ("dense", "sparvar", "skip2", "fp8", "sparvar_fp8", "fp8_all") if v in raw["images"])
    save_grid(raw["images"], rows, args.grid_columns, args.grid)
    print(f"{'variant':<14} {'PSNR mean':>9} {'median':>7} {'pooled':>7} {'SSIM':>6} {'same':>5}  attention rel. error per layer")
    for name, row in results.items():
        if name == "dense":
            continue
        err = row.get("attention_rel_error", {}).get("per_layer")
        err = " ".join("-" if e is None else f"{e:.3f}" for e in err) if err else ""
        print(f"{name:<14} {row['psnr_db_mean']:>9.2f} {row['psnr_db_median']:>7.2f} {row['psnr_db_pooled']:>7.2f} "
              f"{row.get('ssim_mean', float('nan')):>6.3f} {row['identical_images']:>5}  {err}")
    print(f"targets {TARGETS}: {met}; wrote {args.out} and {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
