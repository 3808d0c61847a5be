import json
import os

import pytest
import torch

from sparvar.hart.config import HART_CONFIGS
from sparvar.hart.text import (LLM_SYSTEM_PROMPT, Qwen2TextEncoder, hashed_hart_embeddings, lengths_to_mask,
                               load_hart_embeddings)

TINY = HART_CONFIGS["hart-tiny"]  # text_len 16, text_dim 64
FULL = HART_CONFIGS["hart-0.7b"]  # text_len 300, text_dim 1536
WORDS = "a photo of cat dog red car in the snow fox".split()
PAD = "<|endoftext|>"  # Qwen2's pad token


def _save_tiny_qwen2(path, hidden: int, heads: int, seed: int = 0):
    """A random Qwen2 LM + a real (byte-level BPE) Qwen2Tokenizer over a few words, saved like a checkpoint
    directory (no downloads). Each word of WORDS is one token, with or without its leading space."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([" ".join(WORDS)] * 10 + (WORDS + [" " + w for w in WORDS]) * 10, trainer)
    learned = json.loads(bpe.to_str())["model"]
    tokenizer = transformers.Qwen2Tokenizer(vocab=learned["vocab"], merges=[tuple(m) for m in learned["merges"]])
    tokenizer.save_pretrained(path)
    cfg = transformers.Qwen2Config(vocab_size=len(learned["vocab"]), hidden_size=hidden, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=2,
                                   max_position_embeddings=1024)
    torch.manual_seed(seed)
    # saved as the causal LM (keys under "model."), as the official text model directory; AutoModel strips it
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
    return tokenizer


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2_tiny")
    return str(path), _save_tiny_qwen2(path, hidden=TINY.text_dim, heads=4)


@pytest.fixture(scope="module")
def wide_qwen2(tmp_path_factory):
    """hidden 1536 (the official text_dim), one cheap layer pair: for the real 300 x 1536 output."""
    path = tmp_path_factory.mktemp("qwen2_1536")
    return str(path), _save_tiny_qwen2(path, hidden=FULL.text_dim, heads=12)


def _reference(path, tokenizer, prompt, system, text_len):
    """Run the LLM directly on [system tokens | prompt tokens right-padded to text_len], slice the system off."""
    from transformers import Qwen2Model

    model = Qwen2Model.from_pretrained(path).eval()
    ids = tokenizer(prompt).input_ids[:text_len]
    ids = torch.tensor([ids + [tokenizer.pad_token_id] * (text_len - len(ids))])
    system = torch.tensor([tokenizer(system).input_ids if system else []], dtype=torch.long)
    mask = torch.cat([torch.ones_like(system), (ids != tokenizer.pad_token_id).long()], dim=1)
    with torch.no_grad():
        out = model(input_ids=torch.cat([system, ids], dim=1), attention_mask=mask)
    # official takes hidden_states[-1]; in transformers 4.42 that is the normed last_hidden_state
    return out.last_hidden_state[:, system.shape[1]:], ids != tokenizer.pad_token_id


def test_system_prompt_is_run_then_cut(tiny_qwen2):
    path, tokenizer = tiny_qwen2
    system = "the photo of a red car in snow"
    enc = Qwen2TextEncoder(path, TINY, system_prompt=system)
    prompts = ["a red cat", "dog in the snow"]
    feats, mask = enc(prompts)
    assert feats.shape == (2, TINY.text_len, TINY.text_dim) and feats.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [3, 4]  # one token per word
    assert enc.system_prompt_ids().shape == (8,)
    for row, prompt in enumerate(prompts):
        want, want_mask = _reference(path, tokenizer, prompt, system, TINY.text_len)
        torch.testing.assert_close(feats[row], want[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(mask[row], want_mask[0])
    # the system prompt really conditioned the kept slots: without it the same tokens give other features
    plain, plain_mask = Qwen2TextEncoder(path, TINY, system_prompt=None)(["a red cat"])
    want, _ = _reference(path, tokenizer, "a red cat", None, TINY.text_len)
    torch.testing.assert_close(plain[0], want[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(plain_mask[0], mask[0]) and not torch.allclose(plain[0], feats[0], atol=1e-3)


def test_pads_follow_the_prompt_and_are_kept(tiny_qwen2):
    path, _ = tiny_qwen2
    feats, mask = Qwen2TextEncoder(path, TINY)(["a photo of a fox"])
    assert mask[0, :5].all() and not mask[0, 5:].any()
    # all text_len slots come back, pads included (HART's prefix runs them): they are LLM outputs, not zeros
    assert feats[0, 5:].abs().sum(-1).gt(0).all()


def test_padding_side_is_the_tokenizers_own(tiny_qwen2):
    path, _ = tiny_qwen2
    enc = Qwen2TextEncoder(path, TINY, system_prompt=None)
    enc.tokenizer.padding_side = "left"  # as official, whatever the checkpoint's tokenizer_config says
    _, mask = enc(["a red cat"])
    assert mask[0, -3:].all() and not mask[0, :-3].any()


def test_official_system_prompt_is_truncated_to_text_len(tiny_qwen2):
    path, tokenizer = tiny_qwen2
    enc = Qwen2TextEncoder(path, TINY)  # the official default prompt (hundreds of tokens here) > 16 slots
    assert enc.system_prompt == LLM_SYSTEM_PROMPT
    full = tokenizer(LLM_SYSTEM_PROMPT).input_ids
    assert len(full) > TINY.text_len and enc.system_prompt_ids().tolist() == full[: TINY.text_len]
    feats, _ = enc(["red car"])
    want, _ = _reference(path, tokenizer, "red car", tokenizer.decode(full[: TINY.text_len]), TINY.text_len)
    torch.testing.assert_close(feats[0], want[0], atol=1e-5, rtol=1e-5)


def test_full_size_output_and_truncation_at_300(wide_qwen2):
    path, tokenizer = wide_qwen2
    enc = Qwen2TextEncoder(path, FULL, system_prompt="a photo of")
    long_prompt = " ".join((WORDS * 40)[:350])  # 350 tokens
    feats, mask = enc([long_prompt, "a cat"])
    assert feats.shape == (2, 300, 1536) and mask.shape == (2, 300)
    assert mask[0].all() and mask[1].sum() == 2
    want, _ = _reference(path, tokenizer, long_prompt, "a photo of", 300)  # keeps the first 300 tokens
    torch.testing.assert_close(feats[0], want[0], atol=1e-4, rtol=1e-4)
    cut, _ = enc([" ".join((WORDS * 40)[:300])])
    torch.testing.assert_close(cut[0], feats[0], atol=1e-5, rtol=1e-5)


def test_a_qwen2_directory_missing_weights_is_refused_by_key(tiny_qwen2, tmp_path):
    """As T5's: weights the directory lacks were random values with only a log line; the official directory's LM head
    (unused by the text model) is allowed."""
    import shutil

    from safetensors.torch import load_file, save_file

    from sparvar.checkpoint import CheckpointError

    path = tmp_path / "qwen2"
    shutil.copytree(tiny_qwen2[0], path)
    weights = load_file(str(path / "model.safetensors"))
    assert "lm_head.weight" in weights
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.1.mlp.")}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing \(3\):\n  layers.1.mlp.down_proj.weight"):
        Qwen2TextEncoder(str(path), TINY)


def test_bad_paths_and_inputs_are_clear_errors(tiny_qwen2, tmp_path):
    with pytest.raises(FileNotFoundError, match="Qwen2 text model directory not found"):
        Qwen2TextEncoder(str(tmp_path / "Qwen2-VL-1.5B-Instruct"), FULL)
    path, _ = tiny_qwen2
    partial = tmp_path / "no_weights"
    partial.mkdir()
    for name in os.listdir(path):
        if not name.startswith("model"):
            (partial / name).write_bytes(open(os.path.join(path, name), "rb").read())
    with pytest.raises(FileNotFoundError, match=r"missing weights"):
        Qwen2TextEncoder(str(partial), TINY)
    with pytest.raises(ValueError, match="hidden size 64 != hart-0.7b text_dim 1536"):
        Qwen2TextEncoder(path, FULL)
    enc = Qwen2TextEncoder(path, TINY)
    with pytest.raises(TypeError, match="list of strings"):
        enc("a cat")
    with pytest.raises(ValueError, match=r"prompts \[1\] have no tokens"):
        enc(["a cat", ""])


def test_embedding_file_needs_all_slots(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "emb.safetensors")
    save_file({"features": torch.randn(2, TINY.text_len, TINY.text_dim), "lengths": torch.tensor([3, 16])}, path)
    feats, mask = load_hart_embeddings(path, TINY)
    assert feats.shape == (2, TINY.text_len, TINY.text_dim) and mask.sum(1).tolist() == [3, 16]
    assert torch.equal(mask[0], torch.arange(TINY.text_len) < 3)
    trimmed = str(tmp_path / "trimmed.safetensors")
    save_file({"features": torch.randn(1, 3, TINY.text_dim), "lengths": torch.tensor([3])}, trimmed)
    with pytest.raises(ValueError, match="needs all 16 text slots"):
        load_hart_embeddings(trimmed, TINY)
    with pytest.raises(ValueError, match=r"lengths must be \(B,\) in \[1, 16\]"):
        lengths_to_mask(torch.tensor([0, 3]), TINY.text_len)
    # without 'lengths' every pad slot would count as text (Infinity's trimmed files may leave it out)
    unlengthed = str(tmp_path / "unlengthed.safetensors")
    save_file({"features": torch.randn(1, TINY.text_len, TINY.text_dim)}, unlengthed)
    with pytest.raises(ValueError, match="missing tensor 'lengths' \\(B,\\): .*every pad would count as text"):
        load_hart_embeddings(unlengthed, TINY)


def test_hashed_embeddings_fill_the_prefix():
    feats, mask = hashed_hart_embeddings(["a red car", "cat"], TINY)
    assert feats.shape == (2, TINY.text_len, TINY.text_dim) and mask.sum(1).tolist() == [3, 1]
    assert feats[0, 3:].eq(0).all() and feats[0, :3].ne(0).any(-1).all()
