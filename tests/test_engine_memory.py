"""onnxruntime engines on a memory budget: sessions open when their graph first runs, the least recently used close
when the budget would be passed, and the results do not change (bit for bit) however small the budget.

Before the session pool every graph of an engine held an open session (and its own copy of the weights it uses)
from the moment the engine was loaded: a HART-0.7b engine (1.7 GB of weights, 33 graphs) was killed at 23.9 GB.
"""
import os
import shutil

import pytest
import torch

from sparvar import runtime
from sparvar.engine import EngineError, read_manifest
from sparvar.runtime import OrtUnit, SessionPool, load_engine_pipeline

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore")


class RecordingPool(SessionPool):
    """A pool that records the most sessions and bytes it ever held open at once."""

    def __init__(self, budget):
        super().__init__(budget)
        self.most_sessions = self.most_bytes = 0

    def session(self, key):
        session = super().session(key)
        self.most_sessions = max(self.most_sessions, len(self.sessions))
        self.most_bytes = max(self.most_bytes, self.held_bytes())
        return session


@pytest.fixture(scope="module")
def infinity_engine(engines):  # infinity-tiny at 256 with SparVAR, built once per session (conftest; hart_engine too)
    return engines["sparvar"]


def _generate(engine, pool, monkeypatch):
    monkeypatch.setattr(runtime, "SESSIONS", pool)
    pipe = load_engine_pipeline(engine)
    assert pool.opened == 0, "loading an engine must not open its sessions"
    if read_manifest(engine)["spec"]["model"].startswith("hart"):
        from sparvar.config import get_config
        from sparvar.hart.sampling import HartSampling
        from sparvar.hart.text import hashed_hart_embeddings

        features, mask = hashed_hart_embeddings(["a red car"], get_config("hart-tiny"))
        out = pipe.generate(features, mask, HartSampling(cfg=4.5), seed=7)
        return out.indices, out.image
    from sparvar.generate import Sampling
    from sparvar.text import hashed_embeddings

    features, lengths = hashed_embeddings(["a red car"], 64, 32)
    out = pipe.generate(features, lengths, Sampling(cfg=3.0), seed=7)
    return out.bits, out.image


@pytest.mark.parametrize("family", ["infinity", "hart"])
def test_budget_bounds_open_sessions_and_keeps_results_bit_identical(family, infinity_engine, hart_engine,
                                                                     monkeypatch):
    engine = infinity_engine if family == "infinity" else hart_engine
    graphs = len(read_manifest(engine)["stages"]["optimize"]["info"]["units"])
    unlimited = RecordingPool(budget=1 << 50)
    tokens, image = _generate(engine, unlimited, monkeypatch)
    assert unlimited.most_sessions == unlimited.opened <= graphs  # nothing closed: each graph opened once

    # room for about two sessions of the largest graph: the pool must close sessions to stay inside it
    largest = max(info.session_bytes for info in unlimited.graphs.values())
    tight = RecordingPool(budget=2 * largest + largest // 2)
    tokens_tight, image_tight = _generate(engine, tight, monkeypatch)
    assert tight.most_bytes <= tight.budget
    assert tight.most_sessions < unlimited.most_sessions

    one = RecordingPool(budget=1)  # below any session: exactly one open at a time
    tokens_one, image_one = _generate(engine, one, monkeypatch)
    assert one.most_sessions == 1 and one.opened >= unlimited.opened

    for a, b, c in zip(tokens, tokens_tight, tokens_one):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(image, image_tight) and torch.equal(image, image_one)


def _copy(engine, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(engine, dst)
    return dst, read_manifest(dst)["stages"]["optimize"]["info"]["units"]["step_00"]


def test_missing_weights_file_is_a_clear_error(infinity_engine, tmp_path):
    engine, unit = _copy(infinity_engine, tmp_path)
    os.remove(os.path.join(engine, "optimize", "weights.bin"))
    with pytest.raises(EngineError, match="weights file .*weights.bin is missing"):
        OrtUnit(engine, unit, SessionPool())


def test_truncated_weights_file_is_a_clear_error(infinity_engine, tmp_path):
    engine, unit = _copy(infinity_engine, tmp_path)
    path = os.path.join(engine, "optimize", "weights.bin")
    os.truncate(path, 4096)  # the weights of other graphs, or of a smaller build
    with pytest.raises(EngineError, match="truncated"):
        OrtUnit(engine, unit, SessionPool())


def test_missing_graph_is_a_clear_error(infinity_engine, tmp_path):
    engine, unit = _copy(infinity_engine, tmp_path)
    os.remove(os.path.join(engine, unit["file"]))
    with pytest.raises(EngineError, match="missing"):
        OrtUnit(engine, unit, SessionPool())
