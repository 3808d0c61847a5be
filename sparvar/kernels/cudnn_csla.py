"""CSLA through cuDNN's fused SDPA with paged K/V caches (nvidia-cudnn-frontend, cuDNN >= 9.5), beside the Triton
kernel (sparvar.kernels.csla) and its reference (reference_csla_attention there).

Why: at 8B our Triton sparse kernels run at 58-65% of cuDNN's dense rate (docs/performance.md), and no Triton or
Gluon variant got further. cuDNN's Hopper SDPA takes paged caches (a page table per sequence, for LLM serving), and
a block-granular CSLA layout is exactly that: each query block of block_m queries is one "sequence" whose pages are
its active key blocks of block_n keys, the same set for every head and both CFG rows. No K/V is copied.

Tensor geometry, as the torch-cuda engine holds it (checked, never worked around):
  - q token-major: a (B, Lq, H, D) tensor seen as (B, H, Lq, D). Batch row b's query block i is cuDNN's sequence
    b * nq + i: one uniform stride of block_m * H * D. The output is written token-major, as the Triton kernel's.
  - k, v: views [:, :, :kv_len] of a contiguous (B, H, T, D) cache slice with T a multiple of block_n (KVCache
    allocates whole 128-position pages). Seen as a container of pages (H, block_n, D) with page n of head h at
    n * block_n * D + h * T * D: batch row b's key block j is page b * H * T / block_n + j.
  - Lq a multiple of block_m: sequence b * nq + i starts at one uniform stride from the first only when every
    batch row holds whole query blocks.
The page container's pages of different heads interleave in memory (a view of the cache, not cuDNN's packed
containers of its samples); cuDNN 9.19 on an H100 takes them (the GPU test passed at b9b1bdd).

Measured (docs/performance.md, twenty-sixth pass): on 128x64 tiles 14-16% faster per call than the Triton kernel
on the policy's 64x64 tiles at 8B scales 11-12, on 64x64 tiles 39-45% slower (cuDNN's query tile is 128 rows); ~3-4 ms
per 8B image end to end. So it is a benchmark path (bench/csla_cudnn.py, bench/e2e.py's cuDNN rows), not an engine
option.
"""
from __future__ import annotations

import importlib.util
import threading
import weakref

import torch

HAS_CUDNN_FRONTEND = importlib.util.find_spec("cudnn") is not None


def check_paged_csla(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout) -> int:
    """The cache length T of k/v's storage, or a ValueError naming what the paged call cannot take."""
    if getattr(layout, "granularity", None) != "block":
        raise ValueError(f"{name}: cuDNN's paged SDPA runs block-granular layouts only, got "
                         f"{getattr(layout, 'granularity', type(layout).__name__)!r}")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{name}: q (B, H, Lq, D) and k, v (B, H, Lk, D) of one batch, heads and head dim; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, q_len, d = q.shape
    if (q_len, k.shape[2]) != (layout.q_len, layout.kv_len):
        raise ValueError(f"{name}: layout is for {layout.q_len} queries x {layout.kv_len} keys, got {q_len} x {k.shape[2]}")
    if q_len % layout.block_m:
        raise ValueError(f"{name}: {q_len} queries are not whole blocks of {layout.block_m} (each batch row's query "
                         "blocks are cuDNN sequences at one uniform stride)")
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{name}: q, k, v must share bf16 or fp16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.transpose(1, 2).is_contiguous():
        raise ValueError(f"{name}: q must be token-major (a contiguous (B, Lq, H, D) tensor seen through transpose(1, 2))")
    t = k.stride(1) // d if k.stride(1) % d == 0 else -1
    for label, x in (("k", k), ("v", v)):
        if x.stride() != (h * t * d, t * d, d, 1) or t % layout.block_n or t < layout.kv_len:
            raise ValueError(f"{name}: {label} must be a view [:, :, :Lk] of a contiguous (B, H, T, D) cache with T a "
                             f"multiple of {layout.block_n}; strides {tuple(x.stride())}")
    if not (q.is_cuda and k.device == q.device and v.device == q.device):
        raise ValueError(f"{name}: q, k, v must be on one CUDA device, got {q.device}, {k.device}, {v.device}")
    return t


def paged_tables(layout, batch: int, heads: int, cache_len: int) -> dict:
    """Page table (B*nq, 1, W, 1), sequence lengths (B*nq, 1, 1, 1) of queries and keys, all int32 on the CPU, and
    the longest key sequence: the layout as cuDNN's paged SDPA takes it (see the module docstring)."""
    bn, nq = layout.block_n, layout.num_q_blocks
    counts = layout.kv_num_blocks.to(torch.int64).cpu()
    width = int(counts.max())
    indices = layout.kv_indices[:, :width].to(torch.int64).cpu()
    valid = torch.arange(width)[None, :] < counts[:, None]
    indices = torch.where(valid, indices, torch.zeros_like(indices))  # unread slots still name a page in range
    base = (torch.arange(batch) * heads * (cache_len // bn))[:, None, None]
    table = (base + indices[None]).reshape(batch * nq, 1, width, 1).to(torch.int32)
    last = indices.gather(1, (counts - 1).clamp(min=0)[:, None])[:, 0]
    overhang = ((last + 1) * bn - layout.kv_len).clamp(min=0)  # keys past kv_len in a partial final block
    seq_kv = (counts * bn - overhang).repeat(batch).reshape(batch * nq, 1, 1, 1).to(torch.int32)
    seq_q = torch.full((batch * nq, 1, 1, 1), layout.block_m, dtype=torch.int32)
    return dict(table=table, seq_q=seq_q, seq_kv=seq_kv, max_seq_kv=width * bn)


def paged_views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, layout, cache_len: int) -> dict:
    """q and the output as (B*nq, H, block_m, D) sequences, k and v as page containers (checked shapes assumed)."""
    b, h, q_len, d = q.shape
    bm, bn, rows = layout.block_m, layout.block_n, b * layout.num_q_blocks
    pages = (b - 1) * h * (cache_len // bn) + cache_len // bn
    seq = (rows, h, bm, d), (bm * h * d, d, h * d, 1)
    container = (pages, h, bn, d), (bn * d, cache_len * d, d, 1)
    return dict(q=q.as_strided(*seq, q.storage_offset()), o=out.as_strided(*seq, out.storage_offset()),
                k=k.as_strided(*container, k.storage_offset()), v=v.as_strided(*container, v.storage_offset()))


def emulate_paged(views: dict, tables: dict, scale: float = 1.0) -> torch.Tensor:
    """Paged attention in plain fp32 torch over paged_views/paged_tables: what cuDNN is asked to compute, as
    (B*nq, H, block_m, D). Tests check the tables through it on the CPU, where cuDNN is not."""
    q, k, v = views["q"], views["k"], views["v"]
    rows, h, bm, d = q.shape
    o = torch.empty(rows, h, bm, d)
    for r in range(rows):
        pages, n = tables["table"][r, 0, :, 0].long(), int(tables["seq_kv"][r])
        keys = k[pages].permute(1, 0, 2, 3).reshape(h, -1, d)[:, :n].float()
        vals = v[pages].permute(1, 0, 2, 3).reshape(h, -1, d)[:, :n].float()
        o[r] = torch.softmax(q[r].float() @ keys.transpose(1, 2) * scale, dim=-1) @ vals
    return o


class _PagedGraph:
    """One built cuDNN graph (shapes, strides, dtype and page geometry fixed) and its device tables."""

    def __init__(self, cudnn, handle, views: dict, tables: dict, dtype: torch.dtype, scale: float, device):
        io = cudnn.data_type.BFLOAT16 if dtype == torch.bfloat16 else cudnn.data_type.HALF
        g = cudnn.pygraph(io_data_type=io, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=handle)
        self.tables = {key: t.to(device) for key, t in tables.items() if isinstance(t, torch.Tensor)}
        self.q, self.k, self.v = g.tensor_like(views["q"]), g.tensor_like(views["k"]), g.tensor_like(views["v"])
        self.table_k, self.table_v = g.tensor_like(self.tables["table"]), g.tensor_like(self.tables["table"])
        self.seq_q, self.seq_kv = g.tensor_like(self.tables["seq_q"]), g.tensor_like(self.tables["seq_kv"])
        self.o, _ = g.sdpa(name="csla", q=self.q, k=self.k, v=self.v, is_inference=True, attn_scale=scale,
                           use_padding_mask=True, seq_len_q=self.seq_q, seq_len_kv=self.seq_kv,
                           paged_attention_k_table=self.table_k, paged_attention_v_table=self.table_v,
                           paged_attention_max_seq_len_kv=tables["max_seq_kv"])
        self.o.set_output(True).set_dim(list(views["o"].shape)).set_stride(list(views["o"].stride()))
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.graph = g
        self.workspace = torch.empty(max(g.get_workspace_size(), 1), device=device, dtype=torch.uint8)

    def execute(self, cudnn, handle, views: dict) -> None:
        pack = {self.q: views["q"], self.k: views["k"], self.v: views["v"], self.o: views["o"],
                self.table_k: self.tables["table"], self.table_v: self.tables["table"],
                self.seq_q: self.tables["seq_q"], self.seq_kv: self.tables["seq_kv"]}
        with _LOCK:  # one handle and workspace per graph: a launch on another thread's stream must not interleave
            cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(views["q"].device).cuda_stream)
            self.graph.execute(pack, self.workspace, handle=handle)


# layout -> {(shapes, cache length, dtype, scale, device): _PagedGraph}: layouts are static per scale, so a graph is
# built once; keyed weakly by the layout object (its tables are the layout's), as the Triton kernel's launch orders
_GRAPHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_HANDLES: dict = {}
_LOCK = threading.RLock()


def csla_attention_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, *, scale: float = 1.0) -> torch.Tensor:
    """CSLA over a block-granular sparvar.csla.BlockLayout through cuDNN's paged SDPA; the output (B, H, Lq, D) is
    token-major. The graph is built on the first call per layout and shape (cuDNN's heuristics pick the engine),
    then only executed: on the current stream, so CUDA graphs capture it."""
    name = "csla_attention_cudnn"
    if not HAS_CUDNN_FRONTEND:
        raise RuntimeError(f"{name} needs nvidia-cudnn-frontend (pip install nvidia-cudnn-frontend) and a CUDA GPU")
    cache_len = check_paged_csla(name, q, k, v, layout)
    import cudnn

    device = q.device
    key = (tuple(q.shape), cache_len, q.dtype, float(scale), device)
    with _LOCK:
        handle = _HANDLES.get(device)
        if handle is None:
            with torch.cuda.device(device):
                handle = _HANDLES[device] = cudnn.create_handle()
        graph = _GRAPHS.setdefault(layout, {}).get(key)
    out = torch.empty((q.shape[0], q.shape[2], q.shape[1], q.shape[3]), dtype=q.dtype, device=device)
    views = paged_views(q, k, v, out, layout, cache_len)
    if graph is None:
        tables = paged_tables(layout, q.shape[0], q.shape[1], cache_len)
        graph = _PagedGraph(cudnn, handle, views, tables, q.dtype, float(scale), device)
        with _LOCK:
            graph = _GRAPHS[layout].setdefault(key, graph)
    graph.execute(cudnn, handle, views)
    return out.transpose(1, 2)
