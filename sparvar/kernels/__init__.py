"""Triton kernels for SparVAR attention on CUDA GPUs (forward only; bf16/fp16; head dim 64 or 128).

    csla_attention(q, k, v, layout)                        CSLA over a sparvar.csla.BlockLayout (block or token)
                                                           or a TileLayout (2-D query tiles, keys gathered)
    cs4a_attention(q, k, v, key_idx, group_size, o_cache)  CS4A grouped gather attention (+ residual cache)
    cs4a_decide(q, k, v, group_size, topk, sink_len=0)     dense + per-group top-k selection + residual cache
    cs4a_attention_from_selection(q, k, v, selected, geometry, o_cache, cache_grid, grid)
                                                           CS4A at a later scale from the decision state, one launch
    aot_kernel(op, dtype=, head_dim=, attrs=, static_dims=) TensorRT AOT entry (plugins.aot.AotKernel), CSLA nodes
    select_topk(sums, topk, first=0)                       ascending top-k positions per row (the decision's pick)
    upsample_cache(o_cache, src_grid, dst_grid)            CS4A's residual cache, bilinear to a later scale

Each goes through a torch custom op (sparvar::triton_csla_attention[_token], sparvar::triton_csla_query_tiles,
sparvar::triton_cs4a_attention, sparvar::triton_cs4a_from_selection, sparvar::triton_cs4a_decide, with fake
kernels) so torch.compile and torch.export keep it as one call. The names carry a `triton_` prefix because export/custom_ops.py already defines
sparvar::csla_attention etc. as the reference ops of the ONNX path. `sparse_ops()` returns them as a
sparvar.sparse.SparseOps backend, with two raw functions besides (no custom op: the engines' eager and CUDA-graph
steps call them, nothing traces them): cs4a_decide_begin_raw / cs4a_decide_end_raw, the decision in two halves so
that one top-k launch serves every decision layer.
The module imports without triton (CPU installs); the kernels then raise a RuntimeError naming it.

Beside the attention kernels, the torch-cuda engine's other Triton kernels, each next to its torch reference:
pointwise.py (a block's element-wise glue, as sparvar.model.BlockOps), fp8.py (per-row FP8 quantisation for
sparvar/fp8.py), group_norm.py (the tokenizer decoder's GroupNorm + SiLU, with a pending conv bias) and
decoder_glue.py (the decoder's residual sum with the conv biases, nearest 2x upsampling).
"""
from sparvar.kernels.aot import aot_kernel
from sparvar.kernels.cs4a import (cs4a_attention, cs4a_attention_from_selection, cs4a_attention_from_selection_raw,
                                  cs4a_attention_raw, cs4a_column_sums, cs4a_decide, cs4a_decide_begin_raw,
                                  cs4a_decide_end_raw, cs4a_decide_raw, reference_column_sums, reference_cs4a_attention,
                                  reference_cs4a_decide, select_topk, upsample_cache)
from sparvar.kernels.csla import (HAS_TRITON, csla_attention, csla_attention_blocks, csla_attention_query_tiles,
                                  dense_attention, query_block_order, reference_csla_attention, token_tiles)

__all__ = [
    "HAS_TRITON", "aot_kernel", "csla_attention", "csla_attention_blocks", "csla_attention_query_tiles",
    "dense_attention", "query_block_order",
    "reference_csla_attention", "token_tiles", "cs4a_attention", "cs4a_attention_from_selection",
    "cs4a_attention_from_selection_raw", "cs4a_attention_raw", "cs4a_column_sums", "cs4a_decide",
    "cs4a_decide_begin_raw", "cs4a_decide_end_raw", "cs4a_decide_raw", "reference_column_sums",
    "reference_cs4a_attention", "reference_cs4a_decide", "select_topk", "sparse_ops", "upsample_cache",
]


def sparse_ops():
    """The kernels with sparvar.sparse.SparseOps' signatures (softmax scale 1, as the model uses)."""
    from sparvar.sparse import SparseOps

    def cs4a(q, k, v, key_idx, group_size, o_cache=None):
        return cs4a_attention(q, k, v, key_idx, group_size, o_cache)

    def cs4a_from_selection(q, k, v, selected, geometry, o_cache, cache_grid, grid):
        return cs4a_attention_from_selection(q, k, v, selected, geometry, o_cache, cache_grid, grid)

    return SparseOps(csla_attention, cs4a_decide, cs4a, upsample_cache, cs4a_from_selection, cs4a_decide_begin_raw,
                     cs4a_decide_end_raw)
