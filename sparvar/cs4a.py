"""CS4A: cross-scale self-similar sparse attention (dynamic key selection).

Decision scale S: dense attention, plus for every (batch row, head, group of `group_size` raster-ordered
queries) the column sums of the softmax probabilities over the group's queries. The top-k keys of each
group form its selection (token level); the residual cache
    O_cache = O_dense - softmax(Q K_sel^T) V_sel            (each query with its own group's selection)
keeps what the selection misses.

Sinks: the first `sink_len` KV positions (0 for Infinity: nothing forced; HART's 300-slot text prefix plus its
first scales) are in every key set and never compete in the top-k: K_sel = [sinks | top-k of the rest].

Later scales: queries are split into groups of `group_size` again (the last one may be partial).
Group g of a scale with G groups takes the key set of group src(g) = round((g + 0.5) / G * G_prev - 0.5)
(clamped) of the previous scale, and adds a band of its own scale:
    scale S+1: set(g) = selected[src(g)]            U band_{S+1}(g)
    scale S+2: set(g) = set_{S+1}[src(g)]           U band_{S+2}(g)     ... and so on.
Absolute KV positions stay valid from scale to scale because the KV cache only grows. The output is
sparse attention over the set + O_cache bilinearly upsampled to the scale.

Band of a group covering own-scale raster rows [r0, r1] with side s: the contiguous raster range of rows
[r0 - s//2, r1 + s//2]. Every group of a scale gets the same band length, so key sets are rectangular:
    band_len = min(L, roundup(max_g (r1 - r0 + 1 + 2*(s//2)) * W, multiple))     (unclipped row count)
and, as the SparVAR authors place it, the band starts at the group's first band row (clipped at the scale's first
row), runs band_len keys from there (the round-up padding after the rows), and is shifted back where it would pass
the scale's end.
At 1024^2: scale 11 (48 wide, 4-row groups) 10*48 = 480 -> 560; scale 12 (64 wide, 3-row groups)
11*64 = 704 -> 784; key sets 784 + 560 = 1344 and 1344 + 784 = 2128.

Index format (shared with kernels): selections and key sets are int32 ABSOLUTE KV positions,
(B, H, G, K), ascending along K: the decision selection is sorted, it lies below the KV length of scale
S (kv_len(S) = offsets[S+1]), and each band lies on a later scale, so concatenating
[selection, band_{S+1}, band_{S+2}, ...] stays sorted and duplicate-free. A kernel may instead read the
bands as contiguous ranges: `CS4AGeometry.band_starts[i]` (G,) int32 absolute starts of length
`band_lengths[i]`, plus `selected_group` (G,) mapping each group to the decision group whose selection
it gathers.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from sparvar.schedule import Schedule


def num_groups(length: int, group_size: int) -> int:
    return -(-length // group_size)


def cs4a_topk(kv_len: int, ratio: float, multiple: int) -> int:
    """k = multiple * round(ratio * kv_len / multiple), kept within [multiple, kv_len] (at least one tile)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"CS4A top-k ratio must be in (0, 1], got {ratio}")
    if multiple <= 0:
        raise ValueError(f"CS4A multiple must be positive, got {multiple}")
    return min(kv_len, max(multiple, multiple * round(ratio * kv_len / multiple)))


def source_groups(groups: int, src_groups: int) -> torch.Tensor:
    """(groups,) int64: the previous scale's group each group takes its keys from (round half to even)."""
    g = torch.arange(groups, dtype=torch.float64)
    src = torch.round((g + 0.5) / groups * src_groups - 0.5)
    return src.long().clamp(0, src_groups - 1)


@dataclass(frozen=True, eq=False)
class Band:
    """One own-scale band per query group: keys [start[g], start[g] + length) (absolute KV positions)."""

    start: torch.Tensor  # (G,) int32
    length: int

    def indices(self) -> torch.Tensor:
        """(G, length) int32 absolute key positions."""
        return self.start[:, None] + torch.arange(self.length, dtype=torch.int32, device=self.start.device)[None, :]


def cs4a_band(schedule: Schedule, scale: int, group_size: int, side: int, multiple: int) -> Band:
    """The own-scale band of each query group of `scale` (see the module docstring for the rule)."""
    if side <= 0 or side % 2 == 0:
        raise ValueError(f"CS4A band side must be a positive odd int, got {side}")
    if group_size <= 0 or multiple <= 0:
        raise ValueError(f"CS4A group size and multiple must be positive, got {group_size} and {multiple}")
    h, w = schedule.grids[scale]
    length = h * w
    first = torch.arange(num_groups(length, group_size)) * group_size  # first query of each group
    last = (first + group_size).clamp(max=length) - 1
    row_lo = first // w - side // 2  # unclipped band rows
    row_hi = last // w + side // 2
    nominal = (row_hi - row_lo + 1) * w
    band_len = min(length, -(-int(nominal.max()) // multiple) * multiple)
    start = (row_lo.clamp(min=0) * w).clamp(max=length - band_len)
    return Band((start + schedule.offsets[scale]).to(torch.int32), band_len)


@dataclass(frozen=True, eq=False)
class CS4AGeometry:
    """How the key sets of one later scale are assembled from the decision scale's selection.

    key set of group g = selection[selected_group[g]]  U  bands (one per scale decision+1 .. scale).
    """

    scale: int
    decision_scale: int
    group_size: int
    num_decision_groups: int
    topk: int
    selected_group: torch.Tensor  # (G,) int32
    band_starts: tuple[torch.Tensor, ...]  # each (G,) int32, absolute
    band_lengths: tuple[int, ...]
    sink_len: int = 0  # KV positions [0, sink_len) lead every key set

    def __post_init__(self):
        # the part of every key set that does not depend on the selection, built once per device copy: the sinks
        # (front) and the bands (back) as (G, n) int32 positions. Building them per call cost 5-7 small kernels per
        # CS4A layer and scale; key_indices now takes two (gather, concatenate).
        g, device = self.num_groups, self.selected_group.device
        sinks = with_sinks(torch.zeros(g, 0, dtype=torch.int32, device=device), self.sink_len).contiguous()
        bands = [Band(start, length).indices() for start, length in zip(self.band_starts, self.band_lengths)]
        object.__setattr__(self, "sink_keys", sinks)
        object.__setattr__(self, "band_keys", torch.cat(bands, dim=-1) if bands
                           else torch.zeros(g, 0, dtype=torch.int32, device=device))
        # the same ranges as (starts (R, G) int32, lengths), sinks first: for a kernel that reads them contiguously
        starts = ([torch.zeros(g, dtype=torch.int32, device=device)] if self.sink_len else []) + list(self.band_starts)
        object.__setattr__(self, "range_starts", torch.stack(starts).to(torch.int32).contiguous() if starts
                           else torch.zeros(0, g, dtype=torch.int32, device=device))
        object.__setattr__(self, "range_lengths", ((self.sink_len,) if self.sink_len else ()) + tuple(self.band_lengths))

    @property
    def num_groups(self) -> int:
        return self.selected_group.shape[0]

    @property
    def key_count(self) -> int:
        return self.sink_len + self.topk + sum(self.band_lengths)

    def to(self, device: torch.device | str) -> CS4AGeometry:
        return CS4AGeometry(self.scale, self.decision_scale, self.group_size, self.num_decision_groups, self.topk,
                            self.selected_group.to(device), tuple(b.to(device) for b in self.band_starts),
                            self.band_lengths, self.sink_len)

    def key_indices(self, selected: torch.Tensor) -> torch.Tensor:
        """(B, H, G, K) int32 ascending absolute key positions from the decision selection (B, H, G_S, topk):
        [sinks | selection | bands]."""
        if selected.dim() != 4 or selected.shape[2:] != (self.num_decision_groups, self.topk):
            raise ValueError(f"selection must be (B, H, {self.num_decision_groups}, {self.topk}), got {tuple(selected.shape)}")
        b, h = selected.shape[:2]
        device = selected.device  # .to() below: no-ops once the geometry is on that device
        parts = [selected.index_select(2, self.selected_group.to(device)).to(torch.int32),
                 self.band_keys.to(device).expand(b, h, -1, -1)]
        if self.sink_len:
            parts.insert(0, self.sink_keys.to(device).expand(b, h, -1, -1))
        return torch.cat(parts, dim=-1)


def cs4a_from_selection_ref(cs4a, upsample, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected: torch.Tensor,
                            geometry: CS4AGeometry, o_cache: torch.Tensor | None, cache_grid: tuple[int, int],
                            grid: tuple[int, int]) -> torch.Tensor:
    """CS4A at a later scale from the decision state, composed from a backend's parts: the key sets
    (geometry.key_indices), the residual cache upsampled from cache_grid to grid, then cs4a(q, k, v, key_idx,
    group_size, o_cache). A backend's fused cs4a_from_selection must equal this."""
    key_idx = geometry.key_indices(selected)
    cache = None if o_cache is None else upsample(o_cache, cache_grid, grid)
    return cs4a(q, k, v, key_idx, geometry.group_size, cache)


def with_sinks(selected: torch.Tensor, sink_len: int) -> torch.Tensor:
    """(..., K) int32 selection -> (..., sink_len + K): the sink positions 0..sink_len-1 in front (still ascending,
    since a selection never holds a sink)."""
    if sink_len == 0:
        return selected
    sinks = torch.arange(sink_len, dtype=selected.dtype, device=selected.device)
    return torch.cat([sinks.expand(*selected.shape[:-1], sink_len), selected], dim=-1)


@lru_cache(maxsize=64)
def cs4a_geometry(schedule: Schedule, decision_scale: int, scale: int, group_size: int,
                  band_sides: tuple[int, ...], multiple: int, topk: int, sink_len: int = 0) -> CS4AGeometry:
    """Geometry of a later scale; band_sides[i] is the band side at scale decision_scale + 1 + i."""
    if not 0 <= sink_len + topk <= schedule.kv_len(decision_scale):
        raise ValueError(f"CS4A sinks ({sink_len}) + top-k ({topk}) exceed the decision scale's "
                         f"{schedule.kv_len(decision_scale)} keys")
    if not 0 <= decision_scale < scale < schedule.num_scales:
        raise ValueError(f"CS4A needs decision_scale < scale < {schedule.num_scales}, got {decision_scale} and {scale}")
    if len(band_sides) < scale - decision_scale:
        raise ValueError(f"band_sides {band_sides} has no entry for scale {scale} (decision scale {decision_scale})")
    prev_groups = num_groups(schedule.lengths[decision_scale], group_size)
    selected_group = torch.arange(prev_groups)
    bands: list[Band] = []
    for s in range(decision_scale + 1, scale + 1):
        groups = num_groups(schedule.lengths[s], group_size)
        src = source_groups(groups, prev_groups)
        # this scale's groups inherit everything their source group had, then add their own band
        selected_group = selected_group[src]
        bands = [Band(b.start[src], b.length) for b in bands]
        bands.append(cs4a_band(schedule, s, group_size, band_sides[s - decision_scale - 1], multiple))
        prev_groups = groups
    return CS4AGeometry(scale, decision_scale, group_size, num_groups(schedule.lengths[decision_scale], group_size),
                        topk, selected_group.to(torch.int32), tuple(b.start for b in bands), tuple(b.length for b in bands),
                        sink_len)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q (B, H, Lq, D) and k, v (B, H, Lk, D); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B, H, L, ...) -> (B, H, G, group_size, ...) with the last group zero-padded."""
    b, h, length = x.shape[:3]
    groups = num_groups(length, group_size)
    pad = groups * group_size - length
    if pad:
        x = torch.cat([x, x.new_zeros(b, h, pad, *x.shape[3:])], dim=2)
    return x.view(b, h, groups, group_size, *x.shape[3:])


def _gathered_attention_fp32(q, k, v, key_idx: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B, H, Lq, D) fp32: each query attends to its group's keys key_idx[b, h, g, :]."""
    b, h, q_len, d = q.shape
    groups, keys = key_idx.shape[2:]
    if key_idx.shape[:2] != (b, h) or groups != num_groups(q_len, group_size):
        raise ValueError(f"key_idx {tuple(key_idx.shape)} does not match q {tuple(q.shape)} in groups of {group_size} "
                         f"(expected (B, H, {num_groups(q_len, group_size)}, K))")
    if key_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"key_idx must be int32 or int64, got {key_idx.dtype}")
    idx = key_idx.long()[..., None].expand(b, h, groups, keys, d)  # (B, H, G, K, D)
    k_sel = k.float()[:, :, None].expand(b, h, groups, *k.shape[2:]).gather(3, idx)
    v_sel = v.float()[:, :, None].expand(b, h, groups, *v.shape[2:]).gather(3, idx)
    qg = _grouped(q.float(), group_size)  # (B, H, G, gs, D)
    probs = (qg @ k_sel.transpose(-1, -2)).softmax(dim=-1)  # (B, H, G, gs, K)
    return (probs @ v_sel).reshape(b, h, groups * group_size, d)[:, :, :q_len]


def cs4a_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_idx: torch.Tensor, group_size: int,
                       o_cache: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped gather attention + optional residual, in fp32; returns q's dtype.

    q (B, H, Lq, D); k, v (B, H, Lk, D); key_idx (B, H, ceil(Lq / group_size), K) int32 absolute key
    positions (unique within a group); o_cache None or (B, H, Lq, D), already at this scale's size.
    """
    _check_qkv(q, k, v)
    out = _gathered_attention_fp32(q, k, v, key_idx, group_size)
    if o_cache is not None:
        if o_cache.shape != q.shape:
            raise ValueError(f"o_cache {tuple(o_cache.shape)} must have q's shape {tuple(q.shape)}")
        out = out + o_cache.float()
    return out.to(q.dtype)


def cs4a_decide_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int,
                    topk: int, sink_len: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense attention at the decision scale, the per-group top-k selection and the residual cache.

    Returns out (B, H, Lq, D) = dense attention in q's dtype; selected (B, H, G, topk) int32 ascending
    absolute key positions with the largest probability column sums over the group's queries, among the
    non-sink keys [sink_len, Lk); o_cache (B, H, Lq, D) in q's dtype = dense - attention over [sinks | selection].
    """
    _check_qkv(q, k, v)
    if sink_len < 0 or not 0 < topk <= k.shape[-2] - sink_len:
        raise ValueError(f"topk must be in [1, {k.shape[-2] - max(sink_len, 0)}] (the KV length {k.shape[-2]} minus "
                         f"{sink_len} sinks), got {topk}")
    if group_size <= 0:
        raise ValueError(f"group size must be positive, got {group_size}")
    probs = (q.float() @ k.float().transpose(-1, -2)).softmax(dim=-1)  # (B, H, Lq, Lk)
    dense = probs @ v.float()
    column_sums = _grouped(probs[..., sink_len:], group_size).sum(dim=3)  # (B, H, G, Lk - sinks); padded queries add 0
    selected = (column_sums.topk(topk, dim=-1).indices.sort(dim=-1).values + sink_len).to(torch.int32)
    o_cache = dense - _gathered_attention_fp32(q, k, v, with_sinks(selected, sink_len), group_size)
    return dense.to(q.dtype), selected, o_cache.to(q.dtype)


def upsample_cache(o_cache: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, hs*ws, D) raster tokens -> (B, H, hd*wd, D): bilinear, align_corners=False, weights and sums in fp32,
    one rounding to o_cache's dtype at the end.

    The raster tokens with D last are an NHWC image; interpolating it as one (channels-last) image needs no
    transpose or dtype copies (the H200 measured 0.2 ms per layer at 2B scale 12 for the NCHW fp32 version with
    its four copies, for a 17 MB output)."""
    b, h, length, d = o_cache.shape
    if length != src_grid[0] * src_grid[1]:
        raise ValueError(f"o_cache has {length} tokens, grid {src_grid} has {src_grid[0] * src_grid[1]}")
    image = o_cache.reshape(b * h, *src_grid, d).permute(0, 3, 1, 2)  # (B*H, D, hs, ws) view, channels-last strides
    image = F.interpolate(image, size=tuple(dst_grid), mode="bilinear", align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(b, h, -1, d)  # channels-last output: a view, (B, H, hd*wd, D)
