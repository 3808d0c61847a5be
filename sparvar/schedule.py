"""Scale schedules: which (h, w) token grids a generation walks through.

The official Infinity release defines, per aspect ratio, one 13-scale list of (h, w) grids; the
256/512/768/1024-pixel schedules are its first 7/10/12/13 entries. RoPE positions always come from
the last (1M-pixel) grid of the aspect's list, so every schedule is a prefix of the same geometry.

Models we trained ourselves on another geometry (`MODEL_SCHEDULES`, e.g. infinity-cifar: 64x64 pixels,
2 pixels per token) carry their own grids; `get_schedule(resolution, aspect, model=name)` picks them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .hart.config import HART_CONFIGS, HartConfig

# Aspect ratio (h / w) -> the 13 grids of the 1M-pixel schedule (official dynamic_resolution.py).
_RATIO_TO_GRIDS: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)),
}


def _all_templates() -> dict[float, tuple[tuple[int, int], ...]]:
    out = {}
    for ratio, grids in _RATIO_TO_GRIDS.items():
        out[ratio] = grids
        if ratio != 1.0:  # portrait templates are the transposed landscape ones (official: int(1/r*1000)/1000)
            out[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in grids)
    return out


ASPECT_TEMPLATES = _all_templates()  # 15 templates
# Resolution class (the 1:1 pixel edge) -> number of scales taken from the template.
RESOLUTION_NUM_SCALES = {256: 7, 512: 10, 768: 12, 1024: 13}
PIXELS_PER_TOKEN = 16  # one token covers 16x16 pixels (2B: stride 16; 8B: stride 8 with a 2x2 patchify)


def parse_aspect(aspect: str | float) -> float:
    """'1:1', '16:9', '1.333' or a float -> the official template ratio it names (h/w), or an error."""
    if isinstance(aspect, str):
        if ":" in aspect:
            h, w = aspect.split(":", 1)
            try:
                value = float(h) / float(w)
            except (ValueError, ZeroDivisionError):
                raise ValueError(f"aspect {aspect!r} is not 'H:W'") from None
        else:
            try:
                value = float(aspect)
            except ValueError:
                raise ValueError(f"aspect {aspect!r} is neither 'H:W' nor a number") from None
    else:
        value = float(aspect)
    # the official code snaps to the nearest template; we accept within 2% (16:9 -> 1.75) and refuse the rest
    nearest = min(ASPECT_TEMPLATES, key=lambda r: abs(r - value))
    if abs(nearest - value) <= 0.02 * nearest:
        return nearest
    supported = ", ".join(f"{r:g}" for r in sorted(ASPECT_TEMPLATES))
    raise ValueError(f"unsupported aspect ratio {aspect!r} (h/w = {value:.4g}); supported h/w ratios: {supported}")


@dataclass(frozen=True)
class Schedule:
    """The token grids of one generation, plus the geometry every other module derives from them."""

    grids: tuple[tuple[int, int], ...]  # (h, w) per scale, in generation order
    rope_grid: tuple[int, int]  # the 1M-pixel final grid that RoPE positions live on
    pixels_per_token: int = PIXELS_PER_TOKEN  # pixel edge of one token (a model-specific schedule may differ)
    # HART: scale 0's KV slots are a text prefix of this length instead of its 1x1 grid (the 1x1 token is
    # predicted from the last prefix slot and never enters the KV). None: scale 0 is its grid, as in Infinity.
    prefix_len: int | None = None

    @property
    def num_scales(self) -> int:
        return len(self.grids)

    @cached_property
    def lengths(self) -> tuple[int, ...]:
        """Tokens each scale's step runs (and adds to the KV): its grid, or the text prefix for scale 0."""
        lengths = [h * w for h, w in self.grids]
        if self.prefix_len is not None:
            lengths[0] = self.prefix_len
        return tuple(lengths)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """offsets[k] = tokens before scale k (the KV length entering scale k); offsets[-1] = total."""
        out = [0]
        for n in self.lengths:
            out.append(out[-1] + n)
        return tuple(out)

    @property
    def total_tokens(self) -> int:
        return self.offsets[-1]

    @property
    def final_grid(self) -> tuple[int, int]:
        return self.grids[-1]

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        h, w = self.final_grid
        return h * self.pixels_per_token, w * self.pixels_per_token

    def run_scales(self, skip_last) -> int:
        """The scales a generation loop skipping its last `skip_last` runs; skip_last must be an int in
        [0, num_scales - 1] (ValueError naming it otherwise)."""
        if not isinstance(skip_last, int) or isinstance(skip_last, bool) or not 0 <= skip_last < self.num_scales:
            raise ValueError(f"skip_last must be in [0, {self.num_scales - 1}] for a {self.num_scales}-scale schedule, "
                             f"got {skip_last!r}")
        return self.num_scales - skip_last

    def kv_len(self, scale: int) -> int:
        """Keys visible to the queries of `scale`: every earlier scale and itself."""
        return self.offsets[scale + 1]

    def rope_positions(self, scale: int) -> tuple[list[int], list[int]]:
        """Row and column of each raster token of `scale` on the rope grid: round-half-even(i * H* / h), the product
        in float32 as the official code forms it (torch.arange(h) * (H / h)): at aspect 3:1, scale 9 (54 rows on a
        111-row grid) row 27 is exactly 55.5 in float32 (-> 56) but just below it in float64 (-> 55)."""
        if self.prefix_len is not None:  # HART positions are fractional and follow each prompt's text length
            raise ValueError("a HART schedule has no fixed rope positions; use sparvar.hart.model.rope_tables")
        h, w = self.grids[scale]
        H, W = self.rope_grid
        rows = (torch.arange(h) * (H / h)).round().int().tolist()
        cols = (torch.arange(w) * (W / w)).round().int().tolist()
        return [r for r in rows for _ in cols], [c for _ in rows for c in cols]


@dataclass(frozen=True)
class ModelSchedule:
    """The square schedule of a model trained on its own geometry; a resolution class takes a prefix of it."""

    grids: tuple[tuple[int, int], ...]  # the full schedule; RoPE positions live on its last grid
    pixels_per_token: int
    resolutions: tuple[tuple[int, int], ...]  # (pixel edge, number of scales)

    def schedule(self, model: str, resolution: int, aspect: str | float) -> Schedule:
        if parse_aspect(aspect) != 1.0:
            raise ValueError(f"{model} was trained on square images only; got aspect {aspect!r}")
        num_scales = dict(self.resolutions).get(resolution)
        if num_scales is None:
            raise ValueError(f"unsupported resolution {resolution!r} for {model}; supported: {sorted(dict(self.resolutions))}")
        return Schedule(self.grids[:num_scales], rope_grid=self.grids[-1], pixels_per_token=self.pixels_per_token)


# Model name -> its own schedule. Models not listed use the official templates.
MODEL_SCHEDULES: dict[str, ModelSchedule] = {
    # 64x64 images, stride-2 tokenizer: 11 scales up to 32x32 tokens (2,530 tokens; 1,024 in the last scale)
    "infinity-cifar": ModelSchedule(
        grids=((1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32)),
        pixels_per_token=2, resolutions=((64, 11),)),
}


def get_schedule(resolution: int, aspect: str | float = "1:1", model: str | None = None) -> Schedule:
    """The schedule for a resolution class (256, 512, 768, 1024) and an official aspect template.

    `model` names a model: one listed in MODEL_SCHEDULES gets its own grids, a HART model its config's
    patch_nums (hart_schedule), any other the official Infinity ones.
    """
    if model in HART_CONFIGS:
        return hart_schedule(HART_CONFIGS[model], resolution, aspect)
    if model in MODEL_SCHEDULES:
        return MODEL_SCHEDULES[model].schedule(model, resolution, aspect)
    if resolution not in RESOLUTION_NUM_SCALES:
        raise ValueError(f"unsupported resolution {resolution!r}; supported: {sorted(RESOLUTION_NUM_SCALES)}")
    ratio = parse_aspect(aspect)
    template = ASPECT_TEMPLATES[ratio]
    return Schedule(grids=template[: RESOLUTION_NUM_SCALES[resolution]], rope_grid=template[-1])


def hart_schedule(cfg: HartConfig, resolution: int | None = None, aspect: str | float = "1:1") -> Schedule:
    """A HART model's square schedule: its patch_nums grids at its one resolution, scale 0 = the text prefix.

    RoPE positions live on the last grid (official: coordinates * patch_nums[-1] / pn), and the KV holds
    text_len + sum(pn^2) - 1 tokens (9750 for hart-0.7b).
    """
    resolution = cfg.default_resolution if resolution is None else resolution
    if resolution != cfg.default_resolution:
        raise ValueError(f"unsupported resolution {resolution!r} for {cfg.name}; supported: [{cfg.default_resolution}]")
    if parse_aspect(aspect) != 1.0:
        raise ValueError(f"{cfg.name} generates square images only; got aspect {aspect!r}")
    grids = tuple((pn, pn) for pn in cfg.patch_nums)
    return Schedule(grids, rope_grid=grids[-1], pixels_per_token=cfg.vq.stride, prefix_len=cfg.text_len)
