import pytest
import torch

from sparvar.config import get_config
from sparvar.text import T5TextEncoder, hashed_embeddings, load_embeddings

TINY = get_config("infinity-tiny")


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    """A randomly initialised T5 encoder + word-level tokenizer saved like a real checkpoint directory."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("t5")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate("a photo of cat dog red car".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    cfg = transformers.T5Config(vocab_size=len(vocab), d_model=TINY.text_dim, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    transformers.T5EncoderModel(cfg).save_pretrained(path)
    return str(path)


def test_t5_encoder_pads_to_512_then_trims(tiny_t5_dir):
    enc = T5TextEncoder(tiny_t5_dir)
    feats, lens = enc(["a photo of a cat", "red car"])
    assert lens.tolist() == [5, 2]
    assert feats.shape == (2, 5, TINY.text_dim) and feats.dtype == torch.float32
    # the real tokens do not depend on how much padding follows them
    alone, _ = enc(["red car"])
    torch.testing.assert_close(alone[0, :2], feats[1, :2], atol=1e-5, rtol=1e-5)


def test_a_t5_directory_missing_weights_is_refused_by_key(tiny_t5_dir, tmp_path):
    """transformers fills weights a directory lacks with random values and only logs it: every prompt's features
    would have been wrong. Weights the encoder does not use (a full checkpoint's decoder) are allowed."""
    import shutil

    from safetensors.torch import load_file, save_file

    from sparvar.checkpoint import CheckpointError

    path = tmp_path / "t5"
    shutil.copytree(tiny_t5_dir, path)
    weights = load_file(str(path / "model.safetensors"))
    dropped = sorted(k for k in weights if k.startswith("encoder.block.1."))
    kept = {k: v for k, v in weights.items() if k not in dropped}
    save_file({**kept, "decoder.final_layer_norm.weight": torch.ones(TINY.text_dim)}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"does not hold every weight of its T5EncoderModel(.|\n)*missing "
                                              rf"\({len(dropped)}\):\n  {dropped[0]}"):
        T5TextEncoder(str(path))
    save_file({**weights, "decoder.final_layer_norm.weight": torch.ones(TINY.text_dim)}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    T5TextEncoder(str(path))


def test_missing_t5_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="T5 encoder directory not found"):
        T5TextEncoder(str(tmp_path / "flan-t5-xl"))


def test_embedding_file_roundtrip_and_errors(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "emb.safetensors")
    saved = torch.randn(1, 4, TINY.text_dim)
    save_file({"features": saved, "lengths": torch.tensor([3])}, path)
    feats, lens = load_embeddings(path, TINY.text_dim)
    assert torch.equal(feats, saved) and lens.tolist() == [3]
    torch.save({"features": saved[0].half()}, str(tmp_path / "one.pt"))  # .pt, one prompt without its batch dim
    feats, lens = load_embeddings(str(tmp_path / "one.pt"), TINY.text_dim)
    assert torch.equal(feats, saved.half().float()) and lens.tolist() == [4]  # no lengths: every slot is text
    with pytest.raises(ValueError, match=r"expected \(B, L, 2048\)"):
        load_embeddings(path, 2048)
    bad = str(tmp_path / "bad.safetensors")
    for lengths, message in ((torch.tensor([0]), r"must be in \[1, 4\].*\[0\]"), (torch.tensor([5]), r"\[5\]"),
                             (torch.tensor([3, 3]), "must be 1 integers"), (torch.tensor([2.5]), "must be 1 integers")):
        save_file({"features": torch.randn(1, 4, TINY.text_dim), "lengths": lengths}, bad)
        with pytest.raises(ValueError, match=message):
            load_embeddings(bad, TINY.text_dim)
    nan = torch.randn(1, 4, TINY.text_dim)
    nan[0, 1, 5] = float("nan")
    save_file({"features": nan, "lengths": torch.tensor([4])}, bad)
    with pytest.raises(ValueError, match="'features' holds NaN or infinite values"):
        load_embeddings(bad, TINY.text_dim)
    with open(bad, "wb") as f:
        f.write(b"\x00garbage")
    with pytest.raises(ValueError, match="bad.safetensors cannot be read as text embeddings"):
        load_embeddings(bad, TINY.text_dim)
    # entries it does not read were ignored: an encoder's 'attention_mask' or a misspelt 'lenghts' made every pad slot
    # text; bool lengths read as 1s; features pickled as a list were an AttributeError
    features = torch.randn(2, 4, TINY.text_dim)
    for extra in ({"attention_mask": torch.ones(2, 4, dtype=torch.long)}, {"lenghts": torch.tensor([4, 2])}):
        save_file({"features": features, **extra}, bad)
        with pytest.raises(ValueError, match=rf"unknown entries \['{next(iter(extra))}'\]"):
            load_embeddings(bad, TINY.text_dim)
    save_file({"features": features, "lengths": torch.tensor([True, True])}, bad)
    with pytest.raises(ValueError, match="'lengths' must be 2 integers"):
        load_embeddings(bad, TINY.text_dim)
    torch.save({"features": features.tolist()}, str(tmp_path / "list.pt"))
    with pytest.raises(ValueError, match="'features' must be a floating-point tensor, got list"):
        load_embeddings(str(tmp_path / "list.pt"), TINY.text_dim)


def test_hashed_embeddings_are_deterministic_per_word():
    a, la = hashed_embeddings(["a red car", "cat"], 64, 32)
    b, _ = hashed_embeddings(["a red car"], 64, 32)
    assert la.tolist() == [3, 1] and torch.equal(a[0], b[0]) and not torch.equal(a[0, 0], a[0, 1])
