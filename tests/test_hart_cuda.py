"""HART on the GPU: the CUDA-graph runner replays what the eager runner computes, dense and with the Triton SparVAR
kernels (head dim 64, the [text | scales] KV with sinks); a whole generation runs through it."""
import pytest
import torch

from sparvar.config import get_config
from sparvar.hart.generate import HartTorchRunner, generate_hart
from sparvar.hart.model import build_model
from sparvar.hart.sampling import HartSampling
from sparvar.hart.text import hashed_hart_embeddings
from sparvar.hart.tokenizer import build_hart_vq
from sparvar.schedule import get_schedule
from sparvar.sparse import SparVARPlan, default_policy

pytestmark = pytest.mark.gpu
CFG = get_config("hart-tiny")  # 2 heads of 64, the head dim of hart-0.7b


def step_all(runner, features, mask, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    runner.begin(features, mask, True)
    out = [runner.step(0, None).clone()]
    for n in get_schedule(256, model="hart-tiny").lengths[1:]:
        out.append(runner.step(len(out), torch.randn(features.shape[0], n, CFG.latent_dim, generator=g, device="cuda")).clone())
    return out


@pytest.mark.parametrize("attention", ["dense", "sparvar"])
def test_graph_runner_matches_eager(attention):
    from sparvar.hart.cuda_engine import HartCudaGraphRunner

    schedule = get_schedule(256, model="hart-tiny")
    model = build_model(CFG, device="cuda", dtype=torch.bfloat16, seed=0)
    features, mask = hashed_hart_embeddings(["a cat", "a red fox in the snow"], CFG)
    features, mask = features.cuda(), mask.cuda()

    def plan(backend):
        return None if attention == "dense" else SparVARPlan(default_policy("hart-tiny", schedule), schedule, CFG.depth,
                                                             backend=backend)

    want = step_all(HartTorchRunner(model, schedule, plan("reference"), backend="math"), features, mask)
    runner = HartCudaGraphRunner(model, schedule, plan("triton"))
    for _ in range(2):  # capture, then a replay with the same prompts
        got = step_all(runner, features, mask)
        for scale, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, atol=6e-2, rtol=6e-2, msg=f"scale {scale}")


def test_generation_through_the_graph_runner():
    from sparvar.hart.cuda_engine import HartCudaGraphRunner

    schedule = get_schedule(256, model="hart-tiny")
    model = build_model(CFG, device="cuda", dtype=torch.bfloat16, seed=0)
    tokenizer = build_hart_vq(CFG.vq, device="cuda")
    features, mask = hashed_hart_embeddings(["a cat"], CFG)
    runner = HartCudaGraphRunner(model, schedule, SparVARPlan(default_policy("hart-tiny", schedule), schedule, CFG.depth,
                                                              backend="triton"))
    a = generate_hart(runner, tokenizer, schedule, features.cuda(), mask.cuda(), HartSampling(), seed=3)
    b = generate_hart(runner, tokenizer, schedule, features.cuda(), mask.cuda(), HartSampling(), seed=3)
    assert a.image.shape == (1, 3, 256, 256) and torch.isfinite(a.image).all()
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))  # replays are deterministic


def test_a_graph_runner_for_skip_2_captures_the_scales_it_runs_and_makes_no_decision():
    """hart-tiny decides at scale 5 of 8: skipping 2 leaves no scale to read the decision. The runner captures scales
    0-5 only, its plan runs the decision scale's CS4A layer dense, and the logits match the eager runner's."""
    from sparvar.hart.cuda_engine import HartCudaGraphRunner

    schedule = get_schedule(256, model="hart-tiny")
    model = build_model(CFG, device="cuda", dtype=torch.bfloat16, seed=0)
    features, mask = hashed_hart_embeddings(["a cat"], CFG)
    features, mask = features.cuda(), mask.cuda()
    policy = default_policy("hart-tiny", schedule)
    plan = SparVARPlan(policy, schedule, CFG.depth, backend="triton", skip_last=2)
    assert not plan.decides and policy.decision_scale == schedule.num_scales - 3
    runner = HartCudaGraphRunner(model, schedule, plan, skip_last=2)
    eager = HartTorchRunner(model, schedule, SparVARPlan(policy, schedule, CFG.depth, backend="reference"), backend="math")
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = [None] + [torch.randn(1, n, CFG.latent_dim, generator=g, device="cuda") for n in schedule.lengths[1:]]
    for r in (runner, eager):
        r.begin(features, mask, True)
    for scale in range(runner.run_scales):
        torch.testing.assert_close(runner.step(scale, inputs[scale]), eager.step(scale, inputs[scale]), atol=6e-2,
                                   rtol=6e-2, msg=f"scale {scale}")
    assert len(runner.current.graphs) == runner.run_scales == schedule.num_scales - 2
    assert runner.current.cache.positions == schedule.kv_len(runner.run_scales - 1) < schedule.total_tokens
    with pytest.raises(ValueError, match="outside the 6 scales this runner runs"):
        runner.step(runner.run_scales, inputs[runner.run_scales])
    with pytest.raises(ValueError, match="plan serves skip_last=2"):
        HartCudaGraphRunner(model, schedule, plan)


def test_engine_decode_is_fp16_and_graphed(tmp_path):
    """The torch-cuda HART engine decodes in fp16 (the official autocast precision) through one CUDA graph: the graph
    replays the eager fp16 decode exactly, for every f_hat it is given, and stays close to the fp32 decode."""
    import copy

    from sparvar.cuda_engine import GraphedDecoder
    from sparvar.engine import EngineSpec, build_engine
    from sparvar.hart.cuda_engine import HartCudaGraphRunner
    from sparvar.runtime import load_engine_pipeline

    full = build_hart_vq(CFG.vq, device="cuda")
    half = copy.deepcopy(full).half_decoder()
    graphed = GraphedDecoder(half)
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(2):  # capture, then a replay with another f_hat
        indices = [torch.randint(0, CFG.vq.vocab_size, (1, pn * pn), generator=g, device="cuda") for pn in CFG.patch_nums]
        f_hat = full.indices_to_fhat(indices, CFG.patch_nums)
        with torch.no_grad():
            want = half.decode(f_hat)
            got = graphed.decode(f_hat).clone()
            exact = full.decode(f_hat)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        psnr = 10 * torch.log10(4 / (got.float() - exact).square().mean())
        assert psnr > 45, f"PSNR {psnr:.1f} dB against the fp32 decode"

    path = str(tmp_path / "hart")
    build_engine(EngineSpec(model="hart-tiny", resolution=256, attention="sparvar", backend="torch-cuda", dtype="bf16"),
                 path, log=lambda m: None)
    pipe = load_engine_pipeline(path)  # the runner runs the SparVAR plan the build stored (load_engine_plan)
    assert isinstance(pipe.runner, HartCudaGraphRunner) and pipe.runner.plan is not None
    assert isinstance(pipe.tokenizer, GraphedDecoder) and pipe.tokenizer.decode_dtype == torch.float16
    features, mask = hashed_hart_embeddings(["a cat"], CFG)
    image = pipe.generate(features, mask, HartSampling(), seed=1).image
    assert image.shape == (1, 3, 256, 256) and torch.isfinite(image).all()


def test_graphed_denoise_steps_match_the_eager_steps():
    """Each diffusion step replays the eager step's kernels from one graph; new inputs go through the static buffers
    (passes with other x, cond, noise and guidance), guided and unguided alike: one graph per step, whatever the cfg."""
    from sparvar.hart.cuda_engine import HartCudaGraphRunner
    from sparvar.hart.diffusion import respaced_schedule

    schedule = get_schedule(256, model="hart-tiny")
    model = build_model(CFG, device="cuda", dtype=torch.bfloat16, seed=0)
    eager, graphed = HartTorchRunner(model, schedule), HartCudaGraphRunner(model, schedule)
    g = torch.Generator(device="cuda").manual_seed(0)
    n, steps = 48, respaced_schedule(CFG.diffusion).num_steps
    for cfg_scale, rows in ((4.5, 2 * n), (0.0, n), (3.1, 2 * n), (4.5, 2 * n)):
        cond = torch.randn(rows, CFG.width, generator=g, device="cuda").bfloat16()
        x_eager = x_graph = torch.randn(n, CFG.latent_dim, generator=g, device="cuda")
        for k in reversed(range(steps)):
            noise = torch.randn(n, CFG.latent_dim, generator=g, device="cuda") if k > 0 else None
            x_eager = eager.denoise_step(x_eager, k, cond, cfg_scale, noise)
            x_graph = graphed.denoise_step(x_graph, k, cond, cfg_scale, noise)
            torch.testing.assert_close(x_graph, x_eager, atol=1e-3, rtol=1e-3, msg=f"cfg {cfg_scale}, step {k}")
    assert len(graphed.denoise_graphs) == steps  # captured once per step, replayed after
    with pytest.raises(ValueError, match="needs noise"):  # a replay would reuse the last step's noise
        graphed.denoise_step(x_graph, 1, cond, 4.5, None)
