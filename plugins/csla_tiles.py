"""sparvar::CSLATileAttention - CSLA over 2-D query tiles, each tile's keys gathered (a static layout).

Node: out = CSLATileAttention(q, k, v, q_rows, kv_count, kv_keys), no attributes.
  q (B, H, Lq, D); k, v (B, H, Lk, D); out like q. Softmax scale 1 (q arrives pre-scaled, see sparvar/attention.py).
  q_rows (T, M) int32: the query positions of each of T tiles (M slots, M one of the kernel's tile sizes 16, 32, 64,
    128; a slot holding Lq is padding);
  kv_count (T,) int32 and kv_keys (T, W) int32: each tile's keys, ascending, the first kv_count[t] entries of its row.
  They are a sparvar.csla.TileLayout (the policy's csla_query_tile): every query of a tile attends the tile's
  whole key set. In an exported step they are constant initializers, like CSLAAttention's block lists.

QDP section (TensorRT >= 10.6, `register_qdp`): register / autotune / impl (JIT) / aot_impl (the tile, q_rows' second
dim, must be a constant of the network: it is the AOT kernel's BLOCK_M).
No `from __future__ import annotations` here: tensorrt.plugin reads the annotations as classes.
"""
from typing import List, Tuple, Union

from plugins import spec
from plugins.spec import FLOAT, INT32, OpSpec, Port


def _outputs(dims, attrs, alg):
    return [dims[0]]  # out is shaped like q


def _check(shapes, attrs):
    q, k, v, q_rows, kv_count, kv_keys = shapes
    spec.check_qkv(SPEC.name, q, k, v)
    if not (spec.equal_known(kv_count[0], q_rows[0]) and spec.equal_known(kv_keys[0], q_rows[0])):
        raise ValueError(f"{SPEC.name}: q_rows {q_rows}, kv_count {kv_count} and kv_keys {kv_keys} must agree on the "
                         "number of tiles")
    from sparvar.csla import KERNEL_TILE_SIZES

    if q_rows[1] >= 0 and q_rows[1] not in KERNEL_TILE_SIZES:  # the Triton tactic's query tile
        raise ValueError(f"{SPEC.name}: a tile holds {q_rows[1]} query slots; the kernel takes {KERNEL_TILE_SIZES}")
    if q[2] >= 0 and q_rows[0] >= 0 and q_rows[1] >= 0 and q_rows[0] * q_rows[1] < q[2]:
        raise ValueError(f"{SPEC.name}: {q_rows[0]} tiles of {q_rows[1]} queries cannot hold the {q[2]} queries")
    if k[2] >= 0 and kv_keys[1] > k[2]:
        raise ValueError(f"{SPEC.name}: kv_keys lists {kv_keys[1]} keys per tile, more than the {k[2]} keys")


SPEC = OpSpec(
    name="CSLATileAttention",
    torch_name="csla_tile_attention",
    inputs=(Port("q", FLOAT, 4), Port("k", FLOAT, 4), Port("v", FLOAT, 4),
            Port("q_rows", INT32, 2), Port("kv_count", INT32, 1), Port("kv_keys", INT32, 2)),
    outputs=(Port("out", FLOAT, 4),),
    attributes=(),
    output_rule=_outputs,
    check_rule=_check,
    doc=__doc__,
)


def layout_from_tensors(q_len: int, kv_len: int, q_rows, kv_count, kv_keys):
    """The node's tensors as a sparvar.csla.TileLayout (its grid is not carried by the node: recorded as 0 x 0)."""
    from sparvar.csla import TileLayout

    return TileLayout(q_len, kv_len, (0, 0), (1, q_rows.shape[1]), q_rows, kv_count, kv_keys, float("nan"))


def run(inputs, attrs, ops):
    """Torch-level implementation on `ops` (a sparvar.sparse.SparseOps): returns (out,)."""
    q, k, v, q_rows, kv_count, kv_keys = inputs
    # TensorRT times a plugin's tactics on inputs it never initialised: query slots, counts and keys out of range
    # would read or write out of bounds and fault the build. A real layout is in range: a no-op.
    q_rows = q_rows.clamp(0, q.shape[2])
    kv_count = kv_count.clamp(0, kv_keys.shape[1])
    kv_keys = kv_keys.clamp(0, k.shape[2] - 1)
    return (ops.csla(q, k, v, layout_from_tensors(q.shape[2], k.shape[2], q_rows, kv_count, kv_keys)),)


# ------------------------------------------------------------------------------------------------ QDP
def register_qdp(trtp):
    """Register the quickly-deployable plugin sparvar::CSLATileAttention with tensorrt.plugin (`trtp`)."""
    from plugins import qdp

    @trtp.register(SPEC.plugin_id)
    def csla_tiles_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, q_rows: trtp.TensorDesc,
                        kv_count: trtp.TensorDesc, kv_keys: trtp.TensorDesc) -> trtp.TensorDesc:
        return qdp.output_descs(trtp, SPEC, [q, k, v, q_rows, kv_count, kv_keys], {})[0]

    @trtp.autotune(SPEC.plugin_id)
    def csla_tiles_autotune(q, k, v, q_rows, kv_count, kv_keys, outputs) -> List[trtp.AutoTuneCombination]:
        return qdp.autotune_combinations(trtp, SPEC, q, {})

    @trtp.impl(SPEC.plugin_id)
    def csla_tiles_impl(q, k, v, q_rows, kv_count, kv_keys, outputs, stream: int, tactic: int) -> None:
        qdp.run_jit(SPEC, run, [q, k, v, q_rows, kv_count, kv_keys], outputs, {}, tactic, stream)

    if qdp.has_aot(trtp):  # aot_impl needs TensorRT >= 10.9
        @trtp.aot_impl(SPEC.plugin_id)
        def csla_tiles_aot_impl(q, k, v, q_rows, kv_count, kv_keys, outputs, tactic: int
                                ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
            return qdp.aot_launch(trtp, SPEC, [q, k, v, q_rows, kv_count, kv_keys], outputs, {})
