"""sparvar::CS4ADecide - the CS4A decision scale: dense attention + per-group top-k key selection + residual.

Node: out, selected, o_cache = CS4ADecide(q, k, v), attributes group_size, topk, sink_len (ints; sink_len >= 0).
  q (B, H, Lq, D); k, v (B, H, Lk, D).
  out (B, H, Lq, D): dense attention;
  selected (B, H, ceil(Lq / group_size), topk) int32: per query group, the keys with the largest column sums of the
    softmax probabilities over the group's queries among keys [sink_len, Lk), ascending absolute positions;
  o_cache (B, H, Lq, D): out - attention of each query over [sinks | its group's selection] (what that misses).
See sparvar/cs4a.py (cs4a_decide_ref) for the reference semantics.

QDP section (TensorRT >= 10.6, `register_qdp`). No `from __future__ import annotations` (tensorrt.plugin reads them).
"""
from typing import List, Tuple, Union

from plugins import spec
from plugins.spec import FLOAT, INT32, OpSpec, Port


def _outputs(dims, attrs, alg):
    q = dims[0]
    selected = [q[0], q[1], alg.cdiv(q[2], attrs["group_size"]), alg.const(attrs["topk"])]
    return [q, selected, q]


def _check(shapes, attrs):
    q, k, v = shapes
    spec.check_qkv(SPEC.name, q, k, v)
    if k[2] >= 0 and attrs["topk"] + attrs["sink_len"] > k[2]:
        raise ValueError(f"{SPEC.name}: topk={attrs['topk']} + sink_len={attrs['sink_len']} exceeds the {k[2]} keys")


SPEC = OpSpec(
    name="CS4ADecide",
    torch_name="cs4a_decide",
    inputs=(Port("q", FLOAT, 4), Port("k", FLOAT, 4), Port("v", FLOAT, 4)),
    outputs=(Port("out", FLOAT, 4), Port("selected", INT32, 4), Port("o_cache", FLOAT, 4)),
    attributes=("group_size", "topk", "sink_len"),
    zero_ok=("sink_len",),
    output_rule=_outputs,
    check_rule=_check,
    doc=__doc__,
)


def run(inputs, attrs, ops):
    """Torch-level implementation on `ops` (a sparvar.sparse.SparseOps): returns (out, selected, o_cache)."""
    q, k, v = inputs
    return tuple(ops.cs4a_decide(q, k, v, attrs["group_size"], attrs["topk"], sink_len=attrs["sink_len"]))


# ------------------------------------------------------------------------------------------------ QDP
def register_qdp(trtp):
    """Register the quickly-deployable plugin sparvar::CS4ADecide with tensorrt.plugin (`trtp`)."""
    from plugins import qdp

    Int = qdp.INT_ATTR  # see qdp.INT_ATTR: not `int`

    @trtp.register(SPEC.plugin_id)
    def decide_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, group_size: Int, topk: Int,
                    sink_len: Int) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        return tuple(qdp.output_descs(trtp, SPEC, [q, k, v], dict(group_size=group_size, topk=topk, sink_len=sink_len)))

    @trtp.autotune(SPEC.plugin_id)
    def decide_autotune(q, k, v, group_size: Int, topk: Int, sink_len: Int, outputs) -> List[trtp.AutoTuneCombination]:
        return qdp.autotune_combinations(trtp, SPEC, q, dict(group_size=group_size, topk=topk, sink_len=sink_len))

    @trtp.impl(SPEC.plugin_id)
    def decide_impl(q, k, v, group_size: Int, topk: Int, sink_len: Int, outputs, stream: int, tactic: int) -> None:
        qdp.run_jit(SPEC, run, [q, k, v], outputs, dict(group_size=group_size, topk=topk, sink_len=sink_len), tactic, stream)

    if qdp.has_aot(trtp):  # aot_impl needs TensorRT >= 10.9
        @trtp.aot_impl(SPEC.plugin_id)
        def decide_aot_impl(q, k, v, group_size: Int, topk: Int, sink_len: Int, outputs, tactic: int
                            ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
            return qdp.aot_launch(trtp, SPEC, [q, k, v], outputs, dict(group_size=group_size, topk=topk, sink_len=sink_len))
