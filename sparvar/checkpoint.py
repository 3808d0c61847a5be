"""Strict loading of official Infinity checkpoints (.pth / .safetensors, or a folder of shards).

The official files store block b at `block_chunks.{b // P}.module.{b % P}.` (P blocks per chunk); our model
stores it at `blocks.{b}.`. That renumbering is the only conversion: every other name is the official one.
Unlike the official loader (non-strict, silently trims/pads `cfg_uncond`), any missing, unexpected or wrongly
shaped key is an error that lists them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import zipfile

import torch

from .config import CONFIGS, InfinityConfig
from .model import Infinity, build_model

_OFFICIAL_BLOCK = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.*)$")
_OURS_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")
# Containers state dicts come wrapped in. Official trainer checkpoints (ar-ckpt-*.pth) keep the transformer at
# ['trainer']['gpt_fsdp'] (official run_infinity.py reads that key by default; slim exports are bare state dicts).
_WRAPPER_KEYS = ("gpt_fsdp", "state_dict", "model")


class CheckpointError(ValueError):
    pass


def to_official_name(name: str, cfg: InfinityConfig) -> str:
    m = _OURS_BLOCK.match(name)
    if not m:
        return name
    b, rest = int(m.group(1)), m.group(2)
    P = cfg.blocks_per_chunk
    return f"block_chunks.{b // P}.module.{b % P}.{rest}"


def from_official_name(name: str, cfg: InfinityConfig) -> str:
    m = _OFFICIAL_BLOCK.match(name)
    if not m:
        return name
    chunk, idx, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    if idx >= cfg.blocks_per_chunk:  # a chunk size from another model: renumbering would silently scramble blocks
        raise CheckpointError(f"{name}: block index {idx} within a chunk, but {cfg.name} has {cfg.blocks_per_chunk} blocks per chunk")
    return f"blocks.{chunk * cfg.blocks_per_chunk + idx}.{rest}"


def official_key_shapes(cfg: InfinityConfig) -> dict[str, tuple[int, ...]]:
    """Official checkpoint key -> shape, derived from a meta-device model (allocates no weights)."""
    model = build_model(cfg, init="meta")
    return {to_official_name(k, cfg): tuple(v.shape) for k, v in model.state_dict().items()}


def check_checkpoint_file(path: str) -> None:
    """CheckpointError unless `path` is an existing file (a directory is named as one)."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory; give the checkpoint file (.pth, .pt, .bin or .safetensors)")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")


# Weight files of a Hugging Face save_pretrained folder, in the order we look for them. The official Infinity-8B
# weights are such a folder of shards (official run_infinity.py: checkpoint_type='torch_shard', loaded with
# transformers' load_sharded_checkpoint), and so is HART's llm/ folder.
SINGLE_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def shard_index(index: str) -> dict[str, set[str]]:
    """A shard index (.index.json): {absolute shard file: the keys its weight_map puts there}."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards: dict[str, set[str]] = {}
        for key, file in weight_map.items():
            if not isinstance(file, str) or os.path.isabs(file) or os.path.basename(file) != file:
                raise ValueError(f"key {key!r} maps to {file!r}, not a file name beside the index")
            shards.setdefault(os.path.join(os.path.dirname(os.path.abspath(index)), file), set()).add(key)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # unreadable, corrupt JSON, odd map
        raise CheckpointError(f"{index} is not a shard index with a 'weight_map' of key -> file "
                              f"({type(e).__name__}: {e})") from None
    if not shards:
        raise CheckpointError(f"{index}: its weight_map is empty")
    return dict(sorted(shards.items()))


def _resolve(path: str) -> tuple[list[str], str | None, dict[str, set[str]] | None]:
    """(weight files, the shard index they come from, its shards' keys) of a checkpoint path (index and keys None for
    a single file): see weight_files."""
    if path.endswith(".index.json"):
        check_checkpoint_file(path)
        index = path
    elif not os.path.isdir(path):
        check_checkpoint_file(path)
        return [path], None, None
    else:
        for name in SINGLE_WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return [os.path.join(path, name)], None, None
        index = next((os.path.join(path, n) for n in SHARD_INDEX_FILES if os.path.isfile(os.path.join(path, n))), None)
        if index is None:
            raise CheckpointError(f"{path}: a folder without weights (expected one of "
                                  f"{', '.join(SINGLE_WEIGHT_FILES + SHARD_INDEX_FILES)})")
    shards = shard_index(index)
    return list(shards), index, shards


def weight_files(path: str) -> list[str]:
    """The file(s) a checkpoint path names: a weights file itself; a shard index's (.index.json) shards; a folder's
    single weights file (model.safetensors, pytorch_model.bin) or else its index's shards."""
    return _resolve(path)[0]


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The state dict a checkpoint path names (see weight_files). Shards are merged, and each must hold exactly the
    keys its index lists for it: a key in two shards, or in another shard than the index says, is an error."""
    files, index, shards = _resolve(path)
    if shards is None:
        return read_state_dict(files[0])
    sd: dict[str, torch.Tensor] = {}
    for file, keys in shards.items():
        shard = read_state_dict(file)
        repeated = sorted(set(sd) & set(shard))
        if repeated:
            raise CheckpointError(f"{file}: keys already read from another shard: {', '.join(repeated[:10])}")
        raise_key_problems(f"{file} does not hold the keys {index} lists for it",
                           [("listed but absent", sorted(keys - set(shard))),
                            ("present but not listed", sorted(set(shard) - keys))])
        sd.update(shard)
    return sd


def parameter_tensor(t: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A checkpoint tensor as a loader keeps it (load_state_dict(assign=True)): on `device`, in `dtype` (None: its own),
    and on the CPU in 64-byte aligned memory. safetensors maps each tensor at its byte offset in the file, which is
    seldom a 64-byte boundary, and oneDNN's CPU convolutions take other paths on such weights (slower, and rounding
    differently: a decode of loaded weights differed from the same weights in memory by ~5e-6). A copy that .to()
    made is aligned already, so only tensors kept as they were read are copied."""
    out = t.to(device=device) if dtype is None else t.to(device=device, dtype=dtype)
    if out.device.type == "cpu" and out.data_ptr() % 64:
        out = out.clone()
    return out


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    check_checkpoint_file(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # truncated, empty or not safetensors at all: the library's own error types vary
            raise CheckpointError(f"{path} cannot be read as safetensors ({type(e).__name__}: {e})") from None
    if path.endswith((".pth", ".pt", ".bin")):
        try:
            # memory-mapped (8B's 16 GB read lazily); the pre-zip format of torch < 1.6 cannot be, and is read whole
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as e:  # truncated zip, pickle garbage, or a pickle needing more than tensors
            hint = ("; it pickles more than tensors (an official trainer checkpoint keeps its args): we load tensors "
                    "only, so export the weights first (official save_slim_model)") if "weights_only" in str(e) else ""
            raise CheckpointError(f"{path} cannot be read as a torch checkpoint "
                                  f"({type(e).__name__}: {e}){hint}") from None
        if isinstance(sd, dict) and isinstance(sd.get("trainer"), dict):
            sd = sd["trainer"]
        for key in _WRAPPER_KEYS:
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: expected a state dict, found {type(sd).__name__}")
        return sd
    raise CheckpointError(f"{path}: unknown checkpoint format (expected .pth, .pt, .bin or .safetensors)")


def check_state_dict(sd: dict[str, torch.Tensor], cfg: InfinityConfig) -> None:
    """Raise a CheckpointError that lists every missing, unexpected, wrongly shaped, non-floating-point and
    non-finite official key (check_keys); one whose keys and shapes are another Infinity size's says which."""
    try:
        check_keys(sd, official_key_shapes(cfg), cfg.name)
    except CheckpointError as e:
        other = next((name for name, c in CONFIGS.items() if c != cfg and _same_keys_and_shapes(sd, official_key_shapes(c))),
                     None)
        if other is None:
            raise
        raise CheckpointError(f"this is an {other} checkpoint, not {cfg.name} (give --model {other})\n{e}") from None


def _same_keys_and_shapes(sd: dict, expected: dict[str, tuple[int, ...]]) -> bool:
    return set(sd) == set(expected) and all(isinstance(v, torch.Tensor) and tuple(v.shape) == expected[k]
                                            for k, v in sd.items())


def not_floating(key: str, value: torch.Tensor) -> str | None:
    """The problem of a weight tensor that is not floating point (a load would fail on it deep in torch, or cast it
    silently), for the loaders' key lists; None for a floating-point one."""
    return None if value.dtype.is_floating_point else f"{key}: {str(value.dtype).removeprefix('torch.')}"


def not_finite(key: str, value: torch.Tensor) -> str | None:
    """The problem of a floating-point weight holding NaN or Inf (a corrupt download or a diverged run), for the
    loaders' key lists; None for a finite one. Without it the engine builds and every image comes out black or noise,
    with nothing naming the cause. One min/max reduction per tensor (NaN propagates into both, an Inf into one):
    ~1 s for 8B's weights on 2 CPU cores, where isfinite().all() took ~60 s. Meta tensors hold no values."""
    if not value.dtype.is_floating_point or value.is_meta or value.numel() == 0:
        return None
    if value.element_size() == 1:  # float8 checkpoints: no min/max kernels for them; small, so upcast
        value = value.float()
    low, high = torch.aminmax(value)
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return None
    bad = int((~torch.isfinite(value)).sum())
    return f"{key}: {bad} of {value.numel()} values are NaN or Inf"


def check_keys(sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], model_name: str,
               dropped_keys: frozenset = frozenset()) -> None:
    """The strict comparison every loader shares: one CheckpointError listing all missing, unexpected, wrongly
    shaped, non-floating-point and non-finite keys of `sd` against `expected` (key -> shape). Of `dropped_keys`
    (official buffers the loader drops: integer level ids, a -inf mask) only presence and shape are checked. A
    value that is not a tensor (a .pth pickles lists and floats too) or a key that is not a string is named as such."""
    found = len(sd)
    not_tensors = {k for k, v in sd.items() if isinstance(k, str) and not isinstance(v, torch.Tensor)}
    not_tensor = [f"{k}: {type(sd[k]).__name__}" for k in not_tensors]
    unexpected = [k for k in sd if isinstance(k, str) and k not in expected] + [repr(k) for k in sd if not isinstance(k, str)]
    sd = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    missing = sorted(set(expected) - set(sd) - not_tensors)
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} != expected {expected[k]}"
        for k in set(expected) & set(sd)
        if tuple(sd[k].shape) != expected[k]
    )
    loaded = set(expected) & set(sd) - dropped_keys
    wrong_dtype = sorted(filter(None, (not_floating(k, sd[k]) for k in loaded)))
    non_finite = sorted(filter(None, (not_finite(k, sd[k]) for k in loaded)))
    raise_key_problems(f"checkpoint does not match {model_name} ({len(expected)} keys expected, {found} found)",
                       [("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped),
                        ("not a tensor", not_tensor), ("not floating point", wrong_dtype), ("not finite", non_finite)])


def raise_key_problems(header: str, problems: list[tuple[str, list[str]]]) -> None:
    """One CheckpointError: `header`, then each non-empty (title, keys) list, sorted, at most 20 keys shown."""
    if not any(items for _, items in problems):
        return
    parts = [header]
    for title, items in problems:
        if items:
            items = sorted(items)
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            parts.append(f"{title} ({len(items)}):\n  " + "\n  ".join(shown))
    raise CheckpointError("\n".join(parts))


def select_state(sd: dict, expected: dict[str, tuple[int, ...]], name_of, header: str,
                 missing_prefix: str = "") -> dict[str, torch.Tensor]:
    """Strictly pick the `expected` (name -> shape) tensors out of a larger official state dict (tokenizers hold
    encoder and discriminator weights we do not use).

    name_of(key) gives the expected name a file key spells, None for a key dropped by the caller's (documented)
    rule, or "" for a key that is out of place. One CheckpointError (after `header`) lists every missing,
    unexpected, duplicated, wrongly shaped, non-tensor, non-floating-point and non-finite key; missing names are
    shown with `missing_prefix`.
    """
    ours: dict[str, torch.Tensor] = {}
    seen: set[str] = set()  # expected names some key spelled, even if its value was bad
    unexpected, duplicated, mis_shaped, not_tensor, wrong_dtype, non_finite = [], [], [], [], [], []
    for key, value in sd.items():
        name = name_of(key) if isinstance(key, str) else ""
        if name is None:
            continue
        if name not in expected:
            unexpected.append(key if isinstance(key, str) else repr(key))
            continue
        if name in seen:
            duplicated.append(f"{key} (another key already gave {name})")
            continue
        seen.add(name)
        if not isinstance(value, torch.Tensor):
            not_tensor.append(f"{key}: {type(value).__name__}")
        elif tuple(value.shape) != expected[name]:
            mis_shaped.append(f"{key}: checkpoint {tuple(value.shape)} != expected {expected[name]}")
        elif problem := not_floating(key, value):
            wrong_dtype.append(problem)
        elif problem := not_finite(key, value):
            non_finite.append(problem)
        else:
            ours[name] = value
    missing = [missing_prefix + k for k in expected if k not in seen]
    raise_key_problems(header, [("missing", missing), ("unexpected", unexpected), ("duplicated", duplicated),
                                ("wrong shape", mis_shaped), ("not a tensor", not_tensor),
                                ("not floating point", wrong_dtype), ("not finite", non_finite)])
    return ours


def load_checkpoint(model: Infinity, path: str) -> None:
    """Load an official checkpoint (a file or a folder of shards) into `model` strictly (names, count and shapes
    must all match)."""
    sd = read_weights(path)
    check_state_dict(sd, model.cfg)
    ours = {from_official_name(k, model.cfg): v for k, v in sd.items()}
    model.load_state_dict(ours, strict=True)


def load_model(cfg: InfinityConfig, path: str, device="cpu", dtype=torch.float32) -> Infinity:
    from .model import cast_model

    with torch.device("meta"):
        model = Infinity(cfg)
    sd = read_weights(path)
    check_state_dict(sd, cfg)
    model.load_state_dict({from_official_name(k, cfg): parameter_tensor(v, device) for k, v in sd.items()}, strict=True,
                          assign=True)
    return cast_model(model, dtype)


def save_official(model: Infinity, path: str) -> None:
    """Write `model` under the official key names (what official checkpoints look like); atomic."""
    write_state_dict({to_official_name(k, model.cfg): v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                     path)


def write_state_dict(sd: dict[str, torch.Tensor], path: str) -> None:
    """Write a state dict as .safetensors (by extension) or torch.save, through a temp file and a rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, tmp)
    else:
        torch.save(sd, tmp)
    os.replace(tmp, path)


def file_digest(path: str, chunk: int = 1 << 22) -> str:
    """sha256 of a file (used in engine cache keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_digest(path: str) -> str:
    """file_digest of a checkpoint, hashed once per process while its stat is unchanged: an engine build needs it for
    the export stage's cache key and again for the torch-cuda build's checkpoint record (16 GB at 8B)."""
    st = os.stat(path)
    return _digest_at(os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest_at(path: str, ino: int, size: int, mtime_ns: int) -> str:
    return file_digest(path)
