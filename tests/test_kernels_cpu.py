"""CPU checks of sparvar.kernels: input validation, the reference functions, the fake kernels, and (when triton is
installed) the kernels themselves under Triton's CPU interpreter on tiny fp16 inputs."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sparvar.kernels as kernels
from sparvar.csla import block_layout_from_mask
from sparvar.kernels.csla import check_layout_values
from sparvar.kernels.cs4a import check_key_values, query_tile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16 = torch.bfloat16


def qkv(b=1, h=2, q_len=40, kv_len=70, d=64, dtype=BF16):
    return (torch.randn(b, h, q_len, d, dtype=dtype), torch.randn(b, h, kv_len, d, dtype=dtype),
            torch.randn(b, h, kv_len, d, dtype=dtype))


def layout_tensors(q_len=40, kv_len=70, bm=16, bn=16):
    nq, nk = -(-q_len // bm), -(-kv_len // bn)
    blocks = torch.rand(nq, nk) < 0.4
    blocks[:, 0] = True
    mask = blocks.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:q_len, :kv_len]
    layout = block_layout_from_mask(mask, bm, bn)
    return layout, layout.kv_num_blocks, layout.kv_indices


# ------------------------------------------------------------------------------------------------ validation
def test_csla_wrapper_rejects_bad_inputs():
    q, k, v = qkv()
    _, nb, idx = layout_tensors()
    call = kernels.csla_attention_blocks
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        call(q.float(), k.float(), v.float(), nb, idx, 16, 16)
    with pytest.raises(TypeError, match="share one dtype"):
        call(q, k.half(), v, nb, idx, 16, 16)
    with pytest.raises(ValueError, match="4-D"):
        call(q[0], k, v, nb, idx, 16, 16)
    with pytest.raises(ValueError, match="expected q"):
        call(q, k[:, :1], v, nb, idx, 16, 16)
    with pytest.raises(ValueError, match="head dim 96"):
        call(*qkv(d=96), nb, idx, 16, 16)
    with pytest.raises(TypeError, match="kv_indices must be int32"):
        call(q, k, v, nb, idx.long(), 16, 16)
    with pytest.raises(ValueError, match="block_n must be one of"):
        call(q, k, v, nb, idx, 16, 48)
    with pytest.raises(ValueError, match="need 3 rows"):
        call(q, k, v, nb[:2], idx[:2], 16, 16)
    with pytest.raises(ValueError, match="columns"):
        call(q, k, v, nb, torch.zeros(3, 9, dtype=torch.int32), 16, 16)
    with pytest.raises(ValueError, match="CUDA device"):
        call(q, k, v, nb, idx, 16, 16)
    with pytest.raises(TypeError, match="torch.Tensor"):
        call("q", k, v, nb, idx, 16, 16)


def test_csla_layout_object_checks():
    from sparvar.csla import csla_layout
    from sparvar.schedule import get_schedule

    schedule = get_schedule(256)
    token = csla_layout(schedule, 6, 3, (1, 3, 5), 16, 16, "token")
    q, k, v = qkv(q_len=token.q_len, kv_len=token.kv_len)
    with pytest.raises(ValueError, match="block-granular"):
        kernels.csla_attention(q, k, v, token)
    block = csla_layout(schedule, 6, 3, (1, 3, 5), 16, 16)
    with pytest.raises(ValueError, match="layout is for"):
        kernels.csla_attention(q[:, :, :-1], k, v, block)


def test_cs4a_wrappers_reject_bad_inputs():
    q, k, v = qkv(q_len=40, kv_len=70)
    key_idx = torch.zeros(1, 2, 3, 8, dtype=torch.int32)
    call = kernels.cs4a_attention_raw
    with pytest.raises(ValueError, match="multiple of 16"):
        call(q, k, v, key_idx, 20)
    with pytest.raises(ValueError, match=r"\(B, H, G, K\)"):
        call(q, k, v, key_idx[:, :, :2], 16)
    with pytest.raises(TypeError, match="key_idx must be int32"):
        call(q, k, v, key_idx.long(), 16)
    with pytest.raises(ValueError, match="without band_start"):
        call(q, k, v, key_idx, 16, band_len=8)
    with pytest.raises(ValueError, match="one start per group"):
        call(q, k, v, key_idx, 16, band_start=torch.zeros(2, dtype=torch.int32), band_len=8)
    with pytest.raises(ValueError, match="only 70"):
        call(q, k, v, torch.zeros(1, 2, 3, 80, dtype=torch.int32), 16)
    with pytest.raises(ValueError, match="o_cache"):
        call(q, k, v, key_idx, 16, q[:, :, :-1])
    with pytest.raises(ValueError, match="CUDA device"):
        call(q, k, v, key_idx, 16)
    with pytest.raises(ValueError, match="topk must be"):
        kernels.cs4a_decide_raw(q, k, v, 16, 71)
    with pytest.raises(ValueError, match="lse must be"):
        kernels.cs4a_column_sums(q, k, torch.zeros(1, 2, 39), 32)
    assert query_tile(192) == 64 and query_tile(16) == 16 and query_tile(256) == 128


def test_value_checks():
    _, nb, idx = layout_tensors()
    check_layout_values(nb, idx, 70, 16)
    with pytest.raises(ValueError, match="ascending"):
        check_layout_values(nb.clamp(min=2), torch.zeros_like(idx), 70, 16)
    with pytest.raises(ValueError, match="outside"):
        check_layout_values(nb, idx + 5, 70, 16)
    check_key_values(torch.tensor([[[[0, 69]]]], dtype=torch.int32), 70)
    with pytest.raises(ValueError, match="leave the KV cache"):
        check_key_values(torch.zeros(1, 1, 1, 1, dtype=torch.int32), 70, torch.tensor([60], dtype=torch.int32), 16)


def test_query_block_order_is_heaviest_first():
    order = kernels.query_block_order(torch.tensor([3, 7, 1, 7], dtype=torch.int32))
    assert order.dtype == torch.int32 and order.tolist() == [1, 3, 0, 2]


# ------------------------------------------------------------------------------------------------ references
def brute_force_attention(q, k, v, allowed):
    """Per (batch, head, query): float64 softmax over the allowed keys, one query at a time."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                keys = allowed(b, h, i)
                s = k[b, h, keys].double() @ q[b, h, i].double()
                out[b, h, i] = torch.softmax(s, 0) @ v[b, h, keys].double()
    return out


def test_reference_csla_attention_is_block_granular_attention():
    torch.manual_seed(0)
    q, k, v = qkv(q_len=37, kv_len=50, d=64, dtype=torch.float32)
    layout, nb, idx = layout_tensors(37, 50, 16, 16)
    blocks = layout.block_mask()
    out = kernels.reference_csla_attention(q, k, v, nb, idx, 16, 16, scale=0.5)

    def allowed(b, h, i):
        return torch.tensor([j for j in range(50) if blocks[i // 16, j // 16]])

    ref = brute_force_attention(q * 0.5, k, v, allowed)
    assert (out.double() - ref).abs().max() < 1e-5


def test_reference_cs4a_attention_with_band():
    torch.manual_seed(0)
    q, k, v = qkv(b=1, h=2, q_len=40, kv_len=90, d=64, dtype=torch.float32)
    key_idx = torch.rand(1, 2, 3, 60).topk(10, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    band_start = torch.tensor([60, 65, 70], dtype=torch.int32)
    o_cache = torch.randn_like(q)
    out = kernels.reference_cs4a_attention(q, k, v, key_idx, 16, o_cache, band_start=band_start, band_len=12)

    def allowed(b, h, i):
        g = i // 16
        return torch.cat([key_idx[b, h, g].long(), torch.arange(int(band_start[g]), int(band_start[g]) + 12)])

    ref = brute_force_attention(q, k, v, allowed) + o_cache.double()
    assert (out.double() - ref).abs().max() < 1e-5


def test_reference_column_sums():
    torch.manual_seed(0)
    q, k, _ = qkv(b=1, h=2, q_len=40, kv_len=30, d=64, dtype=torch.float32)
    sums = kernels.reference_column_sums(q, k, 16)
    assert sums.shape == (1, 2, 3, 30)
    # each softmax row sums to one: a group's column sums add up to its query count (16, 16, 8)
    assert torch.allclose(sums.sum(-1), torch.tensor([16.0, 16.0, 8.0]).expand(1, 2, 3), atol=1e-4)
    probs = (q.double() @ k.double().transpose(-1, -2)).softmax(-1)
    assert torch.allclose(sums[0, 1, 2].double(), probs[0, 1, 32:].sum(0), atol=1e-5)
    # the decision reference selects the top-k of exactly these sums
    _, selected, _ = kernels.reference_cs4a_decide(q, k, k, 16, 5)
    assert torch.equal(selected.long(), sums.topk(5, dim=-1).indices.sort(dim=-1).values)


# ------------------------------------------------------------------------------------------------ fake kernels
def test_fake_kernels_give_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = (torch.empty(2, 3, 40, 64, dtype=BF16), torch.empty(2, 3, 70, 64, dtype=BF16),
                   torch.empty(2, 3, 70, 64, dtype=BF16))
        nb, idx = torch.empty(3, dtype=torch.int32), torch.empty(3, 4, dtype=torch.int32)
        out = torch.ops.sparvar.triton_csla_attention(q, k, v, nb, idx, None, 16, 16, 1.0)
        assert out.shape == q.shape and out.dtype == BF16
        key_idx = torch.empty(2, 3, 3, 8, dtype=torch.int32)
        out = torch.ops.sparvar.triton_cs4a_attention(q, k, v, key_idx, None, None, 16, 0, 1.0)
        assert out.shape == q.shape
        out, selected, cache = torch.ops.sparvar.triton_cs4a_decide(q, k, v, 16, 20, 1.0)
        assert out.shape == q.shape and cache.shape == q.shape
        assert selected.shape == (2, 3, 3, 20) and selected.dtype == torch.int32


# ------------------------------------------------------------------------------------------------ interpreter
INTERPRETER_SCRIPT = textwrap.dedent('''
    import torch
    import triton.runtime.interpreter as interp

    # numpy >= 2.4 refuses int() of a 1-element array, which the interpreter does for loop bounds
    _patch = interp._patch_lang_tensor
    def _patched(tensor, scope):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    interp._patch_lang_tensor = _patched

    from sparvar.attention import reference_attention
    from sparvar.csla import block_layout_from_mask
    import sparvar.kernels as K

    torch.manual_seed(0)
    dt = torch.float16  # the interpreter mis-handles bf16 dots
    worst = 0.0
    def err(a, b):
        global worst
        e = (a.float() - b.float()).abs().max().item()
        worst = max(worst, e)
    for bm, bn, lq, lk, d in [(32, 32, 70, 100, 64), (16, 32, 40, 64, 64), (64, 32, 64, 130, 128)]:
        q = torch.randn(1, 2, lq, d, dtype=dt) * d ** -0.5
        k, v = (torch.randn(1, 2, lk + 5, d, dtype=dt)[:, :, :lk] for _ in range(2))
        nq, nk = -(-lq // bm), -(-lk // bn)
        blocks = torch.rand(nq, nk) < 0.4
        blocks[torch.arange(nq), torch.randint(0, nk, (nq,))] = True
        blocks[0, -1] = True
        lay = block_layout_from_mask(blocks.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:lq, :lk], bm, bn)
        order = K.query_block_order(lay.kv_num_blocks)
        out = K.csla_attention_blocks(q, k, v, lay.kv_num_blocks, lay.kv_indices, bm, bn, q_order=order)
        err(out, reference_attention(q, k, v, mask=lay.to_dense()))
        out, lse = K.dense_attention(q, k, v, block_m=bm, block_n=bn, return_lse=True)
        err(out, reference_attention(q, k, v))
        err(lse, torch.logsumexp(q.float() @ k.float().transpose(-1, -2), -1))
    for gs, lq, lk, d, nkeys, band in [(32, 70, 200, 64, 40, 0), (16, 40, 150, 64, 24, 20)]:
        q = torch.randn(2, 2, lq, d, dtype=dt) * d ** -0.5
        k, v = torch.randn(2, 2, lk, d, dtype=dt), torch.randn(2, 2, lk, d, dtype=dt)
        groups = -(-lq // gs)
        key_idx = torch.rand(2, 2, groups, lk - band - 5).topk(nkeys, -1).indices.sort(-1).values.to(torch.int32)
        band_start = torch.randint(lk - band - 5, lk - band + 1, (groups,), dtype=torch.int32) if band else None
        o_cache = torch.randn(2, 2, lq, d, dtype=dt)
        out = K.cs4a_attention_raw(q, k, v, key_idx, gs, o_cache, band_start=band_start, band_len=band)
        err(out, K.reference_cs4a_attention(q, k, v, key_idx, gs, o_cache, band_start=band_start, band_len=band))
        out, selected, cache = K.cs4a_decide_raw(q, k, v, gs, 24)
        ref_out, ref_selected, _ = K.reference_cs4a_decide(q, k, v, gs, 24)
        err(out, ref_out)
        assert torch.equal(selected, ref_selected), "selection differs from the reference"
        err(cache, ref_out.float() - K.reference_cs4a_attention(q, k, v, selected, gs).float())
    print("WORST", worst)
''')


def test_kernels_under_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = float(proc.stdout.split("WORST")[-1])
    assert worst < 5e-3, f"kernels under the interpreter differ from the references by {worst}"
