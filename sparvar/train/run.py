"""The two training stages (tokenizer, then transformer), their evaluation and the weight export."""
from __future__ import annotations

import os
import time

import torch

from sparvar.checkpoint import load_model, to_official_name
from sparvar.config import CLASS_PROMPTS, InfinityConfig, VAEConfig
from sparvar.model import Infinity, build_model
from sparvar.schedule import Schedule
from sparvar.train.data import ImageSet, to_model_images
from sparvar.train.loop import LoopSettings, batch_indices, state_digest, step_generator, train_loop
from sparvar.train.tokenizer import Tokenizer, psnr, tokenizer_loss
from sparvar.train.var import bit_logits, bit_loss, class_text, scale_losses, training_text
from sparvar.vae import load_vae

# AdamW leaves these unregularised: learned embeddings, AdaLN offsets, attention temperatures.
TRANSFORMER_NO_DECAY = ("cfg_uncond", "pos_start", "lvl_embed.weight", "ada_gss", "scale_mul_1H11")


def _images(data: ImageSet, idx: torch.Tensor, size: int, flip: torch.Tensor | None) -> torch.Tensor:
    device = data.images.device
    return to_model_images(data.images[idx.to(device)], size, None if flip is None else flip.to(device))


def train_tokenizer(vae: VAEConfig, schedule: Schedule, data: ImageSet, settings: LoopSettings, work: str,
                    resume: bool = False, print_fn=print) -> tuple[Tokenizer, dict]:
    """Train encoder + decoder through the multi-scale BSQ on random horizontally flipped images."""
    device = data.images.device
    torch.manual_seed(settings.seed)
    tokenizer = Tokenizer(vae, schedule.grids).to(device)
    size = schedule.image_size[0]

    def step_fn(step):
        idx = batch_indices(step, settings.batch, len(data), settings.seed)
        flip = torch.rand(settings.batch, generator=step_generator(settings.seed, step)) < 0.5
        return tokenizer_loss(tokenizer, _images(data, idx, size, flip))

    log = train_loop("tokenizer", tokenizer, step_fn, settings, os.path.join(work, "tokenizer.pt"), resume,
                     print_fn=print_fn)
    return tokenizer, log


@torch.no_grad()
def evaluate_tokenizer(tokenizer: Tokenizer, data: ImageSet, batch: int = 500) -> dict:
    """Mean reconstruction PSNR (dB, [0, 1] pixels) over every image of `data`, at the model's image size."""
    tokenizer.eval()
    size = tokenizer.image_size[0]
    values = []
    for start in range(0, len(data), batch):
        idx = torch.arange(start, min(start + batch, len(data)))
        x = _images(data, idx, size, None)
        values.append(psnr(tokenizer.reconstruct(x), x).cpu())
    values = torch.cat(values)
    return {"psnr_db": round(values.mean().item(), 3), "psnr_db_min": round(values.min().item(), 3), "images": len(values)}


def new_transformer(cfg: InfinityConfig, device, seed: int) -> Infinity:
    """The official-scale random init, with a zero output head so training starts from p = 0.5 for every bit."""
    model = build_model(cfg, device=device, dtype=torch.float32, seed=seed)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    return model


def train_transformer(cfg: InfinityConfig, schedule: Schedule, tokenizer: Tokenizer, data: ImageSet,
                      settings: LoopSettings, work: str, cfg_drop: float = 0.1, resume: bool = False,
                      print_fn=print) -> tuple[Infinity, dict]:
    """Teacher-forced next-scale bit prediction; the condition is the class name, dropped with p=cfg_drop for CFG."""
    if not 0.0 <= cfg_drop < 1.0:
        raise ValueError(f"cfg_drop must be in [0, 1), got {cfg_drop}")
    unknown = sorted(set(data.class_names) - set(CLASS_PROMPTS.get(cfg.name, data.class_names)))
    if unknown:  # generation takes only the model's class names (sparvar.pipeline.check_known_prompts)
        raise ValueError(f"{cfg.name} answers the prompts {', '.join(CLASS_PROMPTS[cfg.name])}; the data has classes "
                         f"{', '.join(unknown)} besides: train a model of another name for them")
    device = data.images.device
    tokenizer = tokenizer.eval().requires_grad_(False)
    model = new_transformer(cfg, device, settings.seed)
    features, lengths = (t.to(device) for t in class_text(data.class_names, cfg.text_dim, cfg.text_maxlen))
    size = schedule.image_size[0]

    def step_fn(step):
        g = step_generator(settings.seed, step)
        idx = batch_indices(step, settings.batch, len(data), settings.seed)
        flip = torch.rand(settings.batch, generator=g) < 0.5
        drop = (torch.rand(settings.batch, generator=g) < cfg_drop).to(device)
        with torch.autocast(device.type, enabled=False):  # the tokenizer's bits in fp32, as at evaluation
            bits = tokenizer.encode_bits(_images(data, idx, size, flip))
        labels = data.labels[idx.to(device)]
        text = training_text(model, features[labels], lengths[labels], drop)
        return bit_loss(bit_logits(model, bits, text, schedule), bits)

    # the bits it learns are this tokenizer's: export checks the tokenizer it ships against the digest
    log = train_loop("transformer", model, step_fn, settings, os.path.join(work, "transformer.pt"), resume,
                     no_decay=TRANSFORMER_NO_DECAY, print_fn=print_fn,
                     run_settings={"cfg_drop": cfg_drop, "tokenizer_sha256": state_digest(tokenizer)})
    return model, log


@torch.no_grad()
def evaluate_transformer(model: Infinity, tokenizer: Tokenizer, data: ImageSet, schedule: Schedule,
                         images: int = 256, batch: int = 32, bf16: bool = False) -> dict:
    """Teacher-forced bit loss and accuracy on `images` images of `data` (conditioned), per scale too. The images are
    evenly spaced through the split, which is sorted by file name, i.e. by class: each class in proportion (the
    first 512, as before, were all airplanes)."""
    device = data.images.device
    cfg = model.cfg
    features, lengths = (t.to(device) for t in class_text(data.class_names, cfg.text_dim, cfg.text_maxlen))
    size = schedule.image_size[0]
    model.eval()
    chosen = torch.linspace(0, len(data) - 1, min(images, len(data))).round().long()
    totals, per_scale, n = {"loss": 0.0, "bit_acc": 0.0}, None, 0
    for start in range(0, len(chosen), batch):
        idx = chosen[start:start + batch]
        bits = tokenizer.encode_bits(_images(data, idx, size, None))
        labels = data.labels[idx.to(device)]
        drop = torch.zeros(len(idx), dtype=torch.bool, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = bit_logits(model, bits, training_text(model, features[labels], lengths[labels], drop), schedule)
        loss, metrics = bit_loss(logits, bits)
        totals["loss"] += loss.item() * len(idx)
        totals["bit_acc"] += metrics["bit_acc"].item() * len(idx)
        scales = scale_losses(logits, bits)
        per_scale = [a + b * len(idx) for a, b in zip(per_scale or [0.0] * len(scales), scales)]
        n += len(idx)
    classes = torch.bincount(data.labels[chosen.to(data.labels.device)].cpu(), minlength=len(data.class_names))
    return {"loss": round(totals["loss"] / n, 5), "bit_acc": round(totals["bit_acc"] / n, 5),
            "scale_loss": [round(v / n, 5) for v in per_scale], "images": n,
            "images_per_class": dict(zip(data.class_names, classes.tolist()))}


# ----------------------------------------------------------------------------------------------- export
TRANSFORMER_FILE = "{model}.safetensors"
TOKENIZER_FILE = "{model}-tokenizer.safetensors"


def _save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.chmod(tmp, 0o644)  # safetensors creates files owner-only; these ship in the repo
    os.replace(tmp, path)


def export_weights(model: Infinity, tokenizer: Tokenizer, out_dir: str, dtype: torch.dtype = torch.float16,
                   metadata: dict[str, str] | None = None) -> tuple[str, str]:
    """Write the transformer under official key names and the tokenizer as `encoder.*` + `decoder.*`, in `dtype`.

    `sparvar.checkpoint.load_model` and `sparvar.vae.load_vae` read these files strictly (checked here).
    """
    cfg = model.cfg
    meta = {"model": cfg.name, "tokenizer": cfg.vae.name, "written": time.strftime("%Y-%m-%d"), **(metadata or {})}
    transformer_path = os.path.join(out_dir, TRANSFORMER_FILE.format(model=cfg.name))
    tokenizer_path = os.path.join(out_dir, TOKENIZER_FILE.format(model=cfg.name))
    _save_safetensors({to_official_name(k, cfg): v.to(dtype) for k, v in model.state_dict().items()}, transformer_path, meta)
    _save_safetensors({k: v.to(dtype) for k, v in tokenizer.state_dict().items()}, tokenizer_path, meta)
    load_model(cfg, transformer_path)  # strict: raises on any missing, unexpected or mis-shaped key
    load_vae(tokenizer_path, cfg.vae)
    return transformer_path, tokenizer_path


def load_tokenizer(path: str, vae: VAEConfig, grids: tuple[tuple[int, int], ...], device="cpu") -> Tokenizer:
    """The full tokenizer (encoder too) from an exported file, strictly, in fp32 and eval mode."""
    from sparvar.checkpoint import read_state_dict

    tokenizer = Tokenizer(vae, grids)
    tokenizer.load_state_dict({k: v.float() for k, v in read_state_dict(path).items()}, strict=True)
    return tokenizer.to(device).eval().requires_grad_(False)
