"""Engine directories: build them stage by stage (export -> optimize -> build), describe and verify them.

An engine directory holds `manifest.json` and one sub-directory per stage. Every stage has a cache key: a hash
of everything its output depends on (model config, schedule, policy, weights digest, dtype, opset, tool
versions, the key of the stage before it). `build_engine` skips a stage whose recorded key matches and redoes it
otherwise. A build happens in a temporary sibling directory that replaces the engine only once complete, so an
interrupted build never leaves a half engine behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BACKENDS = ("onnxruntime", "tensorrt-rtx", "tensorrt", "torch-cuda")
STAGES = ("export", "optimize", "build")


class EngineError(ValueError):
    """An engine directory that cannot be used as asked; the message says what to rebuild."""


@dataclass(frozen=True)
class EngineSpec:
    """What a user asks to build. Everything here is part of the cache keys."""

    model: str
    resolution: int
    aspect: str = "1:1"
    attention: str = "dense"  # dense | sparvar
    backend: str = "onnxruntime"
    dtype: str = "fp32"
    weights: str | None = None  # official checkpoint, or None for seeded random weights
    vae: str | None = None
    seed: int = 0  # random-weight seed
    batch: int = 1  # images per call (CFG doubles the transformer batch)
    opset: int = 18
    fp8: bool = False  # FP8 block linears at scales of >= sparvar.fp8.DEFAULT_MIN_TOKENS tokens (torch-cuda, Infinity)
    # SparVAR's CSLA over 2-D query tiles, "<rows>x<cols>" (the policy's csla_query_tile; Infinity); None: raster blocks
    csla_query_tile: str | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {', '.join(BACKENDS)}")
        if self.attention not in ("dense", "sparvar"):
            raise ValueError(f"unknown attention {self.attention!r}; expected 'dense' or 'sparvar'")
        if self.dtype not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"unknown dtype {self.dtype!r}; expected fp32, fp16 or bf16")
        if self.dtype == "bf16" and self.backend == "onnxruntime":  # ORT's CPU kernels have no bf16 MatMul
            raise ValueError("onnxruntime engines run fp32 or fp16 (its CPU kernels have no bf16 MatMul); "
                             "give --dtype fp16 or fp32")
        if not isinstance(self.batch, int) or isinstance(self.batch, bool) or self.batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {self.batch!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        from export.custom_ops import MIN_OPSET

        if not isinstance(self.opset, int) or isinstance(self.opset, bool) or self.opset < MIN_OPSET:
            raise ValueError(f"opset must be an int >= {MIN_OPSET} (the sparvar functions' opset), got {self.opset!r}")
        if (self.weights is None) != (self.vae is None):
            raise ValueError("give both transformer weights and tokenizer weights, or neither (random weights)")
        for name in ("weights", "vae"):  # a torch-cuda engine reads them at load, from whatever directory it runs in
            if getattr(self, name) is not None:
                object.__setattr__(self, name, os.path.abspath(getattr(self, name)))
        from .config import get_config

        if self.resolution is None:  # the model's own, recorded as a number: `--resolution <it>` later is the same spec
            object.__setattr__(self, "resolution", get_config(self.model).default_resolution)
        family = getattr(get_config(self.model), "family", "infinity")
        if self.fp8 and (self.backend != "torch-cuda" or family != "infinity"):
            raise ValueError(f"FP8 linears are built for Infinity models on the torch-cuda backend only, not "
                             f"{self.model} on {self.backend!r}")
        if self.csla_query_tile is not None:
            rows, cols = parse_query_tile(self.csla_query_tile)
            object.__setattr__(self, "csla_query_tile", f"{rows}x{cols}")  # one spelling: one directory, one key
            if self.attention != "sparvar":
                raise ValueError("CSLA query tiles (--csla-query-tile) are a SparVAR option: give --attention sparvar")
            if family != "infinity":
                raise ValueError(f"CSLA query tiles are built for Infinity models only, not {self.model}")
        if self.backend == "torch-cuda" and self.attention == "sparvar" and self.dtype == "fp32":
            # found at build, not at the first generation on the GPU: the CSLA/CS4A Triton kernels take 16-bit inputs
            raise ValueError("torch-cuda SparVAR engines run bf16 or fp16 (the SparVAR Triton kernels take 16-bit "
                             "inputs); give --dtype bf16 (the default) or fp16")
        if family == "hart":
            if self.backend == "tensorrt":
                raise ValueError(f"{self.model}: HART engines build for the onnxruntime, torch-cuda and tensorrt-rtx "
                                 f"backends so far, not {self.backend!r}")

    def default_dir(self, root: str = "engines") -> str:
        fp8 = "-fp8" if self.fp8 else ""
        tiles = f"-tiles{self.csla_query_tile}" if self.csla_query_tile else ""
        return os.path.join(root, f"{self.model}-{self.resolution}-{self.attention}{tiles}{fp8}-{self.backend}")

    def policy_overrides(self) -> dict:
        """The SparVAR policy fields this spec sets (sparvar.sparse.default_policy overrides)."""
        return {} if self.csla_query_tile is None else {"csla_query_tile": parse_query_tile(self.csla_query_tile)}


def parse_query_tile(text: str) -> tuple[int, int]:
    """'8x8' -> (8, 8), checked by the policy's own rule (sparvar.sparse.check_query_tile)."""
    from .sparse import check_query_tile

    parts = text.split("x") if isinstance(text, str) else []
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"CSLA query tile must be '<rows>x<cols>' with positive ints (e.g. 8x8), got {text!r}")
    tile = int(parts[0]), int(parts[1])
    check_query_tile(tile, "CSLA query tile")
    return tile


def digest_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_sha256(path: str) -> str:
    from .checkpoint import file_digest

    return file_digest(path)


def tool_versions() -> dict:
    import importlib.metadata as md

    out = {"sparvar_engine_format": FORMAT_VERSION, "python": sys.version.split()[0]}
    # key -> the distributions that may provide it, first found wins (TensorRT's wheels are tensorrt, or
    # tensorrt-cu12 / -cu13 without the meta-package; an apt install has no distribution, see below)
    for key, dists in (("torch", ("torch",)), ("onnx", ("onnx",)), ("onnxscript", ("onnxscript",)),
                       ("onnx-ir", ("onnx-ir",)), ("onnxruntime", ("onnxruntime",)),
                       ("tensorrt", ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu13-bindings",
                                     "tensorrt-cu12-bindings")),
                       ("tensorrt-rtx-cu13-bindings", ("tensorrt-rtx-cu13-bindings",)), ("triton", ("triton",))):
        for dist in dists:
            try:
                out[key] = md.version(dist)
                break
            except md.PackageNotFoundError:
                pass
    if "tensorrt" not in out:
        try:  # importable without a distribution record: its own version (plans are tied to it)
            if "tensorrt" in sys.modules or importlib.util.find_spec("tensorrt") is not None:
                out["tensorrt"] = str(importlib.import_module("tensorrt").__version__)
        except Exception:  # noqa: BLE001 - a broken install is reported where TensorRT is used
            pass
    return out


@dataclass
class StageRecord:
    key: str
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    info: dict = field(default_factory=dict)
    seconds: float = 0.0


class FileDigests:
    """file_sha256 within one pass over an engine, each file (inode) hashed once: the graphs' shared weights file is
    hard-linked into several stages (4 GB at 2B), and a pass that met it twice hashed it twice."""

    def __init__(self):
        self._digests: dict[tuple, str] = {}

    def __call__(self, path: str) -> str:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = file_sha256(path)
        return self._digests[key]


def _hash_dir_files(root: str, sub: str, digests: FileDigests) -> dict[str, str]:
    out = {}
    base = os.path.join(root, sub)
    for dirpath, _, names in os.walk(base):
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = digests(path)
    return out


def read_manifest(engine_dir: str) -> dict:
    path = os.path.join(engine_dir, MANIFEST)
    if os.path.exists(engine_dir) and not os.path.isdir(engine_dir):
        raise EngineError(f"{engine_dir} is a file, not an engine directory (give the directory `sparvar engine build` "
                          "wrote)")
    if not os.path.isdir(engine_dir):
        raise EngineError(f"engine directory not found: {engine_dir} (build it with `make engine` / `sparvar engine build`)")
    if not os.path.isfile(path):
        raise EngineError(f"{engine_dir} is not a sparvar engine: no {MANIFEST} (rebuild it with `sparvar engine build`)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path} is corrupt ({e}); rebuild the engine") from None
    if not isinstance(manifest, dict):
        raise EngineError(f"{path} is not a sparvar engine manifest (a JSON {type(manifest).__name__}); rebuild the engine")
    fmt = manifest.get("format_version")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise EngineError(f"{path} has no format_version: not a sparvar engine manifest; rebuild the engine")
    if fmt > FORMAT_VERSION:
        raise EngineError(f"{engine_dir} was built by a newer sparvar (engine format {fmt}, this sparvar reads up to "
                          f"{FORMAT_VERSION}); upgrade sparvar or rebuild the engine")
    if fmt < FORMAT_VERSION:
        raise EngineError(f"{engine_dir} uses the old engine format {fmt} (current {FORMAT_VERSION}); rebuild it")
    stages = manifest.get("stages")
    if not isinstance(manifest.get("spec"), dict) or not isinstance(stages, dict) or any(
            not isinstance(stages.get(stage), dict) or not isinstance(stages[stage].get("files"), dict)
            for stage in STAGES):
        raise EngineError(f"{path} is incomplete (it needs a spec and the {', '.join(STAGES)} stages with their files); "
                          "rebuild the engine")
    # what loading and `engine info` read without looking twice: missing, they were a KeyError traceback
    missing = [f"spec.{f.name}" for f in dataclasses.fields(EngineSpec)
               if f.name not in manifest["spec"] and f.name not in LATER_SPEC_FIELDS]
    missing += [key for key, kind in (("schedule", list), ("model_config", dict), ("units", dict), ("created", str),
                                      ("versions", dict)) if not isinstance(manifest.get(key), kind)]
    missing += [f"stages.{stage}.{key}" for stage in STAGES for key, kind in (("key", str), ("seconds", (int, float)),
                                                                            ("info", dict))
                if not isinstance(stages[stage].get(key), kind)]
    if missing:
        raise EngineError(f"{path} is incomplete or foreign (no {', '.join(missing)}); rebuild the engine")
    # each value of the kind it has when we write it: a string where a number belongs compared unequal to every
    # request ("built for batch 1, got 1 prompts") or failed inside `engine info` and `serve` as a TypeError
    for name, default in LATER_SPEC_FIELDS.items():  # a manifest from before the field: its default, as built
        manifest["spec"].setdefault(name, default)
    wrong = [f"spec.{f.name} = {manifest['spec'][f.name]!r}" for f in dataclasses.fields(EngineSpec)
             if not _is_kind(manifest["spec"][f.name], SPEC_KINDS[f.name])]
    if not all(isinstance(g, list) and len(g) == 2 and all(_is_kind(n, int) and n > 0 for n in g)
               for g in manifest["schedule"]):
        wrong.append(f"schedule = {manifest['schedule']!r} (a list of [h, w] grids)")
    if wrong:
        raise EngineError(f"{path} holds values no sparvar writes ({'; '.join(wrong)}): corrupt or foreign; rebuild "
                          "the engine")
    return manifest


# EngineSpec fields added since the current engine format, with the value an engine built before them has: their
# absence from a manifest is that value, not an incomplete manifest (adding an opt-in field keeps engines current)
LATER_SPEC_FIELDS = {"csla_query_tile": None}
# what each EngineSpec field holds in a manifest, from its annotation (a field of another type fails here, at import)
_ANNOTATION_KINDS = {"str": str, "int": int, "bool": bool, "str | None": (str, type(None))}
SPEC_KINDS = {f.name: _ANNOTATION_KINDS[f.type] for f in dataclasses.fields(EngineSpec)}


def _is_kind(value, kind) -> bool:
    """isinstance, except that a bool is not an int (JSON true is no batch size)."""
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is int)


def check_spec_values(engine_dir: str, manifest: dict) -> EngineSpec:
    """The manifest's spec as an EngineSpec: values a build accepts (batch >= 1, a known attention, backend and
    dtype, ...), or an EngineError. For an engine of a model this sparvar knows (check the model first)."""
    try:
        return EngineSpec(**manifest["spec"])
    except (TypeError, ValueError) as e:
        raise EngineError(f"{engine_dir}: its manifest's spec is not one sparvar builds ({e}); rebuild the engine") from None


def stage_info(engine_dir: str, manifest: dict, stage: str, key: str):
    """manifest["stages"][stage]["info"][key], or an EngineError naming the engine as incomplete (read_manifest
    checks what every engine has; this is what one backend's stage records)."""
    value = manifest["stages"][stage]["info"].get(key)
    if value is None:
        raise EngineError(f"{engine_dir}: its manifest records no {stage} {key}: incomplete or foreign; rebuild the engine")
    return value


def files_not_in_engine(engine_dir: str, manifest: dict | None) -> list[str]:
    """Files under engine_dir that no stage recorded (other than the manifest): the user's, not the engine's. With
    no readable manifest, the files outside the stages' folders (what any engine of ours could have written)."""
    found = []
    for root, _, files in os.walk(engine_dir):
        found += [os.path.relpath(os.path.join(root, f), engine_dir) for f in files]
    if manifest is None:
        return sorted(rel for rel in found if rel != MANIFEST and rel.split(os.sep)[0] not in STAGES)
    recorded = {rel for stage in STAGES for rel in manifest["stages"][stage]["files"]} | {MANIFEST}
    return sorted(rel for rel in found if rel not in recorded)


def verify_files(engine_dir: str, manifest: dict) -> None:
    """Every file the stages recorded must exist with the recorded sha256."""
    digests = FileDigests()
    for stage in STAGES:
        for rel, digest in manifest["stages"][stage]["files"].items():
            path = os.path.join(engine_dir, rel)
            if not os.path.isfile(path):
                raise EngineError(f"{engine_dir}: file {rel} of stage '{stage}' is missing; rebuild the engine")
            if digests(path) != digest:
                raise EngineError(f"{engine_dir}: file {rel} of stage '{stage}' is corrupt (sha256 mismatch); rebuild the engine")


def weight_files_of(model: str, weights: str) -> list[str]:
    """The files a model's --weights path names: a file, or a folder / shard index (Infinity-8B's official weights
    are shards; a HART llm/ folder may hold EMA weights, read by default as official sample.py does)."""
    from .config import get_config

    if getattr(get_config(model), "family", "infinity") == "hart":
        from .hart.checkpoint import checkpoint_files as hart_files

        return hart_files(weights)
    from .checkpoint import weight_files

    return weight_files(weights)


def checkpoint_files(spec: dict) -> list[str]:
    """The files an engine spec's weights live in (none for random weights)."""
    if spec["weights"] is None:
        return []
    return [*weight_files_of(spec["model"], spec["weights"]), spec["vae"]]


def checkpoint_record(spec: dict) -> dict:
    """{absolute path: sha256, bytes, mtime_ns} of the spec's checkpoint files, for engines that read them at load."""
    from .checkpoint import checkpoint_digest

    record = {}
    for path in checkpoint_files(spec):
        st = os.stat(path)
        record[os.path.abspath(path)] = {"sha256": checkpoint_digest(path), "bytes": st.st_size,
                                         "mtime_ns": st.st_mtime_ns}
    return record


def check_checkpoints(engine_dir: str, manifest: dict) -> None:
    """An engine that loads its weights from the spec's checkpoints (torch-cuda) refuses checkpoints that changed
    since its build. An unchanged size and mtime is trusted; otherwise the file is hashed (a copy keeps its digest)."""
    from .checkpoint import file_digest

    if manifest["spec"]["weights"] is None:
        return
    record = manifest["stages"]["build"].get("info", {}).get("checkpoints")
    if record is None:
        raise EngineError(f"{engine_dir} does not record the checkpoints it was built from (built by an older sparvar); "
                          "rebuild the engine")
    for path, rec in record.items():
        if not os.path.isfile(path):
            raise EngineError(f"{engine_dir}: its checkpoint {path} is missing; restore it or rebuild the engine")
        st = os.stat(path)
        if (st.st_size, st.st_mtime_ns) == (rec["bytes"], rec["mtime_ns"]):
            continue
        if st.st_size != rec["bytes"] or file_digest(path) != rec["sha256"]:
            raise EngineError(f"{engine_dir}: its checkpoint {path} changed since the engine was built; rebuild the "
                              "engine (sparvar engine build) to run the new weights")
    # the recorded files are as built; now the ones loading would read: a folder spec (HART's llm/) picks its files
    # at load, and may pick others since
    now = sorted(os.path.abspath(p) for p in checkpoint_files(manifest["spec"]))
    if now != sorted(record):
        raise EngineError(f"{engine_dir}: its spec now selects the checkpoint files {now}, not the {sorted(record)} it "
                          "was built from; rebuild the engine (sparvar engine build) to run them")


def load_engine_plan(engine_dir: str, manifest: dict, backend: str = "triton", skip_last: int = 0):
    """The SparVAR plan a torch-cuda engine's build stage stored (None for a dense engine): its CSLA layouts and CS4A
    geometries as built, checked against this sparvar's policy for the spec's model and schedule; for a generation
    loop that skips the last `skip_last` scales."""
    from .config import get_config
    from .schedule import get_schedule
    from .sparse import default_policy, load_plan

    spec = manifest["spec"]
    if spec["attention"] != "sparvar":
        return None
    rel = manifest["stages"]["build"].get("info", {}).get("torch_cuda", {}).get("sparse_plan")
    if rel is None:
        raise EngineError(f"{engine_dir} has no stored SparVAR plan (built by an older sparvar); rebuild the engine")
    schedule = get_schedule(spec["resolution"], spec["aspect"], model=spec["model"])
    overrides = check_spec_values(engine_dir, manifest).policy_overrides()  # its own EngineError, not wrapped below
    try:
        return load_plan(os.path.join(engine_dir, rel), default_policy(spec["model"], schedule, **overrides), schedule,
                         get_config(spec["model"]).depth, backend, skip_last)
    except (ValueError, KeyError, OSError) as e:
        raise EngineError(f"{engine_dir}: its stored SparVAR plan does not fit this sparvar ({e}); rebuild the engine") from None
    except RuntimeError as e:  # get_sparse_ops: this machine cannot run the backend's kernels (no triton)
        raise EngineError(f"{engine_dir}: {e}") from None


def check_model_config(engine_dir: str, manifest: dict, cfg) -> None:
    """Refuse an engine whose recorded model config differs from this sparvar's config of the same name (stale): its
    graphs were traced from another architecture, which would fail later as a shape error, or run wrong."""
    current = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    recorded = manifest.get("model_config")
    if recorded != current:
        changed = sorted(k for k in current.keys() | (recorded or {}).keys()
                         if (recorded or {}).get(k) != current.get(k))
        raise EngineError(f"{engine_dir} was built for another {cfg.name} config (differs in: {', '.join(changed)}); "
                          "rebuild the engine")


def check_compatible(manifest: dict, engine_dir: str, **expected) -> None:
    """Refuse an engine built for another model/resolution/attention/backend than the caller expects."""
    from .schedule import parse_aspect

    for key, want in expected.items():
        if want is None:
            continue
        have = manifest["spec"].get(key)
        same = have == want
        if key == "aspect" and have is not None:  # '16:9' and '7:4' name one template (parse_aspect says which)
            same = parse_aspect(have) == parse_aspect(want)
        if not same:
            raise EngineError(f"{engine_dir} was built for {key}={have!r}, not {want!r}; build an engine with "
                              f"{key}={want!r} (sparvar engine build ... --{key.replace('_', '-')} {want})")


def remove_abandoned_builds(parent: str, name: str) -> None:
    """Delete the temporary directories that earlier builds of `name` left (killed with SIGKILL, or twice with
    SIGINT, a build cannot clean up after itself). Called with the build lock held (build_lock): no other build of
    `name` is running, so every leftover is abandoned, whatever its process id says (ids repeat across containers)."""
    for entry in os.listdir(parent):
        prefix, _, pid = entry.rpartition("-")
        if prefix not in (f".tmp-{name}", f".old-{name}") or not pid.isdigit():
            continue
        path, engine = os.path.join(parent, entry), os.path.join(parent, name)
        if prefix.startswith(".old-") and not os.path.exists(engine):
            os.replace(path, engine)  # killed between moving the old engine aside and the new one in: restore it
        else:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def build_lock(parent: str, name: str, log=print):
    """One build of an engine directory at a time: an exclusive flock on `.<name>.lock` beside it, held from the
    first look at the old engine to the swap (the OS releases it if the build dies). Without it, a second build
    could link an old engine's files that the first had just replaced, under the old digests, or delete the first's
    temporary directory. A second build waits, then finds the first's stages unchanged."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (one build at a time is then the caller's to keep)
        yield
        return
    path = os.path.join(parent, f".{name}.lock")
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"[engine] another build of {os.path.join(parent, name)} is running; waiting for it ({path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def keep_late_files(engine_dir: str, new_dir: str, log=print) -> None:
    """Files written into engine_dir while its rebuild ran (the build checked for foreign files only at its start)
    move into the new engine at the same paths, instead of being deleted with the old engine. One that would
    overwrite a file of the new engine is an EngineError: the new engine is not swapped in, the old one stays."""
    try:
        old = read_manifest(engine_dir)
    except EngineError:
        old = None
    late = files_not_in_engine(engine_dir, old)
    clashes = [rel for rel in late if os.path.lexists(os.path.join(new_dir, rel))]
    if clashes:
        raise EngineError(f"{engine_dir}: files were written into it during the build ({', '.join(clashes[:5])}) where "
                          "the new engine has files of its own; the old engine is left in place: move them out and "
                          "build again")
    for rel in late:
        os.makedirs(os.path.dirname(os.path.join(new_dir, rel)), exist_ok=True)
        os.replace(os.path.join(engine_dir, rel), os.path.join(new_dir, rel))
    if late:
        log(f"[engine] kept {len(late)} file(s) written into {engine_dir} during the build: {', '.join(late[:5])}")


def build_engine(spec: EngineSpec, engine_dir: str, force: bool = False, log=print) -> dict:
    """Run export -> optimize -> build into engine_dir, skipping stages whose key is unchanged."""
    from export import stages  # the stage implementations (ONNX export, graph optimisation, backend builds)

    # `.`, a trailing slash or a symlink: the swap below renames the directory itself (a symlink would be moved
    # aside as the old engine, the new engine put in its place, and its target left stale)
    engine_dir = os.path.realpath(engine_dir)
    if os.path.exists(engine_dir) and not os.path.isdir(engine_dir):
        raise EngineError(f"{engine_dir} exists and is not a directory; choose another engine directory")
    if os.path.isdir(engine_dir) and os.listdir(engine_dir) and not os.path.exists(os.path.join(engine_dir, MANIFEST)):
        # the build replaces the whole directory: never one that holds something other than an engine
        raise EngineError(f"{engine_dir} is not empty and is not an engine directory (no {MANIFEST}); building there "
                          "would replace what it holds: choose another engine directory, or empty it")
    try:
        stages.check_backend_available(spec.backend)
    except (ImportError, RuntimeError) as e:  # RuntimeError: TensorRT-RTX's library link could not be made
        raise EngineError(f"cannot build a {spec.backend} engine on this machine: {e}") from None
    parent, name = os.path.dirname(engine_dir), os.path.basename(engine_dir)
    os.makedirs(parent, exist_ok=True)
    with build_lock(parent, name, log):
        remove_abandoned_builds(parent, name)  # first: a restored old engine is checked like any other
        return _build_engine_locked(stages, spec, engine_dir, force, log)


def _build_engine_locked(stages, spec: EngineSpec, engine_dir: str, force: bool, log) -> dict:
    """build_engine's work once it holds the directory's build lock: what the old engine holds, the stages, the swap."""
    versions = tool_versions()
    old = None
    if os.path.isdir(engine_dir):
        try:
            old = read_manifest(engine_dir)
        except EngineError as e:
            log(f"[engine] existing {engine_dir} unusable ({e}); rebuilding every stage")
        # the build replaces the whole directory: never over files the engine did not write (a generated image, notes)
        foreign = files_not_in_engine(engine_dir, old)
        if foreign:
            raise EngineError(f"{engine_dir} holds files the engine did not write ({', '.join(foreign[:5])}"
                              f"{', ...' if len(foreign) > 5 else ''}); building there would delete them: move them out "
                              "or choose another engine directory")
        if force:
            old = None
        elif old is not None:
            try:
                verify_files(engine_dir, old)
            except EngineError as e:
                log(f"[engine] existing {engine_dir} unusable ({e}); rebuilding every stage")
                old = None
    parent = os.path.dirname(engine_dir)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(engine_dir)}-{os.getpid()}")  # leftovers went under the lock
    os.makedirs(tmp)
    try:
        context = stages.StageContext(spec=spec, out_dir=tmp, versions=versions, log=log)
        records: dict[str, StageRecord] = {}
        digests = FileDigests()
        prev_key = ""
        for stage in STAGES:
            key = digest_json({"stage": stage, "prev": prev_key, **stages.stage_key_inputs(stage, context)})
            if old is not None and old["stages"].get(stage, {}).get("key") == key:
                for rel in old["stages"][stage]["files"]:
                    os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
                    # a hard link, not a copy: the files stay the ones a running server has loaded (it checks them
                    # by inode), and the graphs' shared weights stay one file on disk. No stage writes into a file
                    # it did not create, so the old engine is never changed through a link
                    try:
                        os.link(os.path.join(engine_dir, rel), os.path.join(tmp, rel))
                    except OSError:  # a file system without hard links
                        shutil.copy2(os.path.join(engine_dir, rel), os.path.join(tmp, rel))
                rec = old["stages"][stage]
                info = stages.refresh_skipped_info(stage, context, rec.get("info", {}))
                records[stage] = StageRecord(key=key, files=rec["files"], info=info, seconds=0.0)
                context.info.update(info)
                log(f"[engine] {stage:8s} unchanged (key {key}), skipped")
            else:
                t0 = time.perf_counter()
                log(f"[engine] {stage:8s} running ...")
                info = stages.run_stage(stage, context)
                context.info.update(info)
                records[stage] = StageRecord(key=key, files=_hash_dir_files(tmp, stage, digests), info=info,
                                             seconds=time.perf_counter() - t0)
                log(f"[engine] {stage:8s} done in {records[stage].seconds:.1f} s (key {key})")
            prev_key = key
        manifest = {
            "format_version": FORMAT_VERSION,
            "spec": dataclasses.asdict(spec),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": versions,
            **stages.describe(context),
            "stages": {s: dataclasses.asdict(r) for s, r in records.items()},
        }
        # the file leaves the later fields at their defaults out: it is then what a sparvar from before them wrote and
        # reads; read_manifest puts the defaults back, so it reads what this returns
        written = {**manifest, "spec": {k: v for k, v in manifest["spec"].items()
                                        if not (k in LATER_SPEC_FIELDS and v == LATER_SPEC_FIELDS[k])}}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(written, f, indent=2, default=str)
        # swap in atomically: the old engine stays intact until the new one is complete
        if os.path.isdir(engine_dir):
            keep_late_files(engine_dir, tmp, log)
            trash = os.path.join(parent, f".old-{os.path.basename(engine_dir)}-{os.getpid()}")
            os.replace(engine_dir, trash)
            try:
                os.replace(tmp, engine_dir)
            except BaseException:
                os.replace(trash, engine_dir)  # the old engine back where it was
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, engine_dir)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def engine_info(engine_dir: str) -> str:
    m = read_manifest(engine_dir)
    s = m["spec"]
    lines = [f"engine {engine_dir}", f"  model {s['model']}  resolution {s['resolution']} ({s['aspect']})  "
             f"attention {s['attention']}  backend {s['backend']}  dtype {s['dtype']}"
             + ("  FP8 linears" if s.get("fp8") else "")
             + (f"  CSLA query tiles {s['csla_query_tile']}" if s.get("csla_query_tile") else ""),
             f"  weights {s['weights'] or 'random (seed %d)' % s['seed']}", f"  built {m['created']} with "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items())]
    if "schedule" in m:
        lines.append(f"  schedule {' '.join(f'{h}x{w}' for h, w in m['schedule'])}")
    for stage in STAGES:
        rec = m["stages"][stage]
        size = sum(os.path.getsize(os.path.join(engine_dir, rel)) for rel in rec["files"] if os.path.exists(os.path.join(engine_dir, rel)))
        lines.append(f"  stage {stage:8s} key {rec['key']}  {len(rec['files'])} files, {size / 2**20:.1f} MiB, {rec['seconds']:.1f} s")
    return "\n".join(lines)
