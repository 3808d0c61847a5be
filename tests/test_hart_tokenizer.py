"""HART tokenizer, decode side: exportable resampling, the residual multi-scale quantizer, strict official-key loading."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparvar.checkpoint import CheckpointError
from sparvar.hart.config import HART_CONFIGS
from sparvar.hart.tokenizer import (_MATRICES, HartVQDecoder, build_hart_vq, load_hart_vq, phi_index, resample,
                                    resample_matrix)

HART = HART_CONFIGS["hart-0.7b"]
TINY = HART_CONFIGS["hart-tiny"]


def official_decode_keys(vq):
    """Decode-side keys of the official HARTAutoEncoder, written out from basic_vae.Decoder's module tree."""
    C, ch, mult, nrb = vq.z_channels, vq.ch, vq.ch_mult, vq.num_res_blocks
    keys = {"quantize.embedding.weight": (vq.vocab_size, C),
            "post_quant_conv.weight": (C, C, 3, 3), "post_quant_conv.bias": (C,)}
    for i in range(vq.share_quant_resi):
        keys.update({f"quantize.quant_resi.qresi_ls.{i}.weight": (C, C, 3, 3), f"quantize.quant_resi.qresi_ls.{i}.bias": (C,)})

    def norm(p, c):
        keys.update({p + ".weight": (c,), p + ".bias": (c,)})

    def conv(p, i, o, k):
        keys.update({p + ".weight": (o, i, k, k), p + ".bias": (o,)})

    def resnet(p, i, o):
        norm(p + ".norm1", i), conv(p + ".conv1", i, o, 3), norm(p + ".norm2", o), conv(p + ".conv2", o, o, 3)
        if i != o:
            conv(p + ".nin_shortcut", i, o, 1)

    def attn(p, c):
        norm(p + ".norm", c), conv(p + ".qkv", c, 3 * c, 1), conv(p + ".proj_out", c, c, 1)

    block_in = ch * mult[-1]
    conv("decoder.conv_in", C, block_in, 3)
    resnet("decoder.mid.block_1", block_in, block_in), attn("decoder.mid.attn_1", block_in)
    resnet("decoder.mid.block_2", block_in, block_in)
    for lvl in reversed(range(len(mult))):
        out = ch * mult[lvl]
        for b in range(nrb + 1):
            resnet(f"decoder.up.{lvl}.block.{b}", block_in, out)
            block_in = out
            if lvl == len(mult) - 1:
                attn(f"decoder.up.{lvl}.attn.{b}", out)
        if lvl != 0:
            conv(f"decoder.up.{lvl}.upsample.conv", out, out, 3)
    norm("decoder.norm_out", block_in), conv("decoder.conv_out", block_in, 3, 3)
    return keys


# --- resampling


@pytest.mark.parametrize("pn", HART.patch_nums)
def test_resample_matches_interpolate_on_official_shapes(pn):
    g = torch.Generator().manual_seed(pn)
    P = HART.patch_nums[-1]
    x = torch.randn(2, HART.vq.z_channels, pn, pn, generator=g)
    torch.testing.assert_close(resample(x, (P, P), "bicubic"), F.interpolate(x, size=(P, P), mode="bicubic"),
                               rtol=1e-5, atol=1e-5)
    f = torch.randn(2, HART.vq.z_channels, P, P, generator=g)
    torch.testing.assert_close(resample(f, (pn, pn), "area"), F.interpolate(f, size=(pn, pn), mode="area"),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resample(f, (pn, pn), "area"), F.adaptive_avg_pool2d(f, pn), rtol=1e-5, atol=1e-6)


def test_resample_non_square_and_matrix_properties():
    x = torch.randn(1, 3, 7, 11)
    torch.testing.assert_close(resample(x, (20, 13), "bicubic"), F.interpolate(x, size=(20, 13), mode="bicubic"),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resample(x, (3, 5), "area"), F.interpolate(x, size=(3, 5), mode="area"))
    for kind in ("bicubic", "area"):
        m = resample_matrix(kind, 64, 27, dtype=torch.float64)
        torch.testing.assert_close(m.sum(1), torch.ones(27, dtype=torch.float64))  # both preserve constants
    assert resample_matrix("area", 64, 27, dtype=torch.float64).min() >= 0
    assert resample_matrix("bicubic", 5, 64) is resample_matrix("bicubic", 5, 64)  # built once per size
    with pytest.raises(ValueError, match="kind"):
        resample(x, (4, 4), "bilinear")


# --- the quantizer's inference path


def test_phi_index_follows_official_ticks():
    for SN in (HART.num_scales, TINY.num_scales, 10):
        for K in (2, 3, 4, 6):
            # official PhiPartiallyShared.__getitem__, in numpy as there: at exact midpoints (SN = 10, si = 2,
            # K = 4) the float rounding of np.linspace decides, so a re-derived formula could differ
            ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)
            for si in range(SN):
                assert phi_index(si, SN, K) == np.argmin(np.abs(ticks - si / (SN - 1))).item()
    used = [phi_index(si, HART.num_scales, 4) for si in range(HART.num_scales)]
    assert used == sorted(used) and set(used) == {0, 1, 2, 3} and used[0] == 0 and used[-1] == 3
    with pytest.raises(ValueError):
        phi_index(14, 14, 4)


def direct_phi(model, si, SN, x):
    conv = model.quantize.quant_resi.qresi_ls[phi_index(si, SN, model.cfg.share_quant_resi)]
    r = model.cfg.quant_resi
    return x * (1 - r) + F.conv2d(x, conv.weight, conv.bias, padding=1) * r


@pytest.mark.parametrize("name", ["hart-tiny", "hart-0.7b-patch-nums"])
def test_per_scale_inputs_equal_direct_interpolate_loop(name):
    cfg = TINY
    patch_nums = HART.patch_nums if name == "hart-0.7b-patch-nums" else TINY.patch_nums
    model = build_hart_vq(cfg.vq, seed=1)
    g = torch.Generator().manual_seed(2)
    idx = [torch.randint(0, cfg.vq.vocab_size, (2, pn * pn), generator=g) for pn in patch_nums]
    residual = torch.randn(2, patch_nums[-1] ** 2, cfg.vq.z_channels, generator=g)
    SN, P, C = len(patch_nums), patch_nums[-1], cfg.vq.z_channels
    f_direct = torch.zeros(2, C, P, P)
    f_ours = torch.zeros(2, C, P, P)
    for si, pn in enumerate(patch_nums[:-1]):
        h = model.quantize.embedding.weight[idx[si]].transpose(1, 2).reshape(2, C, pn, pn)
        f_direct = f_direct + direct_phi(model, si, SN, F.interpolate(h, size=(P, P), mode="bicubic"))
        nxt_direct = F.interpolate(f_direct, size=(patch_nums[si + 1],) * 2, mode="area")
        f_ours, nxt = model.quantize.next_autoregressive_input(si, patch_nums, f_ours, model.quantize.embed(idx[si], pn))
        torch.testing.assert_close(nxt, nxt_direct, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f_ours, f_direct, rtol=1e-5, atol=1e-5)
    last = model.quantize.embedding.weight[idx[-1]] + residual  # (B, P*P, C): codes plus the continuous residual
    f_direct = f_direct + last.transpose(1, 2).reshape(2, C, P, P)  # no Phi at the last scale
    torch.testing.assert_close(model.indices_to_fhat(idx, patch_nums, residual), f_direct, rtol=1e-5, atol=1e-5)
    without = model.indices_to_fhat(idx, patch_nums)
    torch.testing.assert_close(without, f_direct - residual.transpose(1, 2).reshape(2, C, P, P), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="residual"):
        model.indices_to_fhat(idx, patch_nums, residual[:, :-1])
    with pytest.raises(ValueError, match="indices"):
        model.quantize.embed(idx[1], patch_nums[2])


# --- decoder


def test_hart_07b_decoder_keys_and_1024px_shape_on_meta():
    with torch.device("meta"):
        model = HartVQDecoder(HART.vq)
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert got == official_decode_keys(HART.vq)
        assert got["quantize.embedding.weight"] == (4096, 32)
        img = model.decode(torch.empty(1, 32, 64, 64))
    assert img.shape == (1, 3, 1024, 1024)


def test_tiny_real_decode():
    model = build_hart_vq(TINY.vq, seed=0)
    g = torch.Generator().manual_seed(0)
    P = TINY.patch_nums[-1]
    f = torch.randn(1, TINY.vq.z_channels, P, P, generator=g)
    img = model.decode(f)
    assert img.shape == (1, 3, P * TINY.vq.stride, P * TINY.vq.stride)
    assert torch.isfinite(img).all() and img.abs().max() <= 1 and img.std() > 0
    assert not torch.allclose(img, model.decode(f + 0.5))
    with pytest.raises(ValueError, match="f_hat"):
        model.decode(f[:, :-1])
    with pytest.raises(TypeError, match="dtype"):
        model.decode(f.double())


def test_half_decoder_has_the_official_autocast_precision():
    """The engines' decode: fp16 convolutions, channels-last, as the official inference's fp16 autocast; the quantizer
    (where f_hat accumulates) stays fp32. Against the fp32 decode it is as close as the autocast emulation is."""
    import copy

    full = build_hart_vq(TINY.vq, seed=0)
    g = torch.Generator().manual_seed(0)
    indices = [torch.randint(0, TINY.vq.vocab_size, (2, pn * pn), generator=g) for pn in TINY.patch_nums]
    f_hat = full.indices_to_fhat(indices, TINY.patch_nums)  # fp32, accumulated as generation does
    half = copy.deepcopy(full).half_decoder()
    assert half.decode_dtype == torch.float16 and full.decode_dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in half.quantize.parameters())
    assert all(p.dtype == torch.float16 for m in (half.post_quant_conv, half.decoder) for p in m.parameters())
    assert half.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = full.decode(f_hat)
        got = half.decode(f_hat)
        with torch.autocast("cpu", dtype=torch.float16):  # the official's precision, emulated on the fp32 modules
            official = full.decode(f_hat).float()
    assert got.dtype == torch.float16 and got.shape == want.shape and got.is_contiguous()
    err = (got.float() - want).abs()
    psnr = 10 * torch.log10(4 / err.square().mean())  # images in [-1, 1]
    assert err.max() > 0 and psnr > 50, f"PSNR {psnr:.1f} dB"
    assert err.max() < 2 * (official - want).abs().max() + 1e-3
    assert (got.float() - official).abs().max() < 0.05
    with pytest.raises(TypeError, match="quantizer's dtype torch.float32"):
        half.decode(f_hat.half())  # f_hat accumulates in fp32 and is cast on the way in
    with pytest.raises(ValueError, match="float16 or torch.bfloat16"):
        copy.deepcopy(full).half_decoder(torch.float64)


def test_config_errors():
    with pytest.raises(ValueError, match="share_quant_resi"):
        HartVQDecoder(dataclasses.replace(TINY.vq, share_quant_resi=1))
    with pytest.raises(ValueError, match="GroupNorm"):
        HartVQDecoder(dataclasses.replace(TINY.vq, ch=40))


# --- strict loading


def official_checkpoint(model):
    """A synthetic HF `tokenizer/` state dict: HARTAutoEncoderWithDisc keys, with the parts decoding drops."""
    vq = model.cfg
    sd = {"vae." + k: v.clone() for k, v in model.state_dict().items()}
    sd["vae.encoder.conv_in.weight"] = torch.randn(vq.ch, 3, 3, 3)
    sd["vae.encoder.mid.attn_1.qkv.weight"] = torch.randn(3 * vq.ch * 4, vq.ch * 4, 1, 1)
    sd["vae.quant_conv.weight"] = torch.randn(vq.z_channels, vq.z_channels, 3, 3)
    sd["vae.quant_conv.bias"] = torch.randn(vq.z_channels)
    sd["vae.quantize.ema_vocab_hit_SV"] = torch.zeros(10, vq.vocab_size)
    sd["disc.main.0.weight"] = torch.randn(4, 3, 4, 4)
    return sd


@pytest.mark.parametrize("ext", ["safetensors", "pth"])
def test_load_round_trip(tmp_path, ext):
    model = build_hart_vq(TINY.vq, seed=7)
    assert set(model.state_dict()) == set(official_decode_keys(TINY.vq))
    path = str(tmp_path / f"tokenizer.{ext}")
    sd = official_checkpoint(model)
    if ext == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, path)
    else:
        torch.save(sd, path)
    loaded = load_hart_vq(path, TINY.vq)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    f = torch.randn(1, TINY.vq.z_channels, 4, 4)
    torch.testing.assert_close(loaded.decode(f), model.decode(f), rtol=0, atol=0)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_load_bare_autoencoder_state_dict(tmp_path):
    model = build_hart_vq(TINY.vq, seed=8)
    sd = {k[len("vae."):]: v for k, v in official_checkpoint(model).items() if k.startswith("vae.")}
    torch.save(sd, tmp_path / "ae.pth")
    loaded = load_hart_vq(str(tmp_path / "ae.pth"), TINY.vq)
    assert torch.equal(loaded.quantize.embedding.weight, model.quantize.embedding.weight)


def test_load_strict_errors(tmp_path):
    model = build_hart_vq(TINY.vq, seed=9)
    path = str(tmp_path / "bad.pth")
    sd = official_checkpoint(model)
    del sd["vae.decoder.conv_out.bias"]
    del sd["vae.quantize.quant_resi.qresi_ls.3.weight"]
    sd["vae.decoder.up.0.block.0.conv1.weight"] = torch.zeros(1)
    sd["vae.decoder.extra.weight"] = torch.zeros(1)
    sd["stray.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_hart_vq(path, TINY.vq)
    msg = str(e.value)
    for key in ("vae.decoder.conv_out.bias", "vae.quantize.quant_resi.qresi_ls.3.weight",
                "vae.decoder.up.0.block.0.conv1.weight: checkpoint (1,)", "vae.decoder.extra.weight", "stray.weight"):
        assert key in msg, key
    assert "missing (2)" in msg and "unexpected (2)" in msg and "wrong shape (1)" in msg
    # the right keys for another size: every shape mismatch is named
    torch.save(official_checkpoint(model), path)
    with pytest.raises(CheckpointError, match="quantize.embedding.weight: checkpoint"):
        load_hart_vq(path, dataclasses.replace(TINY.vq, vocab_size=128))


def test_next_input_exports_to_onnx_as_matmuls():
    """The non-divisible resamplings (here 6 -> 16 bicubic, 16 -> 12 area) export and match onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    model = build_hart_vq(TINY.vq, seed=1)
    si, P = 4, TINY.patch_nums[-1]

    class NextInput(torch.nn.Module):
        def forward(self, f_hat, h):
            return model.quantize.next_autoregressive_input(si, TINY.patch_nums, f_hat, h)

    args = (torch.randn(1, TINY.vq.z_channels, P, P), torch.randn(1, TINY.vq.z_channels, TINY.patch_nums[si], TINY.patch_nums[si]))
    proto = torch.onnx.export(NextInput(), args, dynamo=True, verbose=False).model_proto
    assert all(type(m) is torch.Tensor for m in _MATRICES.values())  # tracing cached no fake tensors
    ops = {n.op_type for n in proto.graph.node}
    assert "MatMul" in ops and not ops & {"Resize", "AveragePool", "GlobalAveragePool"}, ops
    sess = ort.InferenceSession(proto.SerializeToString())
    got = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})
    for o, r in zip(got, NextInput()(*args)):  # the eager call after tracing: the matrix cache holds no fake tensors
        np.testing.assert_allclose(o, r.numpy(), rtol=1e-5, atol=1e-5)


def test_tokenizer_keeps_nn_module_half():
    """HartVQDecoder's own attributes leave nn.Module's API intact (a `half` property once shadowed Module.half())."""
    model = build_hart_vq(TINY.vq, seed=0).half()
    assert model.decode_dtype == torch.float16 and model.quantize.embedding.weight.dtype == torch.float16
