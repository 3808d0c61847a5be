import os

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


def shared_build(tmp_path_factory, name: str, build) -> str:
    """The directory `name`, made by build(path) once per test run. `make test` runs pytest-xdist workers, each with
    its own session: they share the run's base directory, the first to take `name`'s lock builds (the engine
    builder writes to a temporary path and renames, so a directory that exists is complete) and the others
    reuse it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # set in every worker, one per run: never an older run's engine
    root = base.parent / f"run-{run}" if os.environ.get("PYTEST_XDIST_WORKER") and run else base
    root.mkdir(exist_ok=True)
    path = root / f"shared-{name}"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            build(str(path))
    return str(path)


@pytest.fixture(scope="session")
def engines(tmp_path_factory):
    """infinity-tiny onnxruntime engines at 256², {"dense": dir, "sparvar": dir}, built once per test run: the
    engine tests and the server tests run them; tests that change an engine copy it first."""
    from sparvar.engine import EngineSpec, build_engine

    def build(attention):
        def run(path):
            logs = []
            build_engine(EngineSpec(model="infinity-tiny", resolution=256, attention=attention), path, log=logs.append)
            # a fresh directory runs every stage (test_engine's rebuild tests start from copies of these)
            assert logs and not any("skipped" in line for line in logs), logs
        return run

    # two workers asking at once build one engine each, then take the other's
    order = ("sparvar", "dense") if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0" else ("dense", "sparvar")
    out = {attention: shared_build(tmp_path_factory, f"engine-tiny-{attention}", build(attention)) for attention in order}
    return {"dense": out["dense"], "sparvar": out["sparvar"]}


def _hart_tiny_engine(tmp_path_factory, attention: str) -> str:
    from sparvar.config import get_config
    from sparvar.engine import EngineSpec, build_engine

    spec = EngineSpec(model="hart-tiny", resolution=get_config("hart-tiny").default_resolution, attention=attention)
    return shared_build(tmp_path_factory, f"engine-hart-tiny-{attention}",
                        lambda path: build_engine(spec, path, log=lambda *a, **k: None))


@pytest.fixture(scope="session")
def hart_engine(tmp_path_factory):
    """The hart-tiny onnxruntime engine (dense attention) at its default resolution, built once per test run (the
    HART engine and engine-memory tests run it; tests that change an engine copy it first)."""
    return _hart_tiny_engine(tmp_path_factory, "dense")


@pytest.fixture(scope="session")
def hart_sparvar_engine(tmp_path_factory):
    """hart-tiny with SparVAR attention, as hart_engine."""
    return _hart_tiny_engine(tmp_path_factory, "sparvar")
