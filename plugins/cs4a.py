"""sparvar::CS4AAttention and sparvar::CS4AAttentionCached - CS4A grouped gather attention at the later scales.

Nodes (attribute group_size, int):
  out = CS4AAttention(q, k, v, key_idx)
  out = CS4AAttentionCached(q, k, v, key_idx, o_cache)      (= CS4AAttention + o_cache)
  q (B, H, Lq, D); k, v (B, H, Lk, D); key_idx (B, H, ceil(Lq / group_size), K) int32 absolute key positions,
  query group g (queries [g*group_size, (g+1)*group_size)) attends to keys key_idx[b, h, g, :];
  o_cache (B, H, Lq, D): the decision scale's residual, already upsampled to this scale. out like q.
Two node types rather than one with an optional input: a TensorRT plugin (and a QDP) has a fixed input count, and
an ONNX local function cannot branch on a missing input.

QDP section (TensorRT >= 10.6, `register_qdp`). No `from __future__ import annotations` (tensorrt.plugin reads them).
"""
from typing import List, Tuple, Union

from plugins import spec
from plugins.spec import FLOAT, INT32, OpSpec, Port


def _outputs(dims, attrs, alg):
    return [dims[0]]  # out is shaped like q


def _check_common(name, q, k, v, key_idx, attrs):
    spec.check_qkv(name, q, k, v)
    if not (spec.equal_known(key_idx[0], q[0]) and spec.equal_known(key_idx[1], q[1])):
        raise ValueError(f"{name}: key_idx {key_idx} must be (B, H, G, K) with q's B, H {q[:2]}")
    if q[2] >= 0 and not spec.equal_known(key_idx[2], -(-q[2] // attrs["group_size"])):
        raise ValueError(f"{name}: key_idx {key_idx} must have one row per query group: ceil({q[2]} / "
                         f"group_size={attrs['group_size']}) groups")
    if key_idx[3] >= 0 and k[2] >= 0 and key_idx[3] > k[2]:
        raise ValueError(f"{name}: key_idx selects {key_idx[3]} keys per group but there are only {k[2]}")


def _check(shapes, attrs):
    _check_common(SPEC.name, *shapes, attrs)


def _check_cached(shapes, attrs):
    q, k, v, key_idx, o_cache = shapes
    _check_common(SPEC_CACHED.name, q, k, v, key_idx, attrs)
    if not all(spec.equal_known(a, b) for a, b in zip(o_cache, q)):
        raise ValueError(f"{SPEC_CACHED.name}: o_cache {o_cache} must have q's shape {q}")


_INPUTS = (Port("q", FLOAT, 4), Port("k", FLOAT, 4), Port("v", FLOAT, 4), Port("key_idx", INT32, 4))
SPEC = OpSpec(name="CS4AAttention", torch_name="cs4a_attention", inputs=_INPUTS, outputs=(Port("out", FLOAT, 4),),
              attributes=("group_size",), output_rule=_outputs, check_rule=_check, doc=__doc__)
SPEC_CACHED = OpSpec(name="CS4AAttentionCached", torch_name="cs4a_attention", inputs=_INPUTS + (Port("o_cache", FLOAT, 4),),
                     outputs=(Port("out", FLOAT, 4),), attributes=("group_size",), output_rule=_outputs,
                     check_rule=_check_cached, doc=__doc__)


def run(inputs, attrs, ops):
    """Torch-level implementation on `ops` (a sparvar.sparse.SparseOps), with or without o_cache: returns (out,)."""
    q, k, v, key_idx = inputs[:4]
    o_cache = inputs[4] if len(inputs) == 5 else None
    # TensorRT times a plugin's tactics on inputs it never initialised: an index outside [0, Lk) would read out of
    # bounds, and the fault would end the build (and the CUDA context). Real selections are in range: a no-op.
    key_idx = key_idx.clamp(0, k.shape[2] - 1)
    return (ops.cs4a(q, k, v, key_idx, attrs["group_size"], o_cache),)


# ------------------------------------------------------------------------------------------------ QDP
def register_qdp(trtp):
    """Register sparvar::CS4AAttention and sparvar::CS4AAttentionCached with tensorrt.plugin (`trtp`)."""
    from plugins import qdp

    Int = qdp.INT_ATTR  # see qdp.INT_ATTR: not `int`

    @trtp.register(SPEC.plugin_id)
    def cs4a_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_idx: trtp.TensorDesc,
                  group_size: Int) -> trtp.TensorDesc:
        return qdp.output_descs(trtp, SPEC, [q, k, v, key_idx], dict(group_size=group_size))[0]

    @trtp.autotune(SPEC.plugin_id)
    def cs4a_autotune(q, k, v, key_idx, group_size: Int, outputs) -> List[trtp.AutoTuneCombination]:
        return qdp.autotune_combinations(trtp, SPEC, q, dict(group_size=group_size))

    @trtp.impl(SPEC.plugin_id)
    def cs4a_impl(q, k, v, key_idx, group_size: Int, outputs, stream: int, tactic: int) -> None:
        qdp.run_jit(SPEC, run, [q, k, v, key_idx], outputs, dict(group_size=group_size), tactic, stream)

    if qdp.has_aot(trtp):  # aot_impl needs TensorRT >= 10.9
        @trtp.aot_impl(SPEC.plugin_id)
        def cs4a_aot_impl(q, k, v, key_idx, group_size: Int, outputs, tactic: int
                          ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
            return qdp.aot_launch(trtp, SPEC, [q, k, v, key_idx], outputs, dict(group_size=group_size))

    @trtp.register(SPEC_CACHED.plugin_id)
    def cs4a_cached_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_idx: trtp.TensorDesc,
                         o_cache: trtp.TensorDesc, group_size: Int) -> trtp.TensorDesc:
        return qdp.output_descs(trtp, SPEC_CACHED, [q, k, v, key_idx, o_cache], dict(group_size=group_size))[0]

    @trtp.autotune(SPEC_CACHED.plugin_id)
    def cs4a_cached_autotune(q, k, v, key_idx, o_cache, group_size: Int, outputs) -> List[trtp.AutoTuneCombination]:
        return qdp.autotune_combinations(trtp, SPEC_CACHED, q, dict(group_size=group_size))

    @trtp.impl(SPEC_CACHED.plugin_id)
    def cs4a_cached_impl(q, k, v, key_idx, o_cache, group_size: Int, outputs, stream: int, tactic: int) -> None:
        qdp.run_jit(SPEC_CACHED, run, [q, k, v, key_idx, o_cache], outputs, dict(group_size=group_size), tactic, stream)

    if qdp.has_aot(trtp):  # aot_impl needs TensorRT >= 10.9
        @trtp.aot_impl(SPEC_CACHED.plugin_id)
        def cs4a_cached_aot_impl(q, k, v, key_idx, o_cache, group_size: Int, outputs, tactic: int
                                 ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
            return qdp.aot_launch(trtp, SPEC_CACHED, [q, k, v, key_idx, o_cache], outputs, dict(group_size=group_size))
