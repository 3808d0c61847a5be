"""The absorbed cross-attention's scores and per-head softmax in one Triton kernel (see sparvar.model.AbsorbedText).

    probs[b, m, h*L + l] = softmax over l of (scale * x[b, m] . keys[b, h, l] + bias[b, h, l])
    probs[b, m, H*L:] = 1, 0, ..., 0   (BIAS_ROWS columns: with AbsorbedText.values' last rows they add b_o)

One program takes BLOCK_M rows of x against HEADS heads' L keys each: a GEMM tile of BLOCK_M x HEADS*L over the
width C, then each head's softmax in registers, and the probabilities stored in x's dtype. The scores stay in fp32
on the SM; a cuBLAS GEMM would write them out (rounded, or 4 bytes each) for a second kernel to read. The programs
of one row tile run side by side, so x's tile is read from HBM once and then from L2, HEADS times fewer.

The reference is sparvar.model.absorbed_cross_attention; the second GEMM, probs @ values (b_o included by the bias
columns), stays in cuBLAS (`engine_absorbed_cross_attention`). Its benchmark against the unabsorbed cross-attention
is bench/cross_attention.py.
"""
from __future__ import annotations

import torch

from sparvar.kernels.csla import HAS_TRITON, LOG2E, autotuning, check_device, check_scale, launch_device, require_triton
from sparvar.model import BIAS_ROWS

if HAS_TRITON:
    import triton
    import triton.language as tl

DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # fp32: the engine's checks against an fp32 model
WIDTH_MULTIPLE = 64  # the width loop runs unmasked: every BLOCK_C divides C
MAX_TEXT = 256  # one head's L scores live in registers; absorption pays only up to ~136 positions anyway

if HAS_TRITON:

    @triton.jit
    def _absorbed_scores_kernel(X, K, Bias, P, n, C, H, L, stride_xb, stride_xm, stride_kb, stride_kh, stride_bb,
                                stride_pb, stride_pm, scale_log2e, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
                                BLOCK_C: tl.constexpr, HEADS: tl.constexpr, IEEE: tl.constexpr,
                                BIAS_COLUMNS: tl.constexpr):
        """HEADS heads per program, as one GEMM tile of HEADS * BLOCK_L columns (BLOCK_L == L where HEADS > 1, so that
        every column is a real head's position). Several heads per tile read x's tile fewer times. The first head
        group's programs also write the BIAS_COLUMNS columns after the H*L probabilities: 1, then zeros."""
        pid = tl.program_id(0)
        groups = H // HEADS
        h0 = (pid % groups) * HEADS  # head groups vary fastest: the programs sharing a row tile of x run together
        offs_m = (pid // groups) * BLOCK_M + tl.arange(0, BLOCK_M)
        b = tl.program_id(1).to(tl.int64)
        offs_n = tl.arange(0, HEADS * BLOCK_L)
        head = h0 + offs_n // BLOCK_L
        pos = offs_n % BLOCK_L
        key = head * L + pos  # the column of probs (and row of bias) of each tile column
        key_ok = pos < L
        offs_c = tl.arange(0, BLOCK_C)
        row_ok = offs_m < n
        x_ptrs = X + b * stride_xb + offs_m[:, None].to(tl.int64) * stride_xm + offs_c[None, :]
        k_rows = b * stride_kb + head.to(tl.int64) * stride_kh + pos * C  # keys (B, H, L, C), any b / h strides
        k_ptrs = K + k_rows[None, :] + offs_c[:, None]  # (BLOCK_C, HEADS * BLOCK_L)
        acc = tl.zeros((BLOCK_M, HEADS * BLOCK_L), dtype=tl.float32)
        for _ in range(0, C, BLOCK_C):
            x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            k = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(x, k, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, k, acc)
            x_ptrs += BLOCK_C
            k_ptrs += BLOCK_C
        bias = tl.load(Bias + b * stride_bb + key, mask=key_ok, other=float("-inf"))
        s = acc * scale_log2e + bias[None, :] * 1.4426950408889634  # log2 units: exp2 below
        s = tl.reshape(s, (BLOCK_M, HEADS, BLOCK_L))  # the softmax is per head
        p = tl.exp2(s - tl.max(s, 2)[:, :, None])
        p = tl.reshape(p / tl.sum(p, 2)[:, :, None], (BLOCK_M, HEADS * BLOCK_L))
        p_ptrs = P + b * stride_pb + offs_m[:, None].to(tl.int64) * stride_pm + key[None, :]
        tl.store(p_ptrs, p.to(P.dtype.element_ty), mask=row_ok[:, None] & key_ok[None, :])
        if BIAS_COLUMNS > 0:  # a constexpr branch of its own: with none, tl.arange(0, 0) is never compiled
            if h0 == 0:
                cols = tl.arange(0, BIAS_COLUMNS)
                ones = tl.where(cols == 0, 1.0, 0.0)
                c_ptrs = P + b * stride_pb + offs_m[:, None].to(tl.int64) * stride_pm + H * L + cols[None, :]
                tl.store(c_ptrs, tl.broadcast_to(ones[None, :], (BLOCK_M, BIAS_COLUMNS)).to(P.dtype.element_ty),
                         mask=row_ok[:, None])

    def _prune(configs, named_args, **kwargs):
        """The configs that suit the launch (`_fits`); never none (the last config suits every launch)."""
        a = named_args
        kept = [c for c in configs if _fits(c, a["C"], a["n"], a["H"], a["L"], kwargs["BLOCK_L"], a["X"].element_size())]
        return kept or configs[-1:]

    # (rows, width step, heads, warps, stages): whole-GEMM tiles of 128-256 columns at the large scales, one head of
    # 16-32 rows at the smallest (more programs to read the keys with)
    _CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_C": c, "HEADS": h}, num_warps=w, num_stages=s)
                for m, c, h, w, s in ((128, 64, 2, 8, 3), (128, 64, 4, 8, 3), (128, 128, 2, 8, 3), (64, 64, 4, 4, 3),
                                      (64, 128, 2, 4, 3), (64, 64, 1, 4, 3), (32, 128, 1, 4, 4), (16, 128, 1, 4, 4),
                                      (16, 64, 1, 4, 3))]  # the last suits every launch: the fallback
    _absorbed_scores_tuned = triton.autotune(configs=_CONFIGS, key=["n", "C", "H", "L", "BLOCK_L", "BIAS_COLUMNS"],
                                             prune_configs_by={"early_config_prune": _prune})(_absorbed_scores_kernel)


def _fits(c, C: int, n: int, H: int, L: int, block_l: int, element: int) -> bool:
    """A config suits a launch: the C loop unmasked (BLOCK_C divides C), whole heads per tile (HEADS divides H, and
    several only where BLOCK_L == L), shared memory for the pipelined x and key tiles under Hopper's 227 KB, 8 warps
    exactly for 128-row tiles, and no row tile far longer than the rows."""
    m, width, heads = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_C"], c.kwargs["HEADS"]
    return (C % width == 0 and H % heads == 0 and (heads == 1 or block_l == L)
            and c.num_stages * (m + heads * block_l) * width * element <= 200 * 1024
            and (c.num_warps == 8) == (m == 128) and (m <= 32 or n > 16))


# Where no tuning runs, the first of these (rows, width step, heads, warps, stages) that suits the launch (_fits):
# two heads per 64-row tile, else one; 16-row tiles at the smallest scales. The last suits every launch.
DEFAULT_CONFIGS = ((64, 128, 2, 4, 3), (64, 64, 1, 4, 3), (16, 128, 1, 4, 4), (16, 64, 1, 4, 3))


def default_config(n: int, C: int, H: int, L: int, block_l: int, element: int) -> dict:
    """The config launched where no tuning runs (interpreter, SPARVAR_TRITON_AUTOTUNE=0): see DEFAULT_CONFIGS."""
    for m, width, heads, warps, stages in DEFAULT_CONFIGS:
        config = triton.Config({"BLOCK_M": m, "BLOCK_C": width, "HEADS": heads}, num_warps=warps, num_stages=stages)
        if _fits(config, C, n, H, L, block_l, element):
            return dict(config.kwargs, num_warps=warps, num_stages=stages)
    raise AssertionError(f"no default config suits n={n}, C={C}, H={H}, L={L}")  # the last always does


def check_inputs(name: str, x, keys, bias) -> tuple[int, int, int, int, int]:
    """x (B, n, C), keys (B, H, L, C) of x's dtype (rows of C contiguous, any batch and head strides), bias (B, H, L)
    fp32 contiguous (ValueError / TypeError naming the problem). Returns B, n, C, H, L."""
    for label, t, dims in (("x", x, 3), ("keys", keys, 4), ("bias", bias, 3)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{name}: {label} must be {dims}-D, got shape {tuple(t.shape)}")
    if x.dtype not in DTYPES or keys.dtype != x.dtype:
        raise TypeError(f"{name}: x and keys must share one dtype of {DTYPES}, got {x.dtype} and {keys.dtype}")
    if bias.dtype != torch.float32:
        raise TypeError(f"{name}: bias must be float32, got {bias.dtype}")
    B, n, C = x.shape
    H, L = bias.shape[1:]
    if keys.shape != (B, H, L, C) or bias.shape[0] != B:
        raise ValueError(f"{name}: expected x (B, n, C), keys (B, H, L, C), bias (B, H, L); got x {tuple(x.shape)}, "
                         f"keys {tuple(keys.shape)}, bias {tuple(bias.shape)}")
    if n == 0 or L == 0 or H == 0:
        raise ValueError(f"{name}: empty input: x {tuple(x.shape)}, bias {tuple(bias.shape)}")
    if C % WIDTH_MULTIPLE:
        raise ValueError(f"{name}: width {C} is not a multiple of {WIDTH_MULTIPLE}")
    if L > MAX_TEXT:
        raise ValueError(f"{name}: {L} text positions per head; the kernel holds at most {MAX_TEXT} (and absorbing "
                         f"pays only while (heads - 1) * length < width: sparvar.model.absorption_pays)")
    if x.stride(2) != 1 or keys.stride()[2:] != (C, 1) or not bias.is_contiguous():
        raise ValueError(f"{name}: x must be contiguous in its last dim, keys in their (L, C) rows, bias contiguous; "
                         f"got strides x {x.stride()}, keys {keys.stride()}, bias {bias.stride()}")
    if B > 65535:
        raise ValueError(f"{name}: batch {B} exceeds the launch grid limit 65535")
    return B, n, C, H, L


def absorbed_scores(x: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor, scale: float,
                    config: dict | None = None, bias_columns: bool = True) -> torch.Tensor:
    """probs (B, n, H*L + BIAS_ROWS) in x's dtype: per head, softmax(scale * x @ keys_h^T + bias_h), then the bias
    columns 1, 0, ... that add AbsorbedText.values' b_o row in P @ values. Padding is a -inf bias; every head needs
    at least one finite one (a real text token). bias_columns=False: the (B, n, H*L) probabilities alone (the form
    bench/cross_attention.py times b_o added by torch.baddbmm with).
    config: None (autotuned on the GPU), or one launch config (BLOCK_M, BLOCK_C, HEADS, num_warps, num_stages) that
    the autotuner would keep for this shape (tests and benchmarks)."""
    name = "absorbed_scores"
    B, n, C, H, L = check_inputs(name, x, keys, bias)
    check_scale(name, scale)
    require_triton(name)
    block_l = max(16, triton.next_power_of_2(L))
    if config is not None:
        wanted = triton.Config({k: config[k] for k in ("BLOCK_M", "BLOCK_C", "HEADS")}, num_warps=config["num_warps"],
                               num_stages=config["num_stages"])
        if not _fits(wanted, C, n, H, L, block_l, x.element_size()):
            raise ValueError(f"{name}: config {config} does not suit x {tuple(x.shape)} with {H} heads of {L} positions")
    check_device(name, x, hint="use sparvar.model.absorbed_cross_attention on the CPU", keys=keys, bias=bias)
    columns = BIAS_ROWS if bias_columns else 0
    probs = torch.empty(B, n, H * L + columns, device=x.device, dtype=x.dtype)
    args = (x, keys, bias, probs, n, C, H, L, x.stride(0), x.stride(1), keys.stride(0), keys.stride(1), bias.stride(0),
            probs.stride(0), probs.stride(1), scale * LOG2E)
    with launch_device(x):
        if config is None and autotuning():
            def grid(meta):
                return (triton.cdiv(n, meta["BLOCK_M"]) * (H // meta["HEADS"]), B)

            _absorbed_scores_tuned[grid](*args, BLOCK_L=block_l, IEEE=x.dtype == torch.float32, BIAS_COLUMNS=columns)
        else:
            config = config or default_config(n, C, H, L, block_l, x.element_size())
            grid = (triton.cdiv(n, config["BLOCK_M"]) * (H // config["HEADS"]), B)
            _absorbed_scores_kernel[grid](*args, BLOCK_L=block_l, IEEE=x.dtype == torch.float32,
                                          BIAS_COLUMNS=columns, **config)
    return probs


def engine_absorbed_cross_attention(x: torch.Tensor, text) -> torch.Tensor:
    """sparvar.model.absorbed_cross_attention for the torch-cuda engine: this kernel, then cuBLAS for P @ values, b_o
    added by the bias columns (no pass over the output to fill it with b_o first, as torch.baddbmm would)."""
    return torch.bmm(absorbed_scores(x, text.keys, text.bias, text.scale), text.values)
