"""SparVAR: which attention each (layer, scale) runs, and the plan object the model calls.

`SparVARPolicy` is the one config per model (frozen, tied to a schedule's scale count);
`default_policy(model_name, schedule)` builds it. `SparVARPlan` turns a policy into precomputed CSLA
layouts and CS4A geometry, keeps the per-layer CS4A state of one generation and dispatches
`attend(q, k, v, layer=, scale=)` to pure functions (`SparseOps`), so a kernel backend only swaps those.

Rule that scales the paper's 1024^2 policy to other schedules: sparse attention runs on the last
`sparse_last` scales of the schedule (3: scales 10, 11, 12 at 1024^2, 7, 8, 9 at 512^2, 4, 5, 6 at 256^2);
the CS4A decision is the first of them; band sides apply to the scales after it in order; CSLA window
sides are per key scale, aligned to the schedule's last scale (see sparvar/csla.py). Sinks stay absolute (the first
scales).
At 256^2 the 2B/8B values leave little to skip (KV is tiny next to 112-key tiles and 5 sink scales), which
is correct but not faster; use the values to reproduce the paper at 1024^2.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from sparvar.config import get_config
from sparvar.cs4a import (CS4AGeometry, cs4a_attention_ref, cs4a_decide_ref, cs4a_from_selection_ref, cs4a_geometry,
                          cs4a_topk, num_groups, upsample_cache)
from sparvar.csla import (GRANULARITIES, KERNEL_TILE_SIZES, BlockLayout, TileLayout, check_window_sides, csla_attention_ref, csla_layout,
                          csla_tile_layout)
from sparvar.schedule import Schedule

KINDS = ("dense", "cs4a_decide", "cs4a", "csla")


def is_positive_int_pair(value) -> bool:
    """Whether `value` is a tuple of two positive ints (bools are not ints here): a CSLA block or query tile."""
    return (isinstance(value, tuple) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))


def check_query_tile(tile, name: str = "csla_query_tile") -> None:
    """A CSLA query tile (rows, cols): two positive ints whose product is a kernel query tile (ValueError, its
    message naming the tile as `name`)."""
    if not is_positive_int_pair(tile):
        raise ValueError(f"{name} must be None or two positive ints (rows, cols), got {tile!r}")
    if tile[0] * tile[1] not in KERNEL_TILE_SIZES:
        raise ValueError(f"{name} {tile[0]}x{tile[1]} holds {tile[0] * tile[1]} queries; the kernel's query tile must "
                         f"hold one of {KERNEL_TILE_SIZES}")


@dataclass(frozen=True)
class SparVARPolicy:
    """Per (layer, scale): dense below `decision_scale`; from it on, CS4A in layers < cs4a_layers, CSLA in the rest."""

    num_layers: int
    num_scales: int
    decision_scale: int  # first sparse scale; CS4A selects its keys here
    cs4a_layers: int  # layer split: layers < cs4a_layers run CS4A, the others CSLA
    # CSLA (static mask)
    csla_sinks: int = 5  # the first `csla_sinks` scales are kept whole
    csla_window_sides: tuple[int, ...] = (-1, -1, -1, 1, 1, 3, 5, 7)  # per key scale, the last entry the last scale's
    csla_block: tuple[int, int] = (128, 128)  # (queries, keys) per tile; FlexAttention's default, as the paper ran
    csla_granularity: str = "block"
    # None: raster blocks of csla_block (a BlockLayout). (rows, cols): 2-D query tiles of the query grid, each
    # attending the exact union of its queries' windows (a TileLayout; csla_block is then unused)
    csla_query_tile: tuple[int, int] | None = None
    # CS4A (dynamic selection)
    cs4a_group_size: int = 192
    cs4a_topk_ratio: float = 0.2
    cs4a_multiple: int = 112  # top-k and band lengths are multiples of this (the kernel's K/V tile)
    cs4a_band_sides: tuple[int, ...] = (7, 9)  # one per scale after the decision scale
    cs4a_use_cache: bool = True  # False = the "CS4A without residual cache" ablation
    cs4a_sinks: int = 0  # the first scales' keys (HART: the text prefix + 2^2..5^2) lead every key set, never top-k

    def __post_init__(self):
        # sequence fields arrive as lists from JSON and CLI overrides: one type (tuples) keeps the policy hashable and
        # its record, hence every cache key and staleness check, the same however a field was spelled
        for name in ("csla_window_sides", "csla_block", "csla_query_tile", "cs4a_band_sides"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        ints = ("num_layers", "num_scales", "decision_scale", "cs4a_layers", "csla_sinks", "cs4a_sinks", "cs4a_group_size",
                "cs4a_multiple")
        for name in ints:  # 10.5 layers, "False" for a bool: accepted, they changed the policy or failed far from here
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if not isinstance(self.cs4a_use_cache, bool):
            raise ValueError(f"cs4a_use_cache must be True or False, got {self.cs4a_use_cache!r}")
        if not isinstance(self.cs4a_topk_ratio, (int, float)) or isinstance(self.cs4a_topk_ratio, bool):
            raise ValueError(f"cs4a_topk_ratio must be a number, got {self.cs4a_topk_ratio!r}")
        if not isinstance(self.cs4a_band_sides, tuple) or any(
                not isinstance(side, int) or isinstance(side, bool) for side in self.cs4a_band_sides):
            raise ValueError(f"cs4a_band_sides must be ints, got {self.cs4a_band_sides!r}")
        if self.num_layers <= 0 or self.num_scales <= 0:
            raise ValueError(f"num_layers and num_scales must be positive, got {self.num_layers} and {self.num_scales}")
        if not 0 <= self.decision_scale < self.num_scales:
            raise ValueError(f"decision_scale {self.decision_scale} outside [0, {self.num_scales})")
        if not 0 <= self.cs4a_layers <= self.num_layers:
            raise ValueError(f"cs4a_layers {self.cs4a_layers} outside [0, {self.num_layers}]")
        if self.csla_sinks < 0:
            raise ValueError(f"csla_sinks must be >= 0, got {self.csla_sinks}")
        check_window_sides(self.csla_window_sides)
        if not is_positive_int_pair(self.csla_block):
            raise ValueError(f"csla_block must be two positive ints (queries, keys), got {self.csla_block}")
        if self.csla_granularity not in GRANULARITIES:
            raise ValueError(f"unknown csla_granularity {self.csla_granularity!r}; expected one of {GRANULARITIES}")
        if self.csla_query_tile is not None:
            check_query_tile(self.csla_query_tile)
            if self.csla_granularity != "block":
                raise ValueError("csla_query_tile needs csla_granularity 'block' (a tile attends its whole key set); "
                                 f"got {self.csla_granularity!r}")
        if self.cs4a_group_size <= 0 or self.cs4a_multiple <= 0:
            raise ValueError(f"cs4a_group_size and cs4a_multiple must be positive, got {self.cs4a_group_size}, {self.cs4a_multiple}")
        if not 0.0 < self.cs4a_topk_ratio <= 1.0:
            raise ValueError(f"cs4a_topk_ratio must be in (0, 1], got {self.cs4a_topk_ratio}")
        later = self.num_scales - self.decision_scale - 1
        if len(self.cs4a_band_sides) != later:
            raise ValueError(f"cs4a_band_sides {self.cs4a_band_sides} needs one side per scale after the decision "
                             f"scale {self.decision_scale} ({later} of them)")
        if any(s <= 0 or s % 2 == 0 for s in self.cs4a_band_sides):
            raise ValueError(f"cs4a_band_sides must be positive odd ints, got {self.cs4a_band_sides}")
        if not 0 <= self.cs4a_sinks <= self.decision_scale:
            raise ValueError(f"cs4a_sinks {self.cs4a_sinks} must be in [0, decision_scale={self.decision_scale}]")

    def record(self) -> dict:
        """The policy as engines and plan files record it (their cache keys and staleness checks): its fields, less
        those left at None (the opt-in ones), so that adding an opt-in field leaves every built engine current."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @property
    def sparse_scales(self) -> range:
        return range(self.decision_scale, self.num_scales)

    def kind(self, layer: int, scale: int) -> str:
        """'dense', 'cs4a_decide', 'cs4a' or 'csla'."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} outside [0, {self.num_layers})")
        if not 0 <= scale < self.num_scales:
            raise ValueError(f"scale {scale} outside [0, {self.num_scales})")
        if scale < self.decision_scale:
            return "dense"
        if layer >= self.cs4a_layers:
            return "csla"
        return "cs4a_decide" if scale == self.decision_scale else "cs4a"

    def sink_len(self, schedule: Schedule) -> int:
        """KV positions every CS4A key set starts with (the cs4a_sinks scales)."""
        return schedule.offsets[self.cs4a_sinks]

    def topk(self, schedule: Schedule) -> int:
        """Selected keys per group: a ratio of the decision scale's non-sink keys."""
        return cs4a_topk(schedule.kv_len(self.decision_scale) - self.sink_len(schedule), self.cs4a_topk_ratio,
                         self.cs4a_multiple)

    def csla_layout(self, schedule: Schedule, scale: int) -> BlockLayout | TileLayout:
        if self.csla_query_tile is not None:
            return csla_tile_layout(schedule, scale, self.csla_sinks, self.csla_window_sides, self.csla_query_tile)
        return csla_layout(schedule, scale, self.csla_sinks, self.csla_window_sides, *self.csla_block, self.csla_granularity)

    def cs4a_geometry(self, schedule: Schedule, scale: int) -> CS4AGeometry:
        return cs4a_geometry(schedule, self.decision_scale, scale, self.cs4a_group_size, self.cs4a_band_sides,
                             self.cs4a_multiple, self.topk(schedule), self.sink_len(schedule))


# Per model, relative to the schedule end: sparse_last = how many final scales are sparse; the rest are
# SparVARPolicy fields. 2B/8B are the paper's values. Tiny (4 layers; 256^2 grids 1,2,4,6,8,12,16; KV 121 at
# its decision scale 4) gets the same structure shrunk so each path runs and stays sparse: 2 CS4A + 2 CSLA
# layers, groups of 16 queries and 16-key multiples (top-32 of 121 keys; bands 48 and 80 keys; key sets
# 80/265 and 160/521), 3 sink scales (21 tokens), windows (1, 3, 5) on key scales 4, 5, 6,
# and 16x16 tiles (block density 50% / 42% / 38% at scales 4 / 5 / 6; token density 18% / 11% / 10%).
# CIFAR (6 layers; grids ..., 20, 24, 32 at 64x64; sparse scales 8, 9, 10) keeps the paper's sinks (scales 0-4,
# 66 tokens) and window sides (token density 8.2% / 6.6% / 5.7%), with 32x32 tiles, one 32-token row of the
# last scale (block density 33% / 28% / 26%); CS4A: 2 of 6 layers (paper 11 of 32), 48-query groups give the
# paper's 9 / 12 / 22 groups, top-192 of 930 keys, bands 5 and 7 in 32-key multiples (key sets 352 / 1,506 =
# 23% and 608 / 2,530 = 24%, paper 21% / 20%).
POLICY_PRESETS: dict[str, dict] = {
    # 64x64 tiles: closer to the token windows than the paper's 128x128 (12.1% vs 16.4% of blocks at 1024^2) and
    # faster with our kernels (bench/results/attention_h100.json); 128x128 is one override away
    "infinity-2b": dict(sparse_last=3, cs4a_layers=11, csla_block=(64, 64)),
    "infinity-8b": dict(sparse_last=3, cs4a_layers=11, csla_block=(64, 64)),
    "infinity-tiny": dict(sparse_last=3, cs4a_layers=2, csla_sinks=3, csla_window_sides=(1, 3, 5), csla_block=(16, 16),
                          cs4a_group_size=16, cs4a_multiple=16, cs4a_band_sides=(3, 5)),
    "infinity-cifar": dict(sparse_last=3, cs4a_layers=2, csla_block=(32, 32), cs4a_group_size=48, cs4a_multiple=32,
                           cs4a_band_sides=(5, 7)),
    # HART (KV = [300 text slots | 2^2 | ... | 64^2], no 1x1): after the SparVAR authors' HART prototype (HART.md 5):
    # sinks = text + scales 1-4 (354 keys) for CSLA and CS4A alike (never in CS4A's top-k); windows per key scale
    # [-1 x8, 1, 1, 1, 3, 5, 7] (scales 8-13: 1, 1, 1, 3, 5, 7); CS4A decides at 27^2 (scale 10, KV 2,054), so scales 10-13 are
    # sparse (the prototype: CSLA from 11; at 27^2 CSLA saves little either way); 8 of 24 layers CS4A (2B: 11 of 32).
    "hart-0.7b": dict(sparse_last=4, cs4a_layers=8, csla_sinks=5, csla_window_sides=(1, 1, 1, 3, 5, 7),
                      csla_block=(64, 64), cs4a_sinks=5, cs4a_band_sides=(5, 7, 9)),
    # hart-tiny (2 layers; grids 1,2,3,4,6,8,12,16; 16 text slots): sparse scales 5-7, sinks = text + 2^2 + 3^2 (29 keys)
    "hart-tiny": dict(sparse_last=3, cs4a_layers=1, csla_sinks=3, csla_window_sides=(1, 3, 5), csla_block=(16, 16),
                      cs4a_group_size=16, cs4a_multiple=16, cs4a_band_sides=(3, 5), cs4a_sinks=3),
}


def default_policy(model_name: str, schedule: Schedule, **overrides) -> SparVARPolicy:
    """The model's policy scaled to `schedule`; keyword overrides replace single fields (e.g. cs4a_use_cache=False).
    Scale skipping is not a policy field: the generation loop's skip_last leaves the last scales out."""
    config = get_config(model_name)
    if model_name not in POLICY_PRESETS:
        raise ValueError(f"no SparVAR policy for {model_name!r}; presets exist for {', '.join(POLICY_PRESETS)}")
    preset = dict(POLICY_PRESETS[model_name])
    sparse_last = preset.pop("sparse_last")
    if schedule.num_scales <= sparse_last:
        raise ValueError(f"schedule has {schedule.num_scales} scales; {model_name}'s policy needs more than {sparse_last}")
    decision = schedule.num_scales - sparse_last
    band_sides = preset.pop("cs4a_band_sides", SparVARPolicy.cs4a_band_sides)
    fields = dict(num_layers=config.depth, num_scales=schedule.num_scales, decision_scale=decision,
                  cs4a_band_sides=tuple(band_sides[: sparse_last - 1]), **preset)
    fields.update(overrides)
    return SparVARPolicy(**fields)


class SparseOps(NamedTuple):
    """The pure functions a backend provides (same signatures as the *_ref functions and upsample_cache)."""

    csla: Callable  # (q, k, v, layout) -> out
    cs4a_decide: Callable  # (q, k, v, group_size, topk, sink_len=0) -> (out, selected, o_cache)
    cs4a: Callable  # (q, k, v, key_idx, group_size, o_cache_or_None) -> out
    upsample_cache: Callable = upsample_cache  # (o_cache, src_grid, dst_grid) -> o_cache at dst_grid
    # (q, k, v, selected, geometry, o_cache_or_None, cache_grid, grid) -> out: CS4A at a later scale straight from
    # the decision state, in one call. None: composed from the parts above (sparvar.cs4a.cs4a_from_selection_ref)
    cs4a_from_selection: Callable | None = None
    # the decision in two halves, so that one launch takes the top-k of every decision layer:
    # (q, k, v, group_size, sums_out) -> (out, dense) per layer, its column sums written into sums_out, then
    # ([(q, k, v, dense) per layer], sums (L, B, H, G, Lk), group_size, topk, sink_len, lanes=()) ->
    # [(selected, o_cache)], lanes: CUDA streams the residual launches may also run on (joined before it returns).
    # None: cs4a_decide per layer
    cs4a_decide_begin: Callable | None = None
    cs4a_decide_end: Callable | None = None


def get_sparse_ops(backend: str) -> SparseOps:
    if backend == "reference":
        return SparseOps(csla_attention_ref, cs4a_decide_ref, cs4a_attention_ref)
    if backend == "triton":
        from sparvar import kernels

        if not kernels.HAS_TRITON:
            raise RuntimeError("SparVAR backend 'triton' needs the triton package (and a CUDA GPU to run)")
        return kernels.sparse_ops()
    raise ValueError(f"unknown SparVAR backend {backend!r}; available: 'reference', 'triton'")


class SparVARPlan:
    """Dispatches each (layer, scale) per the policy and holds the CS4A state of one generation.

    Call `reset()` before each new generation; `attend` returns None where the policy says dense.
    """

    def __init__(self, policy: SparVARPolicy, schedule: Schedule, num_layers: int, backend: str = "reference",
                 precomputed: tuple[dict, dict] | None = None, skip_last: int = 0, residual_lanes: int = 1):
        """precomputed: (CSLA layouts, CS4A geometries) per scale, as an engine stored them (`load_plan`);
        by default they are computed from the policy here.

        skip_last: the generation loop's scale skipping this plan serves (generate's skip_last). Where it skips every
        scale after the decision scale (SparVAR + skip 2 at 1024²), nothing would read a CS4A decision: the decision
        scale's CS4A layers then run plain dense attention (the decision's own output is dense attention too) instead
        of collecting column sums, a top-k and a residual cache that would be thrown away.

        The decision runs in line, where the backend can in two halves (SparseOps.cs4a_decide_begin / _end: each
        decision layer's dense pass and column sums, then one top-k launch for all of them and each layer's residual
        cache). Not on a side stream overlapping the rest of the decision scale: side by side the in-line decision was
        the faster in three of four runs (H100: 2B 205.5 vs 207.8 ms, 8B 607.5 vs 610.6; H200: 8B 602.8 vs 606.6, 2B
        203.2 vs 202.4; bench/results/e2e_engines_*_skip_h100.json, e2e_engines_*_decision_h200.json): the side
        stream's kernels take SMs from the scale's own. That option was removed after 6442115.

        residual_lanes: in the two-half decision on CUDA tensors, how many side streams the decision layers'
        residual-cache launches are dealt over besides the current one (0: one after another on it); they are
        joined before the last decision layer returns, and the results are the same bit for bit. Why: each launch
        ends on a nearly empty wave (cs4a_decide_end_raw), which the next launch fills when they run side by side."""
        if policy.num_layers != num_layers:
            raise ValueError(f"policy is for {policy.num_layers} layers, the model has {num_layers}")
        if policy.num_scales != schedule.num_scales:
            raise ValueError(f"policy is for {policy.num_scales} scales, the schedule has {schedule.num_scales}")
        run_scales = schedule.run_scales(skip_last)
        self.policy, self.schedule, self.num_layers, self.backend = policy, schedule, num_layers, backend
        self.skip_last = skip_last
        self.decides = policy.cs4a_layers > 0 and policy.decision_scale < run_scales - 1
        self.ops = get_sparse_ops(backend)
        uses_csla = policy.cs4a_layers < num_layers
        uses_cs4a = policy.cs4a_layers > 0
        self.topk = policy.topk(schedule)
        self.sink_len = policy.sink_len(schedule)
        if precomputed is None:
            self.csla_layouts = {s: policy.csla_layout(schedule, s) for s in policy.sparse_scales} if uses_csla else {}
            self.cs4a_geometries = ({s: policy.cs4a_geometry(schedule, s) for s in policy.sparse_scales[1:]}
                                    if uses_cs4a else {})
        else:
            self.csla_layouts, self.cs4a_geometries = precomputed
            want = (set(policy.sparse_scales) if uses_csla else set(), set(policy.sparse_scales[1:]) if uses_cs4a else set())
            if (set(self.csla_layouts), set(self.cs4a_geometries)) != want:
                raise ValueError(f"precomputed plan has CSLA scales {sorted(self.csla_layouts)} and CS4A scales "
                                 f"{sorted(self.cs4a_geometries)}; the policy needs {sorted(want[0])} and {sorted(want[1])}")
            for s, layout in self.csla_layouts.items():
                if (layout.q_len, layout.kv_len) != (schedule.lengths[s], schedule.kv_len(s)):
                    raise ValueError(f"precomputed CSLA layout of scale {s} is {layout.q_len} x {layout.kv_len}; the "
                                     f"schedule has {schedule.lengths[s]} x {schedule.kv_len(s)}")
            for s, geometry in self.cs4a_geometries.items():
                if (geometry.scale, geometry.topk, geometry.sink_len) != (s, self.topk, self.sink_len):
                    raise ValueError(f"precomputed CS4A geometry of scale {s} is for scale {geometry.scale}, top-"
                                     f"{geometry.topk}, {geometry.sink_len} sinks; the policy has top-{self.topk}, "
                                     f"{self.sink_len} sinks")
        self._on_device: dict[tuple[str, int, torch.device], BlockLayout | TileLayout | CS4AGeometry] = {}
        if not isinstance(residual_lanes, int) or isinstance(residual_lanes, bool) or residual_lanes < 0:
            raise ValueError(f"residual_lanes must be an int >= 0 (side streams), got {residual_lanes!r}")
        self.residual_lanes = residual_lanes
        self._side_streams: dict[torch.device, list[torch.cuda.Stream]] = {}
        self.reset()

    def reset(self) -> None:
        """Forget the CS4A selections and caches of the previous generation."""
        self._selected: dict[int, torch.Tensor] = {}  # layer -> (B, H, G_S, topk) int32
        self._o_cache: dict[int, torch.Tensor] = {}  # layer -> (B, H, L_S, D)
        # the two-half decision (SparseOps.cs4a_decide_begin): the decision layers' column sums, (L, B, H, G_S, Lk),
        # and each begun layer's (q, k, v, dense) until the last decision layer ends them all
        self._drop_pending_decision()

    def load_state(self, layer: int, selected: torch.Tensor, o_cache: torch.Tensor) -> None:
        """Set a layer's CS4A decision state from outside (an exported step graph receives it as inputs)."""
        self._selected[layer], self._o_cache[layer] = selected, o_cache

    def state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's CS4A decision state (selected key positions, residual cache) after its decision scale ran."""
        if layer not in self._selected:
            if self.policy.cs4a_layers == 0:
                raise RuntimeError(f"layer {layer} has no CS4A state: the policy has no CS4A layers")
            if not self.decides:
                raise RuntimeError(f"layer {layer} has no CS4A state: this plan skips the last {self.skip_last} scales, "
                                   f"so no scale reads a decision and none is made")
            raise RuntimeError(f"layer {layer} has no CS4A state: {self._decision_progress()}")
        return self._selected[layer], self._o_cache[layer]

    def _device_copy(self, what: str, scale: int, device: torch.device):
        """The CSLA layout or CS4A geometry of `scale` on `device`, copied once."""
        key = (what, scale, device)
        if key not in self._on_device:
            source = self.csla_layouts if what == "csla" else self.cs4a_geometries
            self._on_device[key] = source[scale].to(device)
        return self._on_device[key]

    def _lanes(self, device: torch.device, count: int) -> tuple[torch.cuda.Stream, ...]:
        """`count` side streams on device for the decision's residual launches, made once."""
        streams = self._side_streams.setdefault(device, [])
        while len(streams) < count:
            streams.append(torch.cuda.Stream(device=device))
        return tuple(streams[:count])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layer: int, scale: int) -> torch.Tensor | None:
        kind = self.policy.kind(layer, scale)
        if kind == "dense":
            return None
        q_len, kv_len = self.schedule.lengths[scale], self.schedule.kv_len(scale)
        if q.dim() != 4 or q.shape[2] != q_len or k.shape[:3] != (*q.shape[:2], kv_len) or v.shape != k.shape:
            raise ValueError(f"scale {scale} expects q (B, H, {q_len}, D), k/v (B, H, {kv_len}, D); got q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)}, v {tuple(v.shape)}")
        if kind == "csla":
            return self.ops.csla(q, k, v, self._device_copy("csla", scale, q.device))
        group_size = self.policy.cs4a_group_size
        if kind == "cs4a_decide":
            if not self.decides:  # no later scale runs: dense attention is all this layer needs
                return None
            if self.ops.cs4a_decide_begin is not None:
                return self._decide_in_halves(q, k, v, layer, group_size)
            out, selected, o_cache = self.ops.cs4a_decide(q, k, v, group_size, self.topk, sink_len=self.sink_len)
            self._selected[layer] = selected
            self._o_cache[layer] = o_cache
            return out
        if layer not in self._selected:
            if not self.decides:
                raise RuntimeError(f"layer {layer} reached CS4A scale {scale}, which this plan was made to skip "
                                   f"(skip_last={self.skip_last}): it made no decision for it")
            raise RuntimeError(f"layer {layer} reached CS4A scale {scale} without a decision: "
                               f"{self._decision_progress()}; call reset() and run the scales in order")
        selected = self._selected[layer]
        if selected.shape[0] != q.shape[0]:
            raise RuntimeError(f"batch size changed within a generation ({selected.shape[0]} -> {q.shape[0]}); call reset()")
        geometry = self._device_copy("cs4a", scale, q.device)
        o_cache = self._o_cache[layer] if self.policy.cs4a_use_cache else None
        grids = self.schedule.grids[self.policy.decision_scale], self.schedule.grids[scale]
        if self.ops.cs4a_from_selection is not None:
            return self.ops.cs4a_from_selection(q, k, v, selected, geometry, o_cache, *grids)
        return cs4a_from_selection_ref(self.ops.cs4a, self.ops.upsample_cache, q, k, v, selected, geometry, o_cache,
                                       *grids)

    def _decide_in_halves(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, group_size: int):
        """A decision layer's dense pass and column sums now; once every decision layer (the policy's CS4A layers
        0 .. cs4a_layers - 1, each once, in any order) has had its first half, one top-k over all of their sums and
        each layer's residual cache. From a decision's first layer until its last, no decision layer has a state
        (state() says which are pending): an earlier generation's is dropped when a new decision begins."""
        layers = self.policy.cs4a_layers
        shape = (layers, q.shape[0], q.shape[1], -(-q.shape[2] // group_size), k.shape[2])
        if layer in self._decision_inputs:
            # the decision scale runs again before the last one ended (a generation cut off there, without reset()):
            # start over, as a decision made whole per layer would simply be overwritten
            self._drop_pending_decision()
        if not self._decision_inputs:  # a new decision: no layer keeps an older one meanwhile
            for i in range(layers):
                self._selected.pop(i, None)
                self._o_cache.pop(i, None)
        try:
            if self._decision_sums is None or tuple(self._decision_sums.shape) != shape:
                if self._decision_inputs:
                    raise RuntimeError(f"layer {layer}'s decision inputs {tuple(q.shape)} / {tuple(k.shape)} do not "
                                       f"match those of layers {sorted(self._decision_inputs)} decided before it in this "
                                       f"generation (column sums {tuple(self._decision_sums.shape)}); call reset()")
                self._decision_sums = torch.empty(shape, dtype=torch.float32, device=q.device)
            out, dense = self.ops.cs4a_decide_begin(q, k, v, group_size, self._decision_sums[layer])
            self._decision_inputs[layer] = (q, k, v, dense)
            if len(self._decision_inputs) == layers:
                inputs = [self._decision_inputs[i] for i in range(layers)]
                lanes = self._lanes(q.device, self.residual_lanes) if q.is_cuda else ()
                states = self.ops.cs4a_decide_end(inputs, self._decision_sums, group_size, self.topk, self.sink_len,
                                                  lanes=lanes)
                for i, (selected, o_cache) in enumerate(states):
                    self._selected[i], self._o_cache[i] = selected, o_cache
                self._drop_pending_decision()  # what the residuals read is no longer needed
        except BaseException:
            self._drop_pending_decision()  # no half-made decision survives a failure
            raise
        return out

    def _decision_progress(self) -> str:
        scale = self.policy.decision_scale
        if self._decision_inputs:
            done = sorted(self._decision_inputs)
            return (f"decision scale {scale} is partway: the decision of every layer ends after the last of layers "
                    f"0-{self.policy.cs4a_layers - 1} (layers {done} have run)")
        return f"its decision scale {scale} has not run"

    def _drop_pending_decision(self) -> None:
        self._decision_sums: torch.Tensor | None = None
        self._decision_inputs: dict[int, tuple[torch.Tensor, ...]] = {}

    def save(self, path: str) -> list[str]:
        """Write the precomputed CSLA layouts and CS4A geometries to one safetensors file (tensors, with the scalar
        fields as JSON metadata); `load_plan` reads it back. Returns the stored names."""
        from safetensors.torch import save_file

        tensors, fields = {}, {}
        for kind, source in (("csla", self.csla_layouts), ("cs4a", self.cs4a_geometries)):
            for s, obj in source.items():
                scalars = fields.setdefault(kind, {}).setdefault(str(s), {})
                if kind == "csla":
                    scalars["layout"] = type(obj).__name__  # raster blocks or 2-D query tiles
                for f in dataclasses.fields(obj):
                    value = getattr(obj, f.name)
                    if isinstance(value, torch.Tensor):
                        tensors[f"{kind}.{s}.{f.name}"] = value.contiguous()
                    elif isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
                        scalars[f.name] = {"tensors": len(value)}
                        tensors.update({f"{kind}.{s}.{f.name}.{i}": t.contiguous() for i, t in enumerate(value)})
                    else:
                        scalars[f.name] = list(value) if isinstance(value, tuple) else value
        save_file(tensors, path, metadata={"sparvar_plan": json.dumps(fields),
                                           "sparvar_policy": json.dumps(self.policy.record())})
        return sorted(tensors)

    def describe(self) -> str:
        """One line per sparse scale: layouts' densities and CS4A key counts (for logs)."""
        lines = [f"SparVAR plan ({self.backend}): dense below scale {self.policy.decision_scale}, "
                 f"CS4A in layers < {self.policy.cs4a_layers}, CSLA in layers >= {self.policy.cs4a_layers}"]
        for s in self.policy.sparse_scales:
            parts = [f"scale {s} {self.schedule.grids[s]}"]
            if s in self.csla_layouts:
                parts.append(f"CSLA {self.csla_layouts[s]!r}")
            if self.policy.cs4a_layers > 0:
                kv = self.schedule.kv_len(s)
                if s == self.policy.decision_scale and not self.decides:
                    parts.append(f"CS4A: dense (the last {self.skip_last} scales are skipped: no decision is read)")
                elif s == self.policy.decision_scale:
                    groups = num_groups(self.schedule.lengths[s], self.policy.cs4a_group_size)
                    sinks = f"{self.sink_len} sink keys + " if self.sink_len else ""
                    parts.append(f"CS4A decide: dense, {sinks}top-{self.topk} of {kv} keys per group ({groups} groups)")
                else:
                    g = self.cs4a_geometries[s]
                    parts.append(f"CS4A: {g.key_count} of {kv} keys ({g.key_count / kv:.1%}) per group ({g.num_groups} groups)")
            lines.append("  " + "; ".join(parts))
        return "\n".join(lines)


def policy_changes(stored: dict | None, policy: SparVARPolicy | None) -> str:
    """How a recorded policy (`SparVARPolicy.record()` as JSON kept it; None for dense attention) differs from
    `policy`: "field: stored ..., now ..." for each field that differs, "" where none does."""
    if stored is None and policy is None:
        return ""
    if stored is None or policy is None:  # one side dense
        def kind(p):
            return "dense attention" if p is None else "a SparVAR policy"
        return f"stored {kind(stored)}, now {kind(policy)}"
    current = json.loads(json.dumps(policy.record()))
    return "; ".join(f"{k}: stored {stored.get(k)!r}, now {current.get(k)!r}" for k in sorted(set(current) | set(stored))
                     if stored.get(k) != current.get(k))


def load_plan(path: str, policy: SparVARPolicy, schedule: Schedule, num_layers: int,
              backend: str = "reference", skip_last: int = 0) -> SparVARPlan:
    """The plan whose layouts and geometries `SparVARPlan.save` stored at `path` (an engine's build output), serving
    a generation loop that skips the last `skip_last` scales (see SparVARPlan)."""
    from safetensors import safe_open

    from .kernels.csla import check_layout_values, check_tile_values

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        fields = json.loads(metadata.get("sparvar_plan", "null"))
        if fields is None:
            raise ValueError(f"{path} is not a saved SparVAR plan (no 'sparvar_plan' metadata)")
        stored = json.loads(metadata.get("sparvar_policy", "null"))
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    # the layouts' shapes cannot tell every policy change (other window sides give other blocks of the same size)
    if stored is None:
        raise ValueError(f"{path} does not record the policy it was made for (saved by an older sparvar)")
    changed = policy_changes(stored, policy)
    if changed:
        raise ValueError(f"{path} was made for another SparVAR policy ({changed})")

    def build(cls, kind, s, scalars):
        kwargs = {}
        for f in dataclasses.fields(cls):
            value = scalars.get(f.name)
            if isinstance(value, dict):  # a tuple of tensors
                value = tuple(tensors[f"{kind}.{s}.{f.name}.{i}"] for i in range(value["tensors"]))
            elif isinstance(value, list):
                value = tuple(value)
            elif f"{kind}.{s}.{f.name}" in tensors:
                value = tensors[f"{kind}.{s}.{f.name}"]
            elif f.name not in scalars:
                continue  # a default (e.g. no token mask)
            kwargs[f.name] = value
        return cls(**kwargs)

    layout_classes = {cls.__name__: cls for cls in (BlockLayout, TileLayout)}

    def layout_class(s, scalars):
        name = scalars.get("layout", "BlockLayout")  # plans saved before TileLayout hold raster blocks only
        if name not in layout_classes:
            raise ValueError(f"{path}: CSLA layout of scale {s} is a {name!r}; this sparvar reads {sorted(layout_classes)}")
        return layout_classes[name]

    layouts = {int(s): build(layout_class(s, v), "csla", s, v) for s, v in fields.get("csla", {}).items()}
    for s, layout in layouts.items():  # the kernels read a layout's indices unchecked: a file's are checked once, here
        try:
            if isinstance(layout, TileLayout):
                check_tile_values(layout.q_len, layout.kv_len, layout.q_rows, layout.kv_count, layout.kv_keys)
            else:
                check_layout_values(layout.kv_num_blocks, layout.kv_indices, layout.kv_len, layout.block_n)
        except ValueError as e:
            raise ValueError(f"{path}: the CSLA layout of scale {s} is corrupt ({e})") from None
    geometries = {int(s): build(CS4AGeometry, "cs4a", s, v) for s, v in fields.get("cs4a", {}).items()}
    return SparVARPlan(policy, schedule, num_layers, backend, precomputed=(layouts, geometries), skip_last=skip_last)
