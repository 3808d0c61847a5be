import dataclasses
import math

import pytest
import torch

from sparvar.config import get_config
from sparvar.model import ConcatKV, build_model
from sparvar.schedule import get_schedule
from sparvar.hart.model import HART, apply_rope, rope_tables

TINY = get_config("hart-tiny")
BIG = get_config("hart-0.7b")


def run_steps(model, text, schedule, codes, num_scales=None):
    """Scale-by-scale generation-style pass with a KVCache; returns per-scale (logits, hidden) and the inputs."""
    ropes = rope_tables(schedule, model.cfg.head_dim, text.positions)
    cache = model.new_cache(text.batch, schedule)
    logits, hidden, inputs = [], [], []
    for scale in range(num_scales or schedule.num_scales):
        cache.offset = schedule.offsets[scale]
        x = model.scale_input(scale, codes[scale], text)
        out, h = model.step(x, scale, text, cache, ropes[scale], return_hidden=True)
        logits.append(out), hidden.append(h), inputs.append(x)
    return logits, hidden, inputs


def random_codes(cfg, schedule, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [None] + [torch.randn(batch, n, cfg.latent_dim, generator=g) for n in schedule.lengths[1:]]


def tiny_text(model, lengths=(5, 16), seed=1, cfg_guidance=True):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(len(lengths), TINY.text_len, TINY.text_dim, generator=g)
    return model.encode_text(features, torch.tensor(lengths), cfg_guidance)


# ------------------------------------------------------------------------------------------------ schedule
def test_hart_schedule_text_prefix_replaces_the_1x1_scale():
    s = get_schedule(1024, model="hart-0.7b")
    assert s.grids == tuple((pn, pn) for pn in BIG.patch_nums) and s.num_scales == 14
    assert s.lengths[0] == 300 and s.lengths[1:] == tuple(pn * pn for pn in BIG.patch_nums[1:])
    # KV blocks [300 text | 2^2 | ... | 64^2] (HART.md section 5); the 1x1 token never enters the KV
    assert s.offsets == (0, 300, 304, 313, 329, 354, 403, 484, 628, 884, 1325, 2054, 3350, 5654, 9750)
    assert s.total_tokens == s.kv_len(13) == 300 + sum(pn * pn for pn in BIG.patch_nums) - 1 == 9750
    assert s.image_size == (1024, 1024) and s.rope_grid == (64, 64)
    with pytest.raises(ValueError, match="rope_tables"):  # Infinity's rounded positions would be silently wrong
        s.rope_positions(3)
    tiny = get_schedule(256, model="hart-tiny")
    assert tiny.lengths[0] == TINY.text_len and tiny.image_size == (256, 256)
    # Infinity schedules are unchanged: scale 0 is its 1x1 grid
    inf = get_schedule(1024)
    assert inf.prefix_len is None and inf.lengths[0] == 1 and inf.total_tokens == 10521


@pytest.mark.parametrize("resolution,aspect", [(512, "1:1"), (256, "1:1"), (1024, "16:9")])
def test_hart_schedule_refuses_other_geometries(resolution, aspect):
    with pytest.raises(ValueError, match="hart-0.7b"):
        get_schedule(resolution, aspect, model="hart-0.7b")


def test_get_config_knows_hart_and_lists_all_models():
    assert get_config("hart-0.7b").family == "hart"
    with pytest.raises(ValueError) as e:
        get_config("hart-9b")
    assert "hart-0.7b" in str(e.value) and "infinity-2b" in str(e.value)


# ------------------------------------------------------------------------------------------------ RoPE
def direct_rope(x, pos_fn, head_dim, base=10000.0):
    """x (n, D) -> rotated (n, D), straight from the official formula, one (i, i + D/2) pair at a time.

    pos_fn(t) -> (a, b): the two positions of token t whose angles act on dims i and i + D/2 (text: (p, p) with
    f_i = base^(-2i/D); image: (row, col) with g = base^(-4 (i mod D/4)/D)).
    """
    out = x.double().clone()
    half = head_dim // 2
    for t in range(x.shape[0]):
        a, b, two_d = pos_fn(t)
        for i in range(half):
            f = base ** (-4 * (i % (head_dim // 4)) / head_dim) if two_d else base ** (-2 * i / head_dim)
            lo, hi = x[t, i].item(), x[t, i + half].item()
            out[t, i] = lo * math.cos(a * f) - hi * math.sin(a * f)
            out[t, i + half] = hi * math.cos(b * f) + lo * math.sin(b * f)
    return out


def test_rope_matches_the_official_formula_per_batch_row():
    """hart-0.7b geometry: text rows of different lengths, fractional image positions (64/3, 64/7), CFG rows."""
    head_dim = BIG.head_dim
    schedule = get_schedule(1024, model="hart-0.7b")
    lengths = torch.tensor([7, 300])
    mask = torch.arange(300)[None] < lengths[:, None]
    positions = torch.cat([mask.long().cumsum(1) - 1, torch.zeros(2, 300, dtype=torch.long)])  # + uncond rows
    tables = rope_tables(schedule, head_dim, positions)
    g = torch.Generator().manual_seed(0)
    for row, text_last in ((0, 6), (1, 299), (2, 0)):
        x = torch.randn(1, 1, 300, head_dim, generator=g)
        got = apply_rope(x.expand(4, 1, -1, -1).contiguous(), tables[0])[row, 0]
        p = positions[row]
        want = direct_rope(x[0, 0, ::37], lambda t: (p[::37][t].item(),) * 2 + (False,), head_dim)
        torch.testing.assert_close(got[::37].double(), want, atol=2e-5, rtol=0)
        for scale in (2, 6, 13):  # pn = 3, 9, 64
            pn = BIG.patch_nums[scale]
            x = torch.randn(1, 1, pn * pn, head_dim, generator=g)
            got = apply_rope(x.expand(4, 1, -1, -1).contiguous(), tables[scale])[row, 0]
            tokens = list(range(0, pn * pn, max(1, pn * pn // 40)))

            def pos(t, pn=pn):
                r, c = divmod(tokens[t], pn)
                return r * 64 / pn + text_last, c * 64 / pn + text_last, True

            want = direct_rope(x[0, 0, tokens], pos, head_dim)
            torch.testing.assert_close(got[tokens].double(), want, atol=5e-5, rtol=0)


def test_rope_is_not_infinity_rope():
    """HART's 2-D RoPE pairs a row angle with a column angle (not a rotation), and depends on the text length."""
    schedule = get_schedule(1024, model="hart-0.7b")
    D = BIG.head_dim
    positions = torch.stack([torch.arange(300).clamp_max(9), torch.arange(300).clamp_max(4), torch.zeros(300, dtype=torch.long)])
    tables = rope_tables(schedule, D, positions)
    pn = 64
    x = torch.zeros(3, 1, pn * pn, D)
    x[..., 0] = 1.0  # only dim 0: its partner dim D/2 gets sin(col angle), itself cos(row angle)
    y = apply_rope(x, tables[13])
    norms = y[0, 0].norm(dim=-1)
    diag = torch.arange(pn) * (pn + 1)  # row == col: cos^2 + sin^2 of one angle
    torch.testing.assert_close(norms[diag], torch.ones(pn))
    off = torch.tensor([1 * pn + 7, 30 * pn + 2])  # row != col: the norm changes (Infinity's rotation keeps it)
    assert ((norms[off] - 1).abs() > 1e-2).all()
    # image positions start after each row's own last text position: rows with 10 and 5 text tokens differ,
    # and the uncond row (positions all 0) equals a 1-token prompt
    assert not torch.allclose(tables[5][:, 0], tables[5][:, 1])
    one_token = rope_tables(schedule, D, torch.zeros(1, 300, dtype=torch.long))
    torch.testing.assert_close(tables[5][:, 2], one_token[5][:, 0])
    # unlike Infinity (round-half-even to integer grid positions), 3x3 positions are fractional: 64/3
    cos_row1 = tables[2][0, 2, 3, 0].item()  # uncond row, token (1, 0) of the 3x3 grid, dim 0 (f = 1)
    assert abs(cos_row1 - math.cos(64 / 3)) < 1e-5 and abs(cos_row1 - math.cos(21)) > 1e-2


# ------------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("variant", ["official", "per_block_adaln_l2_norm"])
def test_cache_steps_equal_full_forward(variant):
    cfg = TINY if variant == "official" else dataclasses.replace(TINY, disable_aln=False, attn_l2_norm=True)
    model = build_model(cfg, seed=0)
    assert isinstance(model, HART)
    schedule = get_schedule(256, model="hart-tiny")
    with torch.no_grad():
        text = tiny_text(model, lengths=(5, 16))  # CFG: 4 rows, different text lengths
        codes = random_codes(cfg, schedule, 2)
        logits, hidden, inputs = run_steps(model, text, schedule, codes)
        full_logits, full_hidden = model.forward_all_scales(inputs, text, schedule, return_hidden=True)
    assert logits[0].shape == (4, 1, cfg.vocab_size)
    for scale, (a, b, ha, hb) in enumerate(zip(logits, full_logits, hidden, full_hidden)):
        assert a.shape == (4, schedule.lengths[scale] if scale else 1, cfg.vocab_size)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(ha, hb, atol=2e-5, rtol=1e-5)
    assert logits[-1].std() > 1e-3  # not a degenerate constant output
    assert not torch.allclose(logits[-1][0], logits[-1][2], atol=1e-4)  # cond and uncond rows differ


@pytest.mark.parametrize("variant", ["official", "per_block_adaln"])
def test_blocks_fused_across_boundaries_equal_the_blocks_one_by_one(variant):
    """run_blocks computes a pre-norm block's input norm inside the previous block's last op; the logits equal the
    blocks written out one at a time (norm, attention, residual + norm, SwiGLU MLP, residual), bit for bit."""
    from sparvar.hart import model as HM

    cfg = TINY if variant == "official" else dataclasses.replace(TINY, disable_aln=False)
    model = build_model(cfg, seed=3)
    g = torch.Generator().manual_seed(4)
    for blk in model.blocks:  # distinct norm weights (they start at 1): a block must use its own
        blk.ln_wo_grad.weight.data.copy_(torch.rand(cfg.width, generator=g) + 0.5)
    schedule = get_schedule(256, model="hart-tiny")
    scale = 2
    with torch.no_grad():
        text = tiny_text(model)
        tokens = model.scale_input(scale, random_codes(cfg, schedule, 2)[scale], text)
        rope = rope_tables(schedule, cfg.head_dim, text.positions)[scale]
        x0 = tokens + model.lvl_embed.weight[scale]
        cond = text.cond.to(x0.dtype)

        def cache():
            c = model.new_cache(text.batch, schedule)
            c.offset = schedule.offsets[scale]
            c.k.normal_(generator=torch.Generator().manual_seed(0))
            c.v.copy_(c.k)
            return c

        fused = HM.run_blocks(model.blocks, x0, cond, rope, cache(), scale)
        kv, x = cache(), x0
        for layer, blk in enumerate(model.blocks):
            if variant == "official":
                w, eps = blk.ln_wo_grad.weight, blk.ln_wo_grad.eps
                x = x + blk.attn(HM.rms_norm(x, w, eps), rope, kv, layer, scale)
                x = x + blk.ffn(HM.rms_norm(x, w, eps))
            else:
                x = blk(x, None, None, cond, rope, kv, layer, scale)[0]  # an AdaLN block norms its own input
    assert torch.equal(fused, x)


def test_first_scale_logits_come_from_the_last_text_slot():
    from sparvar.hart import model as HM

    model = build_model(TINY, seed=0)
    schedule = get_schedule(256, model="hart-tiny")
    with torch.no_grad():
        text = tiny_text(model, lengths=(3, 9))
        logits, hidden, _ = run_steps(model, text, schedule, random_codes(TINY, schedule, 2), num_scales=1)
        # every prefix slot, bidirectionally, by calling the blocks directly
        x = text.prefix + model.lvl_embed.weight[0]
        ropes = rope_tables(schedule, TINY.head_dim, text.positions)
        empty = [x.new_zeros(4, TINY.heads, 0, TINY.head_dim)] * TINY.depth
        kv = ConcatKV(empty, empty)
        x = HM.run_blocks(model.blocks, x, text.cond, ropes[0], kv, 0)
        per_slot = model.head(model.head_nm(x, text.cond))  # (B, L, V)
    torch.testing.assert_close(hidden[0][:, 0], x[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[0][:, 0], per_slot[:, -1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[0][:, 0], per_slot[:, 0], atol=1e-3)
    assert kv.new_k[0].shape[2] == TINY.text_len  # the whole prefix enters the KV, no extra 1x1 slot


def test_frozen_qkv_bias_gives_the_same_attention_without_its_cat():
    """The GPU engine looks the qkv bias up (sparvar.model.frozen_weight_functions) instead of concatenating it in
    every block of every step."""
    from sparvar.hart.model import Pointwise
    from sparvar.model import frozen_weight_functions, qkv_bias
    from tests.test_cuda_engine import CountOps

    model = build_model(TINY, seed=0)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_bias.normal_()
            block.attn.v_bias.normal_()
    frozen = Pointwise(**frozen_weight_functions([b.attn for b in model.blocks], (qkv_bias,)))
    x = torch.randn(2, 9, TINY.width)
    rope = rope_tables(get_schedule(256, model="hart-tiny"), TINY.head_dim, torch.arange(TINY.text_len).repeat(2, 1))[2]
    empty = [x.new_zeros(2, TINY.heads, 0, TINY.head_dim)]
    outs, cats = [], []
    with torch.no_grad():
        for pw in (Pointwise(), frozen):
            attn = model.blocks[1].attn
            with CountOps() as count:
                outs.append(attn(x, rope, ConcatKV(empty, empty), 0, 2, pw=pw))
            cats.append(count.ops["cat"])
    assert torch.equal(outs[0], outs[1])
    assert cats[0] - cats[1] == 1


def test_attention_uses_the_official_softmax_scale():
    model = build_model(TINY, seed=0)
    attn = model.blocks[0].attn
    x = torch.randn(2, 9, TINY.width)
    positions = torch.arange(TINY.text_len).repeat(2, 1)
    rope = rope_tables(get_schedule(256, model="hart-tiny"), TINY.head_dim, positions)[2]
    empty = [x.new_zeros(2, TINY.heads, 0, TINY.head_dim)]
    with torch.no_grad():
        out = attn(x, rope, ConcatKV(empty, empty), 0, 2)
        q, k, v = (x @ attn.qkv_proj.weight.T).split(TINY.width, dim=-1)
        q, v = q + attn.q_bias, v + attn.v_bias
        q, k, v = (t.view(2, 9, TINY.heads, -1).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        w = (q @ k.transpose(-1, -2) * (0.25 / math.sqrt(TINY.head_dim))).softmax(-1)
        want = attn.proj((w @ v).transpose(1, 2).reshape(2, 9, TINY.width))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_encode_text_uncond_rows_positions_and_pooling():
    model = build_model(TINY, seed=0)
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, TINY.text_len, TINY.text_dim, generator=g)
    with torch.no_grad():
        text = model.encode_text(features, torch.tensor([4, 16]))
        left_padded = torch.arange(TINY.text_len)[None] >= torch.tensor([[12], [0]])  # 4 and 16 real tokens
        text_mask = model.encode_text(features, left_padded)
        # official: uncond = zero context (so context_embed's bias in every slot), positions all 0
        torch.testing.assert_close(text.prefix[2:], model.context_embed.bias.expand(2, TINY.text_len, -1))
        assert (text.positions[2:] == 0).all()
        assert text.positions[0].tolist() == [0, 1, 2, 3] + [3] * 12 and text.positions[1].tolist() == list(range(16))
        assert text_mask.positions[0].tolist() == [-1] * 12 + [0, 1, 2, 3] and text_mask.positions[0, -1] == 3
        # the head's condition max-pools every slot, pads included (official AdaLNBeforeHead has no mask)
        torch.testing.assert_close(text.cond, model.context_embed(torch.cat([features, 0 * features])).amax(1))
        bumped = features.clone()
        bumped[0, 10] += 100.0  # a pad slot of the 4-token prompt
        assert not torch.allclose(model.encode_text(bumped, torch.tensor([4, 16])).cond[0], text.cond[0])
        single = model.encode_text(features, torch.tensor([4, 16]), cfg_guidance=False)
    assert single.batch == 2 and text.batch == 4
    with pytest.raises(ValueError, match="text features"):
        model.encode_text(features[:, :10], torch.tensor([4, 10]))
    with pytest.raises(ValueError, match="text mask"):
        model.encode_text(features, torch.ones(2, 10, dtype=torch.bool))


def test_diffusion_condition_is_decoder_norm_of_hidden_plus_code_embedding():
    model = build_model(TINY, seed=0)
    hidden = torch.randn(4, 5, TINY.width)
    codes = torch.randn(2, 5, TINY.latent_dim)
    with torch.no_grad():
        z = model.diffusion_condition(hidden, codes)
        emb = model.word_embed(codes).repeat(2, 1, 1)
        want = model.decoder_norm(hidden + emb)
    torch.testing.assert_close(z, want)
    assert z.shape == (4, 5, TINY.width)


def test_build_is_deterministic_and_meta_allocates_nothing():
    a, b, c = build_model(TINY, seed=3), build_model(TINY, seed=3), build_model(TINY, seed=4)
    for (k, x), (_, y), (_, z) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(x, y), k
    assert not torch.equal(a.blocks[0].attn.qkv_proj.weight, c.blocks[0].attn.qkv_proj.weight)
    assert (a.blocks[0].ln_wo_grad.weight == 1).all() and (a.blocks[0].attn.zero_k_bias == 0).all()
    meta = build_model(BIG, init="meta")
    assert meta.head.weight.is_meta and meta.head.weight.shape == (4096, 1536)
    half = build_model(TINY, dtype=torch.bfloat16, seed=3)
    assert half.blocks[0].attn.qkv_proj.weight.dtype == torch.bfloat16 and half.head.weight.dtype == torch.float32


def test_bf16_steps_track_fp32():
    schedule = get_schedule(256, model="hart-tiny")
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(TINY, dtype=dtype, seed=0)
        with torch.no_grad():
            logits, hidden, _ = run_steps(model, tiny_text(model), schedule, random_codes(TINY, schedule, 2))
        out[dtype] = logits
        assert logits[-1].dtype == torch.float32 and hidden[-1].dtype == dtype
    for a, b in zip(out[torch.float32], out[torch.bfloat16]):
        torch.testing.assert_close(b, a, atol=2e-2, rtol=0)
