"""sparvar::CSLAAttention - CSLA block-sparse attention over a static block layout.

Node: out = CSLAAttention(q, k, v, kv_num_blocks, kv_indices), attributes block_m, block_n (ints).
  q (B, H, Lq, D); k, v (B, H, Lk, D); out like q. Softmax scale 1 (q arrives pre-scaled, see sparvar/attention.py).
  kv_num_blocks (ceil(Lq / block_m),) int32 and kv_indices (ceil(Lq / block_m), W) int32 are a
  sparvar.csla.BlockLayout (block granularity: every key of an active block is attended). In an exported step
  they are constant initializers: the layout of a scale is fixed, so TensorRT keeps them on the device.

QDP section (TensorRT >= 10.6, `register_qdp`): register / autotune / impl (JIT) / aot_impl.
No `from __future__ import annotations` here: tensorrt.plugin reads the annotations as classes.
"""
from typing import List, Tuple, Union

from plugins import spec
from plugins.spec import FLOAT, INT32, OpSpec, Port


def _outputs(dims, attrs, alg):
    return [dims[0]]  # out is shaped like q


def _check(shapes, attrs):
    q, k, v, num_blocks, indices = shapes
    spec.check_qkv(SPEC.name, q, k, v)
    if q[2] >= 0 and not spec.equal_known(num_blocks[0], -(-q[2] // attrs["block_m"])):
        raise ValueError(f"{SPEC.name}: kv_num_blocks {num_blocks} must have one entry per query block "
                         f"(ceil({q[2]} / block_m={attrs['block_m']}))")
    if not spec.equal_known(indices[0], num_blocks[0]):
        raise ValueError(f"{SPEC.name}: kv_indices {indices} and kv_num_blocks {num_blocks} disagree on the query blocks")
    if k[2] >= 0 and indices[1] > -(-k[2] // attrs["block_n"]):
        raise ValueError(f"{SPEC.name}: kv_indices lists {indices[1]} key blocks per row, more than the "
                         f"{-(-k[2] // attrs['block_n'])} key blocks of {k[2]} keys (block_n={attrs['block_n']})")


SPEC = OpSpec(
    name="CSLAAttention",
    torch_name="csla_attention",
    inputs=(Port("q", FLOAT, 4), Port("k", FLOAT, 4), Port("v", FLOAT, 4),
            Port("kv_num_blocks", INT32, 1), Port("kv_indices", INT32, 2)),
    outputs=(Port("out", FLOAT, 4),),
    attributes=("block_m", "block_n"),
    output_rule=_outputs,
    check_rule=_check,
    doc=__doc__,
)


def layout_from_tensors(q_len: int, kv_len: int, kv_num_blocks, kv_indices, block_m: int, block_n: int):
    """The node's block-list tensors as a sparvar.csla.BlockLayout (block granularity)."""
    from sparvar.csla import BlockLayout

    return BlockLayout(q_len, kv_len, block_m, block_n, kv_num_blocks, kv_indices, token_density=float("nan"))


def run(inputs, attrs, ops):
    """Torch-level implementation on `ops` (a sparvar.sparse.SparseOps): returns (out,)."""
    import torch

    q, k, v, kv_num_blocks, kv_indices = inputs
    # TensorRT times a plugin's tactics on inputs it never initialised (as CS4A's key_idx): counts and block
    # indices out of range would loop or read out of bounds and fault the build. A real layout is in range: a no-op.
    kv_num_blocks = kv_num_blocks.clamp(0, kv_indices.shape[1])
    kv_indices = kv_indices.clamp(0, -(-k.shape[2] // attrs["block_n"]) - 1)
    # The Triton kernel masks only a row's last listed key block (a layout is ascending, so that one holds the partial
    # last block): an outside row listing that block earlier, or twice, would read past the keys. So a row counts
    # only its leading strictly ascending blocks; a real layout's padding repeats its last block, so this is a no-op.
    width = kv_indices.shape[1]
    slots = torch.arange(1, width, device=kv_indices.device)
    breaks = torch.where(kv_indices[:, 1:] > kv_indices[:, :-1], width, slots)  # the slots where the ascent breaks
    leading = breaks.min(dim=1).values if slots.numel() else torch.full_like(kv_num_blocks, width)
    kv_num_blocks = torch.minimum(kv_num_blocks, leading.to(kv_num_blocks.dtype))
    layout = layout_from_tensors(q.shape[2], k.shape[2], kv_num_blocks, kv_indices, attrs["block_m"], attrs["block_n"])
    return (ops.csla(q, k, v, layout),)


# ------------------------------------------------------------------------------------------------ QDP
def register_qdp(trtp):
    """Register the quickly-deployable plugin sparvar::CSLAAttention with tensorrt.plugin (`trtp`)."""
    from plugins import qdp

    Int = qdp.INT_ATTR  # see qdp.INT_ATTR: not `int`

    @trtp.register(SPEC.plugin_id)
    def csla_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, kv_num_blocks: trtp.TensorDesc,
                  kv_indices: trtp.TensorDesc, block_m: Int, block_n: Int) -> trtp.TensorDesc:
        return qdp.output_descs(trtp, SPEC, [q, k, v, kv_num_blocks, kv_indices], dict(block_m=block_m, block_n=block_n))[0]

    @trtp.autotune(SPEC.plugin_id)
    def csla_autotune(q, k, v, kv_num_blocks, kv_indices, block_m: Int, block_n: Int, outputs
                       ) -> List[trtp.AutoTuneCombination]:
        return qdp.autotune_combinations(trtp, SPEC, q, dict(block_m=block_m, block_n=block_n))

    @trtp.impl(SPEC.plugin_id)
    def csla_impl(q, k, v, kv_num_blocks, kv_indices, block_m: Int, block_n: Int, outputs, stream: int,
                  tactic: int) -> None:
        qdp.run_jit(SPEC, run, [q, k, v, kv_num_blocks, kv_indices], outputs, dict(block_m=block_m, block_n=block_n),
                    tactic, stream)

    if qdp.has_aot(trtp):  # aot_impl needs TensorRT >= 10.9
        @trtp.aot_impl(SPEC.plugin_id)
        def csla_aot_impl(q, k, v, kv_num_blocks, kv_indices, block_m: Int, block_n: Int, outputs, tactic: int
                          ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
            return qdp.aot_launch(trtp, SPEC, [q, k, v, kv_num_blocks, kv_indices], outputs,
                                  dict(block_m=block_m, block_n=block_n))
