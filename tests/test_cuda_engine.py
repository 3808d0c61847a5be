"""The CUDA-graph runner's static-buffer logic, checked eagerly on CPU; the captured path runs on the GPU."""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparvar.config import get_config
from sparvar.cuda_engine import CudaGraphRunner
from sparvar.generate import Sampling, TorchRunner, generate
from sparvar.model import build_model
from sparvar.pipeline import build_decoder, make_plan
from sparvar.schedule import get_schedule
from sparvar.text import hashed_embeddings

CFG = get_config("infinity-tiny")


class CountOps(TorchDispatchMode):
    """Counts the aten ops (by name, overloads together) that run inside the context."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def _pair(attention, device="cpu", use_graphs=False, dtype=torch.float32, fuse=False):
    schedule = get_schedule(256)
    model = build_model(CFG, device=device, dtype=dtype)
    plan_a = make_plan(CFG, schedule, attention, backend="reference")
    plan_b = make_plan(CFG, schedule, attention, backend="reference")
    return (TorchRunner(model, schedule, plan_a, backend="sdpa"),
            CudaGraphRunner(model, schedule, plan_b, use_graphs=use_graphs, backend="sdpa", fuse_pointwise=fuse), schedule)


@pytest.mark.parametrize("attention", ["dense", "sparvar"])
def test_static_buffer_runner_equals_eager_runner_across_prompts(attention):
    """Static buffers give the eager path's tokens (the fused Triton glue is checked on the GPU below)."""
    eager, static, schedule = _pair(attention)
    decoder = build_decoder(CFG, None, "cpu", torch.float32)
    # two prompts of different lengths in the same text bucket reuse the same buffers
    for prompt, seed in (("a red car", 1), ("a small dog on the grass", 2)):
        f, l = hashed_embeddings([prompt], CFG.text_dim, CFG.text_maxlen)
        a = generate(eager, decoder, schedule, f, l, Sampling(cfg=3.0), seed=seed)
        b = generate(static, decoder, schedule, f, l, Sampling(cfg=3.0), seed=seed)
        for x, y in zip(a.bits, b.bits):
            assert torch.equal(x, y)
    assert len(static.sets) == 1
    with pytest.raises(ValueError, match="accepts at most"):
        static.begin(torch.zeros(1, CFG.text_maxlen + 1, CFG.text_dim), torch.tensor([3]), True)


def test_graph_sets_with_the_same_rows_share_one_kv_cache(monkeypatch):
    """A server meets many text buckets; each graph set must not bring its own KV cache (5-11 GiB at 1024²). Sets with
    the same rows share one, and every generation still gives the eager path's tokens, also after another set ran."""
    import sparvar.cuda_engine

    monkeypatch.setattr(sparvar.cuda_engine, "MIN_TEXT_BUCKET", 4)  # buckets of 4, 8, 16 and 32 text tokens
    eager, static, schedule = _pair("sparvar")
    decoder = build_decoder(CFG, None, "cpu", torch.float32)
    runs = [("a red car", 3.0), ("a small dog on the green grass by a tall old red barn", 3.0), ("a red car", 1.0),
            ("a red car", 3.0)]
    for seed, (prompt, cfg) in enumerate(runs):
        f, l = hashed_embeddings([prompt], CFG.text_dim, CFG.text_maxlen)
        a = generate(eager, decoder, schedule, f, l, Sampling(cfg=cfg), seed=seed)
        b = generate(static, decoder, schedule, f, l, Sampling(cfg=cfg), seed=seed)
        for x, y in zip(a.bits, b.bits):
            assert torch.equal(x, y)
    assert sorted(k[1:] for k in static.sets) == [(False, 4), (True, 4), (True, 16)]
    assert sorted(static.caches) == [1, 2]  # rows: unguided, guided (CFG doubles the batch)
    assert static.sets[(1, True, 4)].cache is static.sets[(1, True, 16)].cache is static.caches[2]


def test_text_buckets_are_powers_of_two_up_to_64_then_multiples_of_64():
    from sparvar.cuda_engine import text_bucket

    lengths = (1, 12, 16, 17, 33, 64, 65, 129, 500)
    assert [text_bucket(n, 512) for n in lengths] == [16, 16, 16, 32, 64, 64, 128, 192, 512]
    assert [text_bucket(n, 8) for n in (1, 8)] == [8, 8] and text_bucket(20, 32) == 32  # never past the model's
    assert len({text_bucket(n, 512) for n in range(1, 513)}) == 10


def test_a_runner_for_skip_2_runs_the_same_tokens_without_the_decision_or_the_skipped_scales():
    """SparVAR + skip 2: the runner runs only the scales the loop runs (capturing them is checked on the GPU), with a
    KV cache as long as those scales, and its plan makes no CS4A decision, which no scale would read: the same
    tokens as a plan that decides (the decision's output is dense attention either way). Asking for a skipped scale,
    a runner and plan made for different skips, or a plan or runner made to skip more than the loop, is an error."""
    schedule = get_schedule(256)
    model = build_model(CFG)
    deciding = TorchRunner(model, schedule, make_plan(CFG, schedule, "sparvar", backend="reference"), backend="sdpa")
    plan = make_plan(CFG, schedule, "sparvar", backend="reference", skip_last=2)
    skipping = CudaGraphRunner(model, schedule, plan, use_graphs=False, backend="sdpa", fuse_pointwise=False, skip_last=2)
    assert not plan.decides and skipping.run_scales == schedule.num_scales - 2
    decoder = build_decoder(CFG, None, "cpu", torch.float32)
    f, l = hashed_embeddings(["a red car"], CFG.text_dim, CFG.text_maxlen)
    a = generate(deciding, decoder, schedule, f, l, Sampling(cfg=3.0), seed=1, skip_last=2)
    b = generate(skipping, decoder, schedule, f, l, Sampling(cfg=3.0), seed=1, skip_last=2)
    assert len(b.bits) == schedule.num_scales - 2 and all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))
    assert skipping.caches[2].positions == schedule.kv_len(schedule.num_scales - 3) < schedule.total_tokens
    torch.testing.assert_close(a.image, b.image)
    assert deciding.plan.state(0)[0].shape[-1] == deciding.plan.topk  # the deciding plan made a decision; this one none
    with pytest.raises(RuntimeError, match="skips the last 2 scales"):
        plan.state(0)
    with pytest.raises(ValueError, match="scale 5 outside the 5 scales this runner runs"):
        skipping.step(5, torch.zeros(1, schedule.lengths[5], CFG.bits))
    with pytest.raises(ValueError, match="plan serves skip_last=2, the runner skip_last=0"):
        CudaGraphRunner(model, schedule, plan, use_graphs=False, backend="sdpa", fuse_pointwise=False)
    with pytest.raises(ValueError, match="skip_last must be"):
        CudaGraphRunner(model, schedule, None, use_graphs=False, skip_last=schedule.num_scales)
    from sparvar.pipeline import Pipeline

    with pytest.raises(ValueError, match="plan was made to skip the last 2 scales; this loop skips 0"):
        Pipeline(CFG, schedule, TorchRunner(model, schedule, plan), decoder, True)
    with pytest.raises(ValueError, match="made to skip the last 2 scales; this loop skips 1"):
        generate(TorchRunner(model, schedule, plan), decoder, schedule, f, l, seed=1, skip_last=1)
    dense = CudaGraphRunner(model, schedule, None, use_graphs=False, skip_last=2)
    with pytest.raises(ValueError, match="runner runs 5 scales; this loop runs 7"):
        Pipeline(CFG, schedule, dense, decoder, True)
    Pipeline(CFG, schedule, deciding, decoder, True, skip_last=2)  # made to skip less: correct, wasted work
    assert Pipeline(CFG, schedule, skipping, decoder, True, skip_last=2).generate(f, l, Sampling(cfg=3.0), seed=1).bits


def test_engine_steps_compute_no_weight_or_prompt_constants():
    """What depends only on the weights (qkv bias, temperature) or the prompt (AdaLN vectors, text mask) is computed
    once, not in every block of every scale step: the engine's step has none of those ops, and the same logits."""
    eager, engine, schedule = _pair("dense")
    f, l = hashed_embeddings(["a red car"], CFG.text_dim, CFG.text_maxlen)
    counts, logits = [], []
    for runner in (eager, engine):
        runner.begin(f, l, True)
        runner.step(0, None)
        with CountOps() as c:
            logits.append(runner.step(1, torch.zeros(1, schedule.lengths[1], CFG.bits)).clone())
        counts.append(c.ops)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-4)  # the engine pads the text to a bucket
    for op in ("cat", "clamp_max", "exp", "where"):  # qkv bias, temperature (x2), bool-mask conversion
        assert counts[1][op] == 0, f"the engine step recomputes a constant ({op})"
    assert counts[0]["cat"] == counts[0]["exp"] == CFG.depth  # the eager reference does, once per block


def test_graphs_need_a_gpu_model():
    with pytest.raises(RuntimeError, match="CUDA graphs need the model on a CUDA GPU"):
        _pair("dense", use_graphs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["dense", "sparvar"])
def test_captured_graphs_equal_eager_on_gpu(attention):
    eager, graphs, schedule = _pair(attention, device="cuda", use_graphs=True, fuse=True)
    decoder = build_decoder(CFG, None, "cuda", torch.float32)
    # the second generation replays the graphs captured by the first, the text graph with another prompt
    for prompt, seed in (("a red car", 1), ("a small dog on the grass", 2)):
        f, l = hashed_embeddings([prompt], CFG.text_dim, CFG.text_maxlen)
        a = generate(eager, decoder, schedule, f, l, Sampling(cfg=3.0), seed=seed)
        b = generate(graphs, decoder, schedule, f, l, Sampling(cfg=3.0), seed=seed)
        agree = sum(torch.equal(x, y) for x, y in zip(a.bits, b.bits))
        assert agree == schedule.num_scales
        torch.testing.assert_close(a.image, b.image, atol=1e-3, rtol=0)


def test_graphed_decoder_forwards_reads_and_refuses_moves():
    """Built on the CPU (only decode needs a GPU): the runtime loop reads the wrapped decoder's attributes through the
    wrapper, for both families; a move or cast would leave the captured graphs on the old weights, so it is refused.
    Wrapping fixes the weights of every 2x upsampling convolution (their sub-pixel form, sparvar.vae)."""
    import copy

    import sparvar.vae as V
    from sparvar.cuda_engine import GraphedDecoder
    from sparvar.hart.tokenizer import build_hart_vq

    infinity = build_decoder(CFG, None, "cpu", torch.float32)
    hart = build_hart_vq(get_config("hart-tiny").vq)
    for wrapped in (infinity, hart):
        module = infinity.module if wrapped is infinity else hart
        convs = [m.upsampling_conv for m in module.modules() if hasattr(m, "upsampling_conv")]
        assert convs and not any(c in V._FROZEN_SUBPIXEL for c in convs)
        graphed = GraphedDecoder(wrapped)
        assert all(c in V._FROZEN_SUBPIXEL for c in convs)
        for name in ("patchify", "codebook_dim") if wrapped is infinity else ("quantize", "decoder", "decode_dtype"):
            assert getattr(graphed, name) is getattr(wrapped, name), name
        for move in ("to", "half", "cuda"):
            with pytest.raises(AttributeError, match=f"GraphedDecoder.{move}: the captured graphs"):
                getattr(graphed, move)
        assert copy.copy(graphed).wrapped is wrapped
    with pytest.raises(AttributeError, match="no_such_thing"):
        graphed.no_such_thing


@pytest.mark.gpu
def test_graphed_decode_equals_the_eager_decode():
    """The engine's decode replays the eager decode's kernels (bf16, channels-last, the Triton GroupNorm): the same
    image bit for bit, for each latent it is given (the second through the static input of the first capture)."""
    from sparvar.cuda_engine import GraphedDecoder

    cfg = get_config("infinity-tiny")
    decoder = build_decoder(cfg, None, "cuda", torch.bfloat16)
    graphed = GraphedDecoder(decoder)
    assert graphed.codebook_dim == decoder.codebook_dim and graphed.patchify == decoder.patchify
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(2):
        latent = torch.randn(1, cfg.vae.codebook_dim, 16, 16, generator=g, device="cuda")
        with torch.no_grad():
            want = decoder.decode(latent)
            got = graphed.decode(latent).clone()
        assert torch.equal(got, want)
    assert len(graphed.graphs) == 1


def test_step_graphs_warm_up_on_a_computed_text(monkeypatch):
    """A capture records its kernels without running them: the text graph's outputs are uninitialised memory until it
    is replayed. The steps' warm-up pass runs eagerly on those outputs, so the runner must replay the text graph
    before capturing the steps. On the H200, garbage text lengths made the engine's cross-attention read before its
    keys (an illegal memory access in `sparvar serve`). Emulated here: a captured output is NaN / 0 until replay."""
    import sparvar.cuda_engine as engine
    from sparvar.model import TextCondition

    def outputs_of(out):
        return engine._text_tensors(out) if isinstance(out, TextCondition) else [out]

    class RecordedGraph:
        def __init__(self, run, out):
            self.run, self.out = run, out

        def replay(self):
            for dst, src in zip(outputs_of(self.out), outputs_of(self.run())):
                dst.copy_(src)

    def capture_without_running(run, num_scales, pool):
        for scale in range(num_scales):  # the warm-up pass runs for real; its results are dropped
            run(scale)
        graphs, outputs = [], []
        for scale in range(num_scales):
            out = run(scale)
            for t in outputs_of(out):  # what a capture leaves in its outputs: nothing computed
                t.fill_(float("nan") if t.is_floating_point() else 0)
            graphs.append(RecordedGraph(lambda s=scale: run(s), out))
            outputs.append(out)
        return graphs, outputs

    monkeypatch.setattr(engine, "capture_scales", capture_without_running)
    eager, static, schedule = _pair("sparvar")
    static.use_graphs = True  # the captured branch of _capture, with the emulated capture
    seen = []
    step = static.model.step

    def watched(tokens, scale, text, *args, **kwargs):
        seen.append((int(text.key_lens.min()), bool(text.ada.isnan().any())))
        return step(tokens, scale, text, *args, **kwargs)

    monkeypatch.setattr(static.model, "step", watched)
    f, l = hashed_embeddings(["a red car"], CFG.text_dim, CFG.text_maxlen)
    static.begin(f, l, True)
    assert len(seen) == 2 * schedule.num_scales  # the warm-up pass and the capture
    assert all(min_len >= 1 and not nan for min_len, nan in seen), seen


@pytest.mark.gpu
def test_a_torch_cuda_engine_loaded_for_skip_2_captures_only_the_scales_it_runs(tmp_path):
    """`load_engine_pipeline(skip_last=2)` (sparvar generate/serve --skip-last 2): graphs for the scales the loop runs,
    a plan without the CS4A decision, and the tokens of the engine loaded for all scales run with the same skip, up to
    where the decision scale's bf16 dense kernels round differently from the decision kernel's."""
    from sparvar.engine import EngineSpec, build_engine
    from sparvar.runtime import load_engine_pipeline

    path = str(tmp_path / "engine")
    build_engine(EngineSpec(model="infinity-tiny", resolution=256, attention="sparvar", backend="torch-cuda",
                            dtype="bf16"), path, log=lambda *a, **k: None)
    skipping, full = load_engine_pipeline(path, skip_last=2), load_engine_pipeline(path)
    schedule, decision = full.schedule, full.runner.plan.policy.decision_scale
    assert skipping.runner.run_scales == schedule.num_scales - 2 == decision + 1
    assert not skipping.runner.plan.decides and full.runner.plan.decides
    f, l = hashed_embeddings(["a red car"], CFG.text_dim, CFG.text_maxlen)
    a = generate(full.runner, full.decoder, schedule, f, l, Sampling(cfg=3.0), seed=1, skip_last=2)
    b = skipping.generate(f, l, Sampling(cfg=3.0), seed=1)
    assert len(skipping.runner.current.graphs) == decision + 1 and len(full.runner.current.graphs) == schedule.num_scales
    assert all(torch.equal(x, y) for x, y in zip(a.bits[:decision], b.bits[:decision]))  # the same graphs up to there
    assert (a.bits[decision] == b.bits[decision]).float().mean() > 0.97
    assert torch.isfinite(b.image).all()


@pytest.mark.gpu
def test_a_torch_cuda_engine_built_with_query_tiles_follows_the_tile_reference(tmp_path):
    """`sparvar engine build --csla-query-tile 4x4 --backend torch-cuda`, loaded and replayed on the GPU: its captured
    bf16 steps run the tile kernel and give (teacher forced) the logits of the fp32 reference with the same tiles, well
    apart from the raster blocks' reference at the sparse scales (CPU: bf16 rounding 0.7-1%, tiles vs raster 3-5%)."""
    from sparvar.csla import TileLayout
    from sparvar.engine import EngineSpec, build_engine
    from sparvar.runtime import load_engine_pipeline

    path = str(tmp_path / "engine")
    manifest = build_engine(EngineSpec(model="infinity-tiny", resolution=256, attention="sparvar", backend="torch-cuda",
                                       dtype="bf16", csla_query_tile="4x4"), path, log=lambda *a, **k: None)
    engine = load_engine_pipeline(path)
    runner, schedule = engine.runner, engine.schedule
    assert runner.plan.backend == "triton" and runner.plan.csla_layouts
    assert all(isinstance(layout, TileLayout) and layout.tile == (4, 4) for layout in runner.plan.csla_layouts.values())
    # the engine's weights in fp32: drawn on the GPU, as the engine's are (a CPU generator draws other numbers)
    model = build_model(CFG, device="cuda", seed=manifest["spec"]["seed"])
    tiles = TorchRunner(model, schedule, make_plan(CFG, schedule, "sparvar", csla_query_tile=(4, 4)))
    raster = TorchRunner(model, schedule, make_plan(CFG, schedule, "sparvar"))
    f, l = hashed_embeddings(["a red car"], CFG.text_dim, CFG.text_maxlen)
    for r in (runner, tiles, raster):
        r.begin(f, l, True)
    g = torch.Generator().manual_seed(0)
    codes, sparse_scales = None, set(runner.plan.csla_layouts)
    for k in range(schedule.num_scales):
        got = runner.step(k, codes).float()
        want, other = tiles.step(k, codes).float(), raster.step(k, codes).float()
        err = ((got - want).norm() / want.norm()).item()
        assert err < 0.02, (k, err)
        if k in sparse_scales:
            apart = ((got - other).norm() / other.norm()).item()
            assert apart > 2 * err, (k, err, apart)
        if k + 1 < schedule.num_scales:
            codes = (torch.randn(1, schedule.lengths[k + 1], CFG.bits, generator=g) * 0.25).cuda()
    assert sparse_scales


def test_cross_attention_runs_absorbed_where_it_pays():
    """Where the text bucket and batch make the absorbed form cheaper (absorption_pays), FP8 linears or not, the
    runner's steps run the cross-attention absorbed (sparvar.model.AbsorbedText) at every scale, and give the
    unabsorbed steps' logits, also for a second prompt in the same graph set (the eager path recomputes the text)."""
    import dataclasses

    from sparvar.model import absorbed_cross_attention

    schedule = get_schedule(256)
    model = build_model(CFG, seed=4)
    for blk in model.blocks:  # nonzero projection biases: folded into the absorbed scores, added after P @ values
        blk.ca.mat_q.bias.data.normal_()
        blk.ca.proj.bias.data.normal_()
    kwargs = dict(use_graphs=False, backend="sdpa", fuse_pointwise=False)
    plain = CudaGraphRunner(model, schedule, None, absorb=False, **kwargs)
    absorbing = CudaGraphRunner(model, schedule, None, **kwargs)
    calls = []
    absorbing.ops = dataclasses.replace(absorbing.ops, absorbed_cross_attention=lambda x, text: calls.append(
        x.shape[1]) or absorbed_cross_attention(x, text))
    bucket = CFG.text_maxlen  # infinity-tiny's 32 text positions: 2 rows * 2 heads * 32 <= width 128 pays
    assert absorbing.absorbs(bucket, 2) and not plain.absorbs(bucket, 2)
    # a 64-position text, or 4 rows (two prompts with CFG): the absorbed text would outgrow the projections
    assert not absorbing.absorbs(2 * bucket, 2) and not absorbing.absorbs(bucket, 4)
    fp8 = CudaGraphRunner(model, schedule, None, fp8_min_tokens=64, **kwargs)
    assert fp8.absorbs(bucket, 2)  # with FP8 linears too (tests/test_fp8.py: its projections then stay out of FP8)
    prompt = "a small dog on the green grass by the old red barn and a tall tree under a blue sky at noon"
    f, l = hashed_embeddings([prompt], CFG.text_dim, CFG.text_maxlen)  # over 16 tokens: the 32-position bucket
    codes = [None] + [torch.randn(1, n, CFG.bits).sign() for n in schedule.lengths[1:]]
    for runner in (plain, absorbing):
        runner.begin(f, l, True)
    assert plain.current.text.absorbed is None
    assert len(absorbing.current.text.absorbed) == CFG.depth
    for scale, c in enumerate(codes):
        want, got = plain.step(scale, c).clone(), absorbing.step(scale, c)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=f"scale {scale}")
    assert calls == [n for n in schedule.lengths for _ in range(CFG.depth)]
    f2, l2 = hashed_embeddings(["a red car"], CFG.text_dim, CFG.text_maxlen)  # 3 tokens: the 16-position bucket
    for runner in (plain, absorbing):
        runner.begin(f2, l2, True)
    last = schedule.num_scales - 1
    torch.testing.assert_close(absorbing.step(last, codes[last]), plain.step(last, codes[last]).clone(), atol=2e-5,
                               rtol=1e-4)
    assert sorted(k[2] for k in absorbing.sets) == [16, 32]
