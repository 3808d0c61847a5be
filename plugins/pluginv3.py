"""IPluginV3 Python plugins for every sparvar op, for TensorRT-RTX and TensorRT alike.

Both ship the same Python plugin API (IPluginV3 + IPluginV3OneCore/OneBuild/OneRuntime, IPluginCreatorV3One), so
one generic class per TensorRT module serves every op: it reads the op's `OpSpec` for output dtypes and shapes,
format negotiation, input checks and attribute fields, and at runtime runs the op's torch-level implementation
(`plugins.RUNS`) on zero-copy views of TensorRT's buffers, on TensorRT's stream.

    trt = load_trt_rtx()                       # or `import tensorrt as trt`
    creators = register_plugins(trt)           # one IPluginCreatorV3One per op, namespace "sparvar"
    # ... the ONNX parser now maps sparvar::<Op> nodes to these plugins

Python plugins are not serialized into an engine: a process that deserializes the engine must call
`register_plugins` first (TensorRT looks the creators up by name, version and namespace).
"""
from __future__ import annotations

import functools

import numpy as np

from plugins import RUNS, SPECS
from plugins.spec import NAMESPACE, VERSION, available_tactics, dtype_name, run_on_stream, torch_view, trt_dtype

_CLASSES: dict[str, tuple[type, type]] = {}
_REGISTERED: dict[str, list] = {}  # module name -> creators; the registry holds raw pointers, so we keep them alive
# TensorRT turns an exception in a plugin callback into a generic "non-zero return code" build error; the builders
# (export/trt_rtx.py) report these messages instead.
ERRORS: list[str] = []


def _reported(method):
    @functools.wraps(method)
    def wrapper(self, *args):
        try:
            return method(self, *args)
        except Exception as e:
            ERRORS.append(f"{self.plugin_namespace}::{self.plugin_name}.{method.__name__}: {type(e).__name__}: {e}")
            raise
    return wrapper


class ExprDims:
    """Shape-rule algebra over TensorRT's IExprBuilder."""

    def __init__(self, trt, builder):
        self.trt, self.builder = trt, builder

    def const(self, value: int):
        return self.builder.constant(int(value))

    def cdiv(self, dim, divisor: int):
        return self.builder.operation(self.trt.DimensionOperation.CEIL_DIV, dim, self.builder.constant(int(divisor)))


def _known_dtype(trt_dtype) -> str | None:
    try:
        return dtype_name(trt_dtype)
    except TypeError:
        return None


def plugin_classes(trt) -> tuple[type, type]:
    """(plugin class, creator class) bound to the TensorRT module `trt` (tensorrt or tensorrt_rtx_bindings)."""
    if trt.__name__ in _CLASSES:
        return _CLASSES[trt.__name__]

    class SparVARPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, op: str, attrs: dict[str, int], phase=None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            spec = SPECS[op]
            self.op, self.attrs, self.phase = op, dict(attrs), phase
            # Python plugins must set every attribute TensorRT reads
            self.plugin_name, self.plugin_namespace, self.plugin_version = spec.name, NAMESPACE, VERSION
            self.num_outputs = len(spec.outputs)
            self.timing_cache_id = ""
            self.metadata_string = f"{spec.plugin_id} {self.attrs}"
            self.tactic = 0  # TensorRT's "default tactic": the preferred available one (resolved at enqueue)
            self.inputs_key = (None, None)  # q's dtype name and head dim, once configure_plugin has seen them

        @property
        def spec(self):
            return SPECS[self.op]

        def get_capability_interface(self, type):
            return self

        # --- build
        @_reported
        def get_output_data_types(self, input_types):
            names = [dtype_name(t) for t in input_types]
            return [trt_dtype(trt, n) for n in self.spec.output_dtypes(names)]

        @_reported
        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            dims = [[d[i] for i in range(len(d))] for d in inputs]
            outputs = []
            for out in self.spec.output_dims(dims, self.attrs, ExprDims(trt, expr_builder)):
                exprs = trt.DimsExprs(len(out))
                for i, e in enumerate(out):
                    exprs[i] = e
                outputs.append(exprs)
            return outputs

        @_reported
        def supports_format_combination(self, pos, in_out, num_inputs):
            if num_inputs != len(self.spec.inputs) or in_out[pos].desc.format != trt.TensorFormat.LINEAR:
                return False
            dtypes = [_known_dtype(io.desc.type) for io in in_out[: pos + 1]]
            return dtypes[pos] is not None and dtypes[0] is not None and self.spec.supports(pos, dtypes)

        @_reported
        def configure_plugin(self, inputs, outputs):
            self.spec.check([tuple(i.desc.dims) for i in inputs], self.attrs)
            self.spec.check_dtypes([dtype_name(i.desc.type) for i in inputs])
            self.inputs_key = (dtype_name(inputs[0].desc.type), inputs[0].desc.dims[-1])  # q: what the tactics need

        def get_workspace_size(self, inputs, outputs):
            return 0

        @_reported
        def get_valid_tactics(self):
            return [int(t) for t in available_tactics(*self.inputs_key, self.attrs)]

        # --- runtime
        def set_tactic(self, tactic):
            self.tactic = int(tactic)

        @_reported
        def on_shape_change(self, inputs, outputs):
            self.spec.check([tuple(i.dims) for i in inputs], self.attrs)

        @_reported
        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            ins = [torch_view(ptr, tuple(d.dims), dtype_name(d.type)) for d, ptr in zip(input_desc, inputs)]
            outs = [torch_view(ptr, tuple(d.dims), dtype_name(d.type)) for d, ptr in zip(output_desc, outputs)]
            q = input_desc[0]
            tactic = self.tactic or int(available_tactics(dtype_name(q.type), q.dims[-1], self.attrs)[0])
            run_on_stream(self.spec, RUNS[self.op], ins, outs, self.attrs, tactic, stream)
            return 0

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([trt.PluginField(name, np.array([value], dtype=np.int32), trt.PluginFieldType.INT32)
                                              for name, value in self.attrs.items()])

        def clone(self):
            cloned = SparVARPlugin(self.op, self.attrs, self.phase)
            cloned.__dict__.update(self.__dict__)
            cloned.attrs = dict(self.attrs)
            return cloned

    class SparVARPluginCreator(trt.IPluginCreatorV3One):
        def __init__(self, op: str):
            trt.IPluginCreatorV3One.__init__(self)
            spec = SPECS[op]
            self.op = op
            self.name, self.plugin_namespace, self.plugin_version = spec.name, NAMESPACE, VERSION
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(a, np.array([], dtype=np.int32), trt.PluginFieldType.INT32) for a in spec.attributes])

        def create_plugin(self, name, fields, phase):
            attrs = SPECS[self.op].parse_attrs({f.name: np.asarray(f.data) for f in fields})
            return SparVARPlugin(self.op, attrs, phase)

    _CLASSES[trt.__name__] = (SparVARPlugin, SparVARPluginCreator)
    return _CLASSES[trt.__name__]


def register_plugins(trt) -> list:
    """Register one creator per sparvar op with `trt`'s plugin registry (idempotent); returns the creators."""
    if trt.__name__ in _REGISTERED:
        return _REGISTERED[trt.__name__]
    _, creator_class = plugin_classes(trt)
    registry = trt.get_plugin_registry()
    creators = []
    for op in SPECS:
        existing = registry.get_creator(op, VERSION, NAMESPACE)
        if existing is not None:
            raise RuntimeError(f"a plugin creator {NAMESPACE}::{op} v{VERSION} is already registered with {trt.__name__} "
                               "(e.g. the QDP definitions of plugins/qdp.py); register one plugin API per process")
        creator = creator_class(op)
        if not registry.register_creator(creator, NAMESPACE):
            raise RuntimeError(f"{trt.__name__} refused to register the plugin creator {NAMESPACE}::{op}")
        creators.append(creator)
    _REGISTERED[trt.__name__] = creators
    return creators
