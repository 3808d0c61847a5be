import hashlib
import os

import numpy as np
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
    assert code == 2 and "--skip-last must be below the 7 scales of infinity-tiny" in err


@pytest.mark.parametrize("args,message", [
    (["--model", "infinity-3b", "--random-weights"], "unknown model 'infinity-3b'"),
    (["--random-weights", "--resolution", "300"], "unsupported resolution 300"),
    (["--random-weights", "--aspect", "7:2"], "unsupported aspect ratio"),
    ([], "give both --weights and --vae"),
    (["--weights", "w.pth"], "give both --weights and --vae"),
    (["--random-weights", "--weights", "w.pth", "--vae", "v.pth"], "cannot be combined"),
    (["--random-weights", "--top-k", "7"], "top_k must be 0, 1 or 2"),
    (["--model", "infinity-cifar", "--weights", "missing.pth", "--vae", "missing.pth"], "checkpoint not found: missing.pth"),
    (["--random-weights", "--engine", "engines/x"], "drop --weights/--vae/--random-weights"),
    (["--random-weights", "--resolution", "0"], "--resolution must be positive"),
    (["--random-weights", "--seed", "99999999999999999999999"], "--seed must be an integer in [0, 2^63)"),
    (["--random-weights", "--seed", "-1"], "--seed must be an integer in [0, 2^63)"),
    (["--random-weights", "--prompt", "a cat", "--text-embeddings", "e.pt"], "give --prompt or --text-embeddings"),
    # before any weights load (it was said by the loop, after them: 25 s and 9 GB at 2B)
    (["--model", "infinity-2b", "--random-weights", "--resolution", "256", "--skip-last", "7"],
     "--skip-last must be below the 7 scales of infinity-2b at 256"),
    # prompts the text encoder cannot take: refused before anything loads, as the server refuses them
    (["--random-weights", "--prompt", "  "], "--prompt must be a non-empty string"),
    (["--random-weights", "--prompt", "caf\udce9"], "--prompt must be valid UTF-8 text: character '\\udce9' at position 3"),
])
def test_bad_arguments_are_named(args, message, capsys, tmp_path):
    code, err = _run(["generate", *args, "--out", str(tmp_path / "x.png")], capsys)
    assert code != 0 and message in err, err


def test_bad_out_paths_are_refused_before_generating(capsys, tmp_path, monkeypatch):
    import sparvar.pipeline as pipeline

    monkeypatch.setattr(pipeline.Pipeline, "from_args", lambda *a, **k: pytest.fail("the model loaded first"))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "b-1.png").mkdir()  # the second image of a batch written as b.png
    for out, prompts, message in (
            (str(tmp_path), 1, "is a directory; give a file name"), ("", 1, "must name an image file"),
            (str(tmp_path / "afile" / "x.png"), 1, "afile is a file, not a directory"),
            (str(tmp_path / "x.foo"), 1, "no image format writes '.foo' files"),
            # a writer Pillow registers that takes no RGB image: it failed after the whole generation
            (str(tmp_path / "x.xbm"), 1, "no image format writes '.xbm' files"),
            (str(tmp_path / "b.png"), 3, f"the batch's image {tmp_path / 'b-1.png'} is a directory")):
        prompt_args = [a for i in range(prompts) for a in ("--prompt", f"prompt {i}")]
        code, err = _run(["generate", "--random-weights", *prompt_args, "--out", out], capsys)
        assert code == 2 and message in err, (out, err)
    assert sorted(os.listdir(tmp_path)) == ["afile", "b-1.png"]  # nothing written, nothing generated


def test_an_engine_takes_its_batch_and_guidance_before_it_loads(engines, capsys, tmp_path, monkeypatch):
    """The prompts an onnxruntime engine takes per generation, and its CFG batch, are in its manifest: a request it
    cannot run is refused before its files hash and its graphs load (and with the same words as its runner)."""
    import sparvar.runtime as runtime

    monkeypatch.setattr(runtime, "load_engine_pipeline", lambda *a, **k: pytest.fail("the engine loaded first"))
    base = ["generate", "--engine", engines["dense"], "--out", str(tmp_path / "x.png")]
    code, err = _run(base + ["--prompt", "a", "--prompt", "b"], capsys)
    assert code == 1 and "was built for 1 prompt(s) per generation, got 2" in err, err
    code, err = _run(base + ["--cfg", "1"], capsys)
    assert code == 1 and "built with classifier-free guidance" in err, err
    code, err = _run(base + ["--model", "infinity-3b"], capsys)  # not "build an engine with model='infinity-3b'"
    assert code == 2 and "unknown model 'infinity-3b'" in err, err
    code, err = _run(base + ["--resolution", "-1"], capsys)
    assert code == 2 and "--resolution must be positive" in err, err
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("option,message", [
    (["--attention", "sparvar"], "built for attention='dense', not 'sparvar'"),
    (["--aspect", "2:1"], "built for aspect='1:1', not '2:1'"),
    (["--dtype", "bf16"], "built for dtype='fp32', not 'bf16'"),
    (["--device", "cpu"], "runs on its backend's device"),
])
def test_engine_generation_refuses_options_that_contradict_the_engine(engines, capsys, tmp_path, option, message):
    """What an engine was built for is fixed: an option saying otherwise is refused, not silently ignored."""
    code, err = _run(["generate", "--engine", engines["dense"], *option, "--out", str(tmp_path / "x.png")], capsys)
    assert code != 0 and message in err, err
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("option,message", [
    (["--device", "cpu"], "--device: an engine runs on its backend's device"),
    (["--skip-last", "2"], "--skip-last is chosen when generating"),
    (["--batch", "0"], "--batch must be >= 1"),
])
def test_engine_build_refuses_generation_options(capsys, tmp_path, option, message):
    code, err = _run(["engine", "build", "--model", "infinity-tiny", "--random-weights", *option,
                      "--engine-dir", str(tmp_path / "e")], capsys)
    assert code == 2 and message in err, err
    assert not os.listdir(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_clear_error(capsys):
    code, err = _run(["generate", "--random-weights", "--device", "cuda"], capsys)
    assert code == 2 and "no CUDA GPU is available" in err


@pytest.mark.parametrize("args", [["generate", "--engine", ""], ["generate", "--model", "", "--random-weights"],
                                  ["engine", "build", "--random-weights", "--engine-dir", ""], ["engine", "info", ""],
                                  ["generate", "--engine", " "], ["serve", "--engine", "e", "--host", ""],
                                  ["bench", "e2e", "--model", "infinity-tiny", "--out", ""]])
def test_an_empty_name_or_path_is_an_error_not_the_default(args, capsys):
    """What "$VAR" gives for an unset variable: an error naming the option, never the option's default (an empty
    --engine ran eager torch, an empty --engine-dir built into ./engines/..., an empty --host listened on every
    interface, an empty bench --out wrote over the committed bench/results/e2e_<device>.json)."""
    with pytest.raises(SystemExit) as e:
        main(args)
    before = args[next(i for i, a in enumerate(args) if not a.strip()) - 1]
    option = before if before.startswith("--") else "engine_dir"
    assert e.value.code == 2 and f"{option}: must not be empty" in capsys.readouterr().err


def test_ctrl_c_is_a_message_and_exit_130(capsys, monkeypatch):
    import sparvar.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_engine", interrupted)
    assert main(["engine", "info", "somewhere"]) == 130
    assert "sparvar: interrupted" in capsys.readouterr().err


def test_an_os_error_is_a_message_not_a_traceback(capsys, tmp_path, monkeypatch):
    """A path the command cannot read (an unreadable --t5 directory, a full disk) ends as `sparvar: error: ...`."""
    import sparvar.cli as cli

    def unreadable(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "flan-t5-xl"))

    monkeypatch.setattr(cli, "cmd_generate", unreadable)
    assert main(["generate", "--model", "infinity-tiny", "--random-weights", "--out", str(tmp_path / "x.png")]) == 1
    assert "sparvar: error: [Errno 13] Permission denied:" in capsys.readouterr().err


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
    assert spec("--model", "infinity-tiny", "--backend", "torch-cuda").dtype == "bf16"  # what its kernels take
    assert spec("--model", "infinity-tiny", "--backend", "onnxruntime").dtype == "fp32"
    with pytest.raises(ValueError, match="torch-cuda SparVAR engines run bf16 or fp16"):
        spec("--model", "infinity-tiny", "--backend", "torch-cuda", "--dtype", "fp32", "--attention", "sparvar")
    assert spec("--model", "infinity-tiny", "--backend", "torch-cuda", "--dtype", "fp32").attention == "dense"
    assert spec("--model", "infinity-2b", "--backend", "torch-cuda", "--dtype", "fp16").dtype == "fp16"
    assert spec("--model", "infinity-2b", "--backend", "torch-cuda", "--fp8").fp8


def test_a_backend_that_is_not_installed_is_refused_before_the_export(capsys, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    code, err = _run(["engine", "build", "--model", "infinity-tiny", "--random-weights", "--backend", "tensorrt",
                      "--engine-dir", str(tmp_path / "e")], capsys)
    assert code == 1 and "cannot build a tensorrt engine on this machine: TensorRT not installed" in err, err
    assert not os.listdir(tmp_path)


def test_a_failed_image_write_leaves_no_temp_file(tmp_path, monkeypatch):
    """save_images writes to a temp name and renames; when the write fails (disk full), the temp file goes too."""
    import torch
    from PIL import Image

    from sparvar.pipeline import save_images

    def full_disk(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_images(torch.rand(1, 3, 8, 8), str(tmp_path / "x.png"))
    assert os.listdir(tmp_path) == []


def test_a_batch_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A batch's images are all encoded before any is renamed into place: the third failing to encode leaves none
    of them (the first two had been written); the error names the file asked for, not its temp name."""
    import torch
    from PIL import Image

    from sparvar.pipeline import save_images

    real_save, calls = Image.Image.save, []

    def third_fails(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", third_fails)
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'b-2.png'}: No space left on device"):
        save_images(torch.rand(3, 3, 8, 8), str(tmp_path / "b.png"))
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()  # the disk has room again
    assert save_images(torch.rand(3, 3, 8, 8), str(tmp_path / "b.png")) == [str(tmp_path / f"b-{i}.png") for i in range(3)]
    assert sorted(os.listdir(tmp_path)) == ["b-0.png", "b-1.png", "b-2.png"]


def test_pixels_are_truncated_as_the_official_pipelines_convert():
    """Infinity's mul_(255).to(torch.uint8) and HART's astype(np.uint8) truncate: 0.999 -> 254, not 255."""
    from sparvar.pipeline import image_arrays

    images = torch.tensor([0.0, 0.999, 1.0, 0.5, -0.1, 1.2]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert image_arrays(images)[0, 0, :, 0].tolist() == [0, 254, 255, 127, 0, 255]


def test_real_weights_never_fall_back_to_hashed_text(tmp_path, capsys):
    """Hashed pseudo-embeddings stand in for text only with random weights: real Infinity weights without a text
    source are refused (the image would come from made-up text), and a model trained on hashed embeddings refuses
    an encoder."""
    from sparvar.config import get_config
    from tests.test_bench_e2e import _official_files

    weights, vae = _official_files(tmp_path, get_config("infinity-tiny"))
    out = str(tmp_path / "x.png")
    assert main(["generate", "--model", "infinity-tiny", "--weights", weights, "--vae", vae, "--out", out]) == 2
    assert "infinity-tiny with real weights needs a text encoder" in capsys.readouterr().err  # before any loading
    assert not os.path.exists(out)
    root = os.path.join(os.path.dirname(__file__), "..", "weights")
    assert main(["generate", "--model", "infinity-cifar", "--weights", os.path.join(root, "infinity-cifar.safetensors"),
                 "--vae", os.path.join(root, "infinity-cifar-tokenizer.safetensors"), "--t5", str(tmp_path),
                 "--out", out]) == 2  # a usage error, found before anything loads
    assert "infinity-cifar was trained on hashed word embeddings, not a text encoder: drop --t5" in capsys.readouterr().err


def test_a_class_conditional_model_takes_only_its_class_names(tmp_path, capsys):
    """infinity-cifar was trained on CIFAR-10's class names: any other prompt is a hashed vector it never saw (a noise
    image, nothing naming why), so it is refused before anything loads; no --prompt means its first class. A class
    name spelled as the hashed embedding reads it (case, spaces) is that class."""
    from sparvar.config import CIFAR10_CLASSES, CLASS_PROMPTS
    from sparvar.pipeline import Pipeline

    root = os.path.join(os.path.dirname(__file__), "..", "weights")
    files = ["--weights", os.path.join(root, "infinity-cifar.safetensors"),
             "--vae", os.path.join(root, "infinity-cifar-tokenizer.safetensors")]
    out = str(tmp_path / "x.png")
    assert main(["generate", "--model", "infinity-cifar", *files, "--prompt", "cat", "--prompt", "a red fox",
                 "--out", out]) == 2
    err = capsys.readouterr().err
    assert "infinity-cifar was trained on its class names alone; the prompt must be one of airplane, automobile" in err
    assert "got 'a red fox'" in err and "'cat'" not in err
    assert not os.listdir(tmp_path)
    assert main(["generate", "--model", "infinity-cifar", *files, "--out", out]) == 0
    assert os.listdir(tmp_path) == ["x.png"] and CLASS_PROMPTS["infinity-cifar"] == CIFAR10_CLASSES
    pipe = Pipeline.create("infinity-cifar")  # the library path refuses it too, random weights or not
    with pytest.raises(ValueError, match="got 'hot dog'"):
        pipe.text_features(["dog", "hot dog"], allow_hashed=True)
    features, _ = pipe.text_features(["dog", " Dog ", "DOG"], allow_hashed=True)
    assert torch.equal(features[0], features[1]) and torch.equal(features[0], features[2])
    assert Pipeline.create("infinity-tiny").text_features(["a red fox"], allow_hashed=True)[0].shape[0] == 1


def test_a_batch_of_prompts_writes_one_numbered_file_each(tmp_path, capsys):
    """Two --prompt: out-0.png and out-1.png (not out.png), each the row of the batched generation."""
    out = str(tmp_path / "x.png")
    assert main(["generate", "--model", "infinity-tiny", "--random-weights", "--prompt", "a cat", "--prompt", "a dog",
                 "--seed", "3", "--out", out]) == 0
    assert sorted(os.listdir(tmp_path)) == ["x-0.png", "x-1.png"]
    from sparvar.pipeline import Pipeline, image_arrays

    pipe = Pipeline.create("infinity-tiny", attention="dense", weights=None, vae=None)  # the CLI default
    features, lengths = pipe.text_features(["a cat", "a dog"], allow_hashed=True)
    want = image_arrays(pipe.generate(features, lengths, pipe.sampling(), seed=3).image)
    for i in range(2):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"x-{i}.png")), want[i])
    assert main(["generate", "--model", "infinity-tiny", "--random-weights", "--device", "mps", "--out", out]) == 2
    assert "--device must be cpu or cuda" in capsys.readouterr().err


def test_a_tensorrt_without_qdp_or_a_gpu_is_refused_before_the_export(capsys, tmp_path, monkeypatch):
    """Engine directories build with the QDP plugins (TensorRT >= 10.6) for this machine's GPU: an older TensorRT, or
    none of a GPU, is named before the export (minutes at 8B) rather than as an ImportError traceback after it."""
    import sys
    import types

    import export.tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    argv = ["engine", "build", "--model", "infinity-tiny", "--random-weights", "--backend", "tensorrt",
            "--engine-dir", str(tmp_path / "e")]
    code, err = _run(argv, capsys)
    assert code == 1 and "TensorRT 10.3.0 has no tensorrt.plugin (QDP needs >= 10.6)" in err, err
    plugin = types.ModuleType("tensorrt.plugin")
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.13.0", __name__="tensorrt",
                                                                       plugin=plugin))
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", plugin)
    monkeypatch.setattr(export.tensorrt, "gpu_identity", lambda: None)
    code, err = _run(argv, capsys)
    assert code == 1 and "this machine has no CUDA GPU" in err, err
    assert not os.listdir(tmp_path)


def test_text_embeddings_file_is_the_text_the_model_sees(tmp_path, capsys):
    """--text-embeddings feeds the file's embeddings: those of 'a cat' give the image of --prompt 'a cat' (random
    weights encode prompts with the same hashed table), not that of 'a dog'."""
    from sparvar.config import get_config
    from sparvar.text import hashed_embeddings

    cfg = get_config("infinity-tiny")
    features, lengths = hashed_embeddings(["a cat"], cfg.text_dim, cfg.text_maxlen)
    torch.save({"features": features, "lengths": lengths}, tmp_path / "text.pt")
    base = ["generate", "--model", "infinity-tiny", "--random-weights", "--seed", "4"]
    runs = {"file": ["--text-embeddings", str(tmp_path / "text.pt")], "cat": ["--prompt", "a cat"],
            "dog": ["--prompt", "a dog"]}
    for name, extra in runs.items():
        code, err = _run([*base, *extra, "--out", str(tmp_path / f"{name}.png")], capsys)
        assert code == 0, err
    assert _digest(tmp_path / "file.png") == _digest(tmp_path / "cat.png") != _digest(tmp_path / "dog.png")


def test_an_encoder_folder_without_a_model_in_it_is_named_before_any_work(tmp_path):
    """--t5 / --qwen pointing at a folder that is not a local model copy (an empty one, the wrong level): the option
    and the folder are named, not a tokenizer library's advice to install sentencepiece."""
    from sparvar.config import get_config
    from sparvar.pipeline import check_text_sources

    with pytest.raises(ValueError, match=r"--t5 .*: no config.json there, so not a local copy of the encoder"):
        check_text_sources(get_config("infinity-tiny"), t5=str(tmp_path))
    with pytest.raises(ValueError, match=r"--qwen .*: no config.json there"):
        check_text_sources(get_config("hart-0.7b"), qwen=str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    check_text_sources(get_config("infinity-tiny"), t5=str(tmp_path))  # a model folder passes this check


def test_an_engine_built_for_another_model_is_named_before_the_text_options(engines, capsys, tmp_path):
    """generate --engine checks the engine against the options first: a --model that contradicts the engine is
    what is reported, not the text encoder that model would have needed."""
    code, err = _run(["generate", "--engine", engines["dense"], "--model", "hart-0.7b", "--qwen", str(tmp_path),
                      "--out", str(tmp_path / "x.png")], capsys)
    assert code == 1 and "built for model='infinity-tiny'" in err, err


def test_sampling_options_and_hart_text_files_are_refused_before_anything_loads(engines, tmp_path, capsys, monkeypatch):
    """--cfg/--tau/--top-k/--top-p are checked as the model's family samples before the weights load or the engine's
    files hash (tens of GB at 8B), and HART's text file as HART reads it (every slot, its lengths): both had been
    said only after the load."""
    import sparvar.pipeline as pipeline
    import sparvar.runtime as runtime

    monkeypatch.setattr(pipeline.Pipeline, "from_args", lambda *a, **k: pytest.fail("the model loaded first"))
    monkeypatch.setattr(runtime, "load_engine_pipeline", lambda *a, **k: pytest.fail("the engine loaded first"))
    out = ["--out", str(tmp_path / "x.png")]
    code, err = _run(["generate", "--engine", engines["sparvar"], "--top-p", "2", *out], capsys)
    assert code == 2 and "top_p must be in [0, 1]" in err, err
    code, err = _run(["generate", "--model", "infinity-2b", "--random-weights", "--tau", "0", *out], capsys)
    assert code == 2 and "tau must be > 0" in err, err
    code, err = _run(["generate", "--model", "hart-tiny", "--random-weights", "--top-k", "1", *out], capsys)
    assert code == 2 and "top_k: hart-tiny uses the official top-k schedule" in err, err
    from sparvar.config import get_config

    cfg = get_config("hart-tiny")
    torch.save({"features": torch.zeros(1, cfg.text_len, cfg.text_dim)}, tmp_path / "e.pt")  # no 'lengths'
    code, err = _run(["generate", "--model", "hart-tiny", "--random-weights", "--text-embeddings",
                      str(tmp_path / "e.pt"), *out], capsys)
    assert code == 2 and "'lengths'" in err, err


@pytest.mark.parametrize("device", ["cuda:1", "cuda:abc", "cuda:-1", "cuda:"])
def test_a_gpu_index_this_machine_lacks_is_named(device, capsys, monkeypatch):
    """On a one-GPU machine (faked here): an index it lacks, or none, was a CUDA traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, err = _run(["generate", "--random-weights", "--device", device], capsys)
    assert code == 2 and f"--device {device}: this machine's GPUs are cuda:0 to cuda:0" in err, err


def test_a_text_embeddings_file_of_the_wrong_width_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """The file is small; the model at 2B is 9 GB: its width is checked first."""
    import sparvar.pipeline as pipeline

    monkeypatch.setattr(pipeline.Pipeline, "from_args", lambda *a, **k: pytest.fail("the model loaded first"))
    torch.save({"features": torch.zeros(1, 5, 64), "lengths": torch.tensor([5])}, tmp_path / "e.pt")
    code, err = _run(["generate", "--model", "infinity-2b", "--random-weights", "--resolution", "256",
                      "--text-embeddings", str(tmp_path / "e.pt"), "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "'features' has shape (1, 5, 64), expected (B, L, 2048)" in err, err
