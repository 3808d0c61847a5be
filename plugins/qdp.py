"""TensorRT quickly-deployable Python plugins (QDP, `tensorrt.plugin`, TensorRT >= 10.6; aot_impl >= 10.9).

The per-op definitions (register / autotune / impl / aot_impl) live in plugins/csla.py, csla_tiles.py, cs4a.py,
cs4a_decide.py; they call the helpers here, which read the op specs - the same rules the IPluginV3 classes use.

    trtp = register_qdp_plugins()          # imports tensorrt.plugin (raises ImportError without TensorRT)

ONNX nodes say which implementation the parser must use with an int attribute `aot` (export/tensorrt.py mark_aot
sets it on every node): 1 for the AOT PTX, 0 for the JIT `impl`, which runs the op's torch-level implementation on
zero-copy views, on TensorRT's stream. Without it TensorRT >= 10.9 refuses ops that define both.
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

from plugins.spec import FLOAT, OpSpec, available_tactics, dtype_name, run_on_stream, torch_view, trt_dtype

# The annotation of the ops' int attributes. tensorrt.plugin's creator rebuilds an attribute as `annotation(field.data)`,
# and a plugin field's data is a 1-element array: `int(array([64]))` is an error since NumPy 2.4, so an `int` attribute
# fails every parse and engine load there. Array annotations are rebuilt by `field.data.astype(np.int32)` instead
# (an INT32 field, which the ONNX parser fills from the node's int attribute); OpSpec.parse_attrs reads them as ints.
INT_ATTR = npt.NDArray[np.int32]

_QDP_TYPES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "int32": "INT32"}
_REGISTERED: list = []


def load_trtp():
    """tensorrt.plugin, or ImportError naming what is missing."""
    try:
        import tensorrt
    except ImportError as e:
        raise ImportError("TensorRT not installed (`import tensorrt` failed); QDP plugins need TensorRT >= 10.6") from e
    try:
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise ImportError(f"TensorRT {tensorrt.__version__} has no tensorrt.plugin (QDP needs >= 10.6)") from e
    return trtp


def has_aot(trtp) -> bool:
    """tensorrt.plugin has the AOT API (KernelLaunchParams, aot_impl): TensorRT >= 10.9."""
    return hasattr(trtp, "KernelLaunchParams")


def register_qdp_plugins():
    """Register every sparvar op as a QDP (idempotent); returns tensorrt.plugin."""
    trtp = load_trtp()
    if not _REGISTERED:
        from plugins import cs4a, cs4a_decide, csla, csla_tiles

        for module in (csla, csla_tiles, cs4a, cs4a_decide):
            module.register_qdp(trtp)
        _REGISTERED.append(True)
    return trtp


class QdpDims:
    """Shape-rule algebra over tensorrt.plugin shape expressions."""

    def __init__(self, trtp):
        self.trtp = trtp

    def const(self, value: int) -> int:
        return int(value)  # from_shape_expr takes ints as constant dims

    def cdiv(self, dim, divisor: int):
        return -(-dim // divisor) if isinstance(dim, int) else self.trtp.cdiv(dim, int(divisor))


def output_descs(trtp, spec: OpSpec, inputs: list, attrs: dict) -> list:
    """`register`: output TensorDescs from the input TensorDescs, by the op's shape and dtype rules."""
    attrs = spec.parse_attrs(attrs)
    dims = [[inp.shape_expr[i] for i in range(inp.ndim)] for inp in inputs]
    dtypes = spec.output_dtypes([dtype_name(inp.dtype) for inp in inputs])
    shapes = spec.output_dims(dims, attrs, QdpDims(trtp))
    import tensorrt as trt

    return [trtp.from_shape_expr(tuple(shape), dtype=trt_dtype(trt, dt)) for shape, dt in zip(shapes, dtypes)]


def type_string(spec: OpSpec, float_dtypes=("float32", "float16", "bfloat16")) -> str:
    """AutoTuneCombination types: all float I/O share one of float_dtypes ('|' = dependent), int32 I/O are INT32."""
    floats = "|".join(_QDP_TYPES[d] for d in float_dtypes)
    kinds = spec.input_kinds() + spec.output_kinds()
    return ", ".join(floats if kind == FLOAT else "INT32" for kind in kinds)


def autotune_combinations(trtp, spec: OpSpec, q=None, attrs: dict | None = None) -> list:
    """`autotune`: the dtype combinations (LINEAR only), each with the tactics (plugins.spec.Tactic) that can run it:
    fp32 only through the reference, fp16/bf16 also through Triton where the kernels take q's head dim and the
    node's attributes. q's head dim comes from `q.shape`, the numeric shape tensorrt.plugin sets on the descs it
    hands to autotune (-1 where dynamic); the symbolic `shape_expr` belongs to the shape callback, whose build
    context has ended by then."""
    head_dim = q.shape[3] if q is not None else None
    attrs = None if attrs is None else spec.parse_attrs(attrs)  # tensorrt.plugin hands them over as INT_ATTR arrays
    return [trtp.AutoTuneCombination(type_string(spec, ("float32",)), "LINEAR",
                                     [int(t) for t in available_tactics("float32", head_dim, attrs)]),
            trtp.AutoTuneCombination(type_string(spec, ("float16", "bfloat16")), "LINEAR",
                                     [int(t) for t in available_tactics("bfloat16", head_dim, attrs)])]


def run_jit(spec: OpSpec, run, inputs: list, outputs: list, attrs: dict, tactic: int, stream: int) -> None:
    """`impl`: zero-copy torch views of TensorRT's buffers, then the op's torch-level implementation on the stream."""
    attrs = spec.parse_attrs(attrs)
    ins = [torch_view(t.data_ptr, tuple(t.shape), dtype_name(t.dtype)) for t in inputs]
    outs = [torch_view(t.data_ptr, tuple(t.shape), dtype_name(t.dtype)) for t in outputs]
    spec.check([tuple(t.shape) for t in ins], attrs)
    tactic = tactic or int(available_tactics(dtype_name(inputs[0].dtype), inputs[0].shape[-1], attrs)[0])
    run_on_stream(spec, run, ins, outs, attrs, tactic, stream)


def aot_launch(trtp, spec: OpSpec, inputs: list, outputs: list, attrs: dict, target=None):
    """`aot_impl`: (kernel name, PTX, launch params, int32 scalar args) for the op's Triton kernel.

    There is one AOT kernel per op, whatever tactic TensorRT asks for (the reference tactic has no PTX form).
    """
    from plugins import aot

    attrs = spec.parse_attrs(attrs)
    io_dtypes = [dtype_name(t.dtype) for t in list(inputs) + list(outputs)]
    head_dim = inputs[0].shape_expr[3]
    if not head_dim.is_constant:
        raise ValueError(f"{spec.name}: the AOT kernel needs a static head dim")
    sizes = {port.name: [t.shape_expr[i] for i in range(t.ndim)]
             for port, t in zip(spec.inputs + spec.outputs, list(inputs) + list(outputs))}
    static_dims = {port.name: tuple(e.constant_value() if e.is_constant else None for e in sizes[port.name])
                   for port in spec.inputs}
    kernel = aot.kernel_for(spec, io_dtypes[0], head_dim.constant_value(), attrs, static_dims)
    compiled = aot.compile_aot(spec, kernel, io_dtypes, target)
    dims = QdpDims(trtp)
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = kernel.grid(sizes, dims)
    params.block_x = compiled.threads
    params.shared_mem = compiled.shared_mem
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in kernel.scalars(sizes, dims)])
    return compiled.name, compiled.ptx, params, extra
