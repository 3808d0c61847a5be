"""TensorRT plugins for the SparVAR custom ONNX nodes (domain and plugin namespace `sparvar`).

One file per op: plugins/csla.py (CSLAAttention), plugins/csla_tiles.py (CSLATileAttention), plugins/cs4a.py (CS4AAttention, CS4AAttentionCached),
plugins/cs4a_decide.py (CS4ADecide). Each holds the op's spec (shapes, checks), its torch-level runtime and its
TensorRT quickly-deployable plugin (QDP) definitions. Shared machinery:
  plugins/spec.py      the contract (OpSpec, dtype/format rules, attribute parsing, zero-copy views, tactics);
  plugins/pluginv3.py  IPluginV3 classes + creators for TensorRT-RTX and TensorRT (same Python API);
  plugins/qdp.py       the tensorrt.plugin glue (TensorRT >= 10.6 only; import-guarded);
  plugins/aot.py       ahead-of-time Triton compilation to PTX for QDP aot_impl.
Nothing here imports TensorRT at import time.
"""
from plugins import cs4a, cs4a_decide, csla, csla_tiles
from plugins.spec import NAMESPACE, VERSION, OpSpec

SPECS: dict[str, OpSpec] = {s.name: s for s in (csla.SPEC, csla_tiles.SPEC, cs4a.SPEC, cs4a.SPEC_CACHED,
                                                  cs4a_decide.SPEC)}
RUNS = {csla.SPEC.name: csla.run, csla_tiles.SPEC.name: csla_tiles.run, cs4a.SPEC.name: cs4a.run,
        cs4a.SPEC_CACHED.name: cs4a.run, cs4a_decide.SPEC.name: cs4a_decide.run}

__all__ = ["NAMESPACE", "VERSION", "SPECS", "RUNS"]
