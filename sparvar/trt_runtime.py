"""Running TensorRT and TensorRT-RTX engines in the generation loop.

The protocol is the onnxruntime runners' (sparvar.runtime.UnitRunner / UnitDecoder: text, one step unit per scale,
the KV cache grown between scales, the decoder); only the units differ. Each exported unit is a deserialized plan
(weight-stripped plans refit from the directory's shared weights, export/trt_build.py) with one execution context,
fed and read by I/O name with torch tensors. The units of one runner run one after another on a stream of their own
(ordered with torch's current stream both ways; TensorRT synchronises more on the legacy default stream) and share
one scratch buffer, sized by the largest unit (user-managed context memory: fifteen contexts' own would all be held).

TensorRT plans do not share weights: every step unit holds its own copy of the transformer's, so an engine needs
about (units x weights) of GPU memory, plus the scratch; loading checks the weights against the free memory first.
(The torch-cuda backend keeps one copy for every scale; it is the one this project benchmarks.)

Written against TensorRT's documented Python API (ICudaEngine's I/O tensors; IExecutionContext.set_input_shape,
set_tensor_address, get_tensor_shape, execute_async_v3). **Never run**: TensorRT cannot be installed on our machines
and TensorRT-RTX's runtime refuses the H100; tests/test_tensorrt.py and tests/test_trt_rtx.py run a generation
where either can (per-scale logits against the onnxruntime engine, then a whole image).
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import torch

from .engine import EngineError, stage_info
from .runtime import UnitDecoder, UnitRunner


def torch_dtype(trt, dtype, name: str = "") -> torch.dtype:
    """The torch dtype of a TensorRT tensor dtype (EngineError for one the runner cannot feed or read)."""
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
             trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool,
             trt.DataType.INT8: torch.int8, trt.DataType.UINT8: torch.uint8}
    if dtype not in table:
        raise EngineError(f"engine tensor {name!r} has type {dtype}, which the sparvar runner does not pass")
    return table[dtype]


class Workspace:
    """What the units of one runner share: the stream they run on and one scratch buffer for their contexts (they run
    one after another, so the largest unit's scratch serves all)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.scratch = torch.empty(0, dtype=torch.uint8, device=device)

    def buffer(self, size: int) -> torch.Tensor:
        if self.scratch.numel() < size:  # the old buffer's last use is ordered before any reuse (see TrtUnit)
            self.scratch = torch.empty(size, dtype=torch.uint8, device=self.device)
        return self.scratch


class TrtUnit:
    """One exported unit as a deserialized plan with one execution context. Called with a dict of torch tensors
    holding (at least) its inputs, it returns its outputs as new CUDA tensors, without synchronising: the run waits
    for the work torch's current stream has queued, and that stream waits for the run, so what torch does next with
    the outputs, and memory the caching allocator hands out again there, is ordered after it, as after any torch op."""

    def __init__(self, trt, engine, name: str, workspace: Workspace | None = None):
        self.trt, self.engine, self.name = trt, engine, name
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.workspace = workspace or Workspace(self.device)
        self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise EngineError(f"{trt.__name__} could not create an execution context for unit {name}")
        self.scratch_bytes = engine.device_memory_size_v2  # the most any profile's shapes need
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: torch_dtype(trt, engine.get_tensor_dtype(n), n) for n in names}
        # a shape tensor (an input the graph uses as a shape) is read from host memory, every other from the GPU
        self.on_host = {n for n in names if engine.get_tensor_location(n) == trt.TensorLocation.HOST}
        self._host_inputs: list[torch.Tensor] = []

    def __call__(self, values: dict) -> dict:
        fed = {}
        for name in self.inputs:
            if name not in values:
                raise EngineError(f"engine input {name!r} of unit {self.name} was not produced by an earlier unit")
            device = torch.device("cpu") if name in self.on_host else self.device
            tensor = torch.as_tensor(values[name]).to(device=device, dtype=self.dtypes[name]).contiguous()
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise EngineError(f"unit {self.name}: input {name!r} of shape {tuple(tensor.shape)} is outside the "
                                  "shapes the engine was built for")
            self.context.set_tensor_address(name, tensor.data_ptr())
            fed[name] = tensor
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):  # our units' outputs follow from the input shapes
                raise EngineError(f"unit {self.name}: output {name!r} has no shape before running ({shape})")
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        current, stream = torch.cuda.current_stream(self.device), self.workspace.stream
        if self.scratch_bytes:
            self.context.set_device_memory(self.workspace.buffer(self.scratch_bytes).data_ptr(), self.scratch_bytes)
        stream.wait_stream(current)  # the inputs, outputs and scratch were made or last used there
        ok = self.context.execute_async_v3(stream.cuda_stream)
        current.wait_stream(stream)  # before this returns: tensors freed from here on are reused after the run
        if not ok:
            raise EngineError(f"{self.trt.__name__} failed to enqueue unit {self.name} (its log says why)")
        # host (shape) inputs are read when the run starts: alive until the next call. The device inputs are the
        # caller's values (the KV cache of the last scale among them): kept, they would double its memory.
        self._host_inputs = [t for n, t in fed.items() if n in self.on_host]
        return outputs


def load_plan(engine_dir: str, manifest: dict, name: str) -> tuple:
    """(the TensorRT module, the unit's ICudaEngine) of a tensorrt or tensorrt-rtx engine directory whose manifest
    was checked (sparvar.runtime.load_engine_pipeline); export/ checks the plans against this GPU and refits them."""
    if manifest["spec"]["backend"] == "tensorrt":
        from export.tensorrt import load_engine, load_tensorrt

        api = stage_info(engine_dir, manifest, "build", "tensorrt")["plugin_api"]
        return load_tensorrt(), load_engine(engine_dir, name, plugin_api=api, manifest=manifest)
    from export.trt_rtx import load_engine, load_trt_rtx

    return load_trt_rtx(), load_engine(engine_dir, name, manifest=manifest)


def unit_weight_bytes(engine_dir: str, manifest: dict) -> dict[str, int]:
    """Bytes of the weights each exported unit holds once its plan is loaded (its ONNX initializers; read without
    their data)."""
    units = stage_info(engine_dir, manifest, "optimize", "units")
    sizes = {}
    for name, unit in units.items():
        graph = onnx.load(os.path.join(engine_dir, unit["file"]), load_external_data=False)
        itemsize = lambda t: onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize  # noqa: E731
        sizes[name] = sum(int(np.prod(t.dims, dtype=np.int64)) * itemsize(t) for t in graph.graph.initializer)
    return sizes


def check_plans_suit_here(engine_dir: str, manifest: dict) -> None:
    """What the manifest says of a tensorrt (-rtx) directory's plans against this sparvar and machine, or an
    EngineError: built with this sparvar's plugin code, and for this GPU (TensorRT: the build's GPU model;
    TensorRT-RTX: exactly the build's for weight-stripped plans). `sparvar engine verify` checks this; loading too."""
    from export.trt_build import check_plugin_code

    backend = manifest["spec"]["backend"]
    info = stage_info(engine_dir, manifest, "build", backend.replace("-", "_"))
    check_plugin_code(engine_dir, info)
    if backend == "tensorrt":
        from export.tensorrt import check_built_for_this_gpu

        check_built_for_this_gpu(engine_dir, info)
    else:
        from export.trt_rtx import check_plans_run_here

        check_plans_run_here(engine_dir, info)


def check_trt_runs_here(engine_dir: str, manifest: dict) -> None:
    """EngineError where this machine cannot run the directory's plans: no CUDA GPU, no TensorRT (-RTX) module, a GPU
    TensorRT-RTX does not run on, or plans that do not suit it (check_plans_suit_here). Reads only the manifest: the
    loader asks before it hashes the files."""
    backend = manifest["spec"]["backend"]
    if not torch.cuda.is_available():
        raise EngineError(f"{engine_dir} is a {backend} engine: its plans run on a CUDA GPU, and this machine has "
                          "none (torch.cuda.is_available() is False); build one with --backend onnxruntime to run on "
                          "the CPU")
    try:
        if backend == "tensorrt":
            from export.tensorrt import load_tensorrt

            load_tensorrt()
        else:
            from export.trt_rtx import load_trt_rtx, local_compute_capability

            load_trt_rtx()
            local, why_not = local_compute_capability()
            if local is None:  # embedded plans would fail in deserialisation, after the hashing
                raise EngineError(f"{engine_dir} is a tensorrt-rtx engine, and {why_not}; build one with --backend "
                                  "torch-cuda or onnxruntime")
    except ImportError as e:
        raise EngineError(f"{engine_dir} is a {backend} engine, and {e}") from None
    check_plans_suit_here(engine_dir, manifest)


def check_gpu_memory_for_plans(engine_dir: str, manifest: dict) -> None:
    """EngineError, before any plan loads, where the plans' own weight copies would not fit the free GPU memory."""
    sizes = unit_weight_bytes(engine_dir, manifest)
    free, _ = torch.cuda.mem_get_info()
    need = sum(sizes.values())
    if need > free:
        raise EngineError(f"{engine_dir}: its {len(sizes)} {manifest['spec']['backend']} plans hold about "
                          f"{need / 2**30:.1f} GiB of weights (each step unit its own copy: TensorRT plans do not "
                          f"share weights), and the GPU has {free / 2**30:.1f} GiB free; use the torch-cuda backend "
                          "(one copy for every scale)")


class TrtIO:
    """How the TensorRT runners load units and pass values: CUDA tensors (sparvar.runtime.OrtIO's counterpart)."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device())

    def load_unit(self, engine_dir: str, manifest: dict, name: str) -> TrtUnit:
        try:
            trt, engine = load_plan(engine_dir, manifest, name)
        except RuntimeError as e:  # deserialisation or refit: TensorRT's own words
            raise EngineError(f"{engine_dir}: unit {name} does not load: {e}") from None
        return TrtUnit(trt, engine, name, self.workspace)

    def array(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    @staticmethod
    def grow(past, new):
        return torch.cat([past, new], dim=2)

    def tensor(self, a) -> torch.Tensor:
        return a


class TrtRunner(TrtIO, UnitRunner):
    """A TensorRT (-RTX) engine's text and step plans, sharing one Workspace (they run one after another)."""

    def __init__(self, engine_dir: str, manifest: dict):
        self.workspace = Workspace(self.device)
        super().__init__(engine_dir, manifest)


class TrtDecoder(TrtIO, UnitDecoder):
    """A TensorRT (-RTX) engine's decoder plan."""

    def __init__(self, engine_dir: str, manifest: dict, cfg):
        self.workspace = Workspace(self.device)
        super().__init__(engine_dir, manifest, cfg)


def load_trt_parts(engine_dir: str, manifest: dict, cfg) -> tuple[TrtRunner, TrtDecoder]:
    """The runner and decoder of a checked tensorrt or tensorrt-rtx engine directory (Infinity)."""
    check_trt_runs_here(engine_dir, manifest)
    check_gpu_memory_for_plans(engine_dir, manifest)
    return TrtRunner(engine_dir, manifest), TrtDecoder(engine_dir, manifest, cfg)
