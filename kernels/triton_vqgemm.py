"""Triton VQ-GEMM: `y = x @ W^T * scales (+ bias)` computed straight from additive-quantization codes.

`W[n, j*g:(j+1)*g] = sum_m codebooks[m, codes[n, j, m]]` (scales applied per output column at the end).
Each program decodes its `[BLOCK_N, BLOCK_K]` weight tile from codes by pointer arithmetic into the
codebooks (a few KiB for B = 8, 1-4 MiB for B = 16: cache-resident) and feeds it to `tl.dot` with fp32
accumulation; the dense weight is never written to memory.

Group layout inside a tile: groups are padded to `GP = next_pow2(g)` lanes (`tl.arange` needs powers of
two). For g = 4, 8, 16 this is the identity; for kernel groups (g = 9, KAQ) each group occupies 16 lanes of
the K tile, lanes 9..15 are masked to zero in *both* operands (x is read through the same index map, so no
padded copy of x or of the codebooks is made; the cost is 16/9 more tensor-core work, not memory).

Two launch families share one kernel:
- large M_rows: output-stationary tiles, `SPLIT_K = 1`, stores `y` in the input dtype;
- small M_rows (<= `SMALL_ROWS`): `BLOCK_M = 16` (the `tl.dot` minimum) and split-K over a grid axis with
  fp32 `atomic_add` into a zeroed buffer, so a GEMV still fills the GPU.
Both are `triton.autotune`d over a short config list; under the Triton interpreter (`TRITON_INTERPRET=1`,
how the CPU test suite runs it) autotuning is skipped and one small config (or the caller's) is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRET: bool = bool(triton.knobs.runtime.interpret)  # read once: `triton.jit` decided at import
SMALL_ROWS = 16  # M_rows at or below which the split-K family runs
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _vqgemm_kernel(
    x_ptr,  # [R, K] activations (row stride stride_xr, unit column stride)
    codes_ptr,  # [N, G, M] uint8/uint16, contiguous
    books_ptr,  # [M, C, GS] fp32, contiguous
    scales_ptr,  # [N]
    bias_ptr,  # [N] or a dummy pointer when HAS_BIAS is False
    y_ptr,  # [R, N] (row stride stride_yr): input dtype, or fp32 when SPLIT_K > 1
    R,
    N,
    G,  # groups per row: K = G * GS
    stride_xr,
    stride_yr,
    R_BUCKET,  # autotune key only (bucketed R, so every batch size does not re-tune)
    M: tl.constexpr,
    C: tl.constexpr,
    GS: tl.constexpr,
    GP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(R, BLOCK_M)
    # Row tiles vary fastest: programs that decode the same codes tile run together and share L2.
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < R
    n_ok = offs_n < N
    kk = tl.arange(0, BLOCK_K)
    lane = kk % GP  # position of each tile column inside its (padded) group
    lane_ok = lane < GS
    BG: tl.constexpr = BLOCK_K // GP  # groups per K tile

    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xr  # [BLOCK_M] row pointers
    code_rows = codes_ptr + offs_n.to(tl.int64) * (G * M)  # [BLOCK_N] row pointers

    k_tiles = tl.cdiv(G, BG)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_begin = pid_k * per_split
    t_end = tl.minimum(t_begin + per_split, k_tiles)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_begin, t_end):
        grp = t * BG + kk // GP  # [BLOCK_K] group of each tile column
        col_ok = lane_ok & (grp < G)
        x_tile = tl.load(
            x_rows[:, None] + (grp * GS + lane)[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        w_mask = n_ok[:, None] & col_ok[None, :]
        code_ptrs = code_rows[:, None] + (grp * M)[None, :]  # [BLOCK_N, BLOCK_K]
        w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for m in tl.static_range(M):
            code = tl.load(code_ptrs + m, mask=w_mask, other=0).to(tl.int32)
            w += tl.load(books_ptr + (m * C + code) * GS + lane[None, :], mask=w_mask, other=0.0)
        a = x_tile.to(DOT_DTYPE)
        b = tl.trans(w.to(DOT_DTYPE))
        if UPCAST_DOT:  # interpreter only: operands keep their DOT_DTYPE rounding, product in fp32
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # Epilogue: per-output-column scale (linear, so it commutes with the split-K sum), bias once.
    acc = acc * tl.load(scales_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_yr + offs_n[None, :]
    y_mask = row_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)


def _config(bm: int, bn: int, bk: int, split_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k},
        num_warps=warps,
        num_stages=stages,
    )


# Short lists on purpose: tuning time is paid once per (shape, dtype) key.
_LARGE_CONFIGS = [
    _config(128, 128, 64, 1, 8, 3),
    _config(64, 128, 64, 1, 4, 3),
    _config(128, 64, 64, 1, 4, 3),
    _config(64, 64, 64, 1, 4, 4),
    _config(32, 128, 64, 1, 4, 4),
]
_SMALL_CONFIGS = [
    _config(16, 64, 128, 1, 4, 3),
    _config(16, 64, 128, 4, 4, 3),
    _config(16, 128, 64, 2, 4, 3),
    _config(16, 32, 128, 8, 4, 3),
    _config(16, 32, 64, 16, 2, 3),
]
_KEY = ["R_BUCKET", "N", "G", "M", "C", "GS"]
if INTERPRET:
    _large_kernel = _small_kernel = None
else:
    _large_kernel = triton.autotune(_LARGE_CONFIGS, key=_KEY)(_vqgemm_kernel)
    _small_kernel = triton.autotune(_SMALL_CONFIGS, key=_KEY, reset_to_zero=["y_ptr"])(_vqgemm_kernel)
# Interpreter: every program runs as numpy in Python, so fewer, larger tiles are faster; 16 is the
# smallest tile `tl.dot` accepts.
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1}


def vq_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """`x [R, K] -> y [R, N]`, `y = x @ decode(codes, codebooks, scales)^T + bias`, in `x.dtype`.

    `codes [N, K/g, M]` uint8/uint16; `codebooks [M, 2^B, g]` (any float dtype; gathered in fp32, so pass
    a cached fp32 copy to avoid a conversion per call); `scales [N]`, `bias [N]` any float dtype.
    `config` (keys `BLOCK_M`, `BLOCK_N`, `BLOCK_K`, `SPLIT_K`, optional `num_warps`, `num_stages`)
    bypasses autotuning; tests use it to force tails and split-K. fp32 inputs use IEEE fp32 `tl.dot`
    unless `torch.backends.cuda.matmul.allow_tf32` is set, mirroring `torch.matmul`.
    """
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"vq_matmul supports {[str(d) for d in SUPPORTED_DTYPES]} inputs, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"vq_matmul needs x of shape [rows, K], got {list(x.shape)}")
    if codes.dtype not in (torch.uint8, torch.uint16) or codes.dim() != 3:
        raise ValueError(f"codes must be [N, K/g, M] uint8/uint16, got {list(codes.shape)} {codes.dtype}")
    N, G, M = codes.shape
    C, GS = codebooks.shape[1], codebooks.shape[2]
    R, K = x.shape
    if K != G * GS or tuple(codebooks.shape) != (M, C, GS) or tuple(scales.shape) != (N,):
        raise ValueError(
            f"vq_matmul: x {list(x.shape)}, codes {list(codes.shape)}, codebooks "
            f"{list(codebooks.shape)}, scales {list(scales.shape)} do not fit together"
        )
    if x.stride(1) != 1:
        x = x.contiguous()
    codes, books = codes.contiguous(), codebooks.float().contiguous()
    small = R <= SMALL_ROWS
    if small or (config is not None and config.get("SPLIT_K", 1) > 1):
        y = torch.zeros(R, N, device=x.device, dtype=torch.float32)
    else:
        y = torch.empty(R, N, device=x.device, dtype=x.dtype)
    if R == 0 or N == 0:
        return y.to(x.dtype)
    # The numpy interpreter's bf16 `tl.dot` returns garbage (triton 3.9), so there bf16 operands are
    # rounded to bf16 and multiplied in fp32; CUDA always uses the native bf16 dot.
    upcast = INTERPRET and x.dtype == torch.bfloat16
    fp32_precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    bias_arg = bias if bias is not None else scales  # any valid pointer; unused when HAS_BIAS is False
    args = (x, codes, books, scales, bias_arg, y, R, N, G, x.stride(0), y.stride(0))
    meta = {
        "M": M,
        "C": C,
        "GS": GS,
        "GP": triton.next_power_of_2(GS),
        "HAS_BIAS": bias is not None,
        "DOT_DTYPE": _TL_DTYPE[x.dtype],
        "INPUT_PRECISION": fp32_precision if x.dtype == torch.float32 or upcast else "tf32",
        "UPCAST_DOT": upcast,
    }
    r_bucket = min(triton.next_power_of_2(R), 4096)
    if config is None and INTERPRET:
        config = _INTERPRET_CONFIG
    if config is not None:
        meta.update(config)
        grid = (triton.cdiv(R, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])
        _vqgemm_kernel[grid](*args, r_bucket, **meta)
    else:

        def grid(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(R, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

        kernel = _small_kernel if small else _large_kernel
        kernel[grid](*args, r_bucket, **meta)
    return y if y.dtype == x.dtype else y.to(x.dtype)
