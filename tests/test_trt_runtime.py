"""The TensorRT runner's checks that need no TensorRT: the weight bytes its plans hold, the free-memory refusal, and the
static batch of exported engines. (Plans run in tests/test_tensorrt.py and tests/test_trt_rtx.py, where a GPU and
TensorRT or TensorRT-RTX are present.)"""
import copy
import os

import onnx
from onnx.external_data_helper import uses_external_data
import pytest
import torch

from sparvar.engine import EngineError, read_manifest
from sparvar.runtime import check_engine_request
from sparvar.trt_runtime import check_gpu_memory_for_plans, unit_weight_bytes


def test_unit_weight_bytes_are_the_initializers_each_unit_loads(engines):
    path = engines["sparvar"]
    manifest = read_manifest(path)
    sizes = unit_weight_bytes(path, manifest)
    assert set(sizes) == set(manifest["units"])
    for name, unit in manifest["units"].items():
        graph = onnx.load(os.path.join(path, unit["file"]), load_external_data=False)
        # what the writer recorded: each external tensor's byte length, the bytes of each tensor kept in the graph
        written = sum(int({e.key: e.value for e in t.external_data}["length"]) if uses_external_data(t)
                      else onnx.numpy_helper.to_array(t).nbytes for t in graph.graph.initializer)
        assert sizes[name] == written > 0, name
    steps = [n for name, n in sizes.items() if name.startswith("step_")]
    # every step unit holds every transformer block's weights (plus its scale's constants: RoPE tables, layouts):
    # the copies a TensorRT engine makes
    assert len(steps) == len(manifest["schedule"]) and max(steps) < 1.1 * min(steps)


def test_plans_that_would_not_fit_the_free_gpu_memory_are_refused(engines, monkeypatch):
    path = engines["sparvar"]
    manifest = read_manifest(path)
    manifest["spec"] = dict(manifest["spec"], backend="tensorrt")
    need = sum(unit_weight_bytes(path, manifest).values())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (need - 1, 80 * 2**30))
    with pytest.raises(EngineError, match=r"tensorrt plans hold about .* GiB of weights \(each step unit its own copy"):
        check_gpu_memory_for_plans(path, manifest)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (need, 80 * 2**30))
    check_gpu_memory_for_plans(path, manifest)


@pytest.mark.parametrize("backend", ["tensorrt", "tensorrt-rtx", "onnxruntime"])
def test_exported_engines_take_their_built_batch_with_guidance(engines, backend):
    manifest = copy.deepcopy(read_manifest(engines["dense"]))
    manifest["spec"]["backend"] = backend
    check_engine_request(manifest, 1, guided=True)
    with pytest.raises(EngineError, match="built for 1 prompt"):
        check_engine_request(manifest, 2, guided=True)
    with pytest.raises(EngineError, match=f"Infinity {backend} engines are built with classifier-free guidance"):
        check_engine_request(manifest, 1, guided=False)
    manifest["spec"]["backend"] = "torch-cuda"  # graphs captured for any batch
    check_engine_request(manifest, 2, guided=False)


def test_weight_bytes_read_no_tensor_data(engines, monkeypatch):
    """Counting the weights must not read them (the 8B's are 16 GB): the graphs are loaded without external data."""
    loads = []
    real = onnx.load
    monkeypatch.setattr(onnx, "load", lambda *a, **k: loads.append(k.get("load_external_data", True)) or real(*a, **k))
    unit_weight_bytes(engines["dense"], read_manifest(engines["dense"]))
    assert loads and not any(loads)


def test_a_plan_that_does_not_load_is_an_engine_error_naming_the_unit(monkeypatch):
    """TensorRT's deserialisation or refit failures (a RuntimeError from export/) reach the CLI and `serve` as the
    EngineError they report, not as a traceback."""
    import sparvar.trt_runtime as trt_runtime

    def fails(*args):
        raise RuntimeError("tensorrt cannot deserialize the engine here: version mismatch")

    monkeypatch.setattr(trt_runtime, "load_plan", fails)
    with pytest.raises(EngineError, match="e: unit step_03 does not load: tensorrt cannot deserialize the engine here"):
        trt_runtime.TrtIO().load_unit("e", {}, "step_03")
