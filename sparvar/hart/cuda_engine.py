"""HART's torch-cuda runner: the HartRunner protocol (sparvar/hart/generate.py) with one CUDA graph per scale.

The same recipe as Infinity's sparvar/cuda_engine.py: bf16 weights on one GPU, the KV cache preallocated for the
whole schedule, every scale step captured once and replayed, the element-wise glue as Triton kernels (the RMSNorm
kernel is Infinity's norm kernel; RoPE by halves writing into the KV cache; SwiGLU), SparVAR kernels and layouts
inside the graphs. What differs is the text: HART's prompt is a
fixed `text_len`-slot prefix, so there is one graph set per (batch, guided) and no length bucket, and the RoPE
tables depend on each row's text positions, so they live in static buffers refilled by `begin`.
The diffusion head (8 small MLP steps on the last scale's tokens) replays one graph per step. The tokenizer's
decode runs in fp16 (the official inference's autocast precision), channels-last, captured as one graph; its f_hat
still accumulates in fp32.
"""
from __future__ import annotations

import dataclasses

import torch

from ..cuda_engine import GraphedDecoder, capture_scales, check_run_scale, check_skip
from ..model import frozen_weight_functions, qkv_bias
from .diffusion import denoise_step, guidance_weights
from .generate import HartTorchRunner, paired_condition
from .model import HART, KVCache, Pointwise, TextCondition, rope_tables


def fused_pointwise() -> Pointwise:
    """HART's element-wise glue for the GPU, as Triton kernels (sparvar/kernels/pointwise.py, shared with Infinity's
    engine where the math is shared): each RMSNorm with the residual add before it one pass (eagerly ~7 kernels);
    q/k RoPE + softmax scale reading the fused projection and writing k, v straight into the KV cache; SwiGLU."""
    from ..kernels.pointwise import qkv_rope_half, residual_norm, swiglu

    def norm(x, weight, eps):
        return residual_norm(x, weight=weight, eps=eps, rms=True)[1]

    def residual_then_norm(x, y, weight, eps):
        return residual_norm(x, y, weight=weight, eps=eps, rms=True)

    def attention_inputs(qkv, heads, q_scale, rope, kv, layer, unit_qk=False):
        if unit_qk:  # no config of ours uses it; the kernel has no unit-q/k step
            raise NotImplementedError("the HART GPU engine's attention-input kernel has no attn_l2_norm variant")
        if not isinstance(kv, KVCache):
            raise TypeError(f"the Triton attention inputs write into a preallocated KVCache, got {type(kv).__name__}")
        k_new, v_new, k_all, v_all = kv.slot(layer, qkv.shape[1])
        return qkv_rope_half(qkv, q_scale, rope, k_new, v_new), k_all, v_all

    return Pointwise(attention_inputs=attention_inputs, swiglu=swiglu, rms_norm=norm,
                     residual_rms_norm=residual_then_norm)


class _Graphs:
    """Static inputs/outputs and the captured graphs for one (batch, guided)."""

    def __init__(self, text, ropes, cache, inputs, logits, hidden, graphs):
        self.text, self.ropes, self.cache, self.inputs = text, ropes, cache, inputs
        self.logits, self.hidden, self.graphs = logits, hidden, graphs


class HartCudaGraphRunner:
    def __init__(self, model: HART, schedule, plan=None, backend: str = "cudnn", fuse_pointwise: bool = True,
                 skip_last: int = 0):
        """skip_last: as CudaGraphRunner's (the skipped scales are not captured; the plan must serve the same skip)."""
        if not torch.cuda.is_available() or model.word_embed.weight.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need the model on a CUDA GPU (model is on {model.word_embed.weight.device}, "
                               f"CUDA available: {torch.cuda.is_available()})")
        self.run_scales = check_skip(schedule, plan, skip_last)
        self.eager = HartTorchRunner(model, schedule)  # same schedule checks; its diffusion step is ours too
        self.model, self.schedule, self.plan, self.backend = model, schedule, plan, backend
        self.cfg = model.cfg
        self.device = model.word_embed.weight.device
        pointwise = fused_pointwise() if fuse_pointwise else Pointwise()
        # an engine's weights are fixed: the qkv bias (a cat per block per step) is computed once
        self.pointwise = dataclasses.replace(pointwise, **frozen_weight_functions([b.attn for b in model.blocks],
                                                                                (qkv_bias,)))
        self.pool = torch.cuda.graph_pool_handle()
        self.sets: dict[tuple[int, bool], _Graphs] = {}
        self.denoise_pool = torch.cuda.graph_pool_handle()
        self.denoise_inputs: dict = {}  # shapes -> static (x, cond, noise)
        self.guidance = torch.zeros(2, device=self.device)  # the replayed step's guidance_weights
        self.denoise_graphs: dict = {}  # (step, shapes) -> (graph, static output)
        self.current: _Graphs | None = None
        self.last_scale = -1

    @torch.no_grad()
    def begin(self, features, mask, guided: bool):
        text = self.model.encode_text(features.to(self.device), mask.to(self.device), guided)
        ropes = rope_tables(self.schedule, self.cfg.head_dim, text.positions)
        key = (features.shape[0], guided)
        if key not in self.sets:
            self.sets[key] = self._capture(text, ropes, features.shape[0])
        g = self.current = self.sets[key]
        g.text.prefix.copy_(text.prefix)
        g.text.cond.copy_(text.cond)
        for dst, src in zip(g.ropes, ropes):
            dst.copy_(src)
        self.last_scale = -1

    def _capture(self, text: TextCondition, ropes: list, B: int) -> _Graphs:
        model, schedule = self.model, self.schedule
        ropes = [r.clone() for r in ropes]
        cache = model.new_cache(text.batch, schedule, schedule.kv_len(self.run_scales - 1))
        inputs = [None] + [torch.zeros(B, n, self.cfg.latent_dim, device=self.device) for n in schedule.lengths[1:]]
        if self.plan is not None:
            self.plan.reset()

        def run(scale):
            cache.offset = schedule.offsets[scale]
            tokens = model.scale_input(scale, inputs[scale], text)
            return model.step(tokens, scale, text, cache, ropes[scale], self.plan, self.backend, self.pointwise,
                              return_hidden=True)

        graphs, outputs = capture_scales(run, self.run_scales, self.pool)
        logits, hidden = (list(x) for x in zip(*outputs))
        return _Graphs(text, ropes, cache, inputs, logits, hidden, graphs)

    @torch.no_grad()
    def step(self, scale: int, inputs):
        if scale != self.last_scale + 1:
            raise ValueError(f"scales run in order from 0 after begin: expected scale {self.last_scale + 1}, got {scale}")
        check_run_scale(self.schedule, self.run_scales, scale)
        if (scale == 0) != (inputs is None):
            raise ValueError(f"scale {scale}: inputs must be None exactly at scale 0 (the text prefix is its input)")
        g = self.current
        if inputs is not None:
            g.inputs[scale].copy_(inputs)
        g.graphs[scale].replay()
        self.last_scale = scale
        return g.logits[scale]

    @torch.no_grad()
    def diffusion_condition(self, codes):
        last = self.schedule.num_scales - 1
        if self.last_scale != last:
            raise ValueError(f"diffusion_condition needs the last scale's hidden states (scale {last}); the last step "
                             f"run was scale {self.last_scale}")
        return self.model.diffusion_condition(self.current.hidden[last], codes)

    @torch.no_grad()
    def denoise_step(self, x, k: int, cond, cfg_scale: float, noise):
        """The eager step (HartTorchRunner.denoise_step: paired_condition, then diffusion.denoise_step) captured as
        one CUDA graph per (step, shapes): a step of the diffusion MLP is ~100 small kernels on a few thousand rows,
        so eagerly the host's launches, not the GPU, set its time. The guidance scale is an input (its
        `guidance_weights` in a static tensor), so a server's requests share the graphs whatever their cfg; the
        unguided condition is paired eagerly, so guided and unguided steps share them too. The steps share their
        static inputs and replay in capture order (the sampler's order) from a memory pool of their own."""
        cond = paired_condition(x, cond, cfg_scale)  # (2N, C): checks the guidance; duplicates unguided rows
        if k > 0 and (noise is None or noise.shape != x.shape):  # a graph would replay the last noise instead
            raise ValueError(f"step {k} needs noise of shape {tuple(x.shape)}, got "
                             f"{None if noise is None else tuple(noise.shape)}")
        shapes = (tuple(x.shape), x.dtype, tuple(cond.shape), cond.dtype)
        if shapes not in self.denoise_inputs:
            self.denoise_inputs[shapes] = (torch.empty_like(x), torch.empty_like(cond), torch.empty_like(x))
        static_x, static_cond, static_noise = self.denoise_inputs[shapes]
        static_x.copy_(x)
        static_cond.copy_(cond)  # the loop passes one cond to every step: a ~25 MB copy at 1024², ~10 µs
        if noise is not None:
            static_noise.copy_(noise)
        self.guidance.copy_(guidance_weights(cfg_scale))
        key = (k, shapes)  # step 0 alone takes no noise
        if key not in self.denoise_graphs:
            net, sched = self.model.diffloss.net, self.eager.diffusion_schedule
            graphs, outputs = capture_scales(
                lambda _: denoise_step(net, static_x, k, static_cond, self.guidance, None if k == 0 else static_noise,
                                       sched), 1, self.denoise_pool)
            self.denoise_graphs[key] = (graphs[0], outputs[0])
        graph, out = self.denoise_graphs[key]
        graph.replay()
        return out


def load_hart_cuda_pipeline(engine_dir: str, manifest: dict, cfg, schedule, skip_last: int = 0):
    """A HartPipeline running a torch-cuda HART engine directory: the spec's weights (or its random seed) on the GPU,
    in the spec's dtype, behind the CUDA-graph runner with the Triton SparVAR kernels."""
    from ..engine import EngineError, check_checkpoints, load_engine_plan
    from .generate import HartPipeline

    if not torch.cuda.is_available():
        raise EngineError(f"{engine_dir} is a torch-cuda engine and needs a CUDA GPU; none is available on this machine")
    spec = manifest["spec"]
    # the layouts the build stored; before the weights: fails fast
    plan = load_engine_plan(engine_dir, manifest, skip_last=skip_last)
    check_checkpoints(engine_dir, manifest)  # the weights are read from the spec's files: the ones it was built from
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[spec["dtype"]]
    pipe = HartPipeline.create(spec["model"], spec["resolution"], spec["aspect"], spec["weights"], spec["vae"],
                               device="cuda", dtype=dtype, attention="dense", skip_last=skip_last, seed=spec["seed"])
    pipe.runner = HartCudaGraphRunner(pipe.runner.model, schedule, plan, skip_last=skip_last)
    pipe.tokenizer = GraphedDecoder(pipe.tokenizer.half_decoder())  # fp16 decode, as the official autocast; one graph
    return pipe
