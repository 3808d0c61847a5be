"""Engine building shared by TensorRT-RTX (export/trt_rtx.py) and TensorRT (export/tensorrt.py).

Both ship the same network API and ONNX parser; every function takes the TensorRT module (`trt`) as an argument.
What is checked, in order, for every sparvar custom node of the ONNX graph:
  1. before parsing: the graph carries no sparvar local functions (they are stripped), so the parser has no body
     to inline and must find a registered plugin or fail;
  2. after parsing: the node became exactly one plugin layer of the same name whose plugin is ours (name,
     namespace, attributes) - `plugin_layers`;
  3. after building: the builder's own graph listing (its verbose log) shows the layer as a plugin, and the
     serialized engine names the plugin - `BuildReport`;
  4. where a runtime can deserialize the engine (a GPU it supports): the engine inspector's layer list, in JSON.

Weights. Every unit of an engine directory (text, step_00..step_NN, decode) reads the same deduplicated weights
file (export/weights.py); a plan that embedded them would copy them once per unit (13 x 4 GB for the 2B model).
`weights="strip"` builds with STRIP_PLAN + REFIT_IDENTICAL: the plan holds no refittable weights, the builder
still optimises as if they were the constants it saw, and `deserialize` refits them at load time from the same
ONNX graph (hence the same shared weights file) the engine was built from - identical weights by construction.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import onnx

from export.custom_ops import custom_nodes, strip_reference_functions
from plugins import SPECS
from plugins.spec import NAMESPACE

DYNAMIC_RANGE = (1, 128, 512)  # min/opt/max for every dynamic axis (the text length) of an engine's profile
WEIGHT_MODES = ("strip", "embed")  # strip: weights refit at load from the shared file; embed: a copy in each plan


def text_range(text_maxlen: int) -> tuple[int, int, int]:
    """The profile range of the text-length axis for a model whose prompts have at most `text_maxlen` tokens."""
    return (1, min(DYNAMIC_RANGE[1], text_maxlen), text_maxlen)


def make_logger(trt, echo_severity=None):
    """An ILogger that keeps every message (for the checks below) and echoes warnings and errors."""

    class CapturingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[object, str]] = []
            self.echo = trt.ILogger.Severity.WARNING if echo_severity is None else echo_severity

        def log(self, severity, msg):
            self.messages.append((severity, msg))
            if int(severity) <= int(self.echo):
                print(f"[{trt.__name__}] {severity.name}: {msg}")

        def errors(self) -> list[str]:
            bad = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR)
            return [m for s, m in self.messages if s in bad]

        def text(self) -> str:
            return "\n".join(m for _, m in self.messages)

    return CapturingLogger()


def name_custom_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every sparvar node a unique name: TensorRT names the plugin layer after the node, and the checks match names."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(custom_nodes(model)):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)
    return model


def ready_for_trt(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph TensorRT sees (build and refit alike): no sparvar reference functions, every sparvar node named."""
    return name_custom_nodes(strip_reference_functions(model))


def parse_onnx(trt, builder, model: onnx.ModelProto, logger, network_flags: int = 0, path: str | None = None):
    """(network, parser, TensorRT-ready model): parse `model` without its sparvar reference functions.

    path: the file `model` was loaded from, so the parser finds its external data next to it.
    """
    ready = ready_for_trt(model)
    leftover = [f.name for f in ready.functions if f.domain == NAMESPACE]
    if leftover:
        raise AssertionError(f"sparvar local functions {leftover} survived stripping; TensorRT could inline them")
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(ready.SerializeToString(), path) if path else parser.parse(ready.SerializeToString())
    if not ok:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError("TensorRT's ONNX parser rejected the graph:\n  " + "\n  ".join(errors))
    return network, parser, ready


def _plugin_of(trt, layer):
    layer.__class__ = trt.IPluginV3Layer  # get_layer returns the ILayer base; the concrete type is PLUGIN_V3
    return layer.plugin


def plugin_layers(trt, network, model: onnx.ModelProto, plugin_classes=None) -> dict[str, dict]:
    """Check that each sparvar node of `model` became one of our plugin layers; returns {node name: layer info}.

    plugin_classes: the Python classes our plugins must be instances of (None: check names and attributes only,
    e.g. for QDP plugins, whose classes belong to tensorrt.plugin).
    """
    nodes = {n.name: n for n in custom_nodes(model)}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    by_name: dict[str, list] = {}
    for layer in layers:
        by_name.setdefault(layer.name, []).append(layer)
    found = {}
    for name, node in nodes.items():
        matches = by_name.get(name, [])
        if len(matches) != 1 or matches[0].type != trt.LayerType.PLUGIN_V3:
            kinds = [str(m.type) for m in matches]
            raise AssertionError(f"sparvar node {name} ({node.op_type}) did not become one plugin layer: layers named "
                                 f"{name!r}: {kinds or 'none'}")
        plugin = _plugin_of(trt, matches[0])
        if plugin_classes is not None and not isinstance(plugin, tuple(plugin_classes)):
            raise AssertionError(f"layer {name} holds plugin {type(plugin).__name__}, not a sparvar plugin")
        if plugin is not None and hasattr(plugin, "plugin_name"):
            if (plugin.plugin_name, plugin.plugin_namespace) != (node.op_type, NAMESPACE):
                raise AssertionError(f"layer {name} holds plugin {plugin.plugin_namespace}::{plugin.plugin_name}, "
                                     f"expected {NAMESPACE}::{node.op_type}")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name not in ("plugin_namespace", "aot")}
        # a QDP plugin holds its attributes as 1-element arrays (plugins.qdp.INT_ATTR): compared as the ints they carry
        if plugin is not None and getattr(plugin, "attrs", None) is not None and (
                SPECS[node.op_type].parse_attrs(plugin.attrs) != attrs):
            raise AssertionError(f"layer {name}: plugin attributes {plugin.attrs} differ from the node's {attrs}")
        found[name] = {"op_type": node.op_type, "attributes": attrs, "inputs": matches[0].num_inputs,
                       "outputs": matches[0].num_outputs}
    return found


@dataclass
class BuildReport:
    """What a build proves about the sparvar nodes of one graph."""

    engine: bytes
    plugin_layers: dict  # node name -> {op_type, attributes, ...}, from the parsed network
    builder_plugin_nodes: list[str]  # layer names the builder listed as PLUGIN_V3 (its verbose graph listing)
    layer_types: dict = field(default_factory=dict)  # network layer type -> count
    inspector: dict | None = None  # engine inspector JSON where a runtime could deserialize the engine
    weights: str = "embed"  # one of WEIGHT_MODES: "strip" plans must be refit (`deserialize`) before they run

    def summary(self) -> dict:
        return {"engine_bytes": len(self.engine), "plugin_layers": self.plugin_layers,
                "builder_plugin_nodes": self.builder_plugin_nodes, "layer_types": self.layer_types,
                "inspected": self.inspector is not None}


_GRAPH_NODE = re.compile(r"^PLUGIN_V3 (\S+)$")


def builder_plugin_nodes(logger) -> list[str]:
    """Layer names the builder's verbose graph listing shows as PLUGIN_V3 (one line per node: '<TYPE> <name>')."""
    return [m.group(1) for _, msg in logger.messages if (m := _GRAPH_NODE.match(msg.strip()))]


def check_build(report: BuildReport, engine_must_name: list[str]) -> None:
    """Every custom node is listed by the builder as a plugin, and the engine bytes name every plugin."""
    missing = sorted(set(report.plugin_layers) - set(report.builder_plugin_nodes))
    if missing:
        raise AssertionError(f"the builder did not list sparvar nodes {missing} as PLUGIN_V3 layers "
                             f"(listed: {report.builder_plugin_nodes})")
    absent = [name for name in engine_must_name if name.encode() not in report.engine]
    if absent:
        raise AssertionError(f"the serialized engine does not name {absent}")


def add_dynamic_profile(builder, network, config, dynamic_range=DYNAMIC_RANGE) -> None:
    """One optimization profile covering every dynamic input axis with `dynamic_range` (min, opt, max)."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [t for t in inputs if any(d < 0 for d in t.shape)]
    if not dynamic:
        return
    lo, opt, hi = dynamic_range
    profile = builder.create_optimization_profile()
    for t in dynamic:
        shape = tuple(t.shape)
        pick = lambda v: tuple(v if d < 0 else d for d in shape)  # noqa: E731
        profile.set_shape(t.name, pick(lo), pick(opt), pick(hi))
    config.add_optimization_profile(profile)



def set_weights_mode(trt, config, weights: str) -> None:
    """Configure the builder for WEIGHT_MODES `weights` (see the module docstring)."""
    if weights not in WEIGHT_MODES:
        raise ValueError(f"unknown weights mode {weights!r}; expected one of {WEIGHT_MODES}")
    if weights == "strip":
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)


def external_data_files(model: onnx.ModelProto) -> list[str]:
    """The external-data files the graph's initializers live in, relative to the graph's folder."""
    from onnx.external_data_helper import uses_external_data

    files = set()
    for init in model.graph.initializer:
        if uses_external_data(init):
            files.update(e.value for e in init.external_data if e.key == "location")
    return sorted(files)


def weights_record(onnx_path: str, root: str, weights: str) -> dict:
    """The manifest entry saying where a unit's weights are: in its plan, or refit from `root`-relative files."""
    if weights == "embed":
        return {"weights": "embedded"}
    model = onnx.load(onnx_path, load_external_data=False)
    graph_dir = os.path.dirname(onnx_path)
    sources = [os.path.relpath(os.path.normpath(os.path.join(graph_dir, f)), root) for f in external_data_files(model)]
    graph = os.path.relpath(onnx_path, root)
    return {"weights": f"stripped, refit from {', '.join(sources) or graph}", "refit_onnx": graph}


def refit(trt, engine, onnx_path: str, logger) -> None:
    """Give a weight-stripped `engine` its weights from the ONNX graph at `onnx_path` (and its external data)."""
    model = ready_for_trt(onnx.load(onnx_path, load_external_data=False))  # the graph exactly as the builder parsed it
    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_bytes(model.SerializeToString(), onnx_path):
        errors = [str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors)]
        raise RuntimeError(f"cannot refit the engine from {onnx_path}:\n  " + "\n  ".join(errors + logger.errors()))
    missing = [name or "<unnamed>" for name in refitter.get_missing_weights()]
    if missing:
        raise RuntimeError(f"{onnx_path} does not supply the engine's weights {missing[:10]}"
                           f"{f' (and {len(missing) - 10} more)' if len(missing) > 10 else ''}; rebuild the engine")
    if not refitter.refit_cuda_engine():
        raise RuntimeError(f"refitting the engine from {onnx_path} failed: " + "; ".join(logger.errors()[-3:]))


def deserialize(trt, engine_bytes: bytes, logger, refit_from: str | None = None):
    """An ICudaEngine from `engine_bytes`; a weight-stripped plan is refit from the ONNX graph at `refit_from`."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise RuntimeError(f"{trt.__name__} cannot deserialize the engine here: " + "; ".join(logger.errors()[-3:]))
    if refit_from is not None:
        refit(trt, engine, refit_from, logger)
    return engine


def checked_manifest(engine_dir: str, backend: str) -> dict:
    """The manifest of an engine directory built for `backend`, checked as the runtime checks a directory before it
    loads one (sparvar.runtime.check_engine_code: exporter, architecture, schedule, SparVAR policy; then every
    file's digest): a stale, foreign or corrupt directory is an EngineError naming it, never a plan deserialised.
    It hashes every file: a caller loading several units checks once and passes the manifest to engine_unit."""
    from sparvar.engine import EngineError, read_manifest, verify_files
    from sparvar.runtime import check_engine_code

    manifest = read_manifest(engine_dir)
    if backend.replace("-", "_") not in manifest["stages"]["build"]["info"]:
        raise EngineError(f"{engine_dir} holds no {backend} engines (it was built for backend "
                          f"{manifest['spec']['backend']!r}); build one with --backend {backend}")
    check_plugin_code(engine_dir, manifest["stages"]["build"]["info"][backend.replace("-", "_")])  # before the hashing
    check_engine_code(engine_dir, manifest)
    verify_files(engine_dir, manifest)
    return manifest


def check_plugin_code(engine_dir: str, build_info: dict) -> None:
    """EngineError unless the directory's plans were built with this sparvar's plugins: a plan bakes in their fields
    and chosen tactics (plugins/spec.py), and TensorRT itself loads a plan whose plugin version string is unchanged."""
    from plugins.spec import PLUGIN_CODE_VERSION
    from sparvar.engine import EngineError

    built = build_info.get("plugin_code")
    if built != PLUGIN_CODE_VERSION:
        what = "no plugin code version (an older sparvar)" if built is None else f"sparvar plugin code {built}"
        raise EngineError(f"{engine_dir}: its plans record {what}, and this sparvar's plugins are version "
                          f"{PLUGIN_CODE_VERSION}; rebuild the engine (sparvar engine build)")


def engine_unit(engine_dir: str, unit: str, backend: str, manifest: dict | None = None) -> dict:
    """A unit's build record in an engine directory built for `backend` (its manifest key), with absolute paths:
    {"engine": plan file, "refit_onnx": graph to refit from or None, "record": the unit's manifest entry,
    "info": the backend's build info}. `manifest`: the directory's, from checked_manifest (checked here if None)."""
    from sparvar.engine import EngineError

    manifest = manifest if manifest is not None else checked_manifest(engine_dir, backend)
    info = manifest["stages"]["build"]["info"][backend.replace("-", "_")]
    units = info["units"]
    if unit not in units:
        raise ValueError(f"unknown unit {unit!r}; {engine_dir} has units {sorted(units)}")
    record = units[unit]
    refit_onnx = record.get("refit_onnx")
    if record["weights"] != "embedded" and refit_onnx is None:
        raise EngineError(f"{engine_dir}: unit {unit} has stripped weights but no graph to refit them from; rebuild it")
    return {"engine": os.path.join(engine_dir, record["engine"]),
            "refit_onnx": os.path.join(engine_dir, refit_onnx) if refit_onnx else None, "record": record,
            "info": info}


def layer_type_counts(trt, network) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in range(network.num_layers):
        key = network.get_layer(i).type.name
        counts[key] = counts.get(key, 0) + 1
    return counts


def inspect_engine(trt, engine_bytes: bytes, logger) -> dict:
    """Layer information (JSON) from the engine inspector; needs a runtime that can deserialize here (a GPU).
    A weight-stripped plan is inspected as it is: the layer list needs no weights."""
    engine = deserialize(trt, engine_bytes, logger)
    inspector = engine.create_engine_inspector()
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def check_inspected(info: dict, plugin_nodes: list[str]) -> None:
    """Every sparvar node is named by some engine layer (TensorRT-RTX wraps plugins in a ForeignNode)."""
    texts = [json.dumps(layer) for layer in info.get("Layers", [])]
    missing = [n for n in plugin_nodes if not any(n in t for t in texts)]
    if missing:
        raise AssertionError(f"engine inspector shows no plugin layer for {missing}")
