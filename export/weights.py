"""One external-data file for all graphs of an engine: each weight is stored once, whatever the scale count.

The exporter writes every graph with its own external data. `SharedWeights.absorb` moves a graph's external
tensors into the engine's shared file — deduplicated by content, so the 13 scale graphs of a 2B engine hold one
copy of its 4 GB of weights, not 13 — and rewrites the graph to point there.
"""
from __future__ import annotations

import hashlib
import os

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

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

    def absorb(self, src_model: str, dst_model: str) -> None:
        """Move src_model's external tensors into the shared file; write the rewritten graph to dst_model."""
        model = onnx.load(src_model, load_external_data=False)
        base = os.path.dirname(src_model)
        location = os.path.relpath(self.path, os.path.dirname(dst_model))
        for tensor in _all_tensors(model):
            if not uses_external_data(tensor):
                continue
            info = ExternalDataInfo(tensor)
            with open(os.path.join(base, info.location), "rb") as f:
                f.seek(info.offset or 0)
                data = f.read(info.length) if info.length else f.read()
            offset, length = self._store(data)
            self.tensors += 1
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        tmp = f"{dst_model}.tmp-{os.getpid()}"
        onnx.save(model, tmp)
        os.replace(tmp, dst_model)

    def close(self) -> None:
        self.file.close()

    def summary(self) -> dict:
        return {"file": os.path.basename(self.path), "bytes": os.path.getsize(self.path), "unique_tensors": len(self.index),
                "references": self.tensors, "deduplicated": self.reused}


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
