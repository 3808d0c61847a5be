"""Export of Infinity scale steps to ONNX with SparVAR custom attention nodes; engine build stages.

  step.py / stages.py / weights.py  the exported units, the export -> optimize -> build stages, shared weights;
  custom_ops.py                     SparVAR attention as torch custom ops -> `sparvar` ONNX nodes + reference bodies;
  trt_build.py                      TensorRT-family parse/check/build helpers (plugin layers must replace every node);
  trt_rtx.py / tensorrt.py          TensorRT-RTX (builds here, CPU-only) and TensorRT (GPU) engine builders.
"""
