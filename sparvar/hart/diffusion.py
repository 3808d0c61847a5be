"""HART's residual diffusion head: the `diffloss.net` MLP (SimpleMLPAdaLN) and its IDDPM sampler.

After the last scale, the transformer's final hidden state plus the embedded sampled code, through
`decoder_norm`, conditions one small MLP per token; 8 IDDPM steps turn Gaussian noise into the continuous
residual that the discrete codebook could not express. State dict keys are the official ones relative to the
transformer checkpoint's `diffloss.` prefix (`net.time_embed.mlp.0.weight`, `net.res_blocks.3.adaLN_modulation.1.bias`, ...).

Sampler facts (hart/modules/diffusion/, official `DiffLoss.sample` with `create_diffusion`):
- cosine beta schedule over 1000 steps, respaced to `num_sampling_steps` by `space_timesteps` (one section);
- epsilon prediction, learned-range variance (the net's second half interpolates the log variance between the
  clipped posterior variance and beta), x0 clipped to [-1, 1], no noise on the last step;
- the samples are in units of latent / 0.6 (`vae_scale`), multiplied back at the end;
- CFG on eps: eps = (1 + s) * eps_cond - s * eps_uncond, the variance from the conditional half; the
  transformer passes s = cfg * 12/13 (the ratio of the last non-final scale, left over from its loop).

Unlike the official code, the noise comes from an explicit torch.Generator. Each step is the pure function
`denoise_step`, whose per-step coefficients are Python floats from `respaced_schedule`, so a step exports as one
graph with its coefficients baked in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from .config import HartConfig, HartDiffusionConfig

FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal timestep features before the time MLP (official default)


# --- the net (official SimpleMLPAdaLN; attribute names are the checkpoint's)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) timesteps (original 0..999 scale, may be fractional) -> (N, dim) [cos | sin] features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim); dim is even here


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_EMBEDDING_SIZE, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """LayerNorm -> adaLN modulate -> MLP, gated residual; shift/scale/gate from the (time + cond) embedding."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)  # (N, W) each
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """(x_t (N, C), t (N,), cond (N, D)) -> (N, 2C): [eps | variance interpolation in [-1, 1]]."""

    def __init__(self, channels: int, width: int, cond_dim: int, depth: int):
        super().__init__()
        self.channels = channels
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * channels)

    def forward(self, x, t, cond):
        y = self.time_embed(t) + self.cond_embed(cond)  # (N, W)
        x = self.input_proj(x)  # (N, W)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)  # (N, 2C)


class DiffLoss(nn.Module):
    """The official `DiffLoss` container (its only weights are `net.*`), inference side."""

    def __init__(self, cfg: HartConfig):
        super().__init__()
        if not isinstance(cfg, HartConfig):
            raise TypeError(f"expected a HartConfig, got {type(cfg).__name__}")
        check_diffusion_config(cfg.diffusion)
        self.cfg = cfg
        self.net = SimpleMLPAdaLN(cfg.vq.z_channels, cfg.diffusion.width, cfg.width, cfg.diffusion.depth)

    def sample(self, cond: torch.Tensor, cfg_scale: float, generator: torch.Generator | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """cond (2B, D) = [conditional; unconditional] rows -> residual tokens (B, C); see `sample`.
        Pass cfg_scale = last_stage_cfg_scale(cfg, num_scales) to match the official loop."""
        return sample(self.net, cond, cfg_scale, self.cfg.diffusion, generator, temperature)


def diffloss_param_count(cfg: HartConfig) -> int:
    """Parameters of `diffloss.net`, by formula (W width, C token channels, D condition dim, depth blocks)."""
    W, C, D, depth = cfg.diffusion.width, cfg.vq.z_channels, cfg.width, cfg.diffusion.depth
    linear = lambda i, o: i * o + o  # noqa: E731
    time = linear(FREQUENCY_EMBEDDING_SIZE, W) + linear(W, W)
    block = 2 * W + 2 * linear(W, W) + linear(W, 3 * W)  # LayerNorm affine, MLP, adaLN
    final = linear(W, 2 * C) + linear(W, 2 * W)
    return time + linear(D, W) + linear(C, W) + depth * block + final


def build_diffloss(cfg: HartConfig, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32) -> DiffLoss:
    """Random-weight head (PyTorch default init, seeded, global RNG untouched), in eval mode.

    Default init, not the official zero-init of the adaLN and output layers: a zero-init net predicts eps = 0
    and would make every sampler test trivially pass."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiffLoss(cfg)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def last_stage_cfg_scale(cfg: float, num_scales: int) -> float:
    """The guidance scale the official loop hands the diffusion head: cfg * ratio, where ratio is left over from
    the last non-final scale, (SN - 2) / (SN - 1) (12/13 for hart-0.7b), not the final stage's 1."""
    if num_scales < 2:
        raise ValueError(f"need at least 2 scales, got {num_scales}")
    return cfg * (num_scales - 2) / (num_scales - 1)


# --- the respaced IDDPM schedule


def check_diffusion_config(cfg: HartDiffusionConfig) -> None:
    if cfg.noise_schedule != "cosine":
        raise ValueError(f"only the official cosine noise schedule is implemented, got {cfg.noise_schedule!r}")
    if not cfg.learn_sigma:
        raise ValueError("only the official learned-range variance (learn_sigma=True) is implemented")
    if not 1 <= cfg.num_sampling_steps <= cfg.train_steps:
        raise ValueError(f"num_sampling_steps must be in [1, {cfg.train_steps}], got {cfg.num_sampling_steps}")
    if cfg.width <= 0 or cfg.depth <= 0:
        raise ValueError(f"diffusion width and depth must be positive, got {cfg.width}, {cfg.depth}")


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> list[float]:
    """IDDPM cosine schedule: beta_i = 1 - abar((i+1)/T) / abar(i/T), abar(t) = cos((t + 0.008) / 1.008 * pi/2)^2."""
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta) for i in range(num_steps)]


def space_timesteps(num_steps: int, count: int) -> list[int]:
    """Kept timesteps of the official `space_timesteps(num_steps, [count])`: `count` evenly strided steps,
    first and last included, rounded as the official code rounds its running float index."""
    if not 1 <= count <= num_steps:
        raise ValueError(f"cannot take {count} steps out of {num_steps}")
    stride = 1 if count <= 1 else (num_steps - 1) / (count - 1)
    kept, index = [], 0.0
    for _ in range(count):
        kept.append(round(index))
        index += stride
    return sorted(set(kept))


@dataclass(frozen=True)
class SamplerSchedule:
    """Per respaced step k (0 = least noisy) of the sampler, everything as Python floats (computed in float64).

    `timesteps[k]` is the original 0..T-1 timestep the net sees at step k (the official `timestep_map`)."""

    timesteps: tuple[int, ...]
    betas: tuple[float, ...]
    alphas_cumprod: tuple[float, ...]
    sqrt_recip_alphas_cumprod: tuple[float, ...]  # x0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps
    sqrt_recipm1_alphas_cumprod: tuple[float, ...]
    posterior_mean_coef1: tuple[float, ...]  # mean = coef1 * x0 + coef2 * x_t
    posterior_mean_coef2: tuple[float, ...]
    posterior_log_variance_clipped: tuple[float, ...]  # min log variance of the learned range
    log_betas: tuple[float, ...]  # max log variance of the learned range

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


@lru_cache(maxsize=None)
def respaced_schedule(cfg: HartDiffusionConfig) -> SamplerSchedule:
    """The official `SpacedDiffusion` coefficients: new betas 1 - abar_k / abar_{k-1} over the kept timesteps."""
    check_diffusion_config(cfg)
    base = torch.tensor(cosine_betas(cfg.train_steps), dtype=torch.float64)
    base_abar = torch.cumprod(1 - base, 0)
    kept = space_timesteps(cfg.train_steps, cfg.num_sampling_steps)
    abar = base_abar[kept]  # (K,)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    betas = 1 - abar / abar_prev
    posterior_variance = betas * (1 - abar_prev) / (1 - abar)
    # log clipped because the posterior variance is 0 at k = 0: step 0 borrows step 1's value (official)
    clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]]) if len(kept) > 1 else posterior_variance
    as_floats = lambda t: tuple(float(v) for v in t)  # noqa: E731
    return SamplerSchedule(
        timesteps=tuple(kept),
        betas=as_floats(betas),
        alphas_cumprod=as_floats(abar),
        sqrt_recip_alphas_cumprod=as_floats(torch.sqrt(1 / abar)),
        sqrt_recipm1_alphas_cumprod=as_floats(torch.sqrt(1 / abar - 1)),
        posterior_mean_coef1=as_floats(betas * torch.sqrt(abar_prev) / (1 - abar)),
        posterior_mean_coef2=as_floats((1 - abar_prev) * torch.sqrt(1 - betas) / (1 - abar)),
        posterior_log_variance_clipped=as_floats(torch.log(clipped)),
        log_betas=as_floats(torch.log(betas)),
    )


# --- one step, and the loop


def p_mean_variance(net_out: torch.Tensor, x: torch.Tensor, k: int, sched: SamplerSchedule):
    """Net output (N, 2C) at x_t (N, C), respaced step k -> (mean, log_variance, pred_x0) of p(x_{t-1} | x_t)."""
    C = x.shape[-1]
    if net_out.shape[-1] != 2 * C:
        raise ValueError(f"net output must have {2 * C} channels (eps and variance), got {tuple(net_out.shape)}")
    eps, var_values = net_out.split(C, dim=-1)  # (N, C) each
    frac = (var_values + 1) / 2  # [-1, 1] -> [min, max] log variance
    log_variance = frac * sched.log_betas[k] + (1 - frac) * sched.posterior_log_variance_clipped[k]
    pred_x0 = (sched.sqrt_recip_alphas_cumprod[k] * x - sched.sqrt_recipm1_alphas_cumprod[k] * eps).clamp(-1, 1)
    mean = sched.posterior_mean_coef1[k] * pred_x0 + sched.posterior_mean_coef2[k] * x
    return mean, log_variance, pred_x0


def guidance_weights(cfg_scale: float) -> torch.Tensor:
    """(1 + s, s) as a float32 (2,) tensor: the weights of eps_c and eps_u, each rounded once from double, which is
    what torch does with a Python-float scale (1 + float32(s) in float32 differs in ~4% of scales). For a step
    whose scale is an input: a captured CUDA graph (one graph for every scale) and the exported denoise unit."""
    return torch.tensor([1 + cfg_scale, cfg_scale], dtype=torch.float32)


def guided_net_output(net: SimpleMLPAdaLN, x: torch.Tensor, k: int, cond: torch.Tensor,
                      cfg_scale: float | torch.Tensor, sched: SamplerSchedule) -> torch.Tensor:
    """The official `forward_with_cfg` for the conditional half: x (B, C), cond (2B, D) = [cond rows; uncond rows];
    cfg_scale a float s, or its `guidance_weights` on x's device.

    -> (B, 2C): guided eps (1 + s) * eps_c - s * eps_u, and the conditional rows' variance output."""
    B, C = x.shape
    t = torch.full((2 * B,), float(sched.timesteps[k]), device=x.device)  # the net sees the original timestep
    out = net(torch.cat([x, x]).to(cond.dtype), t, cond).to(x.dtype)  # (2B, 2C)
    w_cond, w_uncond = cfg_scale.unbind(0) if isinstance(cfg_scale, torch.Tensor) else (1 + cfg_scale, cfg_scale)
    eps = w_cond * out[:B, :C] - w_uncond * out[B:, :C]
    return torch.cat([eps, out[:B, C:]], dim=-1)


def denoise_step(net: SimpleMLPAdaLN, x: torch.Tensor, k: int, cond: torch.Tensor, cfg_scale: float | torch.Tensor,
                 noise: torch.Tensor | None, sched: SamplerSchedule, temperature: float = 1.0) -> torch.Tensor:
    """One IDDPM step at respaced step k: x_t (B, C) -> x_{t-1} (B, C). Pure: the noise (B, C) is an input,
    and unused at k = 0 (the last step adds none). `k` and `temperature` are compile-time constants; `cfg_scale`
    is one too as a float, or an input as its `guidance_weights` tensor (see guided_net_output)."""
    mean, log_variance, _ = p_mean_variance(guided_net_output(net, x, k, cond, cfg_scale, sched), x, k, sched)
    if k == 0:
        return mean
    if noise is None or noise.shape != x.shape:
        raise ValueError(f"step {k} needs noise of shape {tuple(x.shape)}, got "
                         f"{None if noise is None else tuple(noise.shape)}")
    return mean + torch.exp(0.5 * log_variance) * noise * temperature


def sample(net: SimpleMLPAdaLN, cond: torch.Tensor, cfg_scale: float, cfg: HartDiffusionConfig,
           generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Continuous residual tokens (B, C) for cond (2B, D) = [conditional rows; unconditional rows].

    Official quirk kept: `DiffLoss.sample` treats cfg == 1.0 as "no guidance" and samples the conditional rows
    alone, which is guidance scale 0 in its (1 + s) * eps_c - s * eps_u formula. Noise is fp32 from `generator`
    on cond's device; the loop runs in fp32 whatever the net's dtype (the official code keeps x fp32 under autocast).
    """
    if not isinstance(cond, torch.Tensor) or cond.ndim != 2 or cond.shape[0] % 2:
        raise ValueError(f"cond must be (2B, D) = [conditional; unconditional] rows, got "
                         f"{tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__}")
    if cond.shape[1] != net.cond_embed.in_features:
        raise ValueError(f"cond has {cond.shape[1]} channels, the net expects {net.cond_embed.in_features}")
    sched = respaced_schedule(cfg)
    B, C = cond.shape[0] // 2, net.channels
    scale = 0.0 if cfg_scale == 1.0 else float(cfg_scale)
    randn = lambda: torch.randn(B, C, generator=generator, device=cond.device)  # noqa: E731
    x = randn()  # (B, C) pure noise at the noisiest step
    for k in reversed(range(sched.num_steps)):
        x = denoise_step(net, x, k, cond, scale, randn() if k > 0 else None, sched, temperature)
    return x * cfg.vae_scale  # (B, C) in latent units
