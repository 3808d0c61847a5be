"""One frozen config per model size. A size is data: build any model with `get_config(name)`."""
from __future__ import annotations

from dataclasses import dataclass

from .hart.config import HART_CONFIGS, HartConfig


@dataclass(frozen=True)
class VAEConfig:
    """The BSQ tokenizer (decoder side) that turns summed codes into pixels."""

    name: str
    codebook_dim: int  # bits per latent position (32 for d32; 14 for the 8B's d56 = 2x2 patchify of 14 bits)
    patch_size: int  # pixel stride of one latent position (16, or 8 with the 2x2 patchify)
    ch: int = 128  # base channel count of the decoder (official vae_model: base_ch=128)
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    spatial_patchify: bool = False  # 2x2 latent positions form one transformer token

    @property
    def token_bits(self) -> int:
        """Bits predicted per transformer token."""
        return self.codebook_dim * (4 if self.spatial_patchify else 1)


@dataclass(frozen=True)
class InfinityConfig:
    name: str
    depth: int
    width: int
    heads: int
    mlp_dim: int
    vae: VAEConfig
    text_dim: int = 2048  # flan-t5-xl hidden size
    text_maxlen: int = 512
    blocks_per_chunk: int = 4  # official checkpoints store block b at block_chunks.{b // P}.module.{b % P}
    num_level_embeddings: int = 15
    norm_eps: float = 1e-6
    default_resolution: int = 1024
    sos_head_dim: int | None = None  # None: the official rule (128, or 64 past width 4096)
    text_encoder: str = "t5"  # "t5" (flan-t5-xl, official) or "hashed" (sparvar.text.hashed_embeddings: our own models)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def bits(self) -> int:
        return self.vae.token_bits

    @property
    def num_logits(self) -> int:
        return 2 * self.bits

    @property
    def sos_heads(self) -> int:
        """Heads of the attentive text pool (`text_proj_for_sos`): text_dim // its head dim."""
        head_dim = self.sos_head_dim or (64 if self.width > 4096 else 128)
        return self.text_dim // head_dim

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"{self.name}: width {self.width} not divisible by heads {self.heads}")
        if self.head_dim % 4:
            raise ValueError(f"{self.name}: head dim {self.head_dim} must be a multiple of 4 for 2D RoPE")
        if self.text_encoder not in ("t5", "hashed"):
            raise ValueError(f"{self.name}: text_encoder must be 't5' or 'hashed', got {self.text_encoder!r}")
        if self.depth % self.blocks_per_chunk:
            raise ValueError(f"{self.name}: depth {self.depth} not divisible by blocks_per_chunk {self.blocks_per_chunk}")


# infinity-cifar's prompts: class i of the trained model is prompted by CIFAR10_CLASSES[i] (sparvar/train prompts
# each class by its folder name in the tarball, and these are those names, sorted)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

VAE_D32 = VAEConfig(name="infinity_vae_d32reg", codebook_dim=32, patch_size=16)
VAE_D56 = VAEConfig(name="infinity_vae_d56_f8_14_patchify", codebook_dim=14, patch_size=8,
                    ch_mult=(1, 2, 4, 4), spatial_patchify=True)
# ch=32: the official GroupNorm needs channel counts divisible by 32 (or 24), so 16 cannot build.
VAE_TINY = VAEConfig(name="tiny_vae_d16", codebook_dim=16, patch_size=16, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1)
# Our own tokenizer (sparvar/train): 64x64 images (CIFAR-10 upsampled 2x), stride 2 -> a 32x32 latent of 16 bits.
VAE_CIFAR = VAEConfig(name="infinity_cifar_vae_d16", codebook_dim=16, patch_size=2, ch=32, ch_mult=(1, 2), num_res_blocks=2)

CONFIGS: dict[str, InfinityConfig] = {
    c.name: c
    for c in (
        InfinityConfig("infinity-2b", depth=32, width=2048, heads=16, mlp_dim=8192, vae=VAE_D32, blocks_per_chunk=4),
        InfinityConfig("infinity-8b", depth=40, width=3584, heads=28, mlp_dim=14336, vae=VAE_D56, blocks_per_chunk=5),
        # Same architecture, small enough to run every scale on a CPU in seconds.
        InfinityConfig("infinity-tiny", depth=4, width=128, heads=2, mlp_dim=512, vae=VAE_TINY, text_dim=64,
                       text_maxlen=32, blocks_per_chunk=2, default_resolution=256, sos_head_dim=32),
        # Trained by sparvar/train on CIFAR-10 (weights/): 64x64 images, 11 scales up to a 32x32 token grid
        # (sparvar/schedule.py MODEL_SCHEDULES); the prompt is a class name, through `text.hashed_embeddings`.
        InfinityConfig("infinity-cifar", depth=6, width=256, heads=4, mlp_dim=1024, vae=VAE_CIFAR, text_dim=64,
                       text_maxlen=8, blocks_per_chunk=3, default_resolution=64, sos_head_dim=16, text_encoder="hashed"),
    )
}


# A class-conditional model's only prompts (its class names), by model name; other models take free text. Kept out
# of the config dataclasses: engines record those whole (sparvar.engine.check_model_config, the export stage's key),
# and the prompts a model answers do not change what its graphs compute.
CLASS_PROMPTS: dict[str, tuple[str, ...]] = {"infinity-cifar": CIFAR10_CLASSES}


def get_config(name: str) -> InfinityConfig | HartConfig:
    """Any model size by name: Infinity sizes (CONFIGS) and HART sizes (sparvar.hart.config.HART_CONFIGS)."""
    known = {**CONFIGS, **HART_CONFIGS}
    try:
        return known[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(known)}") from None
