"""CSLA: cross-scale local sparse attention, a static mask built from the schedule geometry alone.

For a query at (y, x) on scale q (grid Hq x Wq) and a key scale j (grid Hj x Wj):
  - key scales j < sinks are kept whole (attention sinks);
  - otherwise the key scale has a window side w_j: -1 drops the scale, an odd w > 0 keeps the w x w
    window centred at (round(y*Hj/Hq), round(x*Wj/Wq)) (round half to even, as Python's round),
    clipped at the grid borders. The centre is the formula's value, not clamped: when Hj/Hq < 1/2 the
    last query rows can get a centre one past the border, and the clipped window then loses a row.

`window_sides` gives one side per KEY scale, aligned to the end of the schedule: window_sides[-1] is the last
scale's, window_sides[-2] the one before, and so on; key scales before the tuple starts are dropped (unless they are
sinks). A key scale has its side whatever the query scale, as in the SparVAR authors' code (it looks the side up by
the key's scale index). The paper's (-1, -1, -1, 1, 1, 3, 5, 7) for key scales 5..12 at 1024^2 thus means: at query
scale 12, 7x7 on its own scale, 5x5, 3x3, 1, 1 on the four before it; at query scale 11, 5x5 on its own scale, 3x3,
1, 1; at query scale 10, 3x3 on its own scale, 1, 1.

Tokens are in raster order per scale, scales concatenated (the KV cache order). The block layout
OR-reduces the token mask over (block_m queries x block_n keys) tiles; see `BlockLayout`. The tile layout (opt-in)
OR-reduces it over 2-D tiles of the query grid only, each tile keeping the exact union of its queries' keys; see
`TileLayout`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

from sparvar.attention import reference_attention
from sparvar.schedule import Schedule

GRANULARITIES = ("block", "token")
# the tile sizes the Triton kernels take (tl.dot's power-of-two shapes within the register budget): a BlockLayout's
# block_m and block_n, a TileLayout's queries per tile
KERNEL_TILE_SIZES = (16, 32, 64, 128)


def check_window_sides(window_sides: tuple[int, ...]) -> None:
    for side in window_sides:
        if not isinstance(side, int) or isinstance(side, bool) or not (side == -1 or (side > 0 and side % 2 == 1)):
            raise ValueError(f"CSLA window side {side!r} must be -1 (drop the scale) or a positive odd int; got sides {window_sides}")


def _axis_window(n_query: int, n_key: int, side: int) -> torch.Tensor:
    """(n_query, n_key) bool: along one axis, which key positions lie in each query position's window."""
    centre = torch.round(torch.arange(n_query, dtype=torch.float64) * n_key / n_query)  # (y*Hj)/Hq exactly as Python
    dist = (centre[:, None] - torch.arange(n_key, dtype=torch.float64)[None, :]).abs()
    return dist <= side // 2


def window_side(schedule: Schedule, key_scale: int, window_sides: tuple[int, ...]) -> int:
    """The window side of key scale `key_scale`: window_sides aligned to the schedule's last scale; -1 (dropped) for
    the scales before it starts."""
    index = key_scale - (schedule.num_scales - len(window_sides))
    return window_sides[index] if index >= 0 else -1


def csla_token_mask(schedule: Schedule, scale: int, sinks: int, window_sides: tuple[int, ...]) -> torch.Tensor:
    """(Lq, Lk) bool keep-mask of scale `scale`'s queries over the whole visible KV cache, token-exact."""
    if not 0 <= scale < schedule.num_scales:
        raise ValueError(f"scale {scale} outside the schedule's {schedule.num_scales} scales")
    if sinks < 0:
        raise ValueError(f"CSLA sinks must be >= 0, got {sinks}")
    check_window_sides(window_sides)
    hq, wq = schedule.grids[scale]
    parts = []
    for j in range(scale + 1):
        hj, wj = schedule.grids[j]
        side = window_side(schedule, j, window_sides)
        # KV slots of scale j: its grid, or a text prefix for scale 0 of a prefix model (HART), which only a sink keeps
        if j < sinks:
            part = torch.ones(hq * wq, schedule.lengths[j], dtype=torch.bool)
        elif side == -1:
            part = torch.zeros(hq * wq, schedule.lengths[j], dtype=torch.bool)
        elif schedule.lengths[j] != hj * wj:
            raise ValueError(f"scale {j} holds a {schedule.lengths[j]}-slot prefix, not its {hj}x{wj} grid: "
                             "CSLA must keep it as a sink (sinks >= 1) or drop it")
        else:
            rows, cols = _axis_window(hq, hj, side), _axis_window(wq, wj, side)  # (hq, hj), (wq, wj)
            # token (y, x) keeps key (r, c) iff rows[y, r] and cols[x, c]; raster order on both sides
            part = (rows[:, None, :, None] & cols[None, :, None, :]).reshape(hq * wq, hj * wj)
        parts.append(part)
    return torch.cat(parts, dim=1)


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Block-sparse attention layout shared by the reference, the Triton kernels and the plugins.

    FlexAttention-style, one layout for every batch row and head:
      kv_num_blocks (num_q_blocks,) int32: active key blocks of each query block;
      kv_indices (num_q_blocks, max_kv_blocks) int32: their key-block indices, ascending; entries past
        kv_num_blocks[i] are padding that REPEATS the row's last valid index (so a kernel that reads
        them loads an in-bounds block; it must still stop at kv_num_blocks). max_kv_blocks is the
        largest kv_num_blocks, not the number of key blocks.
    Query block i covers queries [i*block_m, min((i+1)*block_m, q_len)), key block n covers keys
    [n*block_n, min((n+1)*block_n, kv_len)); the last of each may be partial.

    granularity 'block' (the paper's semantics): every key of an active block is attended, so kernels
    need no element mask. granularity 'token': only the keys of `token_mask` (q_len, kv_len) are
    attended; the block lists then say which blocks hold any such key.
    """

    q_len: int
    kv_len: int
    block_m: int
    block_n: int
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    token_density: float  # fraction of (query, key) pairs in the token-exact mask
    token_mask: torch.Tensor | None = None  # only for granularity 'token'
    # granularity 'token' only, for kernels that mask just the tiles that need it: partial_index
    # (num_q_blocks, max_kv_blocks) int32 per kv_indices slot, -1 when every (query, key) pair of the tile is
    # attended (computed unmasked), else the tile's row in partial_masks (num_partial, block_m, block_n) bool
    # (the tile's slice of token_mask, False past q_len / kv_len); padding slots hold -1
    partial_index: torch.Tensor | None = None
    partial_masks: torch.Tensor | None = None

    @property
    def granularity(self) -> str:
        return "block" if self.token_mask is None else "token"

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_m)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_n)

    @property
    def density(self) -> float:
        """Fraction of (query block, key block) tiles a kernel computes."""
        return int(self.kv_num_blocks.sum()) / (self.num_q_blocks * self.num_kv_blocks)

    def block_mask(self) -> torch.Tensor:
        """(num_q_blocks, num_kv_blocks) bool of active tiles."""
        nq, nk = self.num_q_blocks, self.num_kv_blocks
        valid = torch.arange(self.kv_indices.shape[1], device=self.kv_indices.device)[None, :] < self.kv_num_blocks[:, None]
        out = torch.zeros(nq, nk, dtype=torch.bool, device=self.kv_indices.device)
        rows = torch.arange(nq, device=self.kv_indices.device)[:, None].expand_as(self.kv_indices)
        out[rows[valid], self.kv_indices[valid].long()] = True
        return out

    def to_dense(self) -> torch.Tensor:
        """(q_len, kv_len) bool of the (query, key) pairs that are attended (built once per layout)."""
        return self._dense

    @cached_property
    def _dense(self) -> torch.Tensor:
        # cached: building it syncs with the device (boolean indexing), which a CUDA-graph capture cannot do
        if self.token_mask is not None:
            return self.token_mask
        blocks = self.block_mask()
        return blocks.repeat_interleave(self.block_m, 0).repeat_interleave(self.block_n, 1)[: self.q_len, : self.kv_len]

    def to(self, device: torch.device | str) -> BlockLayout:
        token_mask, partial_index, partial_masks = (None if t is None else t.to(device)
                                                    for t in (self.token_mask, self.partial_index, self.partial_masks))
        return BlockLayout(self.q_len, self.kv_len, self.block_m, self.block_n, self.kv_num_blocks.to(device),
                           self.kv_indices.to(device), self.token_density, token_mask, partial_index, partial_masks)

    def __repr__(self) -> str:
        return (f"BlockLayout(q_len={self.q_len}, kv_len={self.kv_len}, block={self.block_m}x{self.block_n}, "
                f"granularity={self.granularity}, tiles={int(self.kv_num_blocks.sum())}/{self.num_q_blocks * self.num_kv_blocks}, "
                f"density={self.density:.2%}, token_density={self.token_density:.2%})")


def block_layout_from_mask(mask: torch.Tensor, block_m: int, block_n: int, granularity: str = "block") -> BlockLayout:
    """OR-reduce a (q_len, kv_len) bool token mask to tiles of block_m queries x block_n keys."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise TypeError(f"mask must be a 2-D bool tensor, got {mask.dtype} with shape {tuple(mask.shape)}")
    if block_m <= 0 or block_n <= 0:
        raise ValueError(f"block shape must be positive, got {block_m}x{block_n}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown CSLA granularity {granularity!r}; expected one of {GRANULARITIES}")
    empty = ~mask.any(dim=1)
    if empty.any():
        raise ValueError(f"{int(empty.sum())} query rows attend to no key (first: {int(empty.nonzero()[0])}); "
                         "give them sinks or a window on their own scale")
    q_len, kv_len = mask.shape
    nq, nk = -(-q_len // block_m), -(-kv_len // block_n)
    padded = torch.zeros(nq * block_m, nk * block_n, dtype=torch.bool)
    padded[:q_len, :kv_len] = mask
    blocks = padded.view(nq, block_m, nk, block_n).any(dim=3).any(dim=1)  # (nq, nk)
    kv_num_blocks = blocks.sum(dim=1).to(torch.int32)
    width = int(kv_num_blocks.max())
    # stable sort of "inactive" puts active block indices first, in ascending order
    order = torch.sort((~blocks).to(torch.int8), dim=1, stable=True).indices[:, :width]
    last_valid = order.gather(1, (kv_num_blocks.long() - 1)[:, None])
    slot = torch.arange(width)[None, :]
    kv_indices = torch.where(slot < kv_num_blocks[:, None], order, last_valid).to(torch.int32).contiguous()
    token_density = mask.sum().item() / mask.numel()
    if granularity == "block":
        return BlockLayout(q_len, kv_len, block_m, block_n, kv_num_blocks.contiguous(), kv_indices, token_density)
    tiles = padded.view(nq, block_m, nk, block_n).transpose(1, 2)  # (nq, nk, block_m, block_n)
    partial = blocks & ~tiles.all(dim=3).all(dim=2)  # active tiles with at least one pair left out
    tile_row = torch.full((nq, nk), -1, dtype=torch.int32)
    tile_row[partial] = torch.arange(int(partial.sum()), dtype=torch.int32)
    partial_index = torch.where(slot < kv_num_blocks[:, None], tile_row.gather(1, kv_indices.long()), -1)
    return BlockLayout(q_len, kv_len, block_m, block_n, kv_num_blocks.contiguous(), kv_indices, token_density,
                       mask.clone(), partial_index.to(torch.int32).contiguous(), tiles[partial].contiguous())


@lru_cache(maxsize=64)
def csla_layout(schedule: Schedule, scale: int, sinks: int, window_sides: tuple[int, ...],
                block_m: int, block_n: int, granularity: str = "block") -> BlockLayout:
    """The CSLA layout of one query scale, cached per (schedule, scale, policy params, block shape).

    The returned tensors are shared between callers: do not modify them in place.
    """
    mask = csla_token_mask(schedule, scale, sinks, tuple(window_sides))
    return block_layout_from_mask(mask, block_m, block_n, granularity)


@dataclass(frozen=True, eq=False)
class TileLayout:
    """CSLA over 2-D query tiles: each tile of the query grid attends the exact union of its queries' windows.

    The raster BlockLayout's query block is a run of raster tokens (at 1024^2, 64 queries = one row of the 64-wide
    last scale), so its key blocks span whole rows of every key scale: a query attends ~6x its window. A tile of
    tile_rows x tile_cols query positions instead attends only the keys some query of the tile keeps (sinks and
    windows), gathered by position: 0.38-0.47x the (query, key) pairs of 64x64 raster blocks at scales 10-12. Like
    the block semantics, every query of a tile attends every key of the tile's set (a superset of its own window).

      q_rows (num_tiles, tile_rows * tile_cols) int32: the raster query positions of each tile, row-major within
        the tile; slots past a border tile's queries hold q_len (out of range: kernels mask them);
      kv_count (num_tiles,) int32: keys in each tile's set;
      kv_keys (num_tiles, max_keys) int32: the set's absolute KV positions, ascending; slots past kv_count repeat
        the row's last key (in bounds; kernels still stop at kv_count).
    Tiles are numbered row-major over the query grid (tile_rows x tile_cols, the last row / column may be partial).
    """

    q_len: int
    kv_len: int
    grid: tuple[int, int]  # the query scale's (rows, cols)
    tile: tuple[int, int]  # (rows, cols) of query positions per tile
    q_rows: torch.Tensor
    kv_count: torch.Tensor
    kv_keys: torch.Tensor
    token_density: float

    granularity = "tile"

    @property
    def num_tiles(self) -> int:
        return self.q_rows.shape[0]

    @property
    def density(self) -> float:
        """Fraction of (query, key) pairs attended (each query attends its tile's whole key set)."""
        return self.pairs / (self.q_len * self.kv_len)

    @cached_property
    def pairs(self) -> int:
        """(query, key) pairs attended: each tile's real queries times its keys."""
        queries = (self.q_rows < self.q_len).sum(dim=1).long()
        return int((queries * self.kv_count.long()).sum())

    def to_dense(self) -> torch.Tensor:
        """(q_len, kv_len) bool of the (query, key) pairs that are attended (built once per layout)."""
        return self._dense

    @cached_property
    def _dense(self) -> torch.Tensor:
        q_rows, kv_count, kv_keys = (t.cpu().long() for t in (self.q_rows, self.kv_count, self.kv_keys))
        keys = torch.zeros(self.num_tiles, self.kv_len, dtype=torch.bool)
        valid = torch.arange(kv_keys.shape[1])[None, :] < kv_count[:, None]
        keys[torch.arange(self.num_tiles)[:, None].expand_as(kv_keys)[valid], kv_keys[valid]] = True
        out = torch.zeros(self.q_len + 1, self.kv_len, dtype=torch.bool)  # row q_len takes the padding slots
        out[q_rows.reshape(-1)] = keys.repeat_interleave(q_rows.shape[1], dim=0)
        return out[: self.q_len].to(self.q_rows.device)

    def to(self, device: torch.device | str) -> TileLayout:
        return TileLayout(self.q_len, self.kv_len, self.grid, self.tile, self.q_rows.to(device),
                          self.kv_count.to(device), self.kv_keys.to(device), self.token_density)

    def __repr__(self) -> str:
        return (f"TileLayout(q_len={self.q_len}, kv_len={self.kv_len}, grid={self.grid[0]}x{self.grid[1]}, "
                f"tile={self.tile[0]}x{self.tile[1]}, tiles={self.num_tiles}, keys per tile "
                f"{int(self.kv_count.min())}-{int(self.kv_count.max())}, density={self.density:.2%}, "
                f"token_density={self.token_density:.2%})")


def tile_layout_from_mask(mask: torch.Tensor, grid: tuple[int, int], tile: tuple[int, int]) -> TileLayout:
    """The TileLayout of a raster query scale (grid = (rows, cols)) cut into tiles of tile = (rows, cols) query
    positions: each tile attends the union of its queries' rows of the (q_len, kv_len) bool token mask."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise TypeError(f"mask must be a 2-D bool tensor, got {mask.dtype} with shape {tuple(mask.shape)}")
    rows, cols = grid
    if rows * cols != mask.shape[0]:
        raise ValueError(f"a {rows}x{cols} query grid has {rows * cols} queries; the mask has {mask.shape[0]}")
    if len(tile) != 2 or min(tile) <= 0:
        raise ValueError(f"query tile must be two positive ints (rows, cols), got {tile}")
    empty = ~mask.any(dim=1)
    if empty.any():
        raise ValueError(f"{int(empty.sum())} query rows attend to no key (first: {int(empty.nonzero()[0])}); "
                         "give them sinks or a window on their own scale")
    tr, tc = tile
    q_len, kv_len = mask.shape
    position = torch.arange(q_len).view(rows, cols)
    q_rows, key_sets = [], []
    for r in range(0, rows, tr):
        for c in range(0, cols, tc):
            members = position[r:r + tr, c:c + tc].reshape(-1)
            q_rows.append(torch.cat([members, torch.full((tr * tc - members.numel(),), q_len)]))
            key_sets.append(mask[members].any(dim=0).nonzero()[:, 0])
    kv_count = torch.tensor([len(k) for k in key_sets], dtype=torch.int32)
    width = int(kv_count.max())
    kv_keys = torch.stack([torch.cat([k, k[-1:].expand(width - len(k))]) for k in key_sets]).to(torch.int32)
    return TileLayout(q_len, kv_len, (rows, cols), (tr, tc), torch.stack(q_rows).to(torch.int32).contiguous(),
                      kv_count, kv_keys.contiguous(), mask.sum().item() / mask.numel())


@lru_cache(maxsize=64)
def csla_tile_layout(schedule: Schedule, scale: int, sinks: int, window_sides: tuple[int, ...],
                     tile: tuple[int, int]) -> TileLayout:
    """The CSLA layout of one query scale over 2-D query tiles (see TileLayout), cached like csla_layout."""
    mask = csla_token_mask(schedule, scale, sinks, tuple(window_sides))
    return tile_layout_from_mask(mask, schedule.grids[scale], tuple(tile))


def csla_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout | TileLayout) -> torch.Tensor:
    """softmax(q k^T) v restricted to the layout's attended pairs, in fp32 (plain masked attention).

    q (B, H, q_len, D); k, v (B, H, kv_len, D); returns (B, H, q_len, D) in q's dtype.
    """
    if q.shape[-2] != layout.q_len or k.shape[-2] != layout.kv_len or v.shape[-2] != layout.kv_len:
        raise ValueError(f"CSLA layout is for {layout.q_len} queries x {layout.kv_len} keys; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    return reference_attention(q, k, v, mask=layout.to_dense().to(q.device))
