"""HART text conditioning: prompt -> (features (B, text_len, text_dim), mask (B, text_len) bool).

HART puts every one of its `text_len` (300) text slots into self-attention as a prefix, pads included, so unlike
Infinity's T5 path nothing is trimmed: the transformer always gets all slots plus a mask (True = real token) that
sets the text RoPE positions (cumsum(mask) - 1) and the head's max-pooling (sparvar.hart.model.encode_text).

Three sources, chosen explicitly by the caller (never a silent fallback), as in sparvar.text:
- `Qwen2TextEncoder`: the official Qwen2 LLM (mit-han-lab/Qwen2-VL-1.5B-Instruct, hidden 1536) and its tokenizer
  from a local path through `transformers`, with the official system-prompt handling (hart/utils/tools.py
  encode_prompts, sample.py / app.py defaults).
- `load_hart_embeddings`: precomputed features in sparvar.text.load_embeddings' file format (`features`
  (B, text_len, text_dim) with ALL slots, pads included; `lengths` (B,) of right-padded prompts).
- `hashed_hart_embeddings`: sparvar.text.hashed_embeddings zero-padded to the prefix, for random-weight and tiny
  models (`text_encoder="hashed"`).
"""
from __future__ import annotations

import os

import torch

from ..text import hashed_embeddings, load_embeddings, load_pretrained_strict
from .config import HartConfig

# Official hart/utils/constants.py llm_system_prompt (sample.py and app.py default use_llm_system_prompt=True).
# The trailing "\n" is a real newline: the official string is a plain (not raw) triple-quoted literal.
LLM_SYSTEM_PROMPT = """Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for image generation.

Examples:
- User Prompt: A cat sleeping -> A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.
- User Prompt: A busy city street -> A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.

Please generate only the enhanced description for the prompt below and DO NOT include any additional sentences. Start your response with "Enhanced Prompt:".

User Prompt:\n"""

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _check_model_dir(path: str) -> None:
    """A local Qwen2 checkpoint directory: config, weights and a tokenizer; name whatever is missing."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Qwen2 text model directory not found: {path} (expected a local "
                                "Qwen2-VL-1.5B-Instruct checkout with config, weights and tokenizer; nothing is downloaded)")
    files = set(os.listdir(path))
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    if not files & set(_WEIGHT_FILES):
        missing.append("weights (" + " / ".join(_WEIGHT_FILES) + ")")
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
        missing.append("tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    if missing:
        raise FileNotFoundError(f"{path} is not a Qwen2 text model directory: missing {', '.join(missing)}")


class Qwen2TextEncoder:
    """The official HART text path (hart/utils/tools.py encode_prompts).

    Each prompt is tokenized on its own, padded / truncated to `text_len` tokens (the tokenizer's own padding
    side, as official); mask = ids != pad_token_id. With the system prompt (the official default) the LLM runs on
    [system prompt tokens (all attended) | prompt tokens], and the system prompt's outputs are cut off, so the
    features are exactly `text_len` slots. Features are the LLM's final hidden state after its last norm (the
    official `hidden_states[-1]` in transformers 4.42 = `last_hidden_state`).
    """

    def __init__(self, path: str, cfg: HartConfig, device="cpu", autocast_dtype=torch.float16,
                 system_prompt: str | None = LLM_SYSTEM_PROMPT):
        _check_model_dir(path)
        if autocast_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"autocast_dtype must be torch.float16 (official) or torch.bfloat16, got {autocast_dtype}")
        from transformers import AutoModel, AutoTokenizer

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"{path}: the tokenizer has no pad token (the official mask is ids != pad_token_id)")
        # Weights stay float32 as in sample.py, which runs the LLM under fp16 autocast on CUDA; CPU runs float32.
        self.model = load_pretrained_strict(AutoModel, path, dtype=torch.float32).to(device).eval()
        hidden = self.model.config.get_text_config().hidden_size  # a Qwen2 config, or a Qwen2-VL one's LLM part
        if hidden != cfg.text_dim:
            raise ValueError(f"{path}: hidden size {hidden} != {cfg.name} text_dim {cfg.text_dim}")
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype if self.device.type == "cuda" else None
        self.system_prompt = system_prompt

    @property
    def text_len(self) -> int:
        return self.cfg.text_len

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> ids (B, text_len) int64, mask (B, text_len) bool, as official tokenize_fn + encode_prompts."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        ids = torch.stack([self.tokenizer(p, return_tensors="pt", padding="max_length", max_length=self.text_len,
                                          truncation=True).input_ids[0] for p in prompts])
        mask = ids != self.tokenizer.pad_token_id
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"prompts {empty} have no tokens (the text positions cumsum(mask) - 1 need at least one)")
        return ids, mask

    def system_prompt_ids(self) -> torch.Tensor:
        """(S,) token ids of the system prompt, truncated to text_len as official (tokenized with max_length)."""
        if self.system_prompt is None:
            return torch.zeros(0, dtype=torch.long)
        return self.tokenizer(self.system_prompt, return_tensors="pt", padding="longest", max_length=self.text_len,
                              truncation=True).input_ids[0]

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> features (B, text_len, text_dim) float32, mask (B, text_len) bool (True = real token)."""
        ids, mask = self.tokenize(prompts)
        system = self.system_prompt_ids()[None].expand(ids.shape[0], -1)  # (B, S)
        S = system.shape[1]
        ids = torch.cat([system, ids], dim=1).to(self.device)
        attention = torch.cat([torch.ones_like(system, dtype=torch.bool), mask], dim=1).to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            hidden = self.model(input_ids=ids, attention_mask=attention).last_hidden_state
        return hidden[:, S:].float(), mask.to(self.device)


def lengths_to_mask(lengths: torch.Tensor, text_len: int) -> torch.Tensor:
    """lengths (B,) of right-padded prompts -> mask (B, text_len) bool."""
    if lengths.ndim != 1 or bool((lengths < 1).any()) or bool((lengths > text_len).any()):
        raise ValueError(f"lengths must be (B,) in [1, {text_len}], got {lengths.tolist()}")
    return torch.arange(text_len, device=lengths.device)[None] < lengths[:, None]


def load_hart_embeddings(path: str, cfg: HartConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Precomputed HART text features (sparvar.text.load_embeddings' format) -> features, mask.

    The file must hold all `text_len` slots (the pad slots' LLM outputs are part of the prefix, so they cannot be
    rebuilt from the real tokens alone); `lengths` are of right-padded prompts (Qwen2's default padding side).
    """
    features, lengths = load_embeddings(path, cfg.text_dim, require_lengths=(
        f"{cfg.name}'s features hold all {cfg.text_len} slots, pads included, so their shape cannot say how many "
        "tokens are real (every pad would count as text)"))
    if features.shape[1] != cfg.text_len:
        raise ValueError(f"{path}: 'features' has {features.shape[1]} slots; {cfg.name} needs all {cfg.text_len} "
                         "text slots, pads included (save the encoder's full output, not a trimmed one)")
    return features, lengths_to_mask(lengths, cfg.text_len)


def hashed_hart_embeddings(prompts: list[str], cfg: HartConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """sparvar.text.hashed_embeddings zero-padded to text_len slots -> features, mask (random-weight models)."""
    features, lengths = hashed_embeddings(prompts, cfg.text_dim, cfg.text_len)
    padded = features.new_zeros(features.shape[0], cfg.text_len, cfg.text_dim)
    padded[:, : features.shape[1]] = features
    return padded, lengths_to_mask(lengths, cfg.text_len)
