"""HART generation: the loop over a runner, the eager runner against the teacher-forced model, pipeline and CLI."""
import hashlib
from types import SimpleNamespace

import pytest
import torch

from sparvar.generate import SeededRows
from PIL import Image

from sparvar.cli import main
from sparvar.hart.checkpoint import save_official
from sparvar.hart.config import HART_CONFIGS
from sparvar.hart.diffusion import last_stage_cfg_scale, sample
from sparvar.hart.generate import HartPipeline, HartTorchRunner, diffusion_residual, generate_hart
from sparvar.hart.model import build_model
from sparvar.hart.sampling import HartSampling
from sparvar.hart.text import hashed_hart_embeddings
from sparvar.hart.tokenizer import build_hart_vq
from sparvar.pipeline import Pipeline
from sparvar.schedule import get_schedule

TINY = HART_CONFIGS["hart-tiny"]
SCHEDULE = get_schedule(TINY.default_resolution, model="hart-tiny")
PATCH_NUMS = TINY.patch_nums
SN = len(PATCH_NUMS)


@pytest.fixture(scope="module")
def model():
    return build_model(TINY, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return build_hart_vq(TINY.vq, seed=0)


@pytest.fixture(scope="module")
def text():
    return hashed_hart_embeddings(["a cat", "a red fox in the snow"], TINY)  # two text lengths: different RoPE rows


class Recording:
    """Wraps a runner and keeps what the loop handed it and got back."""

    def __init__(self, runner):
        self.runner, self.device, self.cfg = runner, runner.device, runner.cfg
        self.inputs, self.logits, self.conds, self.denoise_rows, self.cfg_scales = [], [], [], [], []

    def begin(self, features, mask, guided):
        self.guided = guided
        self.runner.begin(features, mask, guided)

    def step(self, scale, inputs):
        self.inputs.append(inputs)
        self.logits.append(self.runner.step(scale, inputs))
        return self.logits[-1]

    def diffusion_condition(self, codes):
        self.codes = codes
        self.conds.append(self.runner.diffusion_condition(codes))
        return self.conds[-1]

    def denoise_step(self, x, k, cond, cfg_scale, noise):
        self.denoise_rows.append((x.shape[0], cond.shape[0], k, noise is None))
        self.cfg_scales.append(cfg_scale)
        return self.runner.denoise_step(x, k, cond, cfg_scale, noise)


def test_generates_images_indices_and_residual(model, tokenizer, text):
    features, mask = text
    gen = generate_hart(HartTorchRunner(model, SCHEDULE), tokenizer, SCHEDULE, features, mask, seed=0)
    assert gen.image.shape == (2, 3, 256, 256) and gen.image.dtype == torch.float32
    assert gen.image.min() >= 0 and gen.image.max() <= 1 and gen.image.std() > 0.01
    assert [tuple(i.shape) for i in gen.indices] == [(2, pn * pn) for pn in PATCH_NUMS]
    assert all(i.dtype == torch.int64 and i.min() >= 0 and i.max() < TINY.vocab_size for i in gen.indices)
    assert gen.f_hat.shape == (2, TINY.latent_dim, 16, 16)
    assert gen.residual.shape == (2, 256, TINY.latent_dim) and gen.residual.isfinite().all()
    assert gen.residual.abs().mean() > 1e-3  # the diffusion head ran (random weights: a non-trivial residual)
    # f_hat is what the tokenizer rebuilds from the sampled indices plus the residual, and the image is its decode
    rebuilt = tokenizer.indices_to_fhat(gen.indices, PATCH_NUMS, gen.residual)
    torch.testing.assert_close(gen.f_hat, rebuilt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gen.image, tokenizer.decode(gen.f_hat).add(1).div(2))
    # the two prompts give different images
    assert not torch.equal(gen.indices[-1][0], gen.indices[-1][1])


def test_seed_determines_the_generation(model, tokenizer, text):
    features, mask = text
    runner = HartTorchRunner(model, SCHEDULE)
    a, b, c = (generate_hart(runner, tokenizer, SCHEDULE, features, mask, seed=s) for s in (3, 3, 4))
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))
    assert torch.equal(a.image, b.image) and torch.equal(a.residual, b.residual)
    assert not torch.equal(a.indices[-1], c.indices[-1]) and not torch.equal(a.image, c.image)


def test_runner_steps_equal_teacher_forced_forward(model, tokenizer, text):
    """The cached scale-by-scale logits equal one block-causal pass over [text | every scale's input]."""
    features, mask = text
    rec = Recording(HartTorchRunner(model, SCHEDULE))
    generate_hart(rec, tokenizer, SCHEDULE, features, mask, seed=1)
    cond_text = model.encode_text(features, mask, cfg_guidance=True)
    inputs = [model.scale_input(s, x, cond_text) for s, x in enumerate(rec.inputs)]
    logits, hidden = model.forward_all_scales(inputs, cond_text, SCHEDULE, return_hidden=True)
    assert len(rec.logits) == len(logits) == SN
    for scale, (stepped, full) in enumerate(zip(rec.logits, logits)):
        assert stepped.shape == full.shape == (4, SCHEDULE.lengths[scale] if scale else 1, TINY.vocab_size)
        torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4, msg=f"scale {scale}")
    # the diffusion condition comes from the last scale's hidden states
    torch.testing.assert_close(rec.conds[0], model.diffusion_condition(hidden[-1], rec.codes), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", [0.0, 4.5])
def test_guided_runs_2b_rows_unguided_b(model, tokenizer, text, cfg):
    features, mask = text
    B, n_last = features.shape[0], PATCH_NUMS[-1] ** 2
    rows = 2 * B if cfg else B
    rec = Recording(HartTorchRunner(model, SCHEDULE))
    gen = generate_hart(rec, tokenizer, SCHEDULE, features, mask, HartSampling(cfg=cfg), seed=2)
    assert rec.guided == (cfg != 0)
    assert [x.shape[0] for x in rec.logits] == [rows] * SN
    assert rec.inputs[0] is None
    assert [tuple(x.shape) for x in rec.inputs[1:]] == [(B, pn * pn, TINY.latent_dim) for pn in PATCH_NUMS[1:]]
    assert rec.conds[0].shape == (rows, n_last, TINY.width)
    steps = TINY.diffusion.num_sampling_steps
    assert rec.denoise_rows == [(B * n_last, rows * n_last, k, k == 0) for k in reversed(range(steps))]
    assert rec.cfg_scales == pytest.approx([last_stage_cfg_scale(cfg, SN)] * steps, rel=1e-12)  # the last t
    assert gen.image.shape == (B, 3, 256, 256) and gen.residual.isfinite().all()


@pytest.mark.parametrize("t", [0.0, 1.0, 4.5 * 6 / 7])
def test_diffusion_loop_equals_the_diffusion_sampler(model, tokenizer, text, t):
    """The loop's runner-driven residual equals sparvar.hart.diffusion.sample (one copy of the sampler's rules,
    including the official cfg == 1 quirk) for the same generator."""
    features, mask = text
    runner = HartTorchRunner(model, SCHEDULE)
    generate_hart(runner, tokenizer, SCHEDULE, features, mask, seed=0)  # leaves the last scale's hidden states
    codes = torch.randn(2, PATCH_NUMS[-1] ** 2, TINY.latent_dim, generator=torch.Generator().manual_seed(5))
    ours = diffusion_residual(runner, codes, t, SeededRows(9, 2, 'cpu'))
    cond = runner.diffusion_condition(codes).reshape(-1, TINY.width)
    theirs = sample(model.diffloss.net, cond, t, TINY.diffusion, torch.Generator().manual_seed(9))
    torch.testing.assert_close(ours, theirs.view(ours.shape), rtol=0, atol=0)


def test_skip_last_runs_fewer_scales_and_no_diffusion(model, tokenizer, text):
    features, mask = text
    full = generate_hart(HartTorchRunner(model, SCHEDULE), tokenizer, SCHEDULE, features, mask, seed=6)
    rec = Recording(HartTorchRunner(model, SCHEDULE))
    skip = generate_hart(rec, tokenizer, SCHEDULE, features, mask, seed=6, skip_last=2)
    assert len(rec.logits) == len(skip.indices) == SN - 2 and rec.conds == [] and rec.denoise_rows == []
    assert skip.residual is None
    # the run scales draw exactly what the full run drew (same generator sequence), the image differs
    assert all(torch.equal(a, b) for a, b in zip(skip.indices, full.indices))
    assert skip.image.shape == full.image.shape and not torch.equal(skip.image, full.image)
    assert skip.f_hat.shape == full.f_hat.shape
    for bad in (-1, SN):
        with pytest.raises(ValueError, match=rf"skip_last must be in \[0, {SN - 1}\]"):
            generate_hart(rec, tokenizer, SCHEDULE, features, mask, skip_last=bad)


def test_runner_refuses_misuse(model, text):
    features, mask = text
    runner = HartTorchRunner(model, SCHEDULE)
    runner.begin(features, mask, guided=True)
    with pytest.raises(ValueError, match="inputs must be None exactly at scale 0"):
        runner.step(0, torch.zeros(2, 1, TINY.latent_dim))
    runner.step(0, None)
    with pytest.raises(ValueError, match="scales run in order from 0 after begin .*: expected scale 1, got 2"):
        runner.step(2, torch.zeros(2, 9, TINY.latent_dim))
    with pytest.raises(ValueError, match="needs the last scale's hidden states"):
        runner.diffusion_condition(torch.zeros(2, 256, TINY.latent_dim))
    x = torch.zeros(6, TINY.latent_dim)
    with pytest.raises(ValueError, match="cond has 7 rows for 6 tokens"):
        runner.denoise_step(x, 1, torch.zeros(7, TINY.width), 0.0, torch.zeros_like(x))
    with pytest.raises(ValueError, match="unguided condition rows with cfg_scale 2.0"):
        runner.denoise_step(x, 1, torch.zeros(6, TINY.width), 2.0, torch.zeros_like(x))
    with pytest.raises(ValueError, match="not hart-tiny's"):
        HartTorchRunner(model, get_schedule(256, model="infinity-tiny"))


# --------------------------------------------------------------------------------------- pipeline and CLI
def _run(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_pipeline_dispatches_on_family():
    pipe = Pipeline.create("hart-tiny")
    assert isinstance(pipe, HartPipeline) and pipe.random_weights and pipe.schedule == SCHEDULE
    assert pipe.sampling() == HartSampling() and pipe.sampling(cfg=2.0, top_p=0.5) == HartSampling(cfg=2.0, top_p=0.5)
    features, mask = pipe.text_features(["a cat"])
    assert features.shape == (1, TINY.text_len, TINY.text_dim) and mask.dtype == torch.bool


def test_cli_generates_a_png_per_seed(tmp_path, capsys):
    paths = []
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        path = str(tmp_path / f"{name}.png")
        code, err = _run(["generate", "--model", "hart-tiny", "--random-weights", "--prompt", "a cat",
                          "--seed", str(seed), "--out", path], capsys)
        assert code == 0, err
        assert "scale  8/8" in err
        paths.append(path)
    assert Image.open(paths[0]).size == (256, 256)
    assert _digest(paths[0]) == _digest(paths[1]) != _digest(paths[2])


def test_cli_loads_official_checkpoints(tmp_path, capsys):
    """A synthetic official llm/ file and tokenizer file (official keys) give the random-weight model's image."""
    save_official(build_model(TINY, seed=0), str(tmp_path / "llm.safetensors"))
    torch.save({"vae." + k: v for k, v in build_hart_vq(TINY.vq, seed=0).state_dict().items()}, tmp_path / "tok.pth")
    base = ["generate", "--model", "hart-tiny", "--prompt", "a cat", "--seed", "2", "--skip-last", "1"]
    code, err = _run(base + ["--random-weights", "--out", str(tmp_path / "r.png")], capsys)
    assert code == 0, err
    code, err = _run(base + ["--weights", str(tmp_path / "llm.safetensors"), "--vae", str(tmp_path / "tok.pth"),
                             "--out", str(tmp_path / "w.png")], capsys)
    assert code == 0, err
    assert "scale  7/7" in err
    assert _digest(tmp_path / "r.png") == _digest(tmp_path / "w.png")


def test_cli_text_embeddings_file(tmp_path, capsys):
    features, mask = hashed_hart_embeddings(["a cat"], TINY)
    torch.save({"features": features, "lengths": mask.sum(1)}, tmp_path / "text.pt")
    path = str(tmp_path / "e.png")
    code, err = _run(["generate", "--model", "hart-tiny", "--random-weights", "--text-embeddings",
                      str(tmp_path / "text.pt"), "--skip-last", "1", "--out", path], capsys)
    assert code == 0, err
    assert Image.open(path).size == (256, 256)
    # the file's embeddings are the ones used: the image of the prompt they encode, not of another
    for prompt, name in (("a cat", "cat.png"), ("a dog", "dog.png")):
        code, err = _run(["generate", "--model", "hart-tiny", "--random-weights", "--prompt", prompt, "--skip-last", "1",
                          "--out", str(tmp_path / name)], capsys)
        assert code == 0, err
    assert _digest(path) == _digest(tmp_path / "cat.png") != _digest(tmp_path / "dog.png")


@pytest.mark.parametrize("args,message", [
    (["--model", "hart-tiny", "--random-weights", "--t5", "t5dir"], "drop --t5"),
    (["--model", "hart-tiny", "--random-weights", "--qwen", "qwendir"], "drop --qwen"),
    (["--model", "infinity-tiny", "--random-weights", "--qwen", "qwendir"], "--qwen is HART's text encoder"),
    (["--model", "hart-tiny", "--random-weights", "--qwen", "q", "--text-embeddings", "e.pt"],
     "give one text source, not --qwen and --text-embeddings"),
    (["--model", "hart-tiny", "--random-weights", "--tau", "0.5"], "tau: hart-tiny samples without a temperature"),
    (["--model", "hart-tiny", "--random-weights", "--top-k", "10"], "official top-k schedule"),
    (["--model", "hart-tiny", "--random-weights", "--cfg", "-1"], "cfg must be a finite number in [0, 10000]"),
    (["--model", "hart-tiny", "--random-weights", "--top-p", "2"], "top_p must be in [0, 1]"),
    (["--model", "hart-tiny", "--random-weights", "--resolution", "512"], "unsupported resolution 512 for hart-tiny"),
    (["--model", "hart-tiny", "--random-weights", "--aspect", "16:9"], "square images only"),
    (["--model", "hart-tiny", "--random-weights", "--skip-last", "8"], "--skip-last must be below the 8 scales of hart-tiny"),
    (["--model", "hart-0.7b"], "give both --weights and --vae"),
    (["--model", "hart-0.7b", "--weights", "llm", "--vae", "missing.pth", "--qwen", "q", "--t5", "t"],
     "give one text source, not --t5 and --qwen"),
    (["--model", "hart-0.7b", "--weights", "nope-llm", "--vae", "missing.pth", "--t5", "t"],
     "--t5 is Infinity's text encoder; hart-0.7b takes --qwen DIR"),
])
def test_bad_arguments_are_named(args, message, capsys, tmp_path):
    code, err = _run(["generate", *args, "--out", str(tmp_path / "x.png")], capsys)
    assert code != 0 and message in err, err


def test_real_weights_need_a_named_text_source(tmp_path):
    cpu = SimpleNamespace(device=torch.device("cpu"))  # no 0.7b model is built: text comes before the runner
    pipe = HartPipeline(HART_CONFIGS["hart-0.7b"], get_schedule(1024, model="hart-0.7b"), cpu, None, random_weights=False)
    with pytest.raises(ValueError, match="needs a text encoder: give --qwen DIR"):
        pipe.text_features(["a cat"])
    with pytest.raises(ValueError, match="--qwen .*no-qwen: no such directory"):  # checked before any loading
        pipe.text_features(["a cat"], qwen=str(tmp_path / "no-qwen"))


def test_per_row_seeds_draw_what_one_prompt_generations_draw():
    """HART's tokens and diffusion noise per row: a two-prompt generation with seeds [3, 4] gives each row the
    indices of its one-prompt generation (the diffusion residual to float rounding)."""
    pipe = HartPipeline.create("hart-tiny", 256, "1:1", None, None, attention="dense")
    features, mask = pipe.text_features(["a cat", "a red fox in the snow"])
    both = pipe.generate(features, mask, seed=[3, 4])
    for i, seed in enumerate((3, 4)):
        alone = pipe.generate(features[i:i + 1], mask[i:i + 1], seed=[seed])
        assert all(torch.equal(a[i:i + 1], b) for a, b in zip(both.indices, alone.indices)), i
        torch.testing.assert_close(both.residual[i:i + 1], alone.residual, atol=1e-4, rtol=1e-4)
