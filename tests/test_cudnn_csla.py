"""CSLA through cuDNN's paged SDPA (sparvar/kernels/cudnn_csla.py): the page tables against the masked reference
on the CPU (through a torch emulation of paged attention), the checks that refuse what the call cannot take, the
KV cache's whole pages, and on a GPU with nvidia-cudnn-frontend the call itself against the reference, eager and
captured in a CUDA graph."""
from __future__ import annotations

import pytest
import torch

from sparvar.attention import reference_attention
from sparvar.kernels.cudnn_csla import (HAS_CUDNN_FRONTEND, check_paged_csla, emulate_paged, paged_tables,
                                        paged_views)
from sparvar.model import KVCache
from sparvar.schedule import get_schedule
from sparvar.sparse import default_policy


def tiny_layouts(tile):
    schedule = get_schedule(256, model="infinity-tiny")
    policy = default_policy("infinity-tiny", schedule, csla_block=tile)
    return [policy.csla_layout(schedule, s) for s in policy.sparse_scales]


def cache_views(b, h, layout, d, dtype=torch.float32, device="cpu"):
    """k, v as views [:, :, :kv_len] of caches allocated as KVCache does (whole pages), finite past kv_len (the
    engine's cache holds zeros or an earlier generation's values there)."""
    cache = KVCache(2, b, h, layout.kv_len + 5, d, dtype, device)
    cache.k.normal_()
    cache.v.normal_()
    return cache.k[1, :, :, :layout.kv_len], cache.v[1, :, :, :layout.kv_len], cache.k.shape[3]  # layer 1: an offset


@pytest.mark.parametrize("tile", [(16, 16), (16, 32), (32, 16)])
def test_paged_tables_compute_the_masked_reference(tile):
    b, h, d = 2, 3, 16
    checked = 0
    for layout in tiny_layouts(tile):
        if layout.q_len % layout.block_m:
            continue
        k, v, t = cache_views(b, h, layout, d)
        q = (torch.randn(b, layout.q_len, h, d) * d**-0.5).transpose(1, 2)
        views = paged_views(q, k, v, torch.empty(b, layout.q_len, h, d), layout, t)
        got = emulate_paged(views, paged_tables(layout, b, h, t))
        got = got.reshape(b, -1, h, layout.block_m, d).permute(0, 2, 1, 3, 4).reshape(b, h, layout.q_len, d)
        ref = reference_attention(q, k, v, mask=layout.to_dense())
        assert torch.allclose(got, ref, atol=1e-5), (layout.q_len, layout.kv_len, (got - ref).abs().max())
        checked += 1
    assert checked >= 2  # the tiny model's sparse scales (64, 144, 256 queries) hold whole blocks of 16


def test_partial_final_key_block_is_cut_at_kv_len():
    layout = tiny_layouts((16, 16))[0]  # 121 keys: the last 16-key block holds 9
    assert layout.kv_len % layout.block_n
    tables = paged_tables(layout, 2, 3, 128)
    last_block = layout.kv_len // layout.block_n
    for i in range(layout.num_q_blocks):
        n = int(layout.kv_num_blocks[i])
        blocks = layout.kv_indices[i, :n].tolist()
        expect = n * layout.block_n - (layout.block_n - layout.kv_len % layout.block_n) * (last_block in blocks)
        assert int(tables["seq_kv"][i]) == expect == int(tables["seq_kv"][layout.num_q_blocks + i])


def test_kv_cache_allocates_whole_pages_and_views_the_asked_length():
    cache = KVCache(2, 1, 2, 300, 8, torch.float32, "cpu")
    assert cache.k.shape[3] == 384 and cache.v.shape[3] == 384
    k_new, _, k_all, _ = cache.slot(1, 121)
    assert k_new.shape[2] == 121 and k_all.shape[2] == 121
    cache.offset = 290
    with pytest.raises(ValueError, match="holds 300 positions"):  # the page padding is not room for more
        cache.slot(0, 20)


def test_checks_name_what_the_paged_call_cannot_take():
    layout = tiny_layouts((16, 16))[1]  # 144 queries x 265 keys
    b, h, d = 2, 2, 16
    k, v, t = cache_views(b, h, layout, d, torch.bfloat16)
    q = torch.randn(b, layout.q_len, h, d, dtype=torch.bfloat16).transpose(1, 2)
    with pytest.raises(ValueError, match="CUDA device"):  # everything else is right: the device is what is named
        check_paged_csla("f", q, k, v, layout)
    with pytest.raises(ValueError, match="token-major"):
        check_paged_csla("f", q.contiguous(), k, v, layout)
    with pytest.raises(ValueError, match="whole blocks"):
        check_paged_csla("f", q, k, v, tiny_layouts((32, 16))[1])
    with pytest.raises(ValueError, match="multiple of"):  # a cache of 270 positions is not whole 16-key pages
        odd = torch.randn(b, h, 270, d, dtype=torch.bfloat16)[:, :, :layout.kv_len]
        check_paged_csla("f", q, odd, odd, layout)
    with pytest.raises(TypeError, match="bf16 or fp16"):
        check_paged_csla("f", q.float(), k.float(), v.float(), layout)
    with pytest.raises(ValueError, match="layout is for"):
        check_paged_csla("f", q, k[:, :, :-1], v[:, :, :-1], layout)
    token = default_policy("infinity-tiny", get_schedule(256, model="infinity-tiny"), csla_block=(16, 16),
                           csla_granularity="token").csla_layout(get_schedule(256, model="infinity-tiny"), 5)
    with pytest.raises(ValueError, match="block-granular"):
        check_paged_csla("f", q, k, v, token)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDNN_FRONTEND, reason="needs nvidia-cudnn-frontend (pip install nvidia-cudnn-frontend)")
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 128), (torch.float16, 64)])
def test_cudnn_csla_matches_the_reference_eager_and_captured(dtype, d):
    from sparvar.kernels.cudnn_csla import csla_attention_cudnn

    schedule = get_schedule(1024, model="infinity-2b")
    policy = default_policy("infinity-2b", schedule, csla_block=(128, 64))
    layout = policy.csla_layout(schedule, 11).to("cuda")  # 2,304 queries x 6,425 keys: a partial last key block
    b, h = 2, 3
    k, v, _ = cache_views(b, h, layout, d, dtype, "cuda")
    q = (torch.randn(b, layout.q_len, h, d, device="cuda", dtype=dtype) * d**-0.5).transpose(1, 2)
    ref = reference_attention(q, k, v, mask=layout.to_dense())
    out = csla_attention_cudnn(q, k, v, layout)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()  # token-major, as the Triton kernel writes
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert (out.float() - ref.float()).abs().max().item() <= tol
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        csla_attention_cudnn(q, k, v, layout)  # warm-up on the capturing stream, as the engine captures
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = csla_attention_cudnn(q, k, v, layout)
    q.copy_(q.flip(2))  # new inputs in the same memory: the replay must compute them
    graph.replay()
    torch.cuda.synchronize()
    ref = reference_attention(q, k, v, mask=layout.to_dense())
    assert (captured.float() - ref.float()).abs().max().item() <= tol
