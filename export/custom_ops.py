"""SparVAR attention as custom ONNX nodes: torch custom ops, their ONNX translation, and reference function bodies.

Pipeline (torch.onnx dynamo exporter):
  1. The model's plan calls the torch custom ops below (`export_plan` / `sparse_ops`), so torch.export keeps each
     sparse attention as one call: torch.ops.sparvar.csla_attention / csla_tile_attention / cs4a_attention /
     cs4a_decide.
  2. `translation_table()` maps each to ONE node in domain `sparvar` (op types in plugins/: CSLAAttention,
     CSLATileAttention, CS4AAttention, CS4AAttentionCached, CS4ADecide) with the parameters as int attributes plus a
     `plugin_namespace` attribute, which is what TensorRT's ONNX parser needs to find the plugin.
  3. `attach_reference_functions(model)` adds an ONNX model-local function per op type (same domain and name) whose
     body is the reference math, so onnxruntime and onnx.reference run the graph. TensorRT gets the graph without
     them (`strip_reference_functions`): TensorRT's parser inlines a local function when no plugin is registered,
     and a silent inline would hide a missing plugin.
Step 3 is separate because torch.onnx inlines every function it emits when it converts the opset version.

The torch ops run the one reference implementation (sparvar.sparse.get_sparse_ops("reference"), through the op's
`run` in plugins/); node signatures, attributes, shapes and checks come from the op specs in plugins/.

    program = export_program(module, args, flavour="reference")  # or "plugin" for TensorRT-family engines:
    program.save(path)  # torch.onnx.export with translation_table(), fold_and_clean, finalize_export
"""
from __future__ import annotations

import onnx
import onnxscript
import torch
from onnxscript import opset18 as op

from plugins import SPECS
from plugins import cs4a as cs4a_plugin
from plugins import cs4a_decide as decide_plugin
from plugins import csla as csla_plugin
from plugins import csla_tiles as csla_tiles_plugin
from plugins.spec import FLOAT, NAMESPACE, IntDims, OpSpec

DOMAIN_VERSION = 1
FLAVOURS = ("reference", "plugin")  # reference: nodes + local-function bodies; plugin: nodes only (TensorRT)
MIN_OPSET = 18  # the function bodies are written against opset 18 and valid unchanged up to the newest opset
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


# ------------------------------------------------------------------------------------------------ torch custom ops
def _reference_ops():
    from sparvar.sparse import get_sparse_ops

    return get_sparse_ops("reference")


def _fake_outputs(spec: OpSpec, inputs: list[torch.Tensor], attrs: dict) -> list[torch.Tensor]:
    shapes = spec.output_dims([list(t.shape) for t in inputs], attrs, IntDims())
    dtypes = spec.output_dtypes([str(t.dtype).removeprefix("torch.") for t in inputs])
    return [inputs[0].new_empty(shape, dtype=getattr(torch, dtype)) for shape, dtype in zip(shapes, dtypes)]


def _checked(spec: OpSpec, inputs: list[torch.Tensor], attrs: dict) -> dict:
    attrs = spec.parse_attrs(attrs)
    spec.check([tuple(t.shape) for t in inputs], attrs)
    spec.check_dtypes([str(t.dtype).removeprefix("torch.") for t in inputs])
    return attrs


@torch.library.custom_op("sparvar::csla_attention", mutates_args=())
def csla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                   kv_indices: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    inputs = [q, k, v, kv_num_blocks, kv_indices]
    return csla_plugin.run(inputs, _checked(csla_plugin.SPEC, inputs, dict(block_m=block_m, block_n=block_n)), _reference_ops())[0]


@csla_attention.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, block_m, block_n):
    return _fake_outputs(csla_plugin.SPEC, [q, k, v, kv_num_blocks, kv_indices], dict(block_m=block_m, block_n=block_n))[0]


@torch.library.custom_op("sparvar::csla_tile_attention", mutates_args=())
def csla_tile_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_rows: torch.Tensor, kv_count: torch.Tensor,
                        kv_keys: torch.Tensor) -> torch.Tensor:
    inputs = [q, k, v, q_rows, kv_count, kv_keys]
    return csla_tiles_plugin.run(inputs, _checked(csla_tiles_plugin.SPEC, inputs, {}), _reference_ops())[0]


@csla_tile_attention.register_fake
def _(q, k, v, q_rows, kv_count, kv_keys):
    return _fake_outputs(csla_tiles_plugin.SPEC, [q, k, v, q_rows, kv_count, kv_keys], {})[0]


@torch.library.custom_op("sparvar::cs4a_attention", mutates_args=())
def cs4a_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_idx: torch.Tensor,
                   o_cache: torch.Tensor | None, group_size: int) -> torch.Tensor:
    spec = cs4a_plugin.SPEC if o_cache is None else cs4a_plugin.SPEC_CACHED
    inputs = [q, k, v, key_idx] + ([] if o_cache is None else [o_cache])
    return cs4a_plugin.run(inputs, _checked(spec, inputs, dict(group_size=group_size)), _reference_ops())[0]


@cs4a_attention.register_fake
def _(q, k, v, key_idx, o_cache, group_size):
    return _fake_outputs(cs4a_plugin.SPEC, [q, k, v, key_idx], dict(group_size=group_size))[0]


@torch.library.custom_op("sparvar::cs4a_decide", mutates_args=())
def cs4a_decide(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int,
                topk: int, sink_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inputs = [q, k, v]
    attrs = dict(group_size=group_size, topk=topk, sink_len=sink_len)
    out, selected, o_cache = decide_plugin.run(inputs, _checked(decide_plugin.SPEC, inputs, attrs), _reference_ops())
    return out, selected, o_cache


@cs4a_decide.register_fake
def _(q, k, v, group_size, topk, sink_len):
    return tuple(_fake_outputs(decide_plugin.SPEC, [q, k, v], dict(group_size=group_size, topk=topk, sink_len=sink_len)))


assert all(hasattr(torch.ops.sparvar, spec.torch_name) for spec in SPECS.values()), "every op spec needs its torch op"


def sparse_ops():
    """A sparvar.sparse.SparseOps whose functions call the torch custom ops (what torch.export must see)."""
    from sparvar.sparse import SparseOps

    def csla_op(q, k, v, layout):
        if layout.granularity == "tile":  # 2-D query tiles (sparvar.csla.TileLayout)
            return torch.ops.sparvar.csla_tile_attention(q, k, v, layout.q_rows, layout.kv_count, layout.kv_keys)
        if layout.granularity != "block":
            raise ValueError("only block-granular CSLA layouts and query tiles export to CSLA nodes (the plugins have "
                             f"no token mask); got granularity {layout.granularity!r}")
        return torch.ops.sparvar.csla_attention(q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.block_m, layout.block_n)

    def cs4a_decide_op(q, k, v, group_size, topk, sink_len=0):
        return torch.ops.sparvar.cs4a_decide(q, k, v, group_size, topk, sink_len)

    def cs4a_op(q, k, v, key_idx, group_size, o_cache=None):
        return torch.ops.sparvar.cs4a_attention(q, k, v, key_idx, o_cache, group_size)

    return SparseOps(csla_op, cs4a_decide_op, cs4a_op)


def export_plan(policy, schedule, num_layers: int, flavour: str = "reference"):
    """A SparVARPlan (None for a dense engine) whose sparse attention exports as sparvar custom nodes."""
    check_flavour(flavour)
    if policy is None:
        return None
    from sparvar.sparse import SparVARPlan

    plan = SparVARPlan(policy, schedule, num_layers, backend="reference")
    plan.ops = sparse_ops()  # same signatures as the reference ops; only the call torch.export records changes
    return plan


# ------------------------------------------------------------------------------------------------ ONNX nodes
SPARVAR = onnxscript.values.Opset(NAMESPACE, DOMAIN_VERSION)


def _schema(spec: OpSpec) -> onnx.defs.OpSchema:
    """An OpSchema for the node (not registered with onnx): lets onnxscript's tracer emit a schema-less custom op."""
    param = onnx.defs.OpSchema.FormalParameter
    kind_type = lambda kind: "T" if kind == FLOAT else "tensor(int32)"  # noqa: E731
    attr = onnx.defs.OpSchema.Attribute
    return onnx.defs.OpSchema(
        spec.name, NAMESPACE, DOMAIN_VERSION, doc=spec.doc,
        inputs=[param(p.name, kind_type(p.kind)) for p in spec.inputs],
        outputs=[param(p.name, kind_type(p.kind)) for p in spec.outputs],
        type_constraints=[("T", _FLOAT_TYPES, "q, k, v and float outputs share one float type")],
        attributes=[attr(a, onnx.defs.OpSchema.AttrType.INT, "") for a in spec.attributes]
        + [attr("plugin_namespace", onnx.defs.OpSchema.AttrType.STRING, "TensorRT plugin namespace")])


_NODES = {name: onnxscript.values.Op(SPARVAR, name, _schema(spec)) for name, spec in SPECS.items()}


def _csla_onnx(q, k, v, kv_num_blocks, kv_indices, block_m: int, block_n: int):
    return _NODES[csla_plugin.SPEC.name](q, k, v, kv_num_blocks, kv_indices, block_m=block_m, block_n=block_n,
                                  plugin_namespace=NAMESPACE)


def _csla_tiles_onnx(q, k, v, q_rows, kv_count, kv_keys):
    return _NODES[csla_tiles_plugin.SPEC.name](q, k, v, q_rows, kv_count, kv_keys, plugin_namespace=NAMESPACE)


def _cs4a_onnx(q, k, v, key_idx, o_cache=None, group_size: int = 0):
    if o_cache is None:
        return _NODES[cs4a_plugin.SPEC.name](q, k, v, key_idx, group_size=group_size, plugin_namespace=NAMESPACE)
    return _NODES[cs4a_plugin.SPEC_CACHED.name](q, k, v, key_idx, o_cache, group_size=group_size, plugin_namespace=NAMESPACE)


def _cs4a_decide_onnx(q, k, v, group_size: int, topk: int, sink_len: int):
    return _NODES[decide_plugin.SPEC.name](q, k, v, group_size=group_size, topk=topk, sink_len=sink_len,
                                           plugin_namespace=NAMESPACE)


def check_flavour(flavour: str) -> None:
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown graph flavour {flavour!r}; expected one of {FLAVOURS}")


def translation_table(flavour: str = "reference") -> dict:
    """custom_translation_table for torch.onnx.export; the nodes are the same for both flavours."""
    check_flavour(flavour)
    return {torch.ops.sparvar.csla_attention.default: _csla_onnx,
            torch.ops.sparvar.csla_tile_attention.default: _csla_tiles_onnx,
            torch.ops.sparvar.cs4a_attention.default: _cs4a_onnx,
            torch.ops.sparvar.cs4a_decide.default: _cs4a_decide_onnx}


# ------------------------------------------------------------------------------------------------ reference bodies
# The ONNX rendering of sparvar.attention.reference_attention (masked), sparvar.cs4a.cs4a_attention_ref and
# cs4a_decide_ref: fp32 math, results cast back to q's type. Shapes in comments; L = Lq, K = Lk unless noted.
NEG_INF = float("-inf")


@onnxscript.script(SPARVAR, default_opset=op)
def CSLAAttention(q, k, v, kv_num_blocks, kv_indices, block_m: int, block_n: int, plugin_namespace: str):
    # Each query block attends to the keys of its listed key blocks, gathered (W = kv_indices' width): scores are
    # (B, H, Lq, W * block_n), not (B, H, Lq, Lk). A masked dense body held the whole score matrix three times:
    # 23 GB at HART-0.7B's last scale, more than the 24 GiB CPU machine (bench/results/engine_memory_cpu.json).
    shape = op.Shape(q)  # [B, H, Lq, D]
    batch_heads = op.Slice(shape, [0], [2])
    q_len = op.Slice(shape, [2], [3])
    head_dim = op.Slice(shape, [3], [4])
    kv_len = op.Shape(k, start=2, end=3)  # (1,)
    query_blocks = op.Shape(kv_indices, start=0, end=1)  # (1,) = ceil(Lq / block_m)
    width = op.Squeeze(op.Shape(kv_indices, start=1, end=2))
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    bn = op.Constant(value_int=block_n)
    bm = op.Reshape(op.Constant(value_int=block_m), [1])
    # key positions of each row's listed blocks (nq, W, bn); unlisted entries and positions past Lk are masked
    keys = op.Add(op.Unsqueeze(op.Mul(op.Cast(kv_indices, to=7), bn), [2]), op.Range(zero, bn, one))
    listed = op.Less(op.Unsqueeze(op.Range(zero, width, one), [0]), op.Unsqueeze(op.Cast(kv_num_blocks, to=7), [1]))
    valid = op.And(op.Unsqueeze(listed, [2]), op.Less(keys, kv_len))  # (nq, W, bn)
    keys = op.Reshape(op.Where(valid, keys, zero), op.Concat(query_blocks, [-1], axis=0))  # (nq, W*bn), in bounds
    valid = op.Reshape(valid, op.Concat(query_blocks, [1], [-1], axis=0))  # (nq, 1, W*bn)
    k_sel = op.Gather(op.Cast(k, to=1), keys, axis=2)  # (B, H, nq, W*bn, D)
    v_sel = op.Gather(op.Cast(v, to=1), keys, axis=2)
    padded = op.Mul(query_blocks, bm)
    pads = op.Concat([0, 0, 0, 0, 0, 0], op.Sub(padded, q_len), [0], axis=0)  # pad the query axis at its end
    qb = op.Reshape(op.Pad(op.Cast(q, to=1), pads), op.Concat(batch_heads, query_blocks, bm, head_dim, axis=0))
    scores = op.MatMul(qb, op.Transpose(k_sel, perm=[0, 1, 2, 4, 3]))  # (B, H, nq, bm, W*bn)
    scores = op.Where(valid, scores, op.Constant(value_float=NEG_INF))
    out = op.MatMul(op.Softmax(scores, axis=-1), v_sel)  # (B, H, nq, bm, D)
    out = op.Slice(op.Reshape(out, op.Concat(batch_heads, padded, head_dim, axis=0)), [0], q_len, [2])
    return op.CastLike(out, q)


@onnxscript.script(SPARVAR, default_opset=op)
def CSLATileAttention(q, k, v, q_rows, kv_count, kv_keys, plugin_namespace: str):
    # Each tile's M query slots (q_rows; a slot holding Lq is padding) attend its first kv_count keys of kv_keys:
    # scores are (B, H, T, M, W), W = kv_keys' width. The queries are gathered by slot from q with one zero row
    # appended (what padding slots read), and the outputs are gathered back by each query's slot.
    shape = op.Shape(q)  # [B, H, Lq, D]
    batch_heads = op.Slice(shape, [0], [2])
    q_len = op.Slice(shape, [2], [3])
    head_dim = op.Slice(shape, [3], [4])
    tiles = op.Shape(q_rows, start=0, end=1)  # (1,) = T
    slots = op.Shape(q_rows, start=1, end=2)  # (1,) = M
    width = op.Squeeze(op.Shape(kv_keys, start=1, end=2))
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    rows = op.Reshape(op.Cast(q_rows, to=7), [-1])  # (T*M,)
    padded_q = op.Pad(op.Cast(q, to=1), [0, 0, 0, 0, 0, 0, 1, 0])  # (B, H, Lq + 1, D)
    qt = op.Reshape(op.Gather(padded_q, rows, axis=2), op.Concat(batch_heads, tiles, slots, head_dim, axis=0))
    keys = op.Cast(kv_keys, to=7)  # (T, W)
    k_sel = op.Gather(op.Cast(k, to=1), keys, axis=2)  # (B, H, T, W, D)
    v_sel = op.Gather(op.Cast(v, to=1), keys, axis=2)
    listed = op.Less(op.Unsqueeze(op.Range(zero, width, one), [0]), op.Unsqueeze(op.Cast(kv_count, to=7), [1]))
    scores = op.MatMul(qt, op.Transpose(k_sel, perm=[0, 1, 2, 4, 3]))  # (B, H, T, M, W)
    scores = op.Where(op.Unsqueeze(listed, [1]), scores, op.Constant(value_float=NEG_INF))
    out = op.MatMul(op.Softmax(scores, axis=-1), v_sel)  # (B, H, T, M, D)
    out = op.Reshape(out, op.Concat(batch_heads, op.Mul(tiles, slots), head_dim, axis=0))  # (B, H, T*M, D)
    # each query's slot, scattered from the slot numbers; padding slot s writes position Lq + s (past the queries,
    # dropped), so that no two slots write one position
    slot_ids = op.Range(zero, op.Squeeze(op.Mul(tiles, slots)), one)  # (T*M,)
    targets = op.Where(op.Less(rows, q_len), rows, op.Add(q_len, slot_ids))
    slot_of = op.ScatterElements(op.ConstantOfShape(op.Add(q_len, op.Mul(tiles, slots)),
                                                    value=onnx.helper.make_tensor("z", 7, [1], [0])),
                                 targets, slot_ids, axis=0)
    out = op.Gather(out, op.Slice(slot_of, [0], q_len), axis=2)  # (B, H, Lq, D)
    return op.CastLike(out, q)


@onnxscript.script(SPARVAR, default_opset=op)
def CS4AGatheredAttention(q, k, v, key_idx, group_size: int):
    """(B, H, Lq, D) fp32: query group g attends to keys key_idx[:, :, g, :] (helper of the CS4A bodies)."""
    shape = op.Shape(q)  # [B, H, Lq, D]
    batch_heads = op.Slice(shape, [0], [2])
    q_len = op.Slice(shape, [2], [3])
    head_dim = op.Slice(shape, [3], [4])
    gs = op.Reshape(op.Constant(value_int=group_size), [1])
    groups = op.Slice(op.Shape(key_idx), [2], [3])
    idx = op.Unsqueeze(op.Cast(key_idx, to=7), [4])  # (B, H, G, Kg, 1)
    k_sel = op.GatherND(op.Cast(k, to=1), idx, batch_dims=2)  # (B, H, G, Kg, D)
    v_sel = op.GatherND(op.Cast(v, to=1), idx, batch_dims=2)
    padded = op.Mul(groups, gs)
    pads = op.Concat([0, 0, 0, 0, 0, 0], op.Sub(padded, q_len), [0], axis=0)  # pad the query axis at its end
    qg = op.Pad(op.Cast(q, to=1), pads)  # (B, H, G*gs, D)
    qg = op.Reshape(qg, op.Concat(batch_heads, groups, gs, head_dim, axis=0))  # (B, H, G, gs, D)
    probs = op.Softmax(op.MatMul(qg, op.Transpose(k_sel, perm=[0, 1, 2, 4, 3])), axis=-1)  # (B, H, G, gs, Kg)
    out = op.Reshape(op.MatMul(probs, v_sel), op.Concat(batch_heads, padded, head_dim, axis=0))  # (B, H, G*gs, D)
    return op.Slice(out, [0], q_len, [2])


@onnxscript.script(SPARVAR, default_opset=op)
def CS4AAttention(q, k, v, key_idx, group_size: int, plugin_namespace: str):
    out = CS4AGatheredAttention(q, k, v, key_idx, group_size=group_size)
    return op.CastLike(out, q)


@onnxscript.script(SPARVAR, default_opset=op)
def CS4AAttentionCached(q, k, v, key_idx, o_cache, group_size: int, plugin_namespace: str):
    out = CS4AGatheredAttention(q, k, v, key_idx, group_size=group_size)
    return op.CastLike(op.Add(out, op.Cast(o_cache, to=1)), q)


@onnxscript.script(SPARVAR, default_opset=op)
def CS4ADecide(q, k, v, group_size: int, topk: int, sink_len: int, plugin_namespace: str):
    shape = op.Shape(q)  # [B, H, Lq, D]
    batch_heads = op.Slice(shape, [0], [2])
    q_len = op.Slice(shape, [2], [3])
    kv_len = op.Shape(k, start=2, end=3)
    gs = op.Reshape(op.Constant(value_int=group_size), [1])
    k_top = op.Reshape(op.Constant(value_int=topk), [1])
    sinks = op.Reshape(op.Constant(value_int=sink_len), [1])
    groups = op.Div(op.Sub(op.Add(q_len, gs), [1]), gs)
    probs = op.Softmax(op.MatMul(op.Cast(q, to=1), op.Transpose(op.Cast(k, to=1), perm=[0, 1, 3, 2])), axis=-1)  # (B, H, Lq, Lk)
    dense = op.MatMul(probs, op.Cast(v, to=1))  # (B, H, Lq, D)
    pads = op.Concat([0, 0, 0, 0, 0, 0], op.Sub(op.Mul(groups, gs), q_len), [0], axis=0)  # padded queries add zeros
    grouped = op.Reshape(op.Pad(probs, pads), op.Concat(batch_heads, groups, gs, kv_len, axis=0))  # (B, H, G, gs, Lk)
    column_sums = op.Slice(op.ReduceSum(grouped, [3], keepdims=0), sinks, kv_len, [3])  # (B, H, G, Lk - sinks)
    _, top = op.TopK(column_sums, k_top, axis=-1, largest=1, sorted=1)  # (B, H, G, topk) int64, from the sinks on
    ascending, _ = op.TopK(op.Add(top, sinks), k_top, axis=-1, largest=0, sorted=1)
    selected = op.Cast(ascending, to=6)
    sink_range = op.Range(op.Constant(value_int=0), op.Constant(value_int=sink_len), op.Constant(value_int=1))
    sink_idx = op.Expand(sink_range, op.Concat(batch_heads, groups, sinks, axis=0))  # (B, H, G, sinks): 0..sinks-1
    key_set = op.Cast(op.Concat(sink_idx, ascending, axis=-1), to=6)
    o_cache = op.Sub(dense, CS4AGatheredAttention(q, k, v, key_set, group_size=group_size))
    return op.CastLike(dense, q), selected, op.CastLike(o_cache, q)


_BODIES = {"CSLAAttention": CSLAAttention, "CSLATileAttention": CSLATileAttention, "CS4AAttention": CS4AAttention, "CS4AAttentionCached": CS4AAttentionCached,
           "CS4ADecide": CS4ADecide}
_HELPERS = {"CS4AAttention": ["CS4AGatheredAttention"], "CS4AAttentionCached": ["CS4AGatheredAttention"],
            "CS4ADecide": ["CS4AGatheredAttention"]}
_ALL_FUNCTIONS = {**_BODIES, "CS4AGatheredAttention": CS4AGatheredAttention}
assert set(_BODIES) == set(SPECS), "every op spec needs a reference body"


def reference_functions(op_types, opset: int) -> list[onnx.FunctionProto]:
    """FunctionProtos (bodies + helpers they call) for the given sparvar op types, importing default opset `opset`."""
    if opset < MIN_OPSET:
        raise ValueError(f"the sparvar reference functions need ONNX opset >= {MIN_OPSET}, the model imports {opset}")
    unknown = sorted(set(op_types) - set(_BODIES))
    if unknown:
        raise ValueError(f"no reference function for sparvar op type(s) {unknown}; known: {sorted(_BODIES)}")
    names = []  # helpers before their callers: onnx.reference resolves functions in order
    for name in sorted(set(op_types)):
        for n in _HELPERS.get(name, []) + [name]:
            if n not in names:
                names.append(n)
    protos = []
    for name in names:
        proto = _ALL_FUNCTIONS[name].to_function_proto()
        for imp in proto.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = opset
        protos.append(proto)
    return protos


def _default_opset(model: onnx.ModelProto) -> int:
    versions = [imp.version for imp in model.opset_import if imp.domain in ("", "ai.onnx")]
    if not versions:
        raise ValueError("model imports no default ONNX opset")
    return versions[0]


def _custom_op_types(graph: onnx.GraphProto) -> set[str]:
    """sparvar op types used anywhere in the graph, subgraphs included."""
    found = set()
    for node in graph.node:
        if node.domain == NAMESPACE:
            found.add(node.op_type)
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                found |= _custom_op_types(g)
    return found


def custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The sparvar nodes of the main graph, in order."""
    return [n for n in model.graph.node if n.domain == NAMESPACE]


def attach_reference_functions(model):
    """Add the reference bodies of the sparvar op types the model uses (onnx.ModelProto or onnx_ir.Model, in place)."""
    if isinstance(model, onnx.ModelProto):
        used = _custom_op_types(model.graph)
        present = {f.name for f in model.functions if f.domain == NAMESPACE}
        for proto in reference_functions(used, _default_opset(model)):
            if proto.name not in present:
                model.functions.append(proto)
        if used and not any(imp.domain == NAMESPACE for imp in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(NAMESPACE, DOMAIN_VERSION))
        return model
    import onnx_ir as ir

    used = {node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph) if node.domain == NAMESPACE}
    for proto in reference_functions(used, model.opset_imports.get("", MIN_OPSET)):
        function = ir.serde.deserialize_function(proto)
        model.functions.setdefault(function.identifier(), function)
    if used:
        model.opset_imports.setdefault(NAMESPACE, DOMAIN_VERSION)
    return model


def strip_reference_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without the sparvar local functions, so TensorRT must map every sparvar node to its plugin."""
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.functions[:]
    stripped.functions.extend(f for f in model.functions if f.domain != NAMESPACE)
    return stripped


def finalize_export(program, flavour: str):
    """After torch.onnx.export: attach the reference bodies for the 'reference' flavour (ONNXProgram, in place)."""
    check_flavour(flavour)
    if flavour == "reference":
        attach_reference_functions(program.model)
    return program


def fold_and_clean(model) -> None:
    """The exporter's optimisation without onnxscript's pattern-rewrite rules (in place, an onnx_ir.Model): constant
    folding, unused nodes and functions dropped, constants lifted to initializers, duplicates merged. The rewrite
    rules made an infinity-tiny step's export 1.29x and the decode's 1.12x slower (their matcher tries every rule at
    every node; bench/results/export_cleaning_cpu.json) and removed few nodes (40 of 485 in the step, 50 of 303 in
    the decode), of the kinds onnxruntime's and TensorRT's own graph optimisers remove when they load a graph."""
    import onnx_ir
    import onnx_ir.passes.common as common

    onnxscript.optimizer.fold_constants(model)
    onnx_ir.passes.Sequential(
        common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(), common.OutputFixPass(), common.NameFixPass())(model)


def export_program(module: torch.nn.Module, args: tuple, *, flavour: str | None = "reference", opset: int = MIN_OPSET,
                   input_names=None, output_names=None, dynamic_shapes=None):
    """torch.onnx.export (dynamo), cleaned by fold_and_clean; with a `flavour` its SparVAR attention becomes sparvar
    nodes, finalized for that flavour (None: a graph without them). Returns the ONNXProgram (every export of the
    project, an engine's units and the op-level graphs, goes through here)."""
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True,
                                    custom_translation_table=translation_table(flavour) if flavour else None,
                                    opset_version=opset, input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, verbose=False, optimize=False)
    fold_and_clean(program.model)
    return finalize_export(program, flavour) if flavour else program


def export_model(module: torch.nn.Module, args: tuple, *, flavour: str = "reference", opset: int = MIN_OPSET,
                 input_names=None, output_names=None, dynamic_shapes=None) -> onnx.ModelProto:
    """export_program's ModelProto."""
    return export_program(module, args, flavour=flavour, opset=opset, input_names=input_names,
                          output_names=output_names, dynamic_shapes=dynamic_shapes).model_proto
