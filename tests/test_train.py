"""Training pipeline (sparvar/train) on CPU at toy size: data, tokenizer, teacher forcing, loop, resume, export."""
import dataclasses
import io
import os
import tarfile

import pytest
import torch

from sparvar.checkpoint import load_model
from sparvar.config import CIFAR10_CLASSES, VAEConfig, get_config
from sparvar.generate import Sampling, generate, resample
from sparvar.schedule import Schedule, get_schedule
from sparvar.train import run as train_run
from sparvar.train.__main__ import main as train_main
from sparvar.train.data import load_cifar, to_model_images
from sparvar.train.loop import LoopSettings, batch_indices, lr_at
from sparvar.train.tokenizer import Tokenizer, multiscale_bsq
from sparvar.train.var import bit_loss, next_scale_codes
from sparvar.vae import bits_to_codes, load_vae, tokens_to_latent

TOY_SCHEDULE = Schedule(((1, 1), (2, 2), (4, 4), (8, 8)), rope_grid=(8, 8), pixels_per_token=2)  # 16x16 images
TOY_VAE = VAEConfig(name="toy_vae", codebook_dim=8, patch_size=2, ch=32, ch_mult=(1, 1), num_res_blocks=1)
TOY = dataclasses.replace(get_config("infinity-cifar"), name="toy-cifar", depth=2, width=64, heads=2, mlp_dim=128,
                          vae=TOY_VAE, blocks_per_chunk=1)


def fake_cifar(path, per_split=(12, 4), classes=CIFAR10_CLASSES[:3]):
    """A tarball laid out like cifar10-jpeg.tar.gz with random 32x32 JPEGs."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    with tarfile.open(path, "w:gz") as tar:
        for split, n in zip(("train", "test"), per_split):
            for i in range(n):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG")
                info = tarfile.TarInfo(f"{split}/{classes[i % len(classes)]}/{i:04d}.jpg")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
    return str(path)


def test_cifar_schedule_and_registry():
    s = get_schedule(64, model="infinity-cifar")
    assert [h for h, _ in s.grids] == [1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32] and s.rope_grid == (32, 32)
    assert s.total_tokens == 2530 and s.lengths[-1] == 1024 and s.image_size == (64, 64)
    rows, _ = s.rope_positions(9)  # 24x24 on the 32x32 rope grid: round-half-even(i * 32 / 24)
    assert sorted(set(rows)) == sorted({round(i * 32 / 24) for i in range(24)})
    assert get_schedule(1024, model="infinity-2b") == get_schedule(1024)  # unlisted models: official templates
    assert get_schedule(1024).image_size == (1024, 1024)
    with pytest.raises(ValueError, match="square images only"):
        get_schedule(64, "16:9", model="infinity-cifar")
    with pytest.raises(ValueError, match=r"supported: \[64\]"):
        get_schedule(256, model="infinity-cifar")
    cfg = get_config("infinity-cifar")
    assert cfg.bits == 16 and cfg.vae.patch_size * s.final_grid[0] == 64


def test_load_cifar_decodes_sorted_splits(tmp_path):
    data = load_cifar(fake_cifar(tmp_path / "c.tar.gz"))
    assert set(data) == {"train", "test"} and len(data["train"]) == 12 and len(data["test"]) == 4
    assert data["train"].images.shape == (12, 32, 32, 3) and data["train"].images.dtype == torch.uint8
    assert data["train"].class_names == tuple(sorted(CIFAR10_CLASSES[:3]))
    assert data["train"].labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # sorted by path: class folder, then file
    x = to_model_images(data["train"].images[:2], 64, flip=torch.tensor([False, True]))
    assert x.shape == (2, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    x32 = to_model_images(data["train"].images[1:2], 32, flip=torch.tensor([True]))
    torch.testing.assert_close(x32[0], data["train"].images[1].permute(2, 0, 1).float().div(127.5).sub(1).flip(-1))
    with pytest.raises(FileNotFoundError, match="nope.tar.gz"):
        load_cifar(str(tmp_path / "nope.tar.gz"))


def test_multiscale_bsq_sum_is_what_generation_rebuilds_from_the_bits():
    grids = TOY_SCHEDULE.grids
    z = torch.randn(2, 8, 8, 8, requires_grad=True)
    summed, bits = multiscale_bsq(z, grids)
    assert [b.shape for b in bits] == [(2, h * w, 8) for h, w in grids]
    assert all(set(b.unique().tolist()) <= {0.0, 1.0} for b in bits)
    rebuilt = sum(resample(tokens_to_latent(bits_to_codes(b, 8), h, w, False), (8, 8)) for b, (h, w) in zip(bits, grids))
    torch.testing.assert_close(summed, rebuilt, atol=1e-6, rtol=0)
    # scale 0 quantises the area mean of z: its bits are the signs of the mean
    assert torch.equal(bits[0][:, 0], (z.mean(dim=(2, 3)) > 0).float())
    summed.square().sum().backward()  # straight-through: gradients reach the encoder output
    assert z.grad is not None and z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="latent grid"):
        multiscale_bsq(z.detach(), grids[:-1])


class _ForcingRunner:
    """A runner whose logits force given bits; records the code inputs the generation loop feeds it."""

    device = torch.device("cpu")

    def __init__(self, bits):
        self.bits, self.codes = bits, {}

    def begin(self, features, lengths, guided):
        assert not guided

    def step(self, scale, codes):
        self.codes[scale] = codes
        b = self.bits[scale]
        return torch.stack([torch.zeros_like(b), (2 * b - 1) * 30.0], dim=-1).flatten(-2)


class _NullDecoder:
    codebook_dim, patchify = 8, False

    def bits_to_codes(self, bits):
        return bits_to_codes(bits, 8)

    def decode(self, latent):
        return torch.zeros(latent.shape[0], 3, 16, 16)


def test_teacher_inputs_are_the_generation_inputs():
    g = torch.Generator().manual_seed(0)
    bits = [torch.randint(0, 2, (2, h * w, 8), generator=g).float() for h, w in TOY_SCHEDULE.grids]
    runner = _ForcingRunner(bits)
    lengths = torch.ones(2, dtype=torch.long)  # integer counts (a float count is refused)
    gen = generate(runner, _NullDecoder(), TOY_SCHEDULE, torch.zeros(2, 1, 4), lengths, Sampling(cfg=1.0))
    assert all(torch.equal(a, b) for a, b in zip(gen.bits, bits))  # the forcing worked
    teacher = next_scale_codes(bits, TOY_SCHEDULE, 8)
    assert runner.codes[0] is None and len(teacher) == TOY_SCHEDULE.num_scales - 1
    for k, codes in enumerate(teacher, start=1):
        torch.testing.assert_close(codes, runner.codes[k], atol=1e-6, rtol=0, msg=f"scale {k}")


def test_bit_loss_is_two_way_cross_entropy():
    logits = torch.randn(2, 5, 6)
    bits = [torch.randint(0, 2, (2, 2, 3)).float(), torch.randint(0, 2, (2, 3, 3)).float()]
    loss, metrics = bit_loss(logits, bits)
    target = torch.cat(bits, 1).long()
    ce = torch.nn.functional.cross_entropy(logits.unflatten(-1, (-1, 2)).reshape(-1, 2), target.reshape(-1))
    torch.testing.assert_close(loss, ce)
    pred = logits.unflatten(-1, (-1, 2)).argmax(-1)
    assert metrics["bit_acc"].item() == pytest.approx((pred == target).float().mean().item())


def test_loop_schedule_and_batches_are_deterministic():
    s = LoopSettings(steps=100, batch=4, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, s) == pytest.approx(0.1) and lr_at(9, 100, s) == pytest.approx(1.0)
    assert lr_at(100, 100, s) == pytest.approx(0.1) and lr_at(55, 100, s) == pytest.approx(0.55)
    a, b = batch_indices(7, 4, 10, seed=3), batch_indices(7, 4, 10, seed=3)
    assert torch.equal(a, b) and len(set(a.tolist())) == 4
    epoch0 = torch.cat([batch_indices(i, 5, 10, seed=3) for i in range(2)])
    assert sorted(epoch0.tolist()) == list(range(10))  # one epoch visits every item once
    with pytest.raises(ValueError, match="larger than the data set"):
        batch_indices(0, 11, 10, seed=0)
    with pytest.raises(ValueError, match="steps and batch"):
        LoopSettings(steps=0, batch=1, lr=1e-3)


def test_training_end_to_end_exports_loadable_weights(tmp_path):
    data = load_cifar(fake_cifar(tmp_path / "c.tar.gz"))
    settings = LoopSettings(steps=3, batch=4, lr=1e-3, warmup=1, log_every=1)
    tokenizer, tok_log = train_run.train_tokenizer(TOY_VAE, TOY_SCHEDULE, data["train"], settings, str(tmp_path / "w"))
    assert [r["step"] for r in tok_log["records"]] == [1, 2, 3] and all(r["loss"] > 0 for r in tok_log["records"])
    tok_eval = train_run.evaluate_tokenizer(tokenizer, data["test"])
    assert tok_eval["images"] == 4 and 0 < tok_eval["psnr_db"] < 60
    model, var_log = train_run.train_transformer(TOY, TOY_SCHEDULE, tokenizer, data["train"], settings, str(tmp_path / "w"))
    first = var_log["records"][0]
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # zero head: p = 0.5 for every bit at step 0
    assert var_log["records"][-1]["loss"] != first["loss"]
    var_eval = train_run.evaluate_transformer(model, tokenizer, data["test"], TOY_SCHEDULE, images=4, batch=2)
    assert len(var_eval["scale_loss"]) == TOY_SCHEDULE.num_scales and var_eval["images"] == 4
    assert var_eval["images_per_class"] == {"airplane": 2, "automobile": 1, "bird": 1}
    # a part of the split spans its classes (sorted by class, its first two images are both airplanes)
    part = train_run.evaluate_transformer(model, tokenizer, data["test"], TOY_SCHEDULE, images=2, batch=2)
    assert part["images"] == 2 and part["images_per_class"] == {"airplane": 1, "automobile": 0, "bird": 1}

    t_path, k_path = train_run.export_weights(model, tokenizer, str(tmp_path / "out"), torch.float16)
    shipped = load_model(TOY, t_path)  # strict loaders of the generation path
    decoder = load_vae(k_path, TOY_VAE)
    for (name, p), q in zip(model.state_dict().items(), shipped.state_dict().values()):
        torch.testing.assert_close(p.half().float(), q.float(), msg=name)
    latent = torch.randn(1, 8, 8, 8)
    torch.testing.assert_close(decoder.decode(latent), tokenizer.decoder(latent).clamp(-1, 1), atol=2e-2, rtol=0)
    reloaded = train_run.load_tokenizer(k_path, TOY_VAE, TOY_SCHEDULE.grids)  # encoder too, strictly
    assert reloaded.state_dict().keys() == tokenizer.state_dict().keys()
    for (name, p), q in zip(tokenizer.state_dict().items(), reloaded.state_dict().values()):
        torch.testing.assert_close(p.half().float(), q, msg=name)


def interrupt_tokenizer_run_at_step_3(monkeypatch, data, settings, work: str):
    """Train the tokenizer in `work` until its third step raises KeyboardInterrupt (a killed run leaves its last
    checkpoint); returns the real loss function, which stays patched out until the caller puts it back."""
    real_loss, calls = train_run.tokenizer_loss, []

    def crash_at_step_3(tokenizer, images):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(tokenizer, images)

    monkeypatch.setattr(train_run, "tokenizer_loss", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_run.train_tokenizer(TOY_VAE, TOY_SCHEDULE, data, settings, work)
    return real_loss


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    data = load_cifar(fake_cifar(tmp_path / "c.tar.gz"))["train"]
    settings = LoopSettings(steps=4, batch=4, lr=1e-3, warmup=1, checkpoint_every=2)
    straight, _ = train_run.train_tokenizer(TOY_VAE, TOY_SCHEDULE, data, settings, str(tmp_path / "a"))

    real_loss = interrupt_tokenizer_run_at_step_3(monkeypatch, data, settings, str(tmp_path / "b"))
    after = []  # a restart from step 0 would reach the same weights too (same seeds): count the steps it takes
    monkeypatch.setattr(train_run, "tokenizer_loss", lambda tokenizer, images: after.append(1) or real_loss(tokenizer, images))
    resumed, log = train_run.train_tokenizer(TOY_VAE, TOY_SCHEDULE, data, settings, str(tmp_path / "b"), resume=True)
    assert [r["step"] for r in log["records"]][-1] == 4 and len(after) == 2  # steps 3 and 4 only
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name, atol=1e-6, rtol=1e-5)


def test_tokenizer_rejects_wrong_image_size():
    tok = Tokenizer(TOY_VAE, TOY_SCHEDULE.grids)
    assert tok.image_size == (16, 16)
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        tok(torch.zeros(1, 3, 32, 32))


def test_cli_names_a_missing_tarball(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tar.gz"):
        train_main(["tokenizer", "--work", str(tmp_path), "--data", str(tmp_path / "missing.tar.gz"), "--device", "cpu"])


def test_an_interrupted_run_is_not_trained_on_or_exported(tmp_path):
    """A run's checkpoint after a crash holds weights its settings do not describe (step 1 of 2 here): the next stage
    refuses them and says how to finish the run, instead of building on them or shipping them."""
    tarball = fake_cifar(tmp_path / "c.tar.gz")
    work = str(tmp_path / "work")
    base = ["--work", work, "--data", tarball, "--device", "cpu", "--tokenizer-steps", "2", "--tokenizer-batch", "2",
            "--tokenizer-warmup", "1"]
    assert train_main(["tokenizer", *base]) == 0
    state = torch.load(os.path.join(work, "tokenizer.pt"), weights_only=False)
    assert state["step"] == state["log"]["total_steps"] == 2
    state["step"] = 1  # as a run killed after its first checkpoint leaves it
    torch.save(state, os.path.join(work, "tokenizer.pt"))
    with pytest.raises(ValueError, match="the tokenizer run stopped at step 1 of 2; finish it first"):
        train_main(["transformer", *base, "--transformer-steps", "1"])


def test_a_class_conditional_model_trains_only_on_its_class_names(tmp_path):
    """infinity-cifar answers CIFAR-10's class names only (the CLI refuses others): data with another class would
    train a model whose class the CLI then refuses, so training refuses it first, naming it."""
    from sparvar.train.data import ImageSet

    data = ImageSet(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), torch.tensor([0, 1]), ("apple", "cat"))
    with pytest.raises(ValueError, match="the data has classes apple besides"):
        train_run.train_transformer(get_config("infinity-cifar"), get_schedule(64, model="infinity-cifar"), None, data,
                                    LoopSettings(steps=1, batch=1, lr=1e-3), str(tmp_path / "w"))


def test_a_resumed_run_keeps_the_settings_its_checkpoint_records(tmp_path, monkeypatch):
    """A run resumed with another seed, batch or learning rate would train on with them while its log kept the first
    ones: refused, naming each field. Logging and checkpoint intervals do not change the weights and may change."""
    data = load_cifar(fake_cifar(tmp_path / "c.tar.gz"))["train"]
    settings = LoopSettings(steps=4, batch=4, lr=1e-3, warmup=1, checkpoint_every=2)
    real_loss = interrupt_tokenizer_run_at_step_3(monkeypatch, data, settings, str(tmp_path / "w"))
    monkeypatch.setattr(train_run, "tokenizer_loss", real_loss)
    other = dataclasses.replace(settings, seed=7, batch=2, lr=0.05)
    with pytest.raises(ValueError, match=r"started with batch=4, lr=0\.001, seed=0; resuming it with batch=2, lr=0\.05, "
                                         r"seed=7 would change it"):
        train_run.train_tokenizer(TOY_VAE, TOY_SCHEDULE, data, other, str(tmp_path / "w"), resume=True)
    _, log = train_run.train_tokenizer(TOY_VAE, TOY_SCHEDULE, data, dataclasses.replace(settings, log_every=1),
                                       str(tmp_path / "w"), resume=True)
    assert log["records"][-1]["step"] == 4


def test_export_refuses_a_transformer_trained_on_another_tokenizer(tmp_path):
    """The tokenizer stage run again after the transformer (another seed here) would ship a pair that never trained
    together: export refuses it. The exported seed is the transformer's training seed, not export's --seed."""
    from safetensors import safe_open

    tarball = fake_cifar(tmp_path / "c.tar.gz")
    work, out = str(tmp_path / "work"), str(tmp_path / "out")
    base = ["--work", work, "--data", tarball, "--device", "cpu", "--tokenizer-steps", "1", "--tokenizer-batch", "2",
            "--tokenizer-warmup", "1", "--transformer-steps", "1", "--transformer-batch", "2",
            "--transformer-warmup", "1", "--eval-images", "2"]
    assert train_main(["tokenizer", *base]) == 0
    assert train_main(["transformer", *base, "--seed", "3"]) == 0
    assert train_main(["export", *base, "--export", out]) == 0
    with safe_open(os.path.join(out, "infinity-cifar.safetensors"), "pt") as f:
        assert f.metadata()["seed"] == "3"
    assert train_main(["tokenizer", *base, "--seed", "1"]) == 0
    with pytest.raises(ValueError, match="trained on another tokenizer than .*tokenizer.pt holds now"):
        train_main(["export", *base, "--export", out])


def test_bad_limits_and_short_budgeted_warmups_are_refused(tmp_path):
    tarball = fake_cifar(tmp_path / "c.tar.gz")
    for limit in (0, -3):  # 0 had meant every image, -3 all but the last three of each split
        with pytest.raises(ValueError, match=f"limit must be a positive number of images per split, got {limit}"):
            load_cifar(tarball, limit)
    assert {s: len(d) for s, d in load_cifar(tarball, 2).items()} == {"train": 2, "test": 2}
    with pytest.raises(ValueError, match="warm-up must last at least 25 steps"):
        LoopSettings(steps=100, batch=4, lr=1e-3, warmup=10, seconds=60.0)
    LoopSettings(steps=100, batch=4, lr=1e-3, warmup=25, seconds=60.0)
