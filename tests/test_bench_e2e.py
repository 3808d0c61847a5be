"""bench/e2e.py on the CPU: its options are refused before any model is built, and with official checkpoints its
rows run the weights `sparvar generate` loads (the timing itself needs a GPU: tools/gpu_bench.sh)."""
import os

import pytest
import torch

from bench.e2e import family_parts
from sparvar.checkpoint import save_official
from sparvar.cli import main
from sparvar.config import get_config
from sparvar.model import build_model
from sparvar.pipeline import Pipeline
from sparvar.vae import build_vae


@pytest.mark.parametrize("args,message", [
    (["--model", "infinity-3b"], "unknown model 'infinity-3b'"),
    (["--model", "infinity-2b", "--weights", "w.pth"], "give both --weights and --vae"),
    (["--model", "infinity-2b", "--vae", "v.pth"], "give both --weights and --vae"),
    (["--weights", "w.pth", "--vae", "v.pth"], "name that model with one --model"),
    (["--model", "infinity-2b", "--model", "infinity-8b", "--weights", "w.pth", "--vae", "v.pth"],
     "name that model with one --model"),
    (["--text-embeddings", "t.safetensors"], "name that model with one --model"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--model", "infinity-2b", "--weights", "missing.pth", "--vae", "missing.pth"], "--weights missing.pth: no such file"),
    (["--model", "infinity-2b", "--rows", "engine,TRT"], "--rows term 'TRT' selects none of infinity-2b's rows"),
    (["--model", "hart-0.7b", "--rows", "FP8"], "--rows term 'FP8' selects none of hart-0.7b's rows"),
    (["--rows", "=SparVAR engine"], "--rows term '=SparVAR engine' selects none of infinity-2b's rows"),
    (["--model", "infinity-2b", "--rows", "engine", "--rows", "=dense engine"], "'=dense engine' selects none"),
    (["--model", "infinity-2b", "--rows", " , "], "--rows names no row"),
    (["--model", "infinity-2b", "--runs", "0"], "--runs must be >= 1 and --warmup >= 0"),
    (["--model", "infinity-2b", "--warmup", "-5"], "--runs must be >= 1 and --warmup >= 0"),
    (["--model", "infinity-2b", "--resolution", "300"], "unsupported resolution 300"),
    (["--model", "infinity-2b", "--engine-cross-max-q", "-7"], "--engine-cross-max-q must be >= 0"),
    (["--model", "infinity-2b", "--out", "."], "--out . is a directory"),
])
def test_bench_e2e_refuses_bad_options_before_building_anything(args, message, capsys):
    assert main(["bench", "e2e", *args]) == 2
    assert message in capsys.readouterr().err


def test_bench_rows_select_by_substring_or_exact_name():
    """A '=' term picks the one row of that name (the SparVAR engine row without the ablations whose names contain
    it); a plain term every row containing it; the rows keep the benchmark's order."""
    from bench.e2e import SPARVAR_ENGINE_ROW, select_rows

    names = lambda *specs: [r[0] for r in select_rows("infinity-2b", list(specs))]  # noqa: E731
    assert names("=" + SPARVAR_ENGINE_ROW, "dense engine (CUDA graphs),skip last 2") == [
        "dense engine (CUDA graphs)", SPARVAR_ENGINE_ROW, "SparVAR engine + skip last 2", "dense engine + skip last 2",
        "dense engine (CUDA graphs), cross-attention unabsorbed"]
    ablations = names("Triton kernels)")
    assert ablations[0] == SPARVAR_ENGINE_ROW and len(ablations) > 1
    assert all(SPARVAR_ENGINE_ROW in n for n in ablations)
    assert names("skip last 2") == ["SparVAR engine + skip last 2", "dense engine + skip last 2"]
    assert [r[0] for r in select_rows("infinity-2b", None)] == names("e")  # every row name has an 'e'


def test_csla_tuning_reports_only_a_tuning_of_this_row(monkeypatch):
    """A row whose CSLA calls all hit the autotuner's cache must not report the tuning an earlier row left behind as
    its own (a row of e2e_engines_2b_tma_pdl_h100.json reported another row's)."""
    from types import SimpleNamespace

    from bench.e2e import csla_tuning, forget_csla_timings
    from sparvar.kernels import csla

    tuner = SimpleNamespace(best_config="plain config", configs_timings={"other config": 1.0, "plain config": 0.9})
    monkeypatch.setattr(csla, "_csla_fwd_tuned", tuner, raising=False)
    assert csla_tuning() == {"csla_config_last_scale": "plain config", "csla_tuned_in_row": True}
    forget_csla_timings()  # the next row starts; its calls hit the cache: best_config is set, nothing timed
    assert csla_tuning() == {"csla_config_last_scale": "plain config", "csla_tuned_in_row": False}
    tuner.configs_timings = {"plain config": 0.9}  # it tuned after all
    assert csla_tuning()["csla_tuned_in_row"] is True


def _official_files(tmp_path, cfg):
    weights, vae = str(tmp_path / "transformer.safetensors"), str(tmp_path / "tokenizer.pth")
    save_official(build_model(cfg, seed=7), weights)
    tokenizer = build_vae(cfg.vae, seed=9).state_dict()
    tokenizer["quantizer.lfq.mask"] = 2 ** torch.arange(cfg.vae.codebook_dim - 1, -1, -1)  # as official files carry
    torch.save({"vae": tokenizer}, vae)
    return weights, vae


def test_bench_rows_run_the_given_checkpoints(tmp_path):
    """With --weights/--vae the rows' model and tokenizer are the checkpoints' (not random ones), and an eager row's
    pipeline makes the image `sparvar generate` makes from the same files, bit for bit."""
    cfg = get_config("infinity-tiny")
    weights, vae = _official_files(tmp_path, cfg)
    base, decoder, features, lengths, sampling, make_runner, make_pipeline = family_parts(
        "infinity-tiny", cfg.default_resolution, torch.device("cpu"), weights, vae)
    assert not base.random_weights
    want = Pipeline.create("infinity-tiny", weights=weights, vae=vae, dtype=torch.bfloat16)
    random = Pipeline.create("infinity-tiny", dtype=torch.bfloat16)
    got_params = dict(base.runner.model.named_parameters())
    for name, p in want.runner.model.named_parameters():
        assert torch.equal(got_params[name], p), name
    assert not torch.equal(got_params["pos_start"], dict(random.runner.model.named_parameters())["pos_start"])
    for a, b in zip(decoder.module.parameters(), want.decoder.module.parameters()):
        assert torch.equal(a, b)

    pipe = make_pipeline(make_runner("eager", None, "sdpa", False, 0, True), 0)
    with torch.no_grad():
        got = pipe.generate(features, lengths, sampling=sampling, seed=3).image
        ref = want.generate(features, lengths, sampling=sampling, seed=3).image
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


def test_bench_checkpoint_of_another_model_is_refused(tmp_path):
    weights, vae = _official_files(tmp_path, get_config("infinity-tiny"))
    with pytest.raises(ValueError, match="infinity-2b"):
        family_parts("infinity-2b", 1024, torch.device("cpu"), weights, vae)


def cuda_calls_as_no_ops(monkeypatch, e2e) -> None:
    """bench_model's CUDA bookkeeping (memory stats, syncs, cuDNN's acceptance) as no-ops, to run its row loop on the
    CPU."""
    monkeypatch.setattr(e2e, "cudnn_acceptance", lambda cfg, schedule: {})
    for name in ("reset_peak_memory_stats", "synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)


def test_bench_model_saves_every_row_with_its_ratios(monkeypatch):
    """The row loop on the CPU, timing stubbed (it needs CUDA events): every row is saved as soon as it is measured,
    with the ratios over the rows measured before it; a failing row is recorded and the others still run."""
    import bench.e2e as e2e

    medians = iter([100.0, 50.0])

    def fake_timing(pipe, features, lengths, warmup, runs, sampling):
        image = pipe.generate(features, lengths, sampling=sampling, seed=0).image  # the row's real pipeline runs once
        assert image.shape[0] == 2 and torch.isfinite(image).all()  # batch 2: two prompts, two images
        assert not torch.equal(image[0], image[1])
        return {"median_ms": next(medians)}, [1.0] * (pipe.schedule.num_scales - pipe.skip_last)

    monkeypatch.setattr(e2e, "time_generation", fake_timing)
    cuda_calls_as_no_ops(monkeypatch, e2e)
    rows = [("dense eager, SDPA FlashAttention-2", "dense", "eager", "math", 0, False),
            ("dense eager + skip last 2", "dense", "eager", "math", 2, False),
            ("SparVAR eager", "sparvar", "eager", "math", 0, False)]  # the rows' Triton plan: fails on the CPU
    saved = []
    result = e2e.bench_model("infinity-tiny", 256, 0, 1, rows, save=lambda r: saved.append(
        [dict(row) for row in r["rows"]]), device="cpu", batch=2)
    assert [len(s) for s in saved] == [1, 2, 3]
    assert saved[0][0]["speedup_vs_dense_eager_fa2"] == 1.0
    assert saved[1][1]["speedup_vs_dense_eager_fa2"] == 2.0
    assert saved[1][1]["images_per_s"] == 1000 * 2 / 50.0 and result["batch"] == 2
    assert result["rows"][2]["row"] == "SparVAR eager" and "CUDA device" in result["rows"][2]["error"]
    assert result["model"] == "infinity-tiny" and result["weights"] == "random"


def test_hart_rows_decode_in_fp16_as_the_official_inference():
    """HART's bench parts on the CPU: the rows' tokenizer decodes in fp16 (the official autocast precision) while f_hat
    accumulates in fp32, and an eager row's pipeline generates through it."""
    base, decoder, features, mask, sampling, make_runner, make_pipeline = family_parts(
        "hart-tiny", 256, torch.device("cpu"))
    assert decoder.decode_dtype == torch.float16 and decoder.quantize.embedding.weight.dtype == torch.float32
    assert decoder.post_quant_conv.weight.dtype == torch.float16
    pipe = make_pipeline(make_runner("eager", None, "math", False, 0, True), 0)
    with torch.no_grad():
        image = pipe.generate(features, mask, sampling=sampling, seed=1).image
    assert image.shape == (1, 3, 256, 256) and torch.isfinite(image).all()


def test_gpu_bench_script_asks_for_rows_that_exist(monkeypatch):
    """tools/gpu_bench.sh's e2e calls pass the benchmark's option checks, their --rows included: a renamed row
    would otherwise first fail on the GPU, in device time. (The cuDNN CSLA rows exist where nvidia-cudnn-frontend
    is installed, as on the GPU machine the cudnncsla modes run on; without it, asking for them is refused.)"""
    import argparse
    import shlex

    from bench.e2e import check_args
    from sparvar.cli import add_bench_e2e_args

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "tools", "gpu_bench.sh")) as f:
        lines = f.read().replace("\\\n", " ").splitlines()
    calls = [line.split("python bench/e2e.py", 1)[1].split("2>&1")[0] for line in lines if "python bench/e2e.py" in line]
    assert len(calls) >= 5
    monkeypatch.setattr("sparvar.kernels.cudnn_csla.HAS_CUDNN_FRONTEND", True)
    parser = argparse.ArgumentParser()
    add_bench_e2e_args(parser)
    for call in calls:
        for size in ("2b", "8b"):  # the e2e2b / e2e8b mode's "infinity-$size"
            args = parser.parse_args(shlex.split(call.replace("$size", size)))
            check_args(args)


def test_gpu_bench_script_refuses_an_unknown_mode_before_running_any():
    """tools/gpu_bench.sh checks every mode it is given against the modes its header lists before it runs one (a
    mistyped or removed mode would otherwise spend a device call on nothing), and the header lists exactly the
    modes its case statement handles."""
    import re
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "tools", "gpu_bench.sh")
    text = open(script).read()
    listed = set(re.findall(r'^#   bash tools/gpu_bench.sh "\$OUT" ([a-z0-9]+) ', text, re.M))
    body = text[text.index('case "$what" in'):]
    handled = {mode for pattern in re.findall(r"^    ([a-z0-9|]+)\)", body, re.M) for mode in pattern.split("|")}
    assert handled == listed, (listed, handled)
    done = subprocess.run(["bash", script, "/tmp/unused", "pair2b", "tma2b"], capture_output=True, text=True,
                          env={**os.environ, "SPARVAR_COMMIT": "test"}, cwd=root, timeout=30)
    assert done.returncode == 2 and "unknown mode 'tma2b'" in done.stderr, (done.returncode, done.stderr)
    assert "bench e2e" not in done.stdout + done.stderr  # nothing ran, not even the valid pair2b before it


def test_unabsorbed_rows_are_compared_with_the_unabsorbed_dense_engine():
    from bench.e2e import DENSE_ENGINE_ROW, DENSE_FP8_ROW, SPARVAR_ENGINE_ROW, SPARVAR_FP8_ROW, UNABSORBED, add_ratios

    rows = [{"row": DENSE_ENGINE_ROW, "median_ms": 230.0}, {"row": SPARVAR_ENGINE_ROW, "median_ms": 190.0},
            {"row": DENSE_ENGINE_ROW + UNABSORBED, "median_ms": 246.0},
            {"row": SPARVAR_ENGINE_ROW + UNABSORBED, "median_ms": 205.0}]
    add_ratios("infinity-2b", rows)
    assert [round(r["speedup_vs_dense_engine"], 4) for r in rows] == [1.0, round(230 / 190, 4), 1.0, 1.2]
    fp8 = [{"row": DENSE_FP8_ROW, "median_ms": 200.0, "fp8": True},
           {"row": SPARVAR_FP8_ROW, "median_ms": 160.0, "fp8": True},
           {"row": DENSE_FP8_ROW + UNABSORBED, "median_ms": 220.0, "fp8": True},
           {"row": SPARVAR_FP8_ROW + UNABSORBED, "median_ms": 200.0, "fp8": True}]
    add_ratios("infinity-2b", rows + fp8)
    assert [round(r["speedup_vs_dense_fp8_engine"], 4) for r in fp8] == [1.0, 1.25, 1.0, 1.1]
    assert [round(r["speedup_vs_dense_engine"], 4) for r in fp8] == [1.15, round(230 / 160, 4), round(246 / 220, 4),
                                                                    1.23]


def test_skip_rows_name_both_baselines_and_the_flop_floor_fits_the_row():
    """A skipping row: its speedup over the full dense engine (the paper's "+ skip 2") and over the dense engine
    skipping as much. The FLOP floor (dense bf16, whole 1024² images) is given only to rows doing that work: a
    skipping or FP8 row ran under it (x 0.68), and at batch 4 it is four images' floor."""
    from bench.e2e import DENSE_ENGINE_ROW, DENSE_FP8_ROW, SPARVAR_ENGINE_ROW, add_ratios

    rows = [{"row": DENSE_ENGINE_ROW, "median_ms": 230.0}, {"row": SPARVAR_ENGINE_ROW, "median_ms": 190.0},
            {"row": "SparVAR engine + skip last 2", "median_ms": 99.0, "skip_last": 2},
            {"row": "dense engine + skip last 2", "median_ms": 102.0, "skip_last": 2},
            {"row": DENSE_FP8_ROW, "median_ms": 200.0, "fp8": True}]
    add_ratios("infinity-2b", rows)
    assert round(rows[2]["speedup_vs_dense_engine"], 4) == round(230 / 99, 4)
    assert round(rows[2]["speedup_vs_dense_engine_same_skip"], 4) == round(102 / 99, 4)
    assert "speedup_vs_dense_engine_same_skip" not in rows[1]
    assert [round(r.get("x_flop_floor", 0), 4) for r in rows] == [round(230 / 146, 4), round(190 / 146, 4), 0, 0, 0]
    batch4 = [{"row": DENSE_ENGINE_ROW, "median_ms": 740.0}]
    add_ratios("infinity-2b", batch4, batch=4)
    assert round(batch4[0]["x_flop_floor"], 4) == round(740 / (4 * 146), 4)
    other = [{"row": DENSE_ENGINE_ROW, "median_ms": 40.0}]
    add_ratios("infinity-2b", other, resolution=512)
    assert "x_flop_floor" not in other[0]


def test_clock_sampler_summarises_what_it_read_and_says_why_it_did_not():
    """The e2e rows' GPU clocks: samples taken in the background while entered, their median / min / max; without
    a reader (no GPU, no pynvml) no sample and the reason."""
    import itertools
    import time

    from bench.common import ClockSampler

    clocks = itertools.cycle([(1980.0, 650.0), (1755.0, 700.0), (1830.0, 690.0)])
    with ClockSampler(read=lambda: next(clocks), interval_s=0.001) as sampler:
        time.sleep(0.05)
    summary = sampler.summary()
    assert summary["sampled"] and summary["samples"] >= 3
    assert summary["sm_clock_mhz"]["min"] == 1755.0 and summary["sm_clock_mhz"]["max"] == 1980.0
    assert summary["power_w"]["max"] == 700.0
    taken = len(sampler.samples)
    time.sleep(0.01)
    assert len(sampler.samples) == taken  # stopped on exit
    assert summary["stopped"] is None
    reads = iter([(1900.0, 600.0)])
    with ClockSampler(read=lambda: next(reads), interval_s=0.001) as failing:  # the reader fails after one sample
        time.sleep(0.02)
    summary = failing.summary()
    assert summary["samples"] == 1 and summary["stopped"].startswith("sampling stopped: StopIteration")
    if not torch.cuda.is_available():
        with ClockSampler() as idle:
            pass
        assert idle.summary() == {"sampled": False, "why": "no CUDA GPU"}


def test_a_result_that_cannot_be_written_leaves_no_temp_file(tmp_path):
    from bench.common import write_result

    (tmp_path / "r.json").mkdir()  # os.replace onto a directory fails
    with pytest.raises(OSError):
        write_result(str(tmp_path / "r.json"), {"rows": []})
    assert os.listdir(tmp_path) == ["r.json"]


@pytest.mark.parametrize("model", ["infinity-2b", "infinity-8b"])
def test_cudnn_csla_rows_send_each_scale_where_they_say(model, monkeypatch):
    """The cuDNN CSLA rows: on 128x64 tiles, scales 11-12 (whole 128-row tiles) by cuDNN on those tiles and scale 10
    (1,600 queries) on the policy's 64x64 tiles by Triton; on the policy's tiles, every scale by cuDNN. Dispatched
    by tile shape, on the device copies the plan hands over (at 2f1d060 scale 10's 64-row tiles went to cuDNN)."""
    from bench.e2e import csla_by_cudnn
    from sparvar import kernels
    from sparvar.schedule import get_schedule

    cfg, schedule = get_config(model), get_schedule(1024, model=model)
    ran = []
    monkeypatch.setattr("sparvar.kernels.cudnn_csla.csla_attention_cudnn", lambda q, k, v, layout: ran.append("cudnn"))
    triton_ops = kernels.sparse_ops()._replace(csla=lambda q, k, v, layout: ran.append("triton"))
    monkeypatch.setattr(kernels, "sparse_ops", lambda: triton_ops)
    for tile, want, blocks in (((128, 64), [11, 12], {10: (64, 64), 11: (128, 64), 12: (128, 64)}),
                               (None, [10, 11, 12], {10: (64, 64), 11: (64, 64), 12: (64, 64)})):
        plan, cudnn_scales = csla_by_cudnn(cfg, schedule, 0, tile)
        assert cudnn_scales == want
        assert {s: (lay.block_m, lay.block_n) for s, lay in plan.csla_layouts.items()} == blocks
        for scale in plan.csla_layouts:
            ran.clear()
            plan.ops.csla(None, None, None, plan._device_copy("csla", scale, torch.device("cpu")))
            assert ran == ["cudnn" if scale in want else "triton"], (tile, scale)


def test_interleaved_rows_run_in_rotated_rounds(monkeypatch):
    """--interleave: every row is built and warmed up first, then timed in rounds, one generation per row per round,
    the order rotated each round; each row's median comes from its own generations, and the set is saved once."""
    import bench.e2e as e2e

    calls = []
    times = {0: 100.0, 2: 40.0}  # by the pipeline's skip_last: the dense row and the skip-2 row

    def fake_once(pipe, features, lengths, sampling, per_scale_runs=None):
        calls.append((pipe.skip_last, per_scale_runs is not None))
        if per_scale_runs is not None:
            per_scale_runs.append([1.0] * (pipe.schedule.num_scales - pipe.skip_last))
        return times[pipe.skip_last] + len(calls) * 1e-3  # distinct values: each row's own runs give its median

    monkeypatch.setattr(e2e, "generate_once", fake_once)
    cuda_calls_as_no_ops(monkeypatch, e2e)
    rows = [("dense eager, SDPA FlashAttention-2", "dense", "eager", "math", 0, False),
            ("dense eager + skip last 2", "dense", "eager", "math", 2, False)]
    saved = []
    result = e2e.bench_model("infinity-tiny", 256, 2, 3, rows, save=lambda r: saved.append(len(r["rows"])),
                             device="cpu", interleave=True)
    assert calls[:4] == [(0, False), (0, False), (2, False), (2, False)]  # each row's warm-ups, before any timing
    assert [skip for skip, _ in calls[4:]] == [0, 2, 2, 0, 2, 0]  # rounds 0, 1, 2: forward, backward, rotated
    assert saved == [2] and result["protocol"] == "interleaved"
    dense, skip2 = result["rows"]
    assert round(dense["median_ms"]) == 100 and round(skip2["median_ms"]) == 40
    assert dense["speedup_vs_dense_eager_fa2"] == 1.0 and skip2["speedup_vs_dense_eager_fa2"] > 2.4
    assert len(dense["per_scale_ms"]) == 7 and len(skip2["per_scale_ms"]) == 5


def test_a_row_records_what_its_runner_knew_after_generating(monkeypatch):
    """Whether a graph runner absorbed the cross-attention is known once it has generated (its first begin()), so a row
    records it after its runs: read at build time it was False for every row (the e69bd6a results)."""
    import types

    import bench.e2e as e2e

    real_parts = e2e.family_parts

    def parts(*args, **kwargs):
        base, decoder, features, lengths, sampling, make_runner, make_pipeline = real_parts(*args, **kwargs)

        def runner_without_state(*a):
            runner = make_runner(*a)
            runner.current = None  # as CudaGraphRunner before its first begin()
            return runner
        return base, decoder, features, lengths, sampling, runner_without_state, make_pipeline

    def fake_timing(pipe, features, lengths, warmup, runs, sampling):
        pipe.runner.current = types.SimpleNamespace(text=types.SimpleNamespace(absorbed=object()))  # it began
        return {"median_ms": 10.0}, [1.0] * pipe.schedule.num_scales

    monkeypatch.setattr(e2e, "family_parts", parts)
    monkeypatch.setattr(e2e, "time_generation", fake_timing)
    cuda_calls_as_no_ops(monkeypatch, e2e)
    rows = [("dense eager, SDPA FlashAttention-2", "dense", "eager", "math", 0, False)]
    result = e2e.bench_model("infinity-tiny", 256, 0, 1, rows, device="cpu")
    assert result["rows"][0]["cross_attention_absorbed"] is True


def test_interleaved_order_balances_first_place_and_predecessors():
    order = e2e_interleaved_order()
    assert order(2, 4) == [[0, 1], [1, 0], [1, 0], [0, 1]]
    orders = order(3, 6)
    assert sorted(map(tuple, orders)) == sorted(__import__("itertools").permutations(range(3)))  # all six orders
    assert sorted(o[0] for o in orders) == [0, 0, 1, 1, 2, 2]  # each row first equally often


def e2e_interleaved_order():
    from bench.e2e import interleaved_order

    return interleaved_order
