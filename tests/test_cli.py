import hashlib

import pytest
import torch
from PIL import Image

from sparvar.cli import main


def _run(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_generate_sparvar_tiny_is_deterministic_per_seed(tmp_path, capsys):
    outs = []
    for seed, name in ((3, "a"), (3, "b"), (4, "c")):
        path = str(tmp_path / f"{name}.png")
        code, err = _run(["generate", "--model", "infinity-tiny", "--random-weights", "--attention", "sparvar",
                          "--seed", str(seed), "--prompt", "a red car", "--out", path], capsys)
        assert code == 0, err
        assert "scale  7/7" in err  # progress per scale
        outs.append(path)
    assert Image.open(outs[0]).size == (256, 256)
    assert _digest(outs[0]) == _digest(outs[1])
    assert _digest(outs[0]) != _digest(outs[2])


def test_skip_last_changes_the_image_and_is_bounded(tmp_path, capsys):
    full, skip = str(tmp_path / "full.png"), str(tmp_path / "skip.png")
    base = ["generate", "--random-weights", "--prompt", "a cat", "--seed", "1"]
    assert _run(base + ["--out", full], capsys)[0] == 0
    code, err = _run(base + ["--skip-last", "2", "--out", skip], capsys)
    assert code == 0 and "scale  5/5" in err
    assert _digest(full) != _digest(skip)
    code, err = _run(base + ["--skip-last", "7", "--out", skip], capsys)
    assert code == 1 and "skip_last must be in [0, 6]" in err


@pytest.mark.parametrize("args,message", [
    (["--model", "infinity-3b", "--random-weights"], "unknown model 'infinity-3b'"),
    (["--random-weights", "--resolution", "300"], "unsupported resolution 300"),
    (["--random-weights", "--aspect", "7:2"], "unsupported aspect ratio"),
    ([], "give both --weights and --vae"),
    (["--weights", "w.pth"], "give both --weights and --vae"),
    (["--random-weights", "--weights", "w.pth", "--vae", "v.pth"], "cannot be combined"),
    (["--random-weights", "--top-k", "7"], "top_k must be 0, 1 or 2"),
    (["--weights", "missing.pth", "--vae", "missing.pth"], "checkpoint not found: missing.pth"),
    (["--random-weights", "--engine", "engines/x"], "drop --weights/--vae/--random-weights"),
])
def test_bad_arguments_are_named(args, message, capsys, tmp_path):
    code, err = _run(["generate", *args, "--out", str(tmp_path / "x.png")], capsys)
    assert code != 0 and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_clear_error(capsys):
    code, err = _run(["generate", "--random-weights", "--device", "cuda"], capsys)
    assert code == 2 and "no CUDA GPU is available" in err


def test_missing_engine_dir_is_a_clear_error(capsys, tmp_path):
    code, err = _run(["generate", "--engine", str(tmp_path / "nope")], capsys)
    assert code == 1 and "engine directory not found" in err


def test_engine_dtype_defaults_per_backend():
    from sparvar.cli import build_parser
    from sparvar.runtime import spec_from_args

    def spec(*extra):
        return spec_from_args(build_parser().parse_args(["engine", "build", "--random-weights", *extra]))

    assert spec("--model", "infinity-2b", "--backend", "torch-cuda").dtype == "bf16"
    assert spec("--model", "infinity-2b", "--backend", "onnxruntime").dtype == "fp16"
    assert spec("--model", "infinity-tiny", "--backend", "torch-cuda").dtype == "fp32"
    assert spec("--model", "infinity-2b", "--backend", "torch-cuda", "--dtype", "fp16").dtype == "fp16"
    assert spec("--model", "infinity-2b", "--backend", "torch-cuda", "--fp8").fp8
