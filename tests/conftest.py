import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is available on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, so a failure in CI reproduces here (tests draw random
    inputs; an unseeded draw once failed CI and passed locally)."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def engines(tmp_path_factory):
    """infinity-tiny onnxruntime engines at 256², {"dense": dir, "sparvar": dir}, built once per session (~35 s):
    the engine tests and the server tests run them; tests that change an engine copy it first."""
    from sparvar.engine import EngineSpec, build_engine

    root = tmp_path_factory.mktemp("engines")
    out = {}
    for attention in ("dense", "sparvar"):
        out[attention] = str(root / attention)
        logs = []
        build_engine(EngineSpec(model="infinity-tiny", resolution=256, attention=attention), out[attention],
                     log=logs.append)
        # a fresh directory runs every stage (test_engine's rebuild tests start from copies of these)
        assert logs and not any("skipped" in line for line in logs), logs
    return out


def _hart_tiny_engine(tmp_path_factory, attention: str) -> str:
    from sparvar.config import get_config
    from sparvar.engine import EngineSpec, build_engine

    path = str(tmp_path_factory.mktemp("hart") / attention)
    build_engine(EngineSpec(model="hart-tiny", resolution=get_config("hart-tiny").default_resolution,
                            attention=attention), path, log=lambda *a, **k: None)
    return path


@pytest.fixture(scope="session")
def hart_engine(tmp_path_factory):
    """The hart-tiny onnxruntime engine (dense attention) at its default resolution, built once per session (the
    HART engine and engine-memory tests run it; tests that change an engine copy it first)."""
    return _hart_tiny_engine(tmp_path_factory, "dense")


@pytest.fixture(scope="session")
def hart_sparvar_engine(tmp_path_factory):
    """hart-tiny with SparVAR attention, as hart_engine."""
    return _hart_tiny_engine(tmp_path_factory, "sparvar")
