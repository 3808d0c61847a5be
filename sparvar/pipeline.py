"""A ready-to-run text-to-image pipeline: config + schedule + transformer runner + tokenizer decoder + text."""
from __future__ import annotations

import io
import os

import torch

from .config import CLASS_PROMPTS, InfinityConfig, get_config
from .generate import Generation, Sampling, TorchRunner, check_runner_skip, generate
from .schedule import Schedule, get_schedule


class Decoder:
    """What the generation loop needs from the tokenizer: bits -> codes, summed latent -> image."""

    def __init__(self, vae_module, cfg: InfinityConfig):
        from . import vae as vae_lib

        self.module = vae_module
        self.codebook_dim = cfg.vae.codebook_dim
        self.patchify = cfg.vae.spatial_patchify
        self._bits_to_codes = vae_lib.bits_to_codes

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        return self._bits_to_codes(bits, self.codebook_dim)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        p = next(self.module.parameters())
        return self.module.decode(latent.to(p.dtype)).float()


def build_decoder(cfg: InfinityConfig, vae_path: str | None, device, dtype) -> Decoder:
    from . import vae as vae_lib

    if vae_path is None:
        module = vae_lib.build_vae(cfg.vae, seed=0)
    else:
        module = vae_lib.load_vae(vae_path, cfg.vae)
    return Decoder(module.to(device=device, dtype=dtype).eval(), cfg)


def make_plan(cfg: InfinityConfig, schedule: Schedule, attention: str, backend: str = "reference", skip_last: int = 0,
              **policy_overrides):
    """None for dense attention, else the SparVAR plan of the model's default policy (with `policy_overrides`, see
    sparvar.sparse.default_policy) for a generation loop that skips the last `skip_last` scales."""
    if attention == "dense":
        return None
    if attention != "sparvar":
        raise ValueError(f"unknown attention {attention!r}; expected 'dense' or 'sparvar'")
    from .sparse import SparVARPlan, default_policy

    return SparVARPlan(default_policy(cfg.name, schedule, **policy_overrides), schedule, cfg.depth, backend=backend,
                       skip_last=skip_last)


class Pipeline:
    def __init__(self, cfg: InfinityConfig, schedule: Schedule, runner, decoder: Decoder, random_weights: bool, skip_last: int = 0):
        check_runner_skip(runner, schedule, skip_last)
        self.cfg, self.schedule, self.runner, self.decoder = cfg, schedule, runner, decoder
        self.random_weights, self.skip_last = random_weights, skip_last
        self.text_encoders: dict = {}  # directory -> loaded encoder: a long-lived pipeline (sparvar serve) loads it once

    @classmethod
    def from_args(cls, args, device, dtype) -> "Pipeline":
        return cls.create(args.model, resolution=args.resolution, aspect=args.aspect, weights=args.weights, vae=args.vae,
                          device=device, dtype=dtype, attention=args.attention, skip_last=args.skip_last)

    @classmethod
    def create(cls, model: str, resolution: int | None = None, aspect: str = "1:1", weights: str | None = None,
               vae: str | None = None, device="cpu", dtype=torch.float32, attention: str = "dense", skip_last: int = 0,
               seed: int = 0) -> "Pipeline":
        from .checkpoint import load_model
        from .model import build_model

        cfg = get_config(model)
        if getattr(cfg, "family", "infinity") == "hart":
            from .hart.generate import HartPipeline

            return HartPipeline.create(model, resolution, aspect, weights, vae, device, dtype, attention, skip_last, seed)
        schedule = get_schedule(resolution or cfg.default_resolution, aspect, model=model)
        if (weights is None) != (vae is None):
            raise ValueError("give both transformer weights and tokenizer weights, or neither (random weights)")
        net = build_model(cfg, device=device, dtype=dtype, seed=seed) if weights is None else load_model(cfg, weights, device, dtype)
        runner = TorchRunner(net, schedule, make_plan(cfg, schedule, attention, skip_last=skip_last), backend="sdpa")
        return cls(cfg, schedule, runner, build_decoder(cfg, vae, device, dtype), weights is None, skip_last)

    def text_features(self, prompts: list[str], t5: str | None = None, embeddings: str | None = None,
                      allow_hashed: bool = False, qwen: str | None = None):
        from .text import T5TextEncoder, hashed_embeddings, load_embeddings

        check_text_sources(self.cfg, t5=t5, qwen=qwen, embeddings=embeddings, real_weights=not allow_hashed,
                           prompts=None if embeddings else prompts)
        if embeddings:
            return load_embeddings(embeddings, self.cfg.text_dim)
        if self.cfg.text_encoder == "hashed":  # the model was trained on these embeddings: they are its text encoder
            return hashed_embeddings(prompts, self.cfg.text_dim, self.cfg.text_maxlen)
        if t5:
            if t5 not in self.text_encoders:
                self.text_encoders[t5] = T5TextEncoder(t5, device=self.runner.device)
            encoder = self.text_encoders[t5]
            if encoder.dim != self.cfg.text_dim:
                raise ValueError(f"T5 encoder at {t5} has width {encoder.dim}; {self.cfg.name} needs {self.cfg.text_dim}")
            return encoder(prompts)
        return hashed_embeddings(prompts, self.cfg.text_dim, self.cfg.text_maxlen)  # random weights, no text source

    def sampling(self, cfg: float | None = None, tau: float | None = None, top_k: int | None = None,
                 top_p: float | None = None) -> Sampling:
        return sampling_for(self.cfg, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p)

    def generate(self, features, lengths, sampling: Sampling = Sampling(), seed: int = 0, progress=None) -> Generation:
        return generate(self.runner, self.decoder, self.schedule, features, lengths, sampling, seed, self.skip_last, progress)


def sampling_for(model_cfg, cfg: float | None = None, tau: float | None = None, top_k: int | None = None,
                 top_p: float | None = None):
    """The model family's sampling options (Infinity's Sampling, HART's HartSampling) from the CLI's or a request's
    options (None keeps the default); ValueError naming a bad one. Needs only the model's config, so that the CLI
    checks them before any weights load."""
    if getattr(model_cfg, "family", "infinity") == "hart":
        from .hart.generate import hart_sampling

        return hart_sampling(model_cfg, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p)
    options = {"cfg": cfg, "tau": tau, "top_k": top_k, "top_p": top_p}
    return Sampling(**{k: v for k, v in options.items() if v is not None})


def default_prompt(cfg) -> str:
    """The prompt of a request that names none (`generate` without --prompt, the server's warm-up): a fixed phrase,
    or a class-conditional model's first class name."""
    return CLASS_PROMPTS.get(cfg.name, ("a photo of a cat",))[0]


def check_known_prompts(cfg, prompts) -> None:
    """Refuse a prompt a class-conditional model (config.CLASS_PROMPTS: its class names) was never trained on: its
    hashed embedding is a vector the model has not seen, and the image would be noise with nothing naming the cause.
    Compared by the words the hashed embedding reads (text.hashed_words), so 'Dog ' is 'dog'."""
    from .text import hashed_words

    known = CLASS_PROMPTS.get(cfg.name)
    if not known:
        return
    unknown = [p for p in prompts or () if " ".join(hashed_words(p)) not in known]
    if unknown:
        raise ValueError(f"{cfg.name} was trained on its class names alone; the prompt must be one of "
                         f"{', '.join(known)}, got {', '.join(map(repr, unknown))}")


def check_text_sources(cfg, t5: str | None = None, qwen: str | None = None, embeddings: str | None = None,
                       real_weights: bool = False, prompts: list[str] | None = None) -> None:
    """Refuse text options that do not fit the model (Infinity: T5; HART: Qwen2; both: precomputed embeddings;
    a model trained on hashed embeddings: no encoder; a class-conditional model: a prompt it does not know), naming
    the option; with real_weights, also no text source at all where the model needs one. Cheap: the CLI calls it
    before any work."""
    check_known_prompts(cfg, prompts)
    given = [name for name, value in (("--t5", t5), ("--qwen", qwen), ("--text-embeddings", embeddings)) if value]
    if real_weights and not given and cfg.text_encoder != "hashed":
        encoder = ("--qwen DIR (a local Qwen2-VL-1.5B-Instruct)" if getattr(cfg, "family", "infinity") == "hart"
                   else "--t5 DIR")
        raise ValueError(f"{cfg.name} with real weights needs a text encoder: give {encoder} or --text-embeddings FILE")
    if len(given) > 1:
        raise ValueError(f"give one text source, not {' and '.join(given)}")
    if cfg.text_encoder == "hashed" and (t5 or qwen):
        raise ValueError(f"{cfg.name} was trained on hashed word embeddings, not a text encoder: drop {given[0]}")
    hart = getattr(cfg, "family", "infinity") == "hart"
    if t5 and hart:
        raise ValueError(f"--t5 is Infinity's text encoder; {cfg.name} takes --qwen DIR (a local Qwen2) or --text-embeddings FILE")
    if qwen and not hart:
        raise ValueError(f"--qwen is HART's text encoder; {cfg.name} takes --t5 DIR or --text-embeddings FILE")
    for name, path, isthere in (("--t5", t5, os.path.isdir), ("--qwen", qwen, os.path.isdir),
                                ("--text-embeddings", embeddings, os.path.isfile)):
        if path and not isthere(path):
            kind = "file" if isthere is os.path.isfile else "directory (the encoder's local copy)"
            raise ValueError(f"{name} {path}: no such {kind}")
    for name, path in (("--t5", t5), ("--qwen", qwen)):  # a Hugging Face model folder: its config.json first
        if path and not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{name} {path}: no config.json there, so not a local copy of the encoder (a Hugging Face "
                             "model folder: config.json, the weights and the tokenizer files)")


def image_arrays(images: torch.Tensor):
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 numpy: the pixels every written image has. Truncated, not
    rounded, as both official pipelines convert (Infinity: mul_(255).to(torch.uint8); HART: astype(np.uint8)), so a
    PNG matches the official one pixel for pixel when the floats do."""
    return images.mul(255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_paths(out: str, count: int) -> list[str]:
    """The files `save_images` writes for `count` images: `out` itself for one, NAME-<i>.EXT for a batch."""
    root, ext = os.path.splitext(out)
    ext = ext or ".png"
    return [f"{root}{ext}"] if count == 1 else [f"{root}-{i}{ext}" for i in range(count)]


def save_images(images: torch.Tensor, out: str) -> list[str]:
    """(B, 3, H, W) in [0, 1] -> image file(s) (image_paths), all encoded to temp names before any is renamed, so a
    failed write (disk full, no encoder) leaves no image of the batch and no temp file behind (a rename failing
    midway, rarer: `sparvar generate` refuses directories in the way first, can leave the first ones renamed).
    OSError naming the file asked for, not its temp name."""
    from PIL import Image

    arr = image_arrays(images)
    paths = image_paths(out, len(arr))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    temps = [f"{path}.tmp-{os.getpid()}{os.path.splitext(path)[1]}" for path in paths]
    try:
        for a, path, tmp in zip(arr, paths, temps):
            try:
                Image.fromarray(a).save(tmp)
            except (OSError, ValueError) as e:
                raise OSError(f"cannot write {path}: {getattr(e, 'strerror', None) or e}") from None
        for path, tmp in zip(paths, temps):
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
    return paths


def image_format(path: str) -> str | None:
    """The Pillow format an output path's extension saves as (PNG without one), None if Pillow cannot write it."""
    from PIL import Image

    Image.init()  # registers every plug-in's extensions
    ext = os.path.splitext(path)[1].lower() or ".png"
    fmt = Image.registered_extensions().get(ext)
    if fmt not in Image.SAVE:
        return None
    try:  # some registered writers take no RGB image (XBM, MSP, ...) or are stubs without an encoder (HDF5, WMF)
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError):
        return None
    return fmt
