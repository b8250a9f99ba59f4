"""CPU path: a lookup-table (LUT) GEMM for few rows, and blocked dequantize (+ GEMM) for many.

LUT GEMM (`lut_matmul`). With `G = K/g` groups per row and `M` codebooks of `C = 2^B` codewords:
    y[r, n] = scales[n] * sum_{j, m} LUT[j, m, codes[n, j, m], r],  LUT[j, m, c, r] = x[r, j, :] . cb[m, c]
Building the LUT is one small GEMM (`R*K*M*C` multiply-adds, independent of N); the gather-sum then reads
one int32 index per code and never forms the `[N, K]` weight.

The gather-sum is one `F.embedding_bag(mode="sum")` call (a vectorised, multi-threaded fbgemm kernel)
over a cached int32 index in a *blocked* layout `[G/J, N, J*M]`: bag `(b, n)` sums the `J*M` LUT rows
`(j*M + m)*C + codes[n, j, m]` of group block `b`, so consecutive lookups stay inside a `J*M*C*R*4`-byte
slice of the LUT (32 KiB for 2x8 at R = 1, J = 16: L1) instead of striding over the whole LUT
(1 MiB for a 4096-wide layer); the `G/J` partial sums per output are added at the end.
Measured on 2 EPYC cores, 4096x4096 2x8g8, R = 1: flat layout 2.4 ms, blocked (J = 16) 1.7 ms, dense fp32
GEMV 2.7 ms, `aqlm`'s numba kernel 8.0 ms. The int32 index is built once per module and cached with
its weight data (`kernels/weights.py`): building it costs about as much as the GEMV.

Not used, and why: `torch.compile` of the gather-sum reads uint8 codes directly and ran 1.3 ms in
isolation, but its OpenMP worker threads then contended with torch's own (2-10x slowdowns of itself and of
the next dense matmul in the same process), so it is not robust; an fp16 LUT saved < 10% and costs
accuracy on fp32 inputs.

Compiled kernels (`kernels/compiled.py`: native C, else numba): the same gather-sum reading the uint8/uint16
codes (`lut_matmul_codes`, what the dispatcher runs whenever a compiled backend loads and the compute dtype is
fp32), and the decode that `dequantize`, `dequant_matmul` and `dequant_conv2d` use where it applies.

Dequantize (`dequantize`, `dequant_matmul`): the compiled decode where it applies; the fallback (no compiled
backend, other dtypes or devices): the same trick as the LUT with index `m*C + codes[n, j, m]` into the
codebooks viewed as `[M*C, g]`, one fused gather-sum per block of rows. It runs in blocks of output rows: a
block is cache-resident when the GEMM reads it, and no allocation exceeds glibc's mmap threshold (a fresh 64
MiB buffer is page-faulted in on every call, which alone costs ~10 ms)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import compiled

LUT_GROUP_BLOCK = 16  # J: groups per LUT block (measured best for R <= 16 on 4096-wide layers)
DEQUANT_BLOCK_BYTES = 4 << 20  # decoded fp32 rows per block of the blocked dequantize


def lut_index(codes: torch.Tensor, codebook_size: int, block: int | None = None) -> torch.Tensor:
    """`[N, G, M]` codes -> `[G/J, N, J*M]` int32 index into the LUT viewed as `[G*M*C, R]`."""
    N, G, M = codes.shape
    if G * M * codebook_size >= 2**31:
        raise ValueError(f"LUT of {G * M * codebook_size} entries per row does not fit int32 indexing")
    J = compiled.group_block(G, LUT_GROUP_BLOCK) if block is None else block
    base = torch.arange(G * M, device=codes.device, dtype=torch.int32) * codebook_size  # [G*M]
    index = codes.reshape(N, G * M).to(torch.int32) + base  # [N, G*M]
    return index.view(N, G // J, J * M).transpose(0, 1).contiguous()


def dequant_index(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """`[N, G, M]` codes -> `[N*G, M]` int32 index into the codebooks viewed as `[M*C, g]`."""
    N, G, M = codes.shape
    base = torch.arange(M, device=codes.device, dtype=torch.int32) * codebook_size  # [M]
    return (codes.reshape(N * G, M).to(torch.int32) + base).contiguous()


def build_lut(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """`x [R, K]`, `codebooks [M, C, g]` -> LUT `[G*M*C, R]` (row `(j*M + m)*C + c` = x_j . cb[m, c])."""
    R, K = x.shape
    M, C, g = codebooks.shape
    G = K // g
    # One GEMM [R*G, g] x [g, M*C]; for R = 1 the result already has the [G*M*C, 1] layout.
    lut = x.reshape(R * G, g) @ codebooks.reshape(M * C, g).T  # [R*G, M*C]
    if R == 1:
        return lut.reshape(G * M * C, 1)
    return lut.reshape(R, G * M * C).T.contiguous()  # [G*M*C, R]: each gathered row is contiguous


def lut_matmul(
    x: torch.Tensor,
    index: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x [R, K] -> [R, N]` through the LUT; `index [G/J, N, J*M]` from `lut_index`, `codebooks [M, C, g]`.

    Computes in fp32 (fp64 stays fp64) and returns `x.dtype`; `codebooks` should already be in that
    compute dtype (the dispatcher caches an fp32 copy).
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    R = x.shape[0]
    blocks, N, per_bag = index.shape
    lut = build_lut(x.to(compute), codebooks.to(compute))  # [G*M*C, R]
    partial = F.embedding_bag(index.view(blocks * N, per_bag), lut, mode="sum")  # [G/J * N, R]
    acc = partial.view(blocks, N, R).sum(0) if blocks > 1 else partial  # [N, R]
    y = acc.T * scales.to(compute)  # [R, N]
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


def _row_blocks(N: int, K: int) -> range:
    step = max(16, DEQUANT_BLOCK_BYTES // (4 * max(K, 1)))
    return range(0, N, step)


def _decode_rows(codes: torch.Tensor, books2d: torch.Tensor, scales: torch.Tensor, lo: int, hi: int):
    """Decoded fp32 rows `lo:hi` of the weight, `[hi-lo, K]` (codebooks viewed as `[M*C, g]`).

    The int32 index is rebuilt per block rather than cached: it costs ~M/g of the decode itself.
    """
    C = books2d.shape[0] // codes.shape[2]
    groups = F.embedding_bag(dequant_index(codes[lo:hi], C), books2d, mode="sum")  # [(hi-lo)*G, g]
    return groups.view(hi - lo, -1).mul_(scales[lo:hi, None])


def dequantize(
    codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Decoded weight `[N, K]` from codes `[N, G, M]`, codebooks `[M, C, g]` and scales `[N]`.

    fp32 and bit-identical to `avq.core.qweight.decode`; written into `out [N, K]` (any float dtype, e.g. a
    reused workspace) when given.
    """
    N, G, M = codes.shape
    C, g = codebooks.shape[1:]
    if out is None:
        out = torch.empty(N, G * g, device=codebooks.device, dtype=torch.float32)
    books, scales = codebooks.float().contiguous(), scales.float().contiguous()
    if compiled.decode_into(codes, books, scales, out):
        return out
    books2d = books.reshape(M * C, g)
    if out.device.type != "cpu":  # GPU: one launch; the caching allocator already reuses memory
        return out.copy_(_decode_rows(codes, books2d, scales, 0, N))
    rows = _row_blocks(N, G * g)
    for lo in rows:
        hi = min(lo + rows.step, N)
        out[lo:hi] = _decode_rows(codes, books2d, scales, lo, hi)
    return out


def dequant_conv2d(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    weight_shape: tuple[int, ...],
    stride: tuple[int, int],
    padding: tuple[int, int] | str,
    dilation: tuple[int, int],
    parallel: bool | None = None,
) -> torch.Tensor:
    """`conv2d(x, W)` (CPU) with `W [out, in, kh, kw]` decoded a block of output channels at a time
    (`_row_blocks`: ~`DEQUANT_BLOCK_BYTES` of fp32 each), each block convolved while it is cache-resident.

    The whole weight is never written to memory: at low resolution, where a large weight meets few output
    pixels, decoding 59 MB and convolving it costs more than the decode (measured on 2 EPYC cores, 1280 ->
    1280 3x3 at 8x8: FP 22.7 ms, whole decode + conv 28.8 ms, blocks 13.5 ms). Same decoded values as
    `dequantize`; the convolutions run in `x.dtype`. `parallel`: the compiled decode threaded
    or not (`compiled.use_threads`).
    """
    N, G, M = codes.shape
    C, g = codebooks.shape[1:]
    books, scales = codebooks.float().contiguous(), scales.float().contiguous()
    rows = _row_blocks(N, G * g)
    block = torch.empty(min(rows.step, N), G * g)  # [rows, K] fp32
    out = None
    for lo in rows:
        hi = min(lo + rows.step, N)
        w = block[: hi - lo]
        if not compiled.decode_into(codes[lo:hi], books, scales[lo:hi], w, parallel):
            w = _decode_rows(codes, books.reshape(M * C, g), scales, lo, hi)
        b = None if bias is None else bias[lo:hi].to(x.dtype)
        y = F.conv2d(x, w.to(x.dtype).view(hi - lo, *weight_shape[1:]), b, stride, padding, dilation)
        if out is None:  # [B, out, Ho, Wo], in the memory format F.conv2d chose for this input
            last = y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
            fmt = torch.channels_last if last else torch.contiguous_format
            out = torch.empty((y.shape[0], N, *y.shape[2:]), dtype=y.dtype, memory_format=fmt)
        out[:, lo:hi] = y
    return out


def dequant_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    parallel: bool | None = None,
) -> torch.Tensor:
    """`x [R, K] -> [R, N]`: decode a block of output rows, multiply, next block (CPU).

    The full weight is never materialised; each block is still cache-resident when the GEMM reads it.
    Same decoded values as `dequantize`; the GEMM runs in `x.dtype` (fp32 decode cast per block).
    `parallel`: the compiled decode threaded or not (`compiled.use_threads`).
    """
    N, G, M = codes.shape
    C, g = codebooks.shape[1:]
    books, scales = codebooks.float().contiguous(), scales.float().contiguous()
    books2d = books.reshape(M * C, g)
    y = torch.empty(x.shape[0], N, device=x.device, dtype=x.dtype)
    rows = _row_blocks(N, G * g)
    block = torch.empty(min(rows.step, N), G * g) if x.device.type == "cpu" else None  # [rows, K] fp32
    for lo in rows:
        hi = min(lo + rows.step, N)
        w = block[: hi - lo] if block is not None else None
        if w is None or not compiled.decode_into(codes[lo:hi], books, scales[lo:hi], w, parallel):
            w = _decode_rows(codes, books2d, scales, lo, hi)  # [hi-lo, K]
        y[:, lo:hi] = x @ w.to(x.dtype).T
    if bias is not None:
        y += bias.to(x.dtype)
    return y
