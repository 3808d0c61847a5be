"""SparVAR custom ONNX ops: torch custom ops -> one sparvar node each -> reference local functions run by
onnxruntime (CPU) and onnx.reference, compared with the torch reference in fp32."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from export.custom_ops import (FLAVOURS, attach_reference_functions, export_model, export_plan, sparse_ops,
                               strip_reference_functions, translation_table)
from plugins import SPECS
from plugins.spec import NAMESPACE
from sparvar.csla import block_layout_from_mask, csla_attention_ref, tile_layout_from_mask
from sparvar.sparse import get_sparse_ops

B, H, LQ, LK, D = 2, 2, 20, 45, 8
GROUP, TOPK, KEYS = 8, 12, 10  # 3 query groups of 8 (the last one partial)


def _inputs(dtype=torch.float32, seed=0, head_dim=D, group=GROUP):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, head_dim, generator=g).to(dtype) for n in (LQ, LK, LK))
    groups = -(-LQ // group)
    key_idx = torch.stack([torch.randperm(LK, generator=g)[:KEYS].sort().values for _ in range(B * H * groups)])
    key_idx = key_idx.view(B, H, groups, KEYS).to(torch.int32)
    o_cache = torch.randn(B, H, LQ, head_dim, generator=g).to(dtype)
    return q, k, v, key_idx, o_cache


def _mask():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(LQ, LK, generator=g) < 0.25
    mask[:, 0] = True  # every query keeps a key
    return mask


def _layout():
    return block_layout_from_mask(_mask(), 8, 16)


def _tile_layout():
    """2x8 query tiles of a 4x5 query grid: 16 slots (a kernel tile size), 6 of each tile's padding."""
    return tile_layout_from_mask(_mask(), (4, 5), (2, 8))


class OneOp(torch.nn.Module):
    """A tiny graph around one sparse op, as the model's plan calls it (through SparseOps)."""

    def __init__(self, op: str, sink_len: int = 0):
        super().__init__()
        self.op, self.sink_len = op, sink_len
        self.layout = _tile_layout() if op == "CSLATileAttention" else _layout()

    def forward(self, q, k, v, key_idx, o_cache):
        ops = sparse_ops()
        if self.op in ("CSLAAttention", "CSLATileAttention"):
            return ops.csla(q, k, v, self.layout)
        if self.op == "CS4AAttention":
            return ops.cs4a(q, k, v, key_idx, GROUP, None)
        if self.op == "CS4AAttentionCached":
            return ops.cs4a(q, k, v, key_idx, GROUP, o_cache)
        return ops.cs4a_decide(q, k, v, GROUP, TOPK, sink_len=self.sink_len)


EXPECTED_OUTPUTS = {
    "CSLAAttention": [(B, H, LQ, D)],
    "CSLATileAttention": [(B, H, LQ, D)],
    "CS4AAttention": [(B, H, LQ, D)],
    "CS4AAttentionCached": [(B, H, LQ, D)],
    "CS4ADecide": [(B, H, LQ, D), (B, H, 3, TOPK), (B, H, LQ, D)],
}
EXPECTED_ATTRS = {"CSLAAttention": {"block_m": 8, "block_n": 16}, "CSLATileAttention": {}, "CS4AAttention": {"group_size": GROUP},
                  "CS4AAttentionCached": {"group_size": GROUP}, "CS4ADecide": {"group_size": GROUP, "topk": TOPK, "sink_len": 0}}


def _feeds(names, tensors):
    by_name = dict(zip(("q", "k", "v", "key_idx", "o_cache"), tensors))
    return {n: by_name[n].numpy() for n in names}


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("opset", [18, 23])
@pytest.mark.parametrize("op", sorted(SPECS))
def test_export_runs_in_onnxruntime_and_reference(op, opset):
    tensors = _inputs()
    module = OneOp(op).eval()
    model = export_model(module, tensors, opset=opset)

    onnx.checker.check_model(model, full_check=True)
    nodes = [n for n in model.graph.node if n.domain == NAMESPACE]
    assert [n.op_type for n in nodes] == [op]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs == {**EXPECTED_ATTRS[op], "plugin_namespace": NAMESPACE.encode()}
    assert op in {f.name for f in model.functions if f.domain == NAMESPACE}

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = [tuple(d.dim_value for d in o.type.tensor_type.shape.dim) for o in inferred.graph.output]
    assert shapes == EXPECTED_OUTPUTS[op]

    want = _as_tuple(module(*tensors))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = _feeds([i.name for i in session.get_inputs()], tensors)
    for got, ref in zip(session.run(None, feeds), want):
        assert got.dtype == ref.numpy().dtype
        np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-5)
    for got, ref in zip(ReferenceEvaluator(model).run(None, feeds), want):
        np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-5)


def test_csla_body_gathers_only_the_listed_blocks():
    """Query blocks listing different numbers of key blocks (padded rows in kv_indices) and a partial last key block:
    the gathered ONNX body equals the reference (dense scores under the block mask), in onnxruntime."""
    mask = torch.zeros(LQ, LK, dtype=torch.bool)
    mask[0:8, 0] = True  # query block 0: key block 0 only
    mask[8:16, 40] = True  # query block 1: key blocks 0 and 2 (the partial one: keys 32..44)
    mask[8:16, 3] = True
    mask[16:, :] = True  # the last (partial) query block: every key block
    module = OneOp("CSLAAttention").eval()
    module.layout = block_layout_from_mask(mask, 8, 16)
    assert module.layout.kv_num_blocks.tolist() == [1, 2, 3]
    tensors = _inputs(seed=3)
    model = export_model(module, tensors)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, _feeds([i.name for i in session.get_inputs()], tensors))[0]
    np.testing.assert_allclose(got, module(*tensors).numpy(), rtol=0, atol=1e-5)


def test_decide_with_sinks_exports_and_matches_the_reference():
    """HART's CS4A: the first sink_len keys lead every key set and never enter the top-k, in the ONNX body too."""
    tensors = _inputs(seed=3)
    module = OneOp("CS4ADecide", sink_len=7).eval()
    model = export_model(module, tensors)
    node = next(n for n in model.graph.node if n.domain == NAMESPACE)
    assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["sink_len"] == 7
    want = module(*tensors)
    assert (want[1] >= 7).all()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = _feeds([i.name for i in session.get_inputs()], tensors)
    for got, ref in zip(session.run(None, feeds), want):
        np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-5)
    for got, ref in zip(ReferenceEvaluator(model).run(None, feeds), want):
        np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-5)


def test_csla_layout_is_constant_and_fp16_body_matches_reference():
    q, k, v, key_idx, o_cache = _inputs(torch.float16)
    module = OneOp("CSLAAttention").eval()
    model = export_model(module, (q, k, v, key_idx, o_cache))
    node = next(n for n in model.graph.node if n.domain == NAMESPACE)
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    # the block lists are constant int32 initializers (TensorRT keeps them on the device), not graph inputs
    np.testing.assert_array_equal(initializers[node.input[3]], module.layout.kv_num_blocks.numpy())
    np.testing.assert_array_equal(initializers[node.input[4]], module.layout.kv_indices.numpy())
    assert initializers[node.input[4]].dtype == np.int32
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, _feeds([i.name for i in session.get_inputs()], (q, k, v, key_idx, o_cache)))[0]
    want = csla_attention_ref(q, k, v, module.layout)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want.float().numpy(), rtol=0, atol=2e-3)


def test_torch_ops_equal_the_reference_ops():
    q, k, v, key_idx, o_cache = _inputs()
    ref, ops = get_sparse_ops("reference"), sparse_ops()
    layout = _layout()
    torch.testing.assert_close(ops.csla(q, k, v, layout), ref.csla(q, k, v, layout), rtol=0, atol=0)
    torch.testing.assert_close(ops.cs4a(q, k, v, key_idx, GROUP, o_cache), ref.cs4a(q, k, v, key_idx, GROUP, o_cache),
                               rtol=0, atol=0)
    for got, want in zip(ops.cs4a_decide(q, k, v, GROUP, TOPK), ref.cs4a_decide(q, k, v, GROUP, TOPK)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors():
    q, k, v, key_idx, _ = _inputs()
    layout = _layout()
    with pytest.raises(ValueError, match="one entry per query block"):
        torch.ops.sparvar.csla_attention(q, k, v, layout.kv_num_blocks[:-1], layout.kv_indices[:-1], 8, 16)
    with pytest.raises(ValueError, match="one row per query group"):
        torch.ops.sparvar.cs4a_attention(q, k, v, key_idx[:, :, :2], None, GROUP)
    with pytest.raises(TypeError, match="must be int32"):
        torch.ops.sparvar.cs4a_attention(q, k, v, key_idx.long(), None, GROUP)
    with pytest.raises(ValueError, match="must be positive"):
        torch.ops.sparvar.cs4a_decide(q, k, v, 0, TOPK, 0)
    with pytest.raises(ValueError, match="exceeds"):
        torch.ops.sparvar.cs4a_decide(q, k, v, GROUP, LK + 1, 0)
    with pytest.raises(ValueError, match="exceeds"):
        torch.ops.sparvar.cs4a_decide(q, k, v, GROUP, TOPK, LK - TOPK + 1)
    with pytest.raises(ValueError, match=">= 0"):
        torch.ops.sparvar.cs4a_decide(q, k, v, GROUP, TOPK, -1)
    token_layout = block_layout_from_mask(layout.to_dense(), 8, 16, granularity="token")
    with pytest.raises(ValueError, match="block-granular"):
        sparse_ops().csla(q, k, v, token_layout)
    with pytest.raises(ValueError, match="flavour"):
        translation_table("tensorrt")


def test_plugin_flavour_has_nodes_without_bodies_and_stripping_matches():
    tensors = _inputs()
    plugin = export_model(OneOp("CS4ADecide").eval(), tensors, flavour="plugin")
    assert [n.op_type for n in plugin.graph.node if n.domain == NAMESPACE] == ["CS4ADecide"]
    assert not [f for f in plugin.functions if f.domain == NAMESPACE]
    with_bodies = attach_reference_functions(plugin)
    assert {f.name for f in with_bodies.functions} == {"CS4ADecide", "CS4AGatheredAttention"}
    assert not strip_reference_functions(with_bodies).functions
    assert FLAVOURS == ("reference", "plugin")


def test_export_plan_matches_the_reference_plan():
    from sparvar.schedule import get_schedule
    from sparvar.sparse import SparVARPlan, default_policy

    schedule = get_schedule(256)
    policy = default_policy("infinity-tiny", schedule)
    plan, ref = export_plan(policy, schedule, policy.num_layers), SparVARPlan(policy, schedule, policy.num_layers)
    scale = policy.decision_scale
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, schedule.lengths[scale], 8, generator=g)
    k, v = (torch.randn(2, 2, schedule.kv_len(scale), 8, generator=g) for _ in range(2))
    for layer in (0, policy.num_layers - 1):  # a CS4A decision layer and a CSLA layer
        torch.testing.assert_close(plan.attend(q, k, v, layer=layer, scale=scale),
                                   ref.attend(q, k, v, layer=layer, scale=scale), rtol=0, atol=0)
    assert export_plan(None, schedule, policy.num_layers) is None
