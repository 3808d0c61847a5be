"""Text conditioning: prompt -> (features (B, L, text_dim), lengths (B,)).

Three sources, chosen explicitly by the caller (never a silent fallback):
- `T5TextEncoder`: flan-t5-xl (or any T5 encoder) from a local path through `transformers`; as official,
  prompts are padded to 512 tokens, encoded with the attention mask, then trimmed to the real length.
- `load_embeddings`: precomputed features from a .safetensors/.pt file (`features` (B, L, C), `lengths` (B,)).
- `hashed_embeddings`: a deterministic pseudo-embedding of the prompt's words, for random-weight and tiny models
  (which were never trained on a text encoder), so that a demo needs no multi-GB download.
"""
from __future__ import annotations

import hashlib
import os

import torch

T5_MAX_TOKENS = 512


def load_pretrained_strict(model_class, path: str, **kwargs):
    """`model_class.from_pretrained(path, **kwargs)` from local files only, refusing a directory that lacks some of the
    model's weights or holds them in another shape: transformers fills missing weights with random values and only
    logs it, and every prompt's features would be wrong without an error. Weights the model does not use are allowed
    (an official full checkpoint holds the decoder / LM head an encoder has no use for)."""
    from .checkpoint import raise_key_problems

    model, info = model_class.from_pretrained(path, local_files_only=True, output_loading_info=True, **kwargs)
    mismatched = [f"{m[0]}: checkpoint {tuple(m[1])} != expected {tuple(m[2])}"
                  if isinstance(m, (tuple, list)) and len(m) == 3 else str(m) for m in info.get("mismatched_keys") or []]
    raise_key_problems(f"{path} does not hold every weight of its {model_class.__name__} (transformers would fill "
                       "the rest with random values)", [("missing", list(info.get("missing_keys") or [])),
                                                        ("wrong shape", mismatched)])
    return model


class T5TextEncoder:
    def __init__(self, path: str, device="cpu", dtype=torch.float16):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"T5 encoder directory not found: {path} (expected a local flan-t5-xl checkout)")
        from transformers import AutoTokenizer, T5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(path, legacy=True)
        # fp16 as official; CPU matmuls have no fp16 kernels on every build, so use fp32 there
        dtype = dtype if torch.device(device).type == "cuda" else torch.float32
        self.model = load_pretrained_strict(T5EncoderModel, path, torch_dtype=dtype).to(device).eval()
        self.device = device

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(prompts, max_length=T5_MAX_TOKENS, padding="max_length", truncation=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        features = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        lengths = mask.sum(dim=-1)
        return features[:, : int(lengths.max())], lengths


def load_embeddings(path: str, text_dim: int, require_lengths: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """features (B, L, text_dim) float32 and lengths (B,) int64 from a .safetensors / .pt file of 'features' (and
    'lengths', all of L when absent). require_lengths: why a caller needs 'lengths' present (its error message)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text embedding file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            data = load_file(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or not a tensor file: the libraries' error types vary
        raise ValueError(f"{path} cannot be read as text embeddings ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict with 'features' (and 'lengths'), found {type(data).__name__}")
    if "features" not in data:
        raise ValueError(f"{path}: missing tensor 'features' (B, L, {text_dim}); found {sorted(map(str, data))}")
    # any other entry is refused: an 'attention_mask' (the encoders' own output) or a misspelt 'lenghts' left out
    # would make every pad slot count as text
    other = sorted(map(str, set(data) - {"features", "lengths"}))
    if other:
        raise ValueError(f"{path}: unknown entries {other}; the file holds 'features' (B, L, {text_dim}) and "
                         "optionally 'lengths' (B,), the real tokens of each row")
    if not isinstance(data["features"], torch.Tensor) or not data["features"].dtype.is_floating_point:
        raise ValueError(f"{path}: 'features' must be a floating-point tensor, got "
                         f"{data['features'].dtype if isinstance(data['features'], torch.Tensor) else type(data['features']).__name__}")
    features = data["features"].float()
    if features.ndim == 2:
        features = features[None]
    if features.ndim != 3 or features.shape[-1] != text_dim:
        raise ValueError(f"{path}: 'features' has shape {tuple(features.shape)}, expected (B, L, {text_dim})")
    if not bool(torch.isfinite(features).all()):  # every image of the batch would be noise, without a word
        raise ValueError(f"{path}: 'features' holds NaN or infinite values (a failed encoder run?)")
    if require_lengths and "lengths" not in data:
        raise ValueError(f"{path}: missing tensor 'lengths' (B,): {require_lengths}")
    lengths = data.get("lengths", torch.full((features.shape[0],), features.shape[1]))
    B, L = features.shape[:2]
    if (not isinstance(lengths, torch.Tensor) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool
            or lengths.dtype.is_complex or tuple(lengths.shape) != (B,)):
        raise ValueError(f"{path}: 'lengths' must be {B} integers, one per row of 'features', got "
                         f"{tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__}")
    if bool((lengths < 1).any() or (lengths > L).any()):
        raise ValueError(f"{path}: every 'lengths' entry must be in [1, {L}] (the rows' real tokens), got "
                         f"{lengths.tolist()}")
    return features, lengths.long()


def check_prompt(prompt) -> None:
    """ValueError (a phrase to follow the option's or field's name) unless `prompt` is text a tokenizer can take:
    a non-empty string, encodable as UTF-8 (a lone surrogate from a JSON escape or a command line in another
    encoding failed inside the text encoder, and in a server, for every request batched with it)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"must be a non-empty string, got {prompt!r}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"must be valid UTF-8 text: character {e.object[e.start]!r} at position {e.start} is not "
                         "(an unpaired surrogate, or a command line in another encoding)") from None


def hashed_words(prompt: str) -> list[str]:
    """The words `hashed_embeddings` embeds, one vector each: prompts with the same words have the same features."""
    return prompt.lower().split()


def hashed_embeddings(prompts: list[str], text_dim: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed random vector per word (seeded by the word's hash), so equal prompts give equal features."""
    rows, lengths = [], []
    for prompt in prompts:
        words = hashed_words(prompt)[:max_tokens] or ["<empty>"]
        vecs = []
        for word in words:
            seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
            vecs.append(torch.randn(text_dim, generator=torch.Generator().manual_seed(seed)) * 0.2)
        rows.append(torch.stack(vecs))
        lengths.append(len(vecs))
    L = max(lengths)
    features = torch.zeros(len(prompts), L, text_dim)
    for i, r in enumerate(rows):
        features[i, : len(r)] = r
    return features, torch.tensor(lengths)
