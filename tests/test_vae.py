"""BSQ tokenizer decode side: official key layout, strict loading, decode, codes and token layout."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from sparvar.checkpoint import CheckpointError
from sparvar.config import VAE_D32, VAE_D56, VAE_TINY, VAEConfig
from sparvar.vae import (BSQDecoder, bits_to_codes, build_vae, check_vae_config, decoder_key_shapes, latent_to_tokens,
                         load_vae, select_decoder_state, split_group_norm, tokens_to_latent)


# --- the official layout, written out from infinity/models/bsq_vae/flux_vqgan.py (Decoder, ResnetBlock,
# Upsample, Normalize, conv.Conv) independently of sparvar.vae: every Conv wraps nn.Conv2d as `.conv`,
# every Normalize wraps nn.GroupNorm as `.norm`; up[i] has num_res_blocks + 1 blocks, and an upsample
# for 1 <= i <= log2(patch_size); nin_shortcut only where a block changes width; no attention.


def official_decoder_layout(z: int, ch: int, ch_mult: tuple, nrb: int, patch: int) -> dict:
    keys = {}

    def conv(name, c_in, c_out, k):
        keys[f"{name}.conv.weight"] = (c_out, c_in, k, k)
        keys[f"{name}.conv.bias"] = (c_out,)

    def norm(name, c):
        keys[f"{name}.norm.weight"] = (c,)
        keys[f"{name}.norm.bias"] = (c,)

    def resblock(name, c_in, c_out):
        norm(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_in, c_out, 3)
        norm(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_in, c_out, 1)

    c = ch * ch_mult[-1]
    conv("decoder.conv_in", z, c, 3)
    resblock("decoder.mid.block_1", c, c)
    resblock("decoder.mid.block_2", c, c)
    for i in reversed(range(len(ch_mult))):
        for j in range(nrb + 1):
            resblock(f"decoder.up.{i}.block.{j}", c, ch * ch_mult[i])
            c = ch * ch_mult[i]
        if 1 <= i <= math.log2(patch):
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c)
    conv("decoder.conv_out", c, 3, 3)
    return keys


# Hand-counted from the official code (base_ch 128, num_res_blocks 2): conv_in 2 + mid 16 + levels + norm/conv_out 4.
# d32: levels 26+26+26+28+26 = 132 -> 154.  d56: levels 26+26+28+26 = 106 -> 128.
ANCHORS = {
    "d32": (VAE_D32, 154, {
        "decoder.conv_in.conv.weight": (512, 32, 3, 3),
        "decoder.mid.block_2.norm2.norm.weight": (512,),
        "decoder.up.4.upsample.conv.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.conv.weight": (256, 512, 1, 1),
        "decoder.up.0.block.0.nin_shortcut.conv.weight": (128, 256, 1, 1),
        "decoder.up.0.block.2.conv2.conv.bias": (128,),
        "decoder.norm_out.norm.bias": (128,),
        "decoder.conv_out.conv.weight": (3, 128, 3, 3),
    }, ("decoder.up.0.upsample.conv.conv.weight", "decoder.up.4.block.0.nin_shortcut.conv.weight",
        "decoder.up.0.block.3.conv1.conv.weight", "decoder.mid.attn_1.q.conv.weight")),
    "d56": (VAE_D56, 128, {
        "decoder.conv_in.conv.weight": (512, 14, 3, 3),
        "decoder.up.3.upsample.conv.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.upsample.conv.conv.weight": (256, 256, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.conv.weight": (256, 512, 1, 1),
        "decoder.conv_out.conv.weight": (3, 128, 3, 3),
    }, ("decoder.up.4.block.0.conv1.conv.weight", "decoder.up.0.upsample.conv.conv.weight")),
}


@pytest.mark.parametrize("which", ["d32", "d56"])
def test_decoder_keys_match_official_layout(which):
    cfg, count, anchors, absent = ANCHORS[which]
    ours = decoder_key_shapes(cfg)
    assert len(ours) == count
    for key, shape in anchors.items():
        assert ours[key] == shape, key
    for key in absent:
        assert key not in ours
    assert ours == official_decoder_layout(cfg.codebook_dim, 128, cfg.ch_mult, 2, cfg.patch_size)


def test_token_bits_per_model():
    assert (VAE_D32.token_bits, VAE_D56.token_bits) == (32, 56)


# --- strict selection from a full official state dict, on meta tensors (the d32 layout allocates nothing)


def full_official_sd(cfg: VAEConfig, device="meta") -> dict:
    sd = {k: torch.empty(s, device=device) for k, s in official_decoder_layout(
        cfg.codebook_dim, cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.patch_size).items()}
    # What else the official AutoEncoder state dict holds: encoder weights and the quantizer's bit-mask
    # buffer under both of its attribute names.
    sd["encoder.conv_in.conv.weight"] = torch.empty(cfg.ch, 3, 3, 3, device=device)
    sd["encoder.conv_out.conv.bias"] = torch.empty(cfg.codebook_dim, device=device)
    sd["quantizer.lfq.mask"] = torch.empty(cfg.codebook_dim, device=device)
    sd["quantize.lfq.mask"] = torch.empty(cfg.codebook_dim, device=device)
    return sd


def test_select_accepts_full_official_d32_state_dict():
    sd = full_official_sd(VAE_D32)
    picked = select_decoder_state(sd, VAE_D32)
    assert set(picked) == {k for k in sd if k.startswith("decoder.")}
    assert len(picked) == 154


def test_select_accepts_flat_spelling():
    # The official loader (load_cnn) also maps `x.weight` onto a wrapped `x.conv.weight` / `x.norm.weight`.
    sd = full_official_sd(VAE_D56)
    flat = {}
    for k, v in sd.items():
        for wrapped in (".conv.weight", ".conv.bias", ".norm.weight", ".norm.bias"):
            if k.startswith("decoder.") and k.endswith(wrapped):
                k = k[: -len(wrapped)] + "." + wrapped.rsplit(".", 1)[1]
                break
        flat[k] = v
    assert "decoder.up.1.upsample.conv.weight" in flat and "decoder.norm_out.bias" in flat
    picked = select_decoder_state(flat, VAE_D56)
    assert set(picked) == set(decoder_key_shapes(VAE_D56))


def test_select_names_missing_unexpected_misshaped_duplicated():
    sd = full_official_sd(VAE_D32)
    del sd["decoder.up.2.block.1.conv1.conv.weight"]
    sd["decoder.up.0.upsample.conv.conv.weight"] = torch.empty(128, 128, 3, 3, device="meta")
    sd["decoder.conv_in.conv.weight"] = torch.empty(512, 14, 3, 3, device="meta")
    sd["discriminator.conv.weight"] = torch.empty(4, device="meta")
    sd["decoder.norm_out.weight"] = torch.empty(128, device="meta")  # flat twin of decoder.norm_out.norm.weight
    with pytest.raises(CheckpointError) as err:
        select_decoder_state(sd, VAE_D32)
    msg = str(err.value)
    assert "missing (1):\n  decoder.up.2.block.1.conv1.conv.weight" in msg
    assert "decoder.up.0.upsample.conv.conv.weight" in msg.split("unexpected")[1]
    assert "discriminator.conv.weight" in msg.split("unexpected")[1]
    assert "decoder.conv_in.conv.weight: checkpoint (512, 14, 3, 3) != expected (512, 32, 3, 3)" in msg
    assert "duplicated (1):\n  decoder.norm_out.weight" in msg
    assert "encoder.conv_in" not in msg and "lfq.mask" not in msg  # ignored by prefix, not reported


def test_integer_decoder_weights_are_named_not_cast():
    sd = full_official_sd(VAE_D32)
    sd["decoder.conv_in.conv.weight"] = torch.empty(512, 32, 3, 3, dtype=torch.int64, device="meta")
    with pytest.raises(CheckpointError, match=r"not floating point \(1\):\n  decoder.conv_in.conv.weight: int64"):
        select_decoder_state(sd, VAE_D32)


def test_non_finite_decoder_weights_are_named():
    sd = {k: torch.zeros(v.shape) for k, v in full_official_sd(VAE_D32).items()}  # meta shapes, real zeros
    sd["decoder.conv_out.conv.bias"][0] = float("nan")
    with pytest.raises(CheckpointError, match=r"not finite \(1\):\n  decoder.conv_out.conv.bias: 1 of 3 values"):
        select_decoder_state(sd, VAE_D32)


def test_d56_checkpoint_rejected_by_d32_config():
    """Refused, and named as the tokenizer it is (the 8B's given for the 2B's): the key lists alone did not say so."""
    with pytest.raises(CheckpointError, match=r"this is the infinity_vae_d56_f8_14_patchify tokenizer, not "
                                              r"infinity_vae_d32reg\n(.|\n)*wrong shape"):
        select_decoder_state(full_official_sd(VAE_D56), VAE_D32)
    with pytest.raises(CheckpointError, match=r"^tokenizer checkpoint does not match"):  # no known tokenizer's
        sd = full_official_sd(VAE_D56)
        sd.pop(next(k for k in sd if k.startswith("decoder.")))
        select_decoder_state(sd, VAE_D32)


# --- decode


def reference_decode(sd: dict, cfg: VAEConfig, z: torch.Tensor) -> torch.Tensor:
    """The official Decoder._forward + AutoEncoder.decode in plain functional torch, reading official keys."""
    def conv(x, name, pad):
        return F.conv2d(x, sd[f"{name}.conv.weight"], sd[f"{name}.conv.bias"], padding=pad)

    def gn(x, name):
        groups = 32 if x.shape[1] % 32 == 0 else 24
        return F.group_norm(x, groups, sd[f"{name}.norm.weight"], sd[f"{name}.norm.bias"], eps=1e-6)

    def swish(x):
        return x * torch.sigmoid(x)

    def res(x, name):
        h = conv(swish(gn(x, f"{name}.norm1")), f"{name}.conv1", 1)
        h = conv(swish(gn(h, f"{name}.norm2")), f"{name}.conv2", 1)
        if f"{name}.nin_shortcut.conv.weight" in sd:
            x = conv(x, f"{name}.nin_shortcut", 0)
        return x + h

    h = res(res(conv(z, "decoder.conv_in", 1), "decoder.mid.block_1"), "decoder.mid.block_2")
    for i in reversed(range(len(cfg.ch_mult))):
        for j in range(cfg.num_res_blocks + 1):
            h = res(h, f"decoder.up.{i}.block.{j}")
        if f"decoder.up.{i}.upsample.conv.conv.weight" in sd:
            h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), f"decoder.up.{i}.upsample.conv", 1)
    return conv(swish(gn(h, "decoder.norm_out")), "decoder.conv_out", 1).clamp(-1, 1)


def random_latent(cfg: VAEConfig, h: int, w: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (batch, h, w, cfg.codebook_dim), generator=g)
    return bits_to_codes(bits, cfg.codebook_dim).permute(0, 3, 1, 2)  # (B, d, h, w)


def test_tiny_decode_matches_functional_reference():
    vae = build_vae(VAE_TINY, seed=3)
    z = random_latent(VAE_TINY, 3, 5, batch=2) * 3  # a few scales' worth of summed codes
    with torch.no_grad():
        out = vae.decode(z)
        ref = reference_decode(vae.state_dict(), VAE_TINY, z)
    assert out.shape == (2, 3, 48, 80)
    assert out.abs().max() <= 1 and 0.01 < out.abs().mean() < 0.99  # neither blank nor saturated
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_split_group_norm_matches_fp32_group_norm(dtype, tol):
    norm = torch.nn.GroupNorm(32, 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    low = copy.deepcopy(norm).to(dtype)
    g = torch.Generator().manual_seed(0)
    # Per-channel offsets 20x the spread: statistics or scale/shift kept in bf16 would be off by several bf16 ulps.
    x = (torch.randn(2, 64, 9, 7, generator=g) + 20 * torch.randn(1, 64, 1, 1, generator=g)).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = split_group_norm(x, low)
        truth = F.group_norm(x.float(), 32, low.weight.float(), low.bias.float(), eps=1e-6)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.float(), truth, atol=tol, rtol=tol)


@pytest.mark.parametrize("shape,c_out,channels_last", [((2, 5, 4, 6), 7, False), ((1, 3, 1, 1), 3, True),
                                                      ((1, 4, 3, 1), 8, True), ((2, 6, 5, 3), 6, True)])
def test_subpixel_upsample_conv_is_upsample_then_conv(shape, c_out, channels_last):
    """The sub-pixel form (subpixel_weight's 2x2 convolution, then the phases placed in the 2x grid) computes the
    official nearest 2x upsample + 3x3 convolution, up to summation order (fp64 here): odd, non-square and
    one-pixel grids, where the padding decides the border phases; widths that change; both memory formats."""
    from sparvar.kernels.decoder_glue import subpixel_interleave_reference
    from sparvar.vae import subpixel_weight

    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, shape[1], 3, 3, generator=g, dtype=torch.float64)
    want = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, padding=1)
    phases = F.conv2d(x, subpixel_weight(w), padding=1)
    assert phases.shape == (shape[0], 4 * c_out, shape[2] + 1, shape[3] + 1)
    got = subpixel_interleave_reference(phases)
    assert got.shape == want.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_upsample_conv_runs_the_subpixel_form_of_frozen_weights_where_the_kernels_run(monkeypatch):
    """Where the decoder's kernels run (forced here on the CPU, with the interleave's torch reference), an upsampling
    convolution whose weights were fixed (freeze_subpixel_weights) takes the sub-pixel form on channels_last input:
    the official result, one interleave, no nearest upsample. Not frozen, NCHW input, or the switch off: the official
    form. Freezing again after a weight change recomputes the 2x2 weight in place (the tensor a captured graph
    reads); inference-mode weights freeze too."""
    from types import SimpleNamespace

    import sparvar.vae as V
    from sparvar.kernels.decoder_glue import subpixel_interleave_reference

    calls = {"interleave": 0, "up": 0}

    def interleave(y):
        calls["interleave"] += 1
        return subpixel_interleave_reference(y)

    def up(x):
        calls["up"] += 1
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    monkeypatch.setattr(V, "_triton_kernels", lambda: SimpleNamespace(subpixel_interleave=interleave,
                                                                      upsample_nearest_2x=up))
    monkeypatch.setattr(V, "_fast_path", lambda x, weight: True)
    upsample = V.Upsample(8)
    conv = upsample.conv.conv
    x = torch.randn(2, 8, 5, 7, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)

    def official():
        return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), conv.weight, None, padding=1)

    with torch.no_grad():
        torch.testing.assert_close(upsample(x)[0], official(), atol=1e-5, rtol=1e-5)
        assert calls == {"interleave": 0, "up": 1}  # not frozen: the official form
        assert V.freeze_subpixel_weights(torch.nn.Sequential(upsample, V.Conv(8, 8, 3))) == 1  # upsampling convs only
        out, bias = upsample(x)
        assert bias is conv.bias and calls == {"interleave": 1, "up": 1}
        torch.testing.assert_close(out, official(), atol=1e-5, rtol=1e-5)
        held = V._FROZEN_SUBPIXEL[conv]
        conv.weight.data.mul_(-2)
        assert not torch.allclose(upsample(x)[0], official(), atol=1e-3)  # frozen: the weights it was given
        V.freeze_subpixel_weights(upsample)
        assert V._FROZEN_SUBPIXEL[conv] is held  # recomputed in place
        torch.testing.assert_close(upsample(x)[0], official(), atol=1e-5, rtol=1e-5)
        assert calls == {"interleave": 3, "up": 1}
        torch.testing.assert_close(upsample(x.contiguous())[0], official(), atol=1e-5, rtol=1e-5)
        monkeypatch.setattr(V, "SUBPIXEL_UPSAMPLE", False)
        torch.testing.assert_close(upsample(x)[0], official(), atol=1e-5, rtol=1e-5)
    assert calls == {"interleave": 3, "up": 2}  # the NCHW input's nearest upsample is torch's (the kernel is NHWC)
    monkeypatch.setattr(V, "SUBPIXEL_UPSAMPLE", True)
    with torch.no_grad():  # cast after freezing: the frozen weight no longer fits, the official form runs
        upsample.double()
        x64 = x.double()
        want = F.conv2d(F.interpolate(x64, scale_factor=2.0, mode="nearest"), conv.weight, None, padding=1)
        torch.testing.assert_close(upsample(x64)[0], want)
    assert calls == {"interleave": 3, "up": 3}
    with torch.inference_mode():
        frozen = V.Upsample(8)
        V.freeze_subpixel_weights(frozen)
        want = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), frozen.conv.conv.weight, None, padding=1)
        torch.testing.assert_close(frozen(x)[0], want, atol=1e-5, rtol=1e-5)
    V.freeze_subpixel_weights(frozen)  # again, outside inference mode: updated in place all the same
    assert calls["interleave"] == 4


def test_tiny_decode_size():
    # (speed is a benchmark matter, not a unit test: no timing assertion here)
    vae = build_vae(VAE_TINY)
    with torch.no_grad():
        img = vae.decode(random_latent(VAE_TINY, 16, 16))
    assert img.shape == (1, 3, 256, 256)
    assert torch.isfinite(img).all() and img.abs().max() <= 1.0


def test_d56_decoder_upsamples_by_8():
    with torch.device("meta"):
        vae = BSQDecoder(VAE_D56)
    assert vae.decode(torch.empty(1, 14, 6, 10, device="meta")).shape == (1, 3, 48, 80)


def test_build_vae_is_seeded_and_keeps_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = build_vae(VAE_TINY, seed=1), build_vae(VAE_TINY, seed=1), build_vae(VAE_TINY, seed=2)
    assert torch.rand(1) == before
    w = "decoder.conv_in.conv.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])
    assert not a.training and not any(p.requires_grad for p in a.parameters())


def test_decode_rejects_bad_latent():
    vae = build_vae(VAE_TINY)
    with pytest.raises(ValueError, match=r"\(B, 16, H, W\)"):
        vae.decode(torch.zeros(1, 32, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 16, H, W\)"):
        vae.decode(torch.zeros(16, 4, 4))
    with pytest.raises(TypeError, match="latent dtype torch.int64 != decoder weight dtype torch.float32"):
        vae.decode(torch.zeros(1, 16, 4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="latent dtype torch.float32 != decoder weight dtype torch.bfloat16"):
        vae.to(torch.bfloat16).decode(torch.zeros(1, 16, 4, 4))


def test_config_checks():
    with pytest.raises(ValueError, match="divisible by 32 or 24"):
        check_vae_config(VAEConfig(name="bad", codebook_dim=16, patch_size=16, ch=16, ch_mult=(1, 1, 2, 2, 4)))
    with pytest.raises(ValueError, match="power of two"):
        check_vae_config(VAEConfig(name="bad", codebook_dim=16, patch_size=12))
    with pytest.raises(ValueError, match="needs 4 upsamplings"):
        check_vae_config(VAEConfig(name="bad", codebook_dim=16, patch_size=16, ch_mult=(1, 2, 4, 4)))


# --- loading files


def test_load_vae_pth_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    src = build_vae(VAE_TINY, seed=5)
    full = {**src.state_dict(), "encoder.conv_in.conv.weight": torch.randn(32, 3, 3, 3),
            "quantizer.lfq.mask": 2 ** torch.arange(15, -1, -1), "quantize.lfq.mask": 2 ** torch.arange(15, -1, -1)}
    torch.save({"vae": full, "step": 10}, tmp_path / "tok.pth")  # the official wrapping
    save_file({k: v.contiguous() for k, v in full.items()}, tmp_path / "tok.safetensors")
    z = random_latent(VAE_TINY, 2, 3)
    with torch.no_grad():
        want = src.decode(z)
        for name in ("tok.pth", "tok.safetensors"):
            got = load_vae(str(tmp_path / name), VAE_TINY)
            assert not got.training
            torch.testing.assert_close(got.decode(z), want, atol=0, rtol=0)
    half = load_vae(str(tmp_path / "tok.pth"), VAE_TINY, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_load_vae_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_vae(str(tmp_path / "absent.pth"), VAE_TINY)
    torch.save({"model": {"blocks.0.w": torch.zeros(1)}}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="no 'vae' entry"):
        load_vae(str(tmp_path / "wrong.pth"), VAE_TINY)
    sd = build_vae(VAE_TINY).state_dict()
    del sd["decoder.conv_out.conv.bias"]
    torch.save({"vae": sd}, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match=r"missing \(1\):\n  decoder.conv_out.conv.bias"):
        load_vae(str(tmp_path / "short.pth"), VAE_TINY)


# --- codes and token layout


@pytest.mark.parametrize("d", [32, 14, 16])
def test_bits_to_codes_values(d):
    bits = torch.randint(0, 2, (3, 5, d))
    codes = bits_to_codes(bits, d)
    assert codes.dtype == torch.float32
    s = 1 / math.sqrt(d)
    assert torch.equal(codes, torch.where(bits == 1, s, -s))  # exactly +-(float32 of 1/sqrt(d)), as the official
    torch.testing.assert_close(codes.norm(dim=-1), torch.ones(3, 5))  # BSQ codes sit on the unit sphere
    assert bits_to_codes(bits.bool(), d, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_bits_to_codes_on_patchified_tokens_uses_group_scale():
    bits = torch.randint(0, 2, (1, 4, 56))
    codes = bits_to_codes(bits.float(), 14)
    assert torch.allclose(codes.abs(), torch.full_like(codes, 1 / math.sqrt(14)))
    with pytest.raises(ValueError, match="multiple of codebook_dim 14"):
        bits_to_codes(torch.zeros(1, 4, 32), 14)
    with pytest.raises(ValueError, match="positive int"):
        bits_to_codes(bits, 0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        bits_to_codes([0, 1], 2)


def test_patchify_matches_official_pixel_shuffle_order():
    B, h, w, d = 2, 3, 5, 14
    tokens = torch.randn(B, h * w, 4 * d)
    latent = tokens_to_latent(tokens, h, w, patchify=True)
    assert latent.shape == (B, d, 2 * h, 2 * w)
    # Official: token (i, j) channel c*4 + 2a + b is latent position (2i + a, 2j + b), channel c.
    for i, j, c, a, b in [(0, 0, 0, 0, 1), (2, 4, 13, 1, 0), (1, 3, 7, 1, 1), (0, 2, 5, 0, 0)]:
        assert latent[1, c, 2 * i + a, 2 * j + b] == tokens[1, i * w + j, c * 4 + 2 * a + b]
    assert torch.equal(latent_to_tokens(latent, patchify=True), tokens)


def test_plain_token_layout_round_trip():
    tokens = torch.randn(1, 12, 32)
    latent = tokens_to_latent(tokens, 3, 4, patchify=False)
    assert latent.shape == (1, 32, 3, 4) and latent[0, 7, 2, 1] == tokens[0, 2 * 4 + 1, 7]
    assert torch.equal(latent_to_tokens(latent, patchify=False), tokens)


def test_token_layout_errors():
    with pytest.raises(ValueError, match="grid 3x3 needs 9"):
        tokens_to_latent(torch.zeros(1, 8, 56), 3, 3, patchify=True)
    with pytest.raises(ValueError, match="divisible by 4"):
        tokens_to_latent(torch.zeros(1, 9, 14), 3, 3, patchify=True)
    with pytest.raises(ValueError, match="even latent grid"):
        latent_to_tokens(torch.zeros(1, 14, 5, 6), patchify=True)


# --- GPU


@pytest.mark.gpu
def test_cuda_decode_matches_cpu():
    # On CUDA, Norm takes the split-reduction path; on CPU the native GroupNorm.
    vae = build_vae(VAE_TINY, seed=4)
    z = random_latent(VAE_TINY, 6, 4, batch=2) * 2
    with torch.no_grad():
        want = vae.decode(z)
        torch.backends.cudnn.allow_tf32, tf32 = False, torch.backends.cudnn.allow_tf32
        try:
            got = vae.cuda().decode(z.cuda()).cpu()
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_d32_decode_1024_on_gpu():
    vae = build_vae(VAE_D32, device="cuda", dtype=torch.bfloat16)
    z = random_latent(VAE_D32, 64, 64).cuda()
    with torch.no_grad():
        img = vae.decode(z.bfloat16())
        ref = vae.float().decode(z)
    assert img.shape == (1, 3, 1024, 1024) and img.dtype == torch.bfloat16
    assert (img.float() - ref).abs().mean() < 0.02  # bf16 decode tracks fp32
