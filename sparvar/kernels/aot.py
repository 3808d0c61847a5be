"""Ahead-of-time entries of the Triton kernels for TensorRT plugins (plugins/aot.py states the contract).

    aot_kernel(op, *, dtype, head_dim, attrs, static_dims=None) -> plugins.aot.AotKernel

TensorRT launches an AOT kernel with (input pointers, int32 scalars, output pointers) over dense row-major
tensors, so each entry here takes exactly that, derives the strides from the shapes and calls the same jitted
kernel the torch path launches (no second copy of the attention). CSLAAttention (block granularity: the node
carries kv_num_blocks / kv_indices only) and CSLATileAttention (its query tile is q_rows' second dim, a constant
of the exported graph: `static_dims`) have one; softmax scale 1, bf16 or fp16. CS4A's nodes run their JIT `impl`.
"""
from __future__ import annotations

from sparvar.kernels.csla import (DTYPES, HAS_TRITON, HEAD_DIMS, TILE_SIZES, default_launch_config,
                                  default_tile_launch_config, require_triton)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from sparvar.kernels.csla import _csla_fwd_kernel, _csla_tiles_fwd_kernel

    @triton.jit
    def _csla_aot_kernel(Q, K, V, KVNumBlocks, KVIndices, H, q_len, kv_len, num_slots, Out,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """CSLAAttention for TensorRT: inputs, scalars (heads, Lq, Lk, kv_indices width), output; contiguous tensors.

        EVEN_N is False: whether Lk is a multiple of BLOCK_N is a runtime shape property here, and the masked last
        tile is correct either way. Unused pointer slots (lse, launch order, token tiles, row lengths) get Out.
        CLAMP_LAYOUT: TensorRT times tactics on inputs it never wrote, so the block counts and indices are forced
        into range (a no-op for a real layout) rather than looping 2^31 times over keys out of bounds.
        """
        q_head = q_len * HEAD_DIM
        kv_head = kv_len * HEAD_DIM
        _csla_fwd_kernel(Q, K, V, Out, Out, KVNumBlocks, KVIndices, Out, Out, Out, Out, Out,
                         H * q_head, q_head, HEAD_DIM,
                         H * kv_head, kv_head, HEAD_DIM,
                         H * kv_head, kv_head, HEAD_DIM,
                         H * q_head, q_head, HEAD_DIM,
                         num_slots, H, q_len, kv_len, 1.4426950408889634,  # softmax scale 1, in log2 units
                         HEAD_DIM, BLOCK_M, BLOCK_N, False, False, False, False, False, False, True)

    @triton.jit
    def _csla_tiles_aot_kernel(Q, K, V, QRows, KVCount, KVKeys, H, q_len, kv_len, width, Out,
                               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """CSLATileAttention for TensorRT: inputs, scalars (heads, Lq, Lk, kv_keys width), output; contiguous
        tensors; BLOCK_M is the node's tile (q_rows' slots). The launch order slot gets Out (unused: no order);
        CLAMP_LAYOUT forces the query slots, counts and keys into range, as CSLAAttention's entry does."""
        q_head = q_len * HEAD_DIM
        kv_head = kv_len * HEAD_DIM
        _csla_tiles_fwd_kernel(Q, K, V, Out, QRows, KVCount, KVKeys, Out,
                               H * q_head, q_head, HEAD_DIM,
                               H * kv_head, kv_head, HEAD_DIM,
                               H * kv_head, kv_head, HEAD_DIM,
                               H * q_head, q_head, HEAD_DIM,
                               width, H, q_len, kv_len, width, 1.4426950408889634,  # softmax scale 1, log2 units
                               HEAD_DIM, BLOCK_M, BLOCK_N, False, True)


_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in DTYPES}  # 'bfloat16', 'float16'
AOT_OPS = ("CSLAAttention", "CSLATileAttention")  # the ONNX ops aot_kernel has a kernel for; the others run JIT


def aot_kernel(op: str, *, dtype: str, head_dim: int, attrs: dict, static_dims: dict | None = None):
    """The AOT kernel of ONNX op `op` for TensorRT (plugins.aot.AotKernel); ValueError for what it cannot run.
    static_dims: input name -> its dims, ints where the graph fixes them, None where not (CSLATileAttention's tile
    is q_rows' second dim; CSLAAttention's is in its attributes)."""
    from plugins.aot import AotKernel

    require_triton("aot_kernel")
    if op not in AOT_OPS:
        raise NotImplementedError(f"aot_kernel: no AOT kernel for {op!r} yet (only {', '.join(AOT_OPS)}); build that node "
                                  "with the JIT plugin (attribute aot=0)")
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"aot_kernel: {op} runs in {sorted(_DTYPE_NAMES)}, got dtype {dtype!r}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"aot_kernel: head dim {head_dim} is not supported; supported: {HEAD_DIMS}")
    if op == "CSLATileAttention":
        slots = ((static_dims or {}).get("q_rows") or (None, None))[1]
        if slots not in TILE_SIZES:
            raise ValueError(f"aot_kernel: {op}'s query tile (q_rows' second dim) must be a constant in {TILE_SIZES} "
                             f"(the kernel's BLOCK_M), got {slots}")
        launch = default_tile_launch_config(slots)
        block_n = launch.pop("BLOCK_N")
        return AotKernel(
            _csla_tiles_aot_kernel, ("H", "q_len", "kv_len", "width"),
            dict(HEAD_DIM=head_dim, BLOCK_M=slots, BLOCK_N=block_n), **launch,
            grid=lambda s, d: (s["q_rows"][0], s["q"][0] * s["q"][1], d.const(1)),
            scalars=lambda s, d: [s["q"][1], s["q"][2], s["k"][2], s["kv_keys"][1]],
        )
    block_m, block_n = attrs.get("block_m"), attrs.get("block_n")
    if block_m not in TILE_SIZES or block_n not in TILE_SIZES:
        raise ValueError(f"aot_kernel: {op} attributes block_m, block_n must be in {TILE_SIZES} (the kernel tile is the "
                         f"layout block), got {block_m}, {block_n}")
    return AotKernel(
        _csla_aot_kernel, ("H", "q_len", "kv_len", "num_slots"),
        dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n),
        **default_launch_config(block_m, block_n),
        grid=lambda s, d: (d.cdiv(s["q"][2], block_m), s["q"][0] * s["q"][1], d.const(1)),
        scalars=lambda s, d: [s["q"][1], s["q"][2], s["k"][2], s["kv_indices"][1]],
    )
