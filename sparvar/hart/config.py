"""One frozen config per HART size, plus its tokenizer and diffusion head. Registered in sparvar.config.

Values come from the official code's defaults and the hart-0.7b-1024px checkpoint layout
(../shared/spec/HART.md); the ones the official config.json would pin but that is unreachable are inferred
there and marked so here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HartVQConfig:
    """The VAR-style VQ tokenizer (decoder side) and its multi-scale residual quantizer.

    Defaults checked against the official HARTAutoEncoderConfig / HARTAutoEncoder (e28a41f); the decoder always
    has self-attention at the coarsest level and in the middle, GroupNorm(32), and 3x3 quant / post-quant convs."""

    name: str
    vocab_size: int = 4096  # codebook entries
    z_channels: int = 32  # codebook / latent channels (Cvae)
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # 4 downsamplings: stride 16
    num_res_blocks: int = 2  # hard-coded 2 in the official ddconfig (the decoder runs num_res_blocks + 1 per level)
    quant_resi: float = 0.5  # Phi: x * (1 - r) + conv(x) * r
    share_quant_resi: int = 4  # Phi convs shared across scales (picked by relative scale position)

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class HartDiffusionConfig:
    """The residual diffusion MLP (`diffloss.net`, SimpleMLPAdaLN) and its sampler."""

    width: int = 1024
    depth: int = 6  # residual blocks
    num_sampling_steps: int = 8  # IDDPM, 1000 training steps respaced to this many
    train_steps: int = 1000
    noise_schedule: str = "cosine"
    learn_sigma: bool = True  # "learned range" variance: the net outputs eps and a log-variance interpolation
    vae_scale: float = 0.6  # official DiffLoss.vae_scale: the head models latent / 0.6


@dataclass(frozen=True)
class HartConfig:
    """The HART transformer (official HARTForT2IConfig with attn_type = mlp_type = "llama")."""

    name: str
    depth: int
    width: int  # embed_dim
    heads: int
    mlp_dim: int  # SwiGLU hidden size: official int(width * mlp_ratio * 2 / 3 + 255) // 256 * 256 (4096 for 1536, ratio 4)
    vq: HartVQConfig
    diffusion: HartDiffusionConfig
    patch_nums: tuple[int, ...]  # square token grids per scale; the first (1x1) comes from the last text slot
    text_dim: int = 1536  # context_dim: the Qwen2-1.5B hidden size
    text_len: int = 300  # context_token: text prefix slots (padded / truncated by the tokenizer)
    norm_eps: float = 1e-6
    # Official flags that change the checkpoint's keys. hart-0.7b: no per-block AdaLN (disable_aln: its ~0.73B
    # parameter count and key list leave no room for 24 x ada_lin of 6*C*C), and no cosine attention
    # (attn_l2_norm off: no scale_mul_1H11 keys), so the softmax scale is 0.25 / sqrt(head_dim).
    disable_aln: bool = True  # False: each block has ada_lin = (SiLU, Linear(C, 6C)) fed by the max-pooled text
    attn_l2_norm: bool = False  # True: unit q, k and a learned per-head temperature (scale_mul_1H11), softmax scale 1
    default_resolution: int = 1024  # the only resolution: patch_nums[-1] * vq.stride pixels
    text_encoder: str = "qwen2"  # "qwen2" (official) or "hashed" (our own small models)
    family: str = "hart"

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def text_maxlen(self) -> int:
        """Most text tokens a prompt may have (Infinity's name for it): every HART prompt fills the whole prefix."""
        return self.text_len

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def vocab_size(self) -> int:
        return self.vq.vocab_size

    @property
    def latent_dim(self) -> int:
        """Channels of one token's code vector (word_embed's input)."""
        return self.vq.z_channels

    @property
    def attn_scale(self) -> float:
        """Softmax scale of the official attention (the temperature replaces it under attn_l2_norm)."""
        return 1.0 if self.attn_l2_norm else 0.25 / self.head_dim**0.5

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"{self.name}: width {self.width} not divisible by heads {self.heads}")
        if self.head_dim % 4:
            raise ValueError(f"{self.name}: head dim {self.head_dim} must be a multiple of 4 for 2D RoPE")
        if self.patch_nums[0] != 1:
            raise ValueError(f"{self.name}: the first scale must be 1x1 (it is the last text slot), got {self.patch_nums}")
        if self.patch_nums[-1] * self.vq.stride != self.default_resolution:
            raise ValueError(f"{self.name}: last grid {self.patch_nums[-1]} x stride {self.vq.stride} != "
                             f"default_resolution {self.default_resolution}")
        if self.text_encoder not in ("qwen2", "hashed"):
            raise ValueError(f"{self.name}: text_encoder must be 'qwen2' or 'hashed', got {self.text_encoder!r}")


HART_VQ = HartVQConfig(name="hart_vq_4096x32_f16")
HART_VQ_TINY = HartVQConfig(name="hart_vq_tiny", vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2, 4),
                            num_res_blocks=1)

HART_CONFIGS: dict[str, HartConfig] = {
    c.name: c
    for c in (
        # hart-0.7b-1024px: 24 x 1536, 24 heads of 64 (inferred, VAR-d24 rule), SwiGLU 4096
        HartConfig("hart-0.7b", depth=24, width=1536, heads=24, mlp_dim=4096, vq=HART_VQ,
                   diffusion=HartDiffusionConfig(),
                   patch_nums=(1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)),
        # Same architecture, CPU-sized: every path runs in seconds. Text: hashed embeddings (no Qwen2 is 64 wide).
        # 2 heads of 64: the head dim of hart-0.7b, so the Triton kernels (head dims 64, 128) run it on a GPU
        HartConfig("hart-tiny", depth=2, width=128, heads=2, mlp_dim=256, vq=HART_VQ_TINY,
                   diffusion=HartDiffusionConfig(width=64, depth=2), patch_nums=(1, 2, 3, 4, 6, 8, 12, 16),
                   text_dim=64, text_len=16, default_resolution=256, text_encoder="hashed"),
    )
}
