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
