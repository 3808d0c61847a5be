"""The exported units of a HART engine, each stating its I/O once (the HART side of export/step.py).

HART's text is a fixed `text_len`-slot prefix, so every graph has fully static shapes (no dynamic axis).
Rows are [cond..., uncond...] (2B), as sparvar.hart.model runs them; code vectors and noise are per image (B).

- `HartTextUnit`: features + mask -> the prefix embedding, the pooled cond, and every scale's RoPE (cos, sin)
  table. RoPE follows each row's text positions, so the tables are per prompt batch: computed once here by
  sparvar.hart.model.rope_tables and fed to the step graphs as inputs.
- `HartStepUnit(scale)`: one scale through all blocks; past K/V in, this scale's K/V out. Scale 0 runs the
  bidirectional text prefix (its logits are the last slot's: the 1x1 token). The last scale also outputs the
  hidden state, the diffusion head's input. With SparVAR the attention of the sparse scales becomes sparvar::
  custom nodes (export/custom_ops.py, as for Infinity) and the CS4A decision scale's per-layer state is an
  output of that scale and an input of the later ones.
- `HartDiffusionConditionUnit`: decoder_norm(hidden + word_embed(codes)), once, after the last scale.
- `HartDenoiseUnit`: ONE IDDPM step with the step index an input (coefficients gathered from the respaced
  schedule in the graph), run num_sampling_steps times.
- `HartDecodeUnit`: f_hat -> image, the VQ decoder.
- `HartNextInputUnit(scale)`: the residual quantizer's accumulation, f_hat + Phi(upsample(codes)) and the next
  scale's input (area downsample), so the engine carries the tokenizer's Phi convs and no torch weights.
  With `codebook.npy` (the codebook the loop samples code vectors from) they stand in for the HartVQDecoder that
  sparvar.hart.generate.generate_hart drives.

Export (torch.onnx), the onnxruntime build and sparvar/hart/runtime.py all read these I/O lists. When a unit's
graph changes for the same inputs, bump export.stages.EXPORT_CODE_VERSION (the export cache key).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn as nn

from export.step import TensorSpec, _dt, cs4a_step_io, kv_io, step_kv, step_kv_outputs
from sparvar.hart.config import HartConfig
from sparvar.hart.diffusion import p_mean_variance, respaced_schedule
from sparvar.hart.model import HART, TextCondition, rope_tables
from sparvar.hart.tokenizer import HartVQDecoder
from sparvar.schedule import Schedule

IOSpec = tuple[list[TensorSpec], list[TensorSpec]]


# ----------------------------------------------------------------------------------------------- I/O
def hart_text_io(cfg: HartConfig, schedule: Schedule, batch: int, dtype: torch.dtype) -> IOSpec:
    B2, L, C, D = 2 * batch, cfg.text_len, cfg.width, cfg.head_dim
    inputs = [TensorSpec("text_features", (batch, L, cfg.text_dim), "float32"),
              TensorSpec("text_mask", (batch, L), "bool")]
    outputs = [TensorSpec("prefix", (B2, L, C), _dt(dtype)), TensorSpec("cond", (B2, C), "float32")]
    outputs += [TensorSpec(f"rope.{s}", (2, B2, n, D), "float32") for s, n in enumerate(schedule.lengths)]
    return inputs, outputs


def hart_step_io(cfg: HartConfig, schedule: Schedule, scale: int, batch: int, dtype: torch.dtype,
                 policy=None) -> IOSpec:
    B2, D, C = 2 * batch, cfg.head_dim, cfg.width
    n, dt = schedule.lengths[scale], _dt(dtype)
    first = TensorSpec("prefix", (B2, n, C), dt) if scale == 0 else TensorSpec("codes", (batch, n, cfg.latent_dim), "float32")
    inputs = [first, TensorSpec("cond", (B2, C), "float32"), TensorSpec(f"rope.{scale}", (2, B2, n, D), "float32")]
    outputs = [TensorSpec("logits", (B2, 1 if scale == 0 else n, cfg.vocab_size), "float32")]
    past_kv, new_kv = kv_io(cfg, schedule, scale, batch, dtype)
    hidden = [TensorSpec("hidden", (B2, n, C), dt)] if scale == schedule.num_scales - 1 else []
    state_in, state_out = cs4a_step_io(cfg, schedule, scale, batch, dtype, policy)
    return inputs + past_kv + state_in, outputs + new_kv + hidden + state_out


def hart_condition_io(cfg: HartConfig, schedule: Schedule, batch: int, dtype: torch.dtype) -> IOSpec:
    n = schedule.lengths[-1]
    return ([TensorSpec("hidden", (2 * batch, n, cfg.width), _dt(dtype)),
             TensorSpec("codes", (batch, n, cfg.latent_dim), "float32")],
            [TensorSpec("diffusion_cond", (2 * batch, n, cfg.width), _dt(dtype))])


def hart_denoise_io(cfg: HartConfig, schedule: Schedule, batch: int, dtype: torch.dtype) -> IOSpec:
    """x, noise: (B * n_last, Cvae) tokens; cond: (2 B n_last, C) rows [cond tokens; uncond tokens];
    step: the respaced step index k (0 = least noisy); guidance: (1 + s, s) for eps = (1 + s) eps_c - s eps_u."""
    N, Cv = batch * schedule.lengths[-1], cfg.latent_dim
    return ([TensorSpec("x", (N, Cv), "float32"), TensorSpec("diffusion_cond", (2 * N, cfg.width), _dt(dtype)),
             TensorSpec("noise", (N, Cv), "float32"), TensorSpec("step", (), "int64"),
             TensorSpec("guidance", (2,), "float32")],
            [TensorSpec("x_prev", (N, Cv), "float32")])


def hart_decode_io(cfg: HartConfig, schedule: Schedule, batch: int) -> IOSpec:
    P = cfg.patch_nums[-1]
    H, W = schedule.image_size
    return ([TensorSpec("f_hat", (batch, cfg.latent_dim, P, P), "float32")],
            [TensorSpec("image", (batch, 3, H, W), "float32")])


def hart_next_input_io(cfg: HartConfig, schedule: Schedule, scale: int, batch: int) -> IOSpec:
    """Scale s's codes h (B, Cvae, pn, pn) into f_hat (B, Cvae, P, P); also the next scale's input
    (B, Cvae, pn', pn'), except at the last scale, whose codes (residual included) are the final tokens."""
    P, Cv, pn = cfg.patch_nums[-1], cfg.latent_dim, cfg.patch_nums[scale]
    inputs = [TensorSpec("f_hat", (batch, Cv, P, P), "float32"), TensorSpec("h", (batch, Cv, pn, pn), "float32")]
    outputs = [TensorSpec("f_hat_next", (batch, Cv, P, P), "float32")]
    if scale + 1 < schedule.num_scales:
        nxt = cfg.patch_nums[scale + 1]
        outputs.append(TensorSpec("next_input", (batch, Cv, nxt, nxt), "float32"))
    return inputs, outputs


# ----------------------------------------------------------------------------------------------- units
class HartTextUnit(nn.Module):
    def __init__(self, model: HART, schedule: Schedule, batch: int):
        super().__init__()
        self.model, self.schedule = model, schedule
        self.inputs, self.outputs = hart_text_io(model.cfg, schedule, batch, model.word_embed.weight.dtype)

    def forward(self, text_features, text_mask):
        text = self.model.encode_text(text_features, text_mask, cfg_guidance=True)
        return (text.prefix, text.cond, *rope_tables(self.schedule, self.model.cfg.head_dim, text.positions))


class HartStepUnit(nn.Module):
    """One scale of HART with explicit KV (and CS4A state) inputs and outputs (sparvar.model.ConcatKV); with a
    SparVAR `plan` (export.custom_ops.export_plan) its sparse attention exports as sparvar custom nodes."""

    def __init__(self, model: HART, schedule: Schedule, scale: int, batch: int, plan=None):
        super().__init__()
        self.model, self.schedule, self.scale, self.plan = model, schedule, scale, plan
        self.inputs, self.outputs = hart_step_io(model.cfg, schedule, scale, batch, model.word_embed.weight.dtype,
                                                 plan.policy if plan is not None else None)

    def forward(self, *args):
        cfg = self.model.cfg
        named = dict(zip((s.name for s in self.inputs), args))
        # positions only feed rope_tables, which this graph gets as an input: the step never reads them
        text = TextCondition(prefix=named.get("prefix"), cond=named["cond"], positions=None)
        tokens = self.model.scale_input(self.scale, named.get("codes"), text)
        kv = step_kv(named, cfg, self.scale, named.get("prefix"), self.plan)
        logits, hidden = self.model.step(tokens, self.scale, text, kv, named[f"rope.{self.scale}"], self.plan,
                                         return_hidden=True)
        produced = {"logits": logits, "hidden": hidden, **step_kv_outputs(kv, cfg, self.scale, self.plan)}
        return tuple(produced[s.name] for s in self.outputs)


class HartDiffusionConditionUnit(nn.Module):
    def __init__(self, model: HART, schedule: Schedule, batch: int):
        super().__init__()
        self.model = model
        self.inputs, self.outputs = hart_condition_io(model.cfg, schedule, batch, model.word_embed.weight.dtype)

    def forward(self, hidden, codes):
        return self.model.diffusion_condition(hidden, codes)


class HartDenoiseUnit(nn.Module):
    """sparvar.hart.diffusion.denoise_step with the step index k as a graph input, so one graph serves every step.

    The respaced schedule's per-step coefficients become float32 tables gathered at k (the eager step multiplies
    by the same Python floats, which torch rounds to float32). The guided net output is restated here because
    the eager `guided_net_output` builds its timestep from a Python float; the variance and mean reuse
    `p_mean_variance`. At k = 0 the caller passes zero noise (the last step adds none)."""

    def __init__(self, model: HART, schedule: Schedule, batch: int):
        super().__init__()
        self.net = model.diffloss.net
        self.sched = respaced_schedule(model.cfg.diffusion)
        self.tables = {f.name: f"sched_{f.name}" for f in dataclasses.fields(self.sched)}
        for field, buffer in self.tables.items():
            self.register_buffer(buffer, torch.tensor(getattr(self.sched, field), dtype=torch.float32), persistent=False)
        self.inputs, self.outputs = hart_denoise_io(model.cfg, schedule, batch, model.word_embed.weight.dtype)

    def forward(self, x, diffusion_cond, noise, step, guidance):
        # the schedule's rows at the tensor step, as one-entry tables that p_mean_variance reads at 0: a gather
        # (index_select), not `table[step]`, which torch.export before 2.13 turns into a data-dependent int
        at = step.reshape(1)
        tables = dataclasses.replace(self.sched, **{field: getattr(self, b).index_select(0, at)
                                                    for field, b in self.tables.items()})
        N, C = x.shape
        t = tables.timesteps.expand(2 * N)  # the net sees the original 0..T-1 timestep
        out = self.net(torch.cat([x, x]).to(diffusion_cond.dtype), t, diffusion_cond).to(x.dtype)  # (2N, 2C)
        eps = guidance[0] * out[:N, :C] - guidance[1] * out[N:, :C]
        mean, log_variance, _ = p_mean_variance(torch.cat([eps, out[:N, C:]], dim=-1), x, 0, tables)
        return mean + torch.exp(0.5 * log_variance) * noise


class HartDecodeUnit(nn.Module):
    def __init__(self, vq: HartVQDecoder, cfg: HartConfig, schedule: Schedule, batch: int):
        super().__init__()
        self.vq = vq
        self.inputs, self.outputs = hart_decode_io(cfg, schedule, batch)

    def forward(self, f_hat):
        return self.vq.decode(f_hat.to(self.vq.post_quant_conv.weight.dtype)).float()


class HartNextInputUnit(nn.Module):
    """The residual quantizer's step at one scale (HartVQDecoder.quantize.next_autoregressive_input)."""

    def __init__(self, vq: HartVQDecoder, cfg: HartConfig, schedule: Schedule, scale: int, batch: int):
        super().__init__()
        self.vq, self.patch_nums, self.scale = vq, cfg.patch_nums, scale
        self.inputs, self.outputs = hart_next_input_io(cfg, schedule, scale, batch)

    def forward(self, f_hat, h):
        f_hat, nxt = self.vq.quantize.next_autoregressive_input(self.scale, self.patch_nums, f_hat, h)
        return f_hat if len(self.outputs) == 1 else (f_hat, nxt)  # after the last scale nxt is f_hat itself


# ----------------------------------------------------------------------------------------------- export
def hart_units(model: HART, vq: HartVQDecoder, schedule: Schedule, batch: int, plan=None) -> dict[str, nn.Module]:
    """Every unit of a HART engine by its graph name (the runtime looks them up by these names)."""
    cfg = model.cfg
    units: dict[str, nn.Module] = {"text": HartTextUnit(model, schedule, batch)}
    for scale in range(schedule.num_scales):
        units[f"step_{scale:02d}"] = HartStepUnit(model, schedule, scale, batch, plan)
    units["diffusion_condition"] = HartDiffusionConditionUnit(model, schedule, batch)
    units["denoise"] = HartDenoiseUnit(model, schedule, batch)
    for scale in range(schedule.num_scales):
        units[f"next_input_{scale:02d}"] = HartNextInputUnit(vq, cfg, schedule, scale, batch)
    units["decode"] = HartDecodeUnit(vq, cfg, schedule, batch)
    return units


def sample_inputs(unit: nn.Module, named: dict | None = None) -> list[torch.Tensor]:
    """Export arguments in I/O order: known values by name (real activations keep the trace honest), else
    small random values (a zero mask or zero noise could let the exporter specialise on them)."""
    named = named or {}
    g = torch.Generator().manual_seed(0)
    out = []
    for s in unit.inputs:
        if s.name in named:
            out.append(named[s.name])
        elif s.dtype == "bool":
            out.append(torch.ones(s.shape, dtype=torch.bool))
        elif s.dtype in ("int64", "int32"):
            out.append(torch.ones(s.shape, dtype=getattr(torch, s.dtype)))
        else:
            out.append((torch.randn(s.shape, generator=g) * 0.1).to(getattr(torch, s.dtype)))
    return out


CODEBOOK_FILE = "codebook.npy"  # (V, Cvae) fp32: the sampler's codebook, stored next to the graphs


@torch.no_grad()
def export_hart_units(model: HART, vq: HartVQDecoder, schedule: Schedule, batch: int, export_one, out_dir: str,
                      plan=None) -> dict:
    """Export every unit through `export_one(name, module, inputs, outputs, args)` (export/stages.py's exporter)
    and save the codebook (the loop samples code vectors from it on the host) into out_dir; returns the export
    stage's extra info. Step graphs are traced on real text-unit outputs, the later scales on real past K/V."""
    import numpy as np

    np.save(os.path.join(out_dir, CODEBOOK_FILE), vq.quantize.embedding.weight.float().numpy())
    units = hart_units(model, vq, schedule, batch, plan)
    text = units["text"]
    text_args = sample_inputs(text)
    named = dict(zip((s.name for s in text.outputs), text(*text_args)))
    for name, unit in units.items():
        args = text_args if name == "text" else sample_inputs(unit, named)
        export_one(name, unit, unit.inputs, unit.outputs, args)
        # the next step traces on this one's real K/V (and CS4A state); the last step's outputs feed only the
        # diffusion-condition graph, which traces as well on random hidden states, so it is not run eagerly
        # (on a 1024^2 model that eager run is the largest reference attention of the export)
        if name.startswith("step_") and name != f"step_{schedule.num_scales - 1:02d}":
            out = dict(zip((s.name for s in unit.outputs), unit(*args)))
            for i in range(model.cfg.depth):
                for kv in ("k", "v"):
                    past = named.get(f"past_{kv}.{i}")
                    new = out[f"new_{kv}.{i}"]
                    named[f"past_{kv}.{i}"] = new if past is None else torch.cat([past, new], dim=2)
            named.update({k: v for k, v in out.items() if k == "hidden" or k.startswith("cs4a_")})
    return {"codebook": f"export/{CODEBOOK_FILE}"}


# ----------------------------------------------------------------------------------------------- weights
def load_hart_model_and_vq(spec, cfg: HartConfig, dtype: torch.dtype) -> tuple[HART, HartVQDecoder]:
    """The engine's transformer and tokenizer decoder: official checkpoints, or random weights built as the eager
    random-weight pipeline builds them (HartPipeline.create: the transformer from spec.seed, the tokenizer from 0).
    The tokenizer stays fp32 whatever the engine dtype (f_hat accumulates over every scale)."""
    from sparvar.hart.checkpoint import load_model
    from sparvar.hart.model import build_model
    from sparvar.hart.tokenizer import build_hart_vq, load_hart_vq

    if spec.weights is None:
        return build_model(cfg, dtype=dtype, seed=spec.seed), build_hart_vq(cfg.vq, seed=0)
    return load_model(cfg, spec.weights, "cpu", dtype), load_hart_vq(spec.vae, cfg.vq)
