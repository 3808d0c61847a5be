"""The CSLA kernel's variants side by side in one process, on the engine's own layouts and tensor layouts.

For each model's sparse scales at 1024² (B=2 for CFG, bf16; the policy's CSLA block, sinks and windows), with q as
the token-major projection view and K/V as views of a preallocated (B, H, T, D) cache, as the torch-cuda engine
runs them:
  - each of sparvar.kernels.csla.CSLA_VARIANTS with its fixed launch config: "pointer" (the default kernel), and
    whatever experimental form is put beside it there (earlier ones, measured with this script and removed: tensor
    descriptors with and without warp specialisation, key tiles read in halves);
  - the autotuned kernel as the engine runs it, with the config it picked.
Every row is checked against the fp32 masked reference on two heads before it is timed (a row off by more than
the GPU tests' tolerance is recorded as an error, untimed, and left out of the ratios); timing and flops as in
bench/attention.py (CUDA events with an L2-evicting write before each call, and a CUDA-graph replay).

`--compile-only` needs no GPU: it compiles the autotuner's configs for sm_90 on this machine, specialised as a
launch on the engine's tensors is, and records what the compiler made of each (registers from ptxas, shared
memory, warps, whether the loads are asynchronous copies): the static side of the comparison, for choosing what to
time.

    PYTHONPATH=. python bench/csla_variants.py                  # bench/results/csla_variants_<h100|h200|...>.json
    PYTHONPATH=. python bench/csla_variants.py --compile-only   # bench/results/csla_variants_sm90_compile.json
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.attention import MODELS, Bench, csla_computed_pairs, max_abs_err  # noqa: E402
from bench.common import device_tag, write_result  # noqa: E402


TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}  # max abs error against the fp32 reference, as the GPU tests
AUTOTUNED = "CSLA autotuned (the engine's kernel)"  # the row every ratio is over


def compile_for_sm90(constexprs: dict, num_warps: int, num_stages: int, dtype: str = "bf16"):
    """triton.compile of the CSLA kernel for sm_90 on any machine, specialised as Triton's JIT specialises a launch
    on torch tensors: pointers 16-byte aligned, strides multiples of 16, the lengths not."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    from sparvar.kernels.csla import _csla_fwd_kernel

    names = _csla_fwd_kernel.arg_names
    pointers = {"Q": dtype, "K": dtype, "V": dtype, "Out": dtype, "Lse": "fp32", "PartialMasks": "u8",
                "KVNumBlocks": "i32", "KVIndices": "i32", "QOrder": "i32", "NumFull": "i32", "PartialIndex": "i32",
                "KVLens": "i32"}
    params = {p.name: p for p in _csla_fwd_kernel.params}
    given = dict(constexprs)
    for name, p in params.items():  # every constexpr is compiled as one: a default where the caller gave none
        if p.is_constexpr and name not in given:
            if p.default is inspect.Parameter.empty:
                raise ValueError(f"compile_for_sm90: constexpr {name} has no value and no default")
            given[name] = p.default
    unknown = set(given) - {n for n, p in params.items() if p.is_constexpr}
    if unknown:
        raise ValueError(f"compile_for_sm90: {sorted(unknown)} are not constexprs of the kernel")
    constexprs = given
    signature = {n: "constexpr" if n in constexprs else "*" + pointers[n] if n in pointers
                 else "fp32" if n == "qk_scale" else "i32" for n in names}
    aligned = [i for i, n in enumerate(names) if signature[n].startswith("*") or n.startswith("stride")]
    source = ASTSource(fn=_csla_fwd_kernel, signature=signature, constexprs=constexprs,
                       attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton_compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))


def ptxas_registers(ptx: str) -> dict:
    """Registers and spills of a PTX for sm_90a, from Triton's own ptxas (-v)."""
    import subprocess
    import tempfile

    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([knobs.nvidia.ptxas.path, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_bytes=int(spills.group(1)) + int(spills.group(2)) if spills else None)


def compile_stats(tiles=((64, 64), (128, 64)), head_dims=(128, 64)) -> list[dict]:
    """Every config the CSLA autotuner keeps for the engines' tiles, compiled for sm_90."""
    from sparvar.kernels import csla as C

    rows = []
    for block_m, block_n in tiles:
        for head_dim in head_dims:
            for config in C._prune_by_tile(C._CSLA_CONFIGS, {}, BLOCK_M=block_m, BLOCK_N=block_n):
                constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, DENSE=False, EVEN_N=False,
                                  USE_ORDER=True, STORE_LSE=False, TOKEN=False, ROW_LEN=False, CLAMP_LAYOUT=False)
                constexprs.update(config.kwargs)
                compiled = compile_for_sm90(constexprs, config.num_warps, config.num_stages)
                ptx = compiled.asm["ptx"]
                rows.append(dict(variant="pointer", block=f"{block_m}x{block_n}", head_dim=head_dim,
                                 num_warps=config.num_warps, num_stages=config.num_stages,
                                 warps_launched=compiled.metadata.num_warps, shared_bytes=compiled.metadata.shared,
                                 ctas_per_sm_by_shared=232448 // max(compiled.metadata.shared, 1),
                                 async_copies="cp.async.cg" in ptx, **ptxas_registers(ptx)))
                regs = rows[-1]["registers"]  # the launch's register count bounds the CTAs an SM holds, too
                per_thread = -(-regs // 8) * 8 if regs else None  # allocated in units of 8 per thread
                rows[-1]["ctas_per_sm_by_registers"] = (65536 // (compiled.metadata.num_warps * 32 * per_thread)
                                                        if regs else None)
    return rows


def run(models: list[str], runs: int, warmup: int, partial_path: str | None = None, resolution: int = 1024,
        device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> dict:
    """The rows (resolution, device and dtype other than the defaults: a CPU dry run under TRITON_INTERPRET=1)."""
    from sparvar.attention import reference_attention
    from sparvar.kernels import csla as C
    from sparvar.schedule import get_schedule
    from sparvar.sparse import default_policy

    bench = Bench(runs, warmup, partial_path)
    batch, tuned = 2, {}
    for model in models:
        heads, head_dim = MODELS[model]
        schedule = get_schedule(resolution, model=model)
        policy = default_policy(model, schedule)
        torch.manual_seed(0)
        total = schedule.kv_len(schedule.num_scales - 1)
        cache_k, cache_v = (torch.randn(batch, heads, total, head_dim, device=device, dtype=dtype) for _ in range(2))
        for scale in policy.sparse_scales:
            layout = policy.csla_layout(schedule, scale).to(device)
            if layout.granularity != "block":
                continue  # the variants take block-granular layouts
            q_len, kv_len = layout.q_len, layout.kv_len
            q = (torch.randn(batch, q_len, heads, head_dim, device=device, dtype=dtype) * head_dim**-0.5).transpose(1, 2)
            k, v = cache_k[:, :, :kv_len], cache_v[:, :, :kv_len]
            order = C.query_block_order(layout.kv_num_blocks)
            blocks = (layout.block_m, layout.block_n)
            info = dict(block=f"{blocks[0]}x{blocks[1]}", block_density=layout.density, q_len=q_len, kv_len=kv_len,
                        heads=heads, head_dim=head_dim, batch=batch)
            flops_dense = 4 * batch * heads * q_len * kv_len * head_dim
            flops_computed = 4 * batch * heads * csla_computed_pairs(layout) * head_dim
            ref = reference_attention(q[:1, :2], k[:1, :2], v[:1, :2], mask=layout.to_dense())

            def check(fn):
                def checked():  # a row off the reference is recorded as an error and not timed (Bench.add)
                    err = max_abs_err(fn()[:1, :2], ref)
                    if not err <= TOLERANCE[dtype]:  # NaN fails too
                        raise AssertionError(f"max abs error {err} against the fp32 reference > {TOLERANCE[dtype]}")
                    return dict(max_abs_err=err)
                return checked

            for variant in C.CSLA_VARIANTS:
                fn = (lambda variant=variant: C.csla_attention_blocks(  # noqa: E731
                    q, k, v, layout.kv_num_blocks, layout.kv_indices, *blocks, q_order=order, variant=variant))
                bench.add(model, f"CSLA {variant} (fixed config)", scale, fn, flops_dense=flops_dense,
                          flops_computed=flops_computed, check=check(fn), **info)
            C._csla_fwd_tuned.cache.clear()  # tuned for this row: the key holds neither heads nor batch
            fn = lambda: C.csla_attention(q, k, v, layout)  # noqa: E731
            bench.add(model, AUTOTUNED, scale, fn, flops_dense=flops_dense, flops_computed=flops_computed,
                      check=check(fn), **info)
            tuned[f"{model} s{scale}"] = C.tuned_config("csla")
        del cache_k, cache_v
        if device == "cuda":
            torch.cuda.empty_cache()
    return dict(rows=bench.rows, tuned_configs=tuned)


def ratios(rows: list[dict], key: str = "graph_median_ms") -> dict:
    """Per (model, scale): each row's speed-up over the autotuned kernel (the engine's CSLA)."""
    out = {}
    for r in rows:
        if key not in r:
            continue
        base = next((b[key] for b in rows if b["model"] == r["model"] and b["scale"] == r["scale"]
                     and b["name"] == AUTOTUNED and key in b), None)
        if base:
            out.setdefault(f"{r['model']} s{r['scale']}", {})[r["name"]] = base / r[key]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default=None, help="default: bench/results/csla_variants_<device>.json")
    parser.add_argument("--compile-only", action="store_true", help="compile for sm_90 here (no GPU) and record stats")
    args = parser.parse_args(argv)
    if args.compile_only:
        import triton

        out = args.out or os.path.join(ROOT, "bench", "results", "csla_variants_sm90_compile.json")
        rows = compile_stats()
        path = write_result(out, dict(benchmark="CSLA kernel configs compiled for sm_90 (no GPU run)",
                                      triton=triton.__version__, note="ctas_per_sm_by_shared: 227 KiB / shared_bytes; ctas_per_sm_by_registers: 64 Ki / (threads x registers rounded up to 8)",
                                      rows=rows))
        for r in rows:
            print({k: v for k, v in r.items()})
        print(f"wrote {path}")
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench/csla_variants.py needs a CUDA GPU")
    out = args.out or os.path.join(ROOT, "bench", "results", f"csla_variants_{device_tag()}.json")
    partial = os.path.splitext(out)[0] + "_partial.json"
    result = run(args.models, args.runs, args.warmup, partial)
    result = dict(protocol=dict(runs=args.runs, warmup=args.warmup, dtype="bfloat16", batch=2,
                                timing="as bench/attention.py; ratios over the autotuned kernel, CUDA-graph medians"),
                  **result, ratios=ratios(result["rows"]), ratios_eager=ratios(result["rows"], "median_ms"))
    path = write_result(out, result)
    if os.path.exists(partial):
        os.remove(partial)
    print(f"wrote {path}")
    for where, table in result["ratios"].items():
        print(where, {k: round(v, 3) for k, v in table.items()})


if __name__ == "__main__":
    main()
