"""Our model vs the official Infinity code on a small config (CPU). Needs the official code in .official/
(tools/fetch_official.sh; it is never committed), so CI skips it; the GPU run covers 2B/8B shapes."""
import dataclasses
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, ".official", "Infinity")),
                                reason="official Infinity code not fetched (run tools/fetch_official.sh)")


@pytest.fixture
def isolated_imports(monkeypatch):
    """The harness stubs timm/flash_attn and torch.compile for the official code: undo all of it afterwards
    (a stub flash_attn left in sys.modules would break transformers in later tests)."""
    import sys

    monkeypatch.setattr(torch, "compile", torch.compile)
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("timm", "flash_attn", "pytz", "infinity"):
            del sys.modules[name]


def test_logits_match_official_code(monkeypatch, isolated_imports):
    from bench import parity_infinity
    from sparvar.config import CONFIGS, get_config

    # tiny width, but a text width whose official pool head count is > 0 (text_dim // 128)
    cfg = dataclasses.replace(get_config("infinity-tiny"), name="parity-tiny", text_dim=256, sos_head_dim=None, text_maxlen=64)
    monkeypatch.setitem(CONFIGS, cfg.name, cfg)
    r = parity_infinity.run_parity(cfg.name, None, 256, torch.device("cpu"))
    assert r["max_abs_logit_diff_official_without_bf16_cross_attention_cast"] < 5e-5
    assert r["max_abs_logit_diff"] < 3e-2  # the official bf16 cast of cross-attention q/kv alone
