"""Ahead-of-time Triton kernels for the QDP `aot_impl` path: the engine carries PTX, no Python at runtime.

TensorRT launches an AOT plugin kernel with the arguments: input pointers (node input order), int32 scalars
("extra args", symbolic in the shapes), output pointers. A kernel for it is described by an `AotKernel`, which
sparvar/kernels provides per op through

    sparvar.kernels.aot_kernel(op: str, *, dtype: str, head_dim: int, attrs: dict, static_dims: dict) -> AotKernel

(op is the ONNX op type, dtype one of float32/float16/bfloat16, attrs the node's int attributes, static_dims each
input's dims with ints where the network fixes them and None elsewhere: a kernel may specialise on a constant input
shape, as CSLATileAttention's query tile). The kernel's parameters must come in that order, followed by its
constexprs only.

Triton 3.6 appends two hidden pointer parameters to every kernel (global and profile scratch). TensorRT does not
pass them, which is only safe when the kernel needs no scratch: `compile_aot` asserts both sizes are 0 and that
the PTX entry has exactly the expected parameters.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from plugins.spec import OpSpec

TRITON_HIDDEN_PARAMS = 2  # global_scratch, profile_scratch (Triton >= 3.3)
_POINTER = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "int32": "*i32"}


@dataclass(frozen=True)
class AotKernel:
    fn: object  # a triton.JITFunction: (inputs..., scalars..., outputs..., constexprs...)
    scalar_names: tuple[str, ...]  # the int32 parameters between the input and output pointers
    constexprs: dict = field(default_factory=dict)  # name -> value
    num_warps: int = 4
    num_stages: int = 2
    # (sizes, dims) -> values: sizes maps each I/O name of the op to its dims (ints or shape expressions), dims is a
    # plugins.spec.Dims algebra; multiplication/addition of dims use Python operators
    grid: Callable = None  # -> (gx, gy, gz)
    scalars: Callable = None  # -> values for scalar_names, in order


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    ptx: str
    shared_mem: int
    threads: int  # block size in threads (num_warps * 32)


def kernel_for(spec: OpSpec, dtype: str, head_dim: int, attrs: dict, static_dims: dict | None = None) -> AotKernel:
    """The op's AOT kernel from sparvar.kernels (raises NotImplementedError naming what is missing)."""
    try:
        from sparvar import kernels
    except ImportError as e:
        raise NotImplementedError(f"{spec.name}: no AOT kernel: sparvar.kernels cannot be imported ({e})") from e
    if not hasattr(kernels, "aot_kernel"):
        raise NotImplementedError(f"{spec.name}: sparvar.kernels has no aot_kernel(op, dtype=, head_dim=, attrs=, static_dims=); "
                                  "build with the JIT plugin (node attribute aot=0) instead")
    kernel = kernels.aot_kernel(spec.name, dtype=dtype, head_dim=head_dim, attrs=dict(attrs),
                                static_dims=dict(static_dims or {}))
    if not isinstance(kernel, AotKernel):
        raise TypeError(f"sparvar.kernels.aot_kernel returned {type(kernel).__name__}, expected plugins.aot.AotKernel")
    return kernel


def signature(spec: OpSpec, kernel: AotKernel, io_dtypes: list[str]) -> dict[str, str]:
    """Triton signature {param: type} in the TensorRT AOT argument order, checked against the kernel's parameters."""
    names = list(kernel.fn.arg_names)
    n_in, n_out = len(spec.inputs), len(spec.outputs)
    n_args = n_in + len(kernel.scalar_names) + n_out
    if len(names) != n_args + len(kernel.constexprs) or set(names[n_args:]) != set(kernel.constexprs):
        raise ValueError(f"{spec.name}: AOT kernel {kernel.fn.__name__}{tuple(names)} must take {n_in} input pointers, "
                         f"scalars {kernel.scalar_names}, {n_out} output pointers, then constexprs {sorted(kernel.constexprs)}")
    if tuple(names[n_in:n_in + len(kernel.scalar_names)]) != tuple(kernel.scalar_names):
        raise ValueError(f"{spec.name}: kernel scalars are {names[n_in:n_in + len(kernel.scalar_names)]}, "
                         f"AotKernel says {kernel.scalar_names}")
    types = ([_POINTER[d] for d in io_dtypes[:n_in]] + ["i32"] * len(kernel.scalar_names)
             + [_POINTER[d] for d in io_dtypes[n_in:]] + ["constexpr"] * len(kernel.constexprs))
    return dict(zip(names, types))


def compile_aot(spec: OpSpec, kernel: AotKernel, io_dtypes: list[str], target=None) -> CompiledKernel:
    """triton.compile to PTX (for `target`, a triton GPUTarget; None = the current device) and check the ABI."""
    import triton

    sig = signature(spec, kernel, io_dtypes)
    source = triton.compiler.ASTSource(fn=kernel.fn, signature=sig, constexprs=dict(kernel.constexprs))
    options = {"num_warps": kernel.num_warps, "num_stages": kernel.num_stages}
    compiled = triton.compile(source, target=target, options=options) if target is not None else triton.compile(source, options=options)
    meta = compiled.metadata
    for scratch in ("global_scratch_size", "profile_scratch_size"):
        size = getattr(meta, scratch, 0) or 0
        if size != 0:
            raise RuntimeError(f"{spec.name}: kernel {meta.name} needs {scratch}={size}; TensorRT AOT plugins pass no "
                               "scratch pointers, so this kernel cannot be used ahead of time")
    ptx = compiled.asm["ptx"]
    entry = re.search(r"\.entry\s+" + re.escape(meta.name) + r"\s*\((.*?)\)", ptx, re.S)
    if entry is None:
        raise RuntimeError(f"{spec.name}: no .entry {meta.name} in the compiled PTX")
    params = entry.group(1).count(".param")
    expected = len(sig) - len(kernel.constexprs) + TRITON_HIDDEN_PARAMS
    if params != expected:
        raise RuntimeError(f"{spec.name}: PTX entry {meta.name} has {params} parameters, expected {expected} "
                           f"({len(sig) - len(kernel.constexprs)} arguments + {TRITON_HIDDEN_PARAMS} Triton scratch pointers)")
    return CompiledKernel(meta.name, ptx, int(meta.shared), int(meta.num_warps) * 32)
