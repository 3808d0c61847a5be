"""The contract between the exported ONNX nodes and their TensorRT plugins, stated once.

An `OpSpec` names one custom op (ONNX op_type == TensorRT plugin name, in the `sparvar` domain and plugin
namespace) with its tensor inputs/outputs, its integer attributes, its output-shape rule and its input checks.
Every consumer reads the spec:
  - export/custom_ops.py: the torch fake kernels, the ONNX node signatures and attributes;
  - plugins/pluginv3.py: IPluginV3 classes (TensorRT-RTX and TensorRT) - output shapes/dtypes, formats, fields;
  - plugins/<op>.py: the TensorRT quickly-deployable plugins (QDP) - register/autotune/impl/aot_impl.

Shape rules are written once over a small "dim algebra" (`const`, `cdiv`) that has three implementations:
plain ints here, `IExprBuilder` expressions in pluginv3.py, QDP shape expressions in qdp.py.

Tensor kinds: "float" tensors (q, k, v, caches, outputs) share one dtype among fp32/fp16/bf16 per node; "int32"
tensors are block lists and key indices. Every tensor is dense row-major (TensorRT LINEAR format).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, NamedTuple, Protocol, Sequence

NAMESPACE = "sparvar"  # ONNX domain of the custom nodes and TensorRT plugin namespace
VERSION = "1"  # TensorRT plugin version; the ONNX domain version is 1 as well
# A built plan bakes in the plugins' fields and chosen tactics, so the build stage's key holds this: bump it when the
# tactics offered, the plugin fields or the ops' semantics change (1: the clamped timing inputs, tactics w/o triton).
PLUGIN_CODE_VERSION = 1
FLOAT, INT32 = "float", "int32"
FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # the float dtypes every op accepts (all "float" tensors alike)


class Tactic(IntEnum):
    """How a plugin computes at runtime (JIT plugins); TensorRT times the tactics it is offered."""

    REFERENCE = 1  # the plain-torch reference on the device (sparvar.sparse reference ops): always available
    TRITON = 2  # sparvar's Triton kernels through get_sparse_ops("triton"), when that backend exists


class Dims(Protocol):
    """The operations a shape rule may use on dimensions (ints or symbolic expressions)."""

    def const(self, value: int): ...

    def cdiv(self, dim, divisor: int): ...


class IntDims:
    def const(self, value: int) -> int:
        return value

    def cdiv(self, dim: int, divisor: int) -> int:
        return -(-dim // divisor)


class Port(NamedTuple):
    name: str
    kind: str  # FLOAT or INT32
    rank: int


@dataclass(frozen=True)
class OpSpec:
    name: str  # ONNX op_type and TensorRT plugin name
    torch_name: str  # the torch.library op: torch.ops.sparvar.<torch_name>
    inputs: tuple[Port, ...]  # in node input order
    outputs: tuple[Port, ...]
    attributes: tuple[str, ...]  # ints (positive unless in zero_ok), node attributes == plugin fields
    output_rule: Callable  # (input dims: list[list[dim]], attrs: dict, Dims) -> list[list[dim]]
    check_rule: Callable  # (input shapes: list[tuple[int, ...]] with -1 = unknown, attrs: dict) -> None, raises ValueError
    doc: str = ""
    zero_ok: tuple[str, ...] = ()  # attributes that may also be 0 (the others must be positive)

    @property
    def plugin_id(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    def input_kinds(self) -> tuple[str, ...]:
        return tuple(p.kind for p in self.inputs)

    def output_kinds(self) -> tuple[str, ...]:
        return tuple(p.kind for p in self.outputs)

    def parse_attrs(self, values: dict) -> dict[str, int]:
        """Attribute values (ints, or 1-element int arrays as TensorRT plugin fields carry them) -> {name: int}."""
        unknown = sorted(set(values) - set(self.attributes))
        if unknown:
            raise ValueError(f"{self.name}: unknown attribute(s) {unknown}; expected {list(self.attributes)}")
        missing = [a for a in self.attributes if a not in values]
        if missing:
            raise ValueError(f"{self.name}: missing attribute(s) {missing}")
        out = {}
        for name in self.attributes:
            value = values[name]
            if hasattr(value, "reshape"):  # numpy array from a plugin field
                if value.size != 1:
                    raise ValueError(f"{self.name}: attribute {name} must be one int, got {value.size} values")
                value = value.reshape(-1)[0]
            if isinstance(value, bool) or int(value) != value:
                raise TypeError(f"{self.name}: attribute {name} must be an int, got {value!r}")
            if int(value) < 0 or (int(value) == 0 and name not in self.zero_ok):
                raise ValueError(f"{self.name}: attribute {name} must be {'>= 0' if name in self.zero_ok else 'positive'}, "
                                 f"got {int(value)}")
            out[name] = int(value)
        return out

    def output_dims(self, input_dims: Sequence[Sequence], attrs: dict, dims: Dims) -> list[list]:
        if len(input_dims) != len(self.inputs):
            raise ValueError(f"{self.name} takes {len(self.inputs)} inputs ({', '.join(p.name for p in self.inputs)}), "
                             f"got {len(input_dims)}")
        return self.output_rule([list(d) for d in input_dims], attrs, dims)

    def check(self, input_shapes: Sequence[Sequence[int]], attrs: dict) -> None:
        """Raise ValueError for inputs this op cannot take; dims of -1 (unknown at build time) are not checked."""
        if len(input_shapes) != len(self.inputs):
            raise ValueError(f"{self.name} takes {len(self.inputs)} inputs, got {len(input_shapes)}")
        for port, shape in zip(self.inputs, input_shapes):
            if len(shape) != port.rank:
                raise ValueError(f"{self.name}: input {port.name} must have rank {port.rank}, got shape {tuple(shape)}")
        self.check_rule([tuple(int(d) for d in s) for s in input_shapes], attrs)

    def output_dtypes(self, input_dtypes: Sequence[str]) -> list[str]:
        """Output dtype names from input dtype names (float outputs follow q, the first input)."""
        self.check_dtypes(input_dtypes)
        return [input_dtypes[0] if kind == FLOAT else "int32" for kind in self.output_kinds()]

    def check_dtypes(self, input_dtypes: Sequence[str]) -> None:
        floats = {d for d, kind in zip(input_dtypes, self.input_kinds()) if kind == FLOAT}
        if len(floats) != 1 or not floats <= set(FLOAT_DTYPES):
            raise TypeError(f"{self.name}: float inputs must share one dtype of {FLOAT_DTYPES}, got "
                            f"{dict(zip((p.name for p in self.inputs), input_dtypes))}")
        for port, dtype in zip(self.inputs, input_dtypes):
            if port.kind == INT32 and dtype != "int32":
                raise TypeError(f"{self.name}: input {port.name} must be int32, got {dtype}")

    def supports(self, pos: int, dtypes: Sequence[str]) -> bool:
        """TensorRT format negotiation: may I/O position `pos` have dtypes[pos], given dtypes[:pos]? (LINEAR only)"""
        kinds = self.input_kinds() + self.output_kinds()
        kind, dtype = kinds[pos], dtypes[pos]
        if kind == INT32:
            return dtype == "int32"
        if pos == 0:
            return dtype in FLOAT_DTYPES
        return dtype == dtypes[0]  # every float tensor has q's dtype


def equal_known(a: int, b: int) -> bool:
    return a < 0 or b < 0 or a == b


def check_qkv(op: str, q: tuple, k: tuple, v: tuple) -> None:
    """q (B, H, Lq, D); k, v (B, H, Lk, D)."""
    if not all(equal_known(x, y) for x, y in zip(k, v)):
        raise ValueError(f"{op}: k {k} and v {v} must have the same shape")
    if not (equal_known(q[0], k[0]) and equal_known(q[1], k[1]) and equal_known(q[3], k[3])):
        raise ValueError(f"{op}: q {q} and k {k} must agree on batch, heads and head dim (B, H, L, D)")


# ------------------------------------------------------------------------------------------------ torch views
TRT_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                   "INT8": "int8", "BOOL": "bool", "UINT8": "uint8"}


def dtype_name(trt_dtype) -> str:
    """TensorRT DataType (of either TensorRT or TensorRT-RTX) -> our dtype name."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in TRT_DTYPE_NAMES:
        raise TypeError(f"TensorRT dtype {trt_dtype} is not used by sparvar plugins")
    return TRT_DTYPE_NAMES[name]


def trt_dtype(trt, name: str):
    """Our dtype name -> the DataType of `trt` (the tensorrt or tensorrt_rtx module); the inverse of dtype_name for
    the dtypes plugin outputs take."""
    return {"float32": trt.float32, "float16": trt.float16, "bfloat16": trt.bfloat16, "int32": trt.int32}[name]


_CUDA_ARRAY_TYPESTR = {"float32": "<f4", "float16": "<f2", "bfloat16": "<i2", "int32": "<i4", "int64": "<i8"}


class _DeviceBuffer:
    """A raw device pointer described by the CUDA array interface, so torch can view it without a copy."""

    def __init__(self, ptr: int, shape: tuple[int, ...], dtype: str):
        self.__cuda_array_interface__ = {"data": (int(ptr), False), "shape": tuple(int(s) for s in shape),
                                         "typestr": _CUDA_ARRAY_TYPESTR[dtype], "version": 3, "strides": None}


def torch_view(ptr: int, shape: Sequence[int], dtype: str):
    """Zero-copy torch view of a dense device buffer (TensorRT LINEAR tensors are dense row-major)."""
    import torch

    view = torch.as_tensor(_DeviceBuffer(ptr, tuple(shape), dtype), device="cuda")
    # numpy has no bfloat16, so the interface carries int16 and torch reinterprets the bits
    return view.view(torch.bfloat16) if dtype == "bfloat16" else view


# ------------------------------------------------------------------------------------------------ runtime
def available_tactics(dtype: str | None = None, head_dim: int | None = None, attrs: dict | None = None) -> list[Tactic]:
    """Tactics this process can run on inputs of `dtype` (a dtype name) whose q has head dim `head_dim`, for a node
    with attributes `attrs`, preferred first: Triton when sparvar.sparse has a 'triton' backend and its kernels take
    these inputs (bf16 or fp16, a head dim of sparvar.kernels.csla.HEAD_DIMS, CS4A groups of a multiple of 16
    queries, CSLA tiles of TILE_SIZES), then the reference, which takes everything. None (or a dynamic -1) means not
    known yet. (TensorRT times every tactic it is offered, and one that cannot run fails the build; a builder that
    cannot time, like TensorRT-RTX on a machine without a GPU, takes the preferred one, first.)"""
    import torch

    from sparvar.kernels.csla import TILE_SIZES, kernels_take
    from sparvar.sparse import get_sparse_ops

    attrs = attrs or {}
    torch_dtype = None if dtype is None else getattr(torch, dtype, dtype)  # an unknown name is not a torch dtype
    if not kernels_take(torch_dtype, None if head_dim is None or head_dim < 0 else head_dim):
        return [Tactic.REFERENCE]  # e.g. an fp32 graph: the kernels are bf16/fp16 only
    if attrs.get("group_size", 16) % 16 or any(attrs.get(t, 16) not in TILE_SIZES for t in ("block_m", "block_n")):
        return [Tactic.REFERENCE]  # query tiles of 16..128 never straddle a CS4A group; CSLA tiles are tl.dot tiles
    try:
        get_sparse_ops("triton")
    except (ValueError, ImportError, RuntimeError):  # RuntimeError: no triton package (CPU torch wheels lack it)
        return [Tactic.REFERENCE]
    return [Tactic.TRITON, Tactic.REFERENCE]


def sparse_ops(tactic: int):
    """The SparseOps (csla, cs4a_decide, cs4a) a tactic runs."""
    from sparvar.sparse import get_sparse_ops

    tactic = Tactic(int(tactic))
    return get_sparse_ops("reference" if tactic == Tactic.REFERENCE else "triton")


def run_on_stream(spec: OpSpec, run: Callable, inputs: list, outputs: list, attrs: dict, tactic: int, stream: int) -> None:
    """Run an op's torch-level implementation on TensorRT's CUDA stream, writing into TensorRT's output buffers."""
    import torch

    with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
        results = run(inputs, attrs, sparse_ops(tactic))
        if len(results) != len(outputs):
            raise RuntimeError(f"{spec.name}: implementation returned {len(results)} tensors, expected {len(outputs)}")
        for out, result in zip(outputs, results):
            out.copy_(result.reshape(out.shape))
