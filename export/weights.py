"""One external-data file for all graphs of an engine: each weight is stored once, whatever the scale count.

`SharedWeights.add_model` moves an exported graph's initializers into the engine's shared file — deduplicated by
content, so the 13 scale graphs of a 2B engine hold one copy of its 4 GB of weights, not 13 — and saves the graph
pointing there. Nothing else is written per graph, so exporting a large model costs one weight write in total.
"""
from __future__ import annotations

import hashlib
import os

ALIGN = 64  # byte alignment of each tensor in the shared file (lets runtimes map weights directly)


class SharedWeights:
    def __init__(self, path: str):
        self.path = path
        self.file = open(path, "wb")
        self.index: dict[str, tuple[int, int]] = {}  # sha256 -> (offset, length)
        self.tensors = 0
        self.reused = 0

    def _store(self, data: bytes) -> tuple[int, int]:
        digest = hashlib.sha256(data).hexdigest()
        if digest in self.index:
            self.reused += 1
            return self.index[digest]
        offset = self.file.tell()
        pad = (-offset) % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            offset += pad
        self.file.write(data)
        self.index[digest] = (offset, len(data))
        return self.index[digest]

    def add_model(self, model, dst_model: str, inline_below: int = 1024) -> None:
        """Move an exported model's initializers (onnx_ir) into the shared file; save the graph to dst_model.

        Tensors go straight from memory into the shared file (no per-graph external-data file is written);
        an identical tensor already stored is referenced instead of written again.
        """
        import onnx_ir as ir

        base = os.path.dirname(os.path.abspath(dst_model))
        location = os.path.relpath(os.path.abspath(self.path), base)
        self.file.flush()
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or tensor.nbytes < inline_below:
                continue
            offset, length = self._store(tensor.tobytes())
            self.tensors += 1
            value.const_value = ir.ExternalTensor(location, offset, length, tensor.dtype, shape=tensor.shape,
                                                  name=value.name, base_dir=base)
        self.file.flush()
        tmp = f"{dst_model}.tmp-{os.getpid()}"
        ir.save(model, tmp)
        os.replace(tmp, dst_model)

    def close(self) -> None:
        self.file.close()

    def summary(self) -> dict:
        return {"file": os.path.basename(self.path), "bytes": os.path.getsize(self.path), "unique_tensors": len(self.index),
                "references": self.tensors, "deduplicated": self.reused}

