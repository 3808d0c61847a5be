"""CIFAR-10 from the JPEG tarball (`<split>/<class>/NNNN.jpg`), decoded once into uint8 tensors."""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_DATA = os.path.join("..", "shared", "data", "cifar10-jpeg.tar.gz")  # relative to the repo root
SPLITS = ("train", "test")


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 32, 32, 3) uint8, in file-name order within each split
    labels: torch.Tensor  # (N,) int64 index into class_names
    class_names: tuple[str, ...]  # sorted folder names; the prompt of class i is class_names[i]

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device), self.class_names)


def load_cifar(path: str, limit: int | None = None) -> dict[str, ImageSet]:
    """Decode every JPEG of the tarball; returns {'train': ..., 'test': ...} (splits present in the file).

    `limit` keeps the first `limit` files of each split in name order (for quick runs and tests).
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive number of images per split, got {limit}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR-10 tarball not found: {path} (expected cifar10-jpeg.tar.gz, see ../shared/data/README.md)")
    files: dict[str, list[tuple[str, str, bytes]]] = {s: [] for s in SPLITS}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if not member.isfile() or not member.name.lower().endswith((".jpg", ".jpeg")):
                continue
            parts = member.name.strip("./").split("/")
            if len(parts) < 3 or parts[-3] not in files:
                raise ValueError(f"{path}: unexpected member {member.name!r}; expected <train|test>/<class>/<file>.jpg")
            files[parts[-3]].append((member.name, parts[-2], tar.extractfile(member).read()))
    class_names = tuple(sorted({cls for items in files.values() for _, cls, _ in items}))
    if not class_names:
        raise ValueError(f"{path}: no JPEG files under train/ or test/")
    out = {}
    for split, items in files.items():
        if not items:
            continue
        items.sort(key=lambda item: item[0])
        items = items[:limit] if limit is not None else items
        images = np.stack([_decode(name, data) for name, _, data in items])
        labels = torch.tensor([class_names.index(cls) for _, cls, _ in items])
        out[split] = ImageSet(torch.from_numpy(images), labels, class_names)
    return out


def _decode(name: str, data: bytes) -> np.ndarray:
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    if image.shape != (32, 32, 3):
        raise ValueError(f"{name}: expected a 32x32 RGB image, got shape {image.shape}")
    return image


def to_model_images(images: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """(B, h, w, 3) uint8 -> (B, 3, size, size) float in [-1, 1], bicubic upsampling, optional per-row h-flip."""
    x = images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if flip is not None:
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x.clamp(-1.0, 1.0)
