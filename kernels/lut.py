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
GEMV 2.7 ms, `aqlm`'s numba kernel 8.0 ms. The int32 index is built once per module and cached by the
dispatcher (`kernels/dispatch.py`): building it costs about as much as the GEMV.

Not used, and why: `torch.compile` of the gather-sum reads uint8 codes directly and ran 1.3 ms in
isolation, but its OpenMP worker threads then contended with torch's own (2-10x slowdowns of itself and of
the next dense matmul in the same process), so it is not robust; an fp16 LUT saved < 10% and costs
accuracy on fp32 inputs.

Compiled gather-sum (`lut_matmul_codes`, used by the dispatcher whenever numba is importable and the
compute dtype is fp32): the same blocked loop written for numba, reading the *uint8/uint16 codes* in the
blocked layout `[G/J, N, J*M]` (`blocked_codes`, 1 byte per code for B <= 8, a quarter of the int32
index's memory traffic), with M, C and J compile-time constants so the inner loop unrolls. Threads split
the *outputs* (each writes its own slice: no races; aqlm's numba kernel splits the input groups and races
on the shared output with more than one thread). Measured on the 2-core EPYC box, 4096x4096 2x8g8, one row,
one thread each: J = 1 (aqlm's loop order) 1.30 ms, J = 8 0.91 ms, aqlm's kernel 1.44 ms; the dispatcher
runs it with torch's thread count. Compiled once per (M, C, J, code dtype) in a process (~2 s).

Dequantize (`dequantize`, `dequant_matmul`): a compiled decode (`decoder` / `decode_into`, numba: each
group's codewords summed and scaled straight into the output rows, generated unrolled per (M, C, g) so that
LLVM's SLP vectoriser turns a group into vector loads, adds and a store; one thread below
`DECODE_PARALLEL_MIN` weights: in a model the parallel decode was not faster), bit-identical to
`avq.core.qweight.decode`. On the W2 `digits-unet` (74 layers, 13 M weights, one EPYC core) decoding every
layer once takes 1.1 ms compiled and 11 ms through the fallback. The
fallback (no numba, other dtypes or
devices): the same trick as the LUT with index `m*C + codes[n, j, m]` into the codebooks viewed as
`[M*C, g]`, one fused gather-sum per block of rows. It runs in blocks of output rows: a block is
cache-resident when the GEMM reads it, and no allocation exceeds glibc's mmap threshold (a fresh 64 MiB
buffer is page-faulted in on every call, which alone costs ~10 ms).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

LUT_GROUP_BLOCK = 16  # J: groups per LUT block (measured best for R <= 16 on 4096-wide layers)
NUMBA_GROUP_BLOCK = 8  # J of the compiled gather-sum (measured: 8 and 16 within noise, 1 is 40 % slower)
DEQUANT_BLOCK_BYTES = 4 << 20  # decoded fp32 rows per block of the blocked dequantize
# Sizes below which the compiled kernels run on one thread. Inside a model forward torch's OpenMP threads
# spin between ops and numba's workers compete with them for the cores: measured on 2 EPYC cores right
# after a torch GEMM, the parallel decode was never faster (0.26 M weights: 0.23 ms vs 0.11 serial; 16.8 M:
# 6.2 vs 6.1 ms, the stores bound it), nor the parallel gather-sum at [4096, 4096] one row (1.04 vs
# 0.86 ms; 0.68 vs 0.84 ms on idle threads).
# On an Intel Xeon (2 cores of a 16-core Emerald Rapids VM) the opposite held for the decode: 2 threads
# 1.8-2.9 ms vs 3.0-9.0 ms serial for 16.8 M weights. So these are only the defaults; the measured dispatch
# (`kernels/dispatch.py`) times its winner again on numba's threads (`parallel=True`) per host.
DECODE_PARALLEL_MIN = 1 << 25  # weights (larger than any SD / SDXL layer)
LUT_PARALLEL_MIN = 1 << 23  # lookups: rows x codes (one row of [4096, 4096] 2x8g8 is 4.2 M)


def use_threads(size: int, threshold: int, parallel: bool | None) -> bool:
    """Whether a compiled kernel of `size` runs on numba's threads: as `parallel` says where given (the
    measured dispatch's threaded candidates), else from `threshold` up; never when torch has one thread."""
    if torch.get_num_threads() <= 1:
        return False
    return size >= threshold if parallel is None else parallel


def group_block(groups: int, target: int = LUT_GROUP_BLOCK) -> int:
    """Largest divisor of `groups` that is <= `target` (blocks must tile the groups exactly)."""
    return max(j for j in range(1, min(target, groups) + 1) if groups % j == 0)


def lut_index(codes: torch.Tensor, codebook_size: int, block: int | None = None) -> torch.Tensor:
    """`[N, G, M]` codes -> `[G/J, N, J*M]` int32 index into the LUT viewed as `[G*M*C, R]`."""
    N, G, M = codes.shape
    if G * M * codebook_size >= 2**31:
        raise ValueError(f"LUT of {G * M * codebook_size} entries per row does not fit int32 indexing")
    J = group_block(G) if block is None else block
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


# ---------------------------------------------------------------------------------- compiled gather-sum
# numba is imported on first use, not with this module: importing it costs ~55 MiB resident and ~0.3 s,
# which `import avq` should not pay where nothing is decoded on the CPU (GPU inference, quantizing,
# loading a pipeline). `numba` is that module once `_numba()` has run (None: not installed).
numba = None
_NUMBA_TRIED = False


def _numba():
    """The numba module, imported on first call (None without numba)."""
    global numba, _NUMBA_TRIED
    if not _NUMBA_TRIED:
        _NUMBA_TRIED = True
        try:
            import numba as module
        except ImportError:  # optional: without numba the embedding_bag path serves
            return None
        # numba's own thread pool, not OpenMP: its "omp" layer shares the OpenMP runtime with torch and
        # resets torch's thread count (measured: torch.get_num_threads() 1 -> 2 after one call), which
        # changes the rounding of every later float32 GEMM and oversubscribes the cores. Set before the
        # first parallel call.
        if "NUMBA_THREADING_LAYER" not in os.environ:
            module.config.THREADING_LAYER = "workqueue"
        numba = module
    return numba


_COMPILED: dict[tuple, Callable] = {}


def numba_available() -> bool:
    return _numba() is not None


def blocked_codes(codes: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """`[N, G, M]` codes -> `[G/J, N, J*M]`, same dtype (the compiled gather-sum's layout)."""
    N, G, M = codes.shape
    J = group_block(G, NUMBA_GROUP_BLOCK) if block is None else block
    return codes.reshape(N, G // J, J * M).transpose(0, 1).contiguous()


def _gather_sum_kernel(M: int, C: int, J: int, parallel: bool = True) -> Callable:
    """The numba kernel for one (M, C, J): `lut [R, G*M*C]`, `codes [G/J, N, J*M]` -> `out [R, N]` (+=);
    `parallel=False`: the same loops on the calling thread."""
    key = (M, C, J, parallel)
    if key in _COMPILED:
        return _COMPILED[key]
    JM = J * M

    @numba.njit(parallel=parallel, fastmath=True, cache=False)
    def gather_sum(lut, codes, out):
        R = lut.shape[0]
        GB, N, _ = codes.shape
        T = numba.get_num_threads() if parallel else 1
        chunk = (N + T - 1) // T
        for t in numba.prange(T):  # each thread owns outputs lo:hi
            lo = t * chunk
            hi = min(N, lo + chunk)
            for r in range(R):
                for b in range(GB):  # one block of J groups: its M*J*C LUT entries stay in L1
                    base = b * JM * C
                    for n in range(lo, hi):
                        acc = numba.float32(0.0)
                        for k in range(JM):
                            acc += lut[r, base + k * C + codes[b, n, k]]
                        out[r, n] += acc

    _COMPILED[key] = gather_sum
    return gather_sum


def lut_matmul_codes(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    parallel: bool | None = None,
) -> torch.Tensor:
    """`x [R, K] -> [R, N]` (CPU) through the LUT and the compiled gather-sum over `codes [G/J, N, J*M]`
    from `blocked_codes`; fp32 compute, returns `x.dtype`. Needs numba. `parallel`: on numba's threads
    or not (`use_threads`; default: from `LUT_PARALLEL_MIN` lookups up)."""
    if _numba() is None:
        raise RuntimeError("lut_matmul_codes needs numba (pip install numba); use lut_matmul instead")
    R, K = x.shape
    blocks, N, per_block = codes.shape
    M, C, g = codebooks.shape
    G = K // g
    lut = (x.float().reshape(R * G, g) @ codebooks.float().reshape(M * C, g).T).reshape(R, G * M * C)
    out = torch.zeros(R, N, dtype=torch.float32)
    # Threads only where the gather outweighs starting numba's parallel region (~50 us) and the contention
    # of its workers with torch's OpenMP threads, which spin between the ops of a model's forward.
    parallel = use_threads(R * blocks * N * per_block, LUT_PARALLEL_MIN, parallel)
    if parallel:
        _numba_threads()
    _gather_sum_kernel(M, C, per_block // M, parallel)(lut.numpy(), codes.numpy(), out.numpy())
    y = out.mul_(scales.float())
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


def _decode_source(M: int, C: int, g: int) -> str:
    """Source of the decode for one (M, C, g), unrolled over the group: all `M*g` codeword loads, then the
    `g` scaled stores. Loads before stores is what lets LLVM's SLP vectoriser turn a group into a few
    vector loads, adds, a multiply and a store; a loop over the group stores element `k` before it loads
    `k + 1`, and since `out` might alias `books` nothing is vectorised (measured, [512, 4608] 2x8g8 on an
    EPYC core: 0.83 ms as a loop, 0.16 ms unrolled with SLP, bit-identical)."""
    lines = [
        "def decode(codes, books, scales, out):",
        "    N = codes.shape[0]",
        f"    G = codes.shape[1] // {M}",
        "    for n in numba.prange(N):",
        "        s = scales[n]",
        "        row = out[n]",
        "        crow = codes[n]",
        "        for j in range(G):",
        f"            o = j * {g}",
    ]
    lines += [f"            b{m} = ({m * C} + np.int64(crow[j * {M} + {m}])) * {g}" for m in range(M)]
    # summed in codebook order, as `avq.core.qweight.decode` does (no fastmath: the same roundings)
    lines += [f"            a{k} = " + " + ".join(f"books[b{m} + {k}]" for m in range(M)) for k in range(g)]
    lines += [f"            row[o + {k}] = a{k} * s" for k in range(g)]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _slp_vectorize() -> Iterator[None]:
    """numba compiles with LLVM's SLP vectoriser inside this block. It is off by default since numba #8705
    (a miscompilation elsewhere); the decode's bit-identity to `avq.core.qweight.decode` is tested for
    every spec family (tests/test_kernels.py)."""
    old = numba.config.SLP_VECTORIZE
    numba.config.SLP_VECTORIZE = 1
    try:
        yield
    finally:
        numba.config.SLP_VECTORIZE = old


def _decode_kernel(M: int, C: int, g: int, parallel: bool) -> Callable:
    """The numba decode for one (M, C, g): `codes [N, G*M]`, flat fp32 `books [M*C*g]`, fp32 `scales [N]`
    -> `out [N, G*g]` fp32, rows split across threads. The same float operations in the same order as
    `avq.core.qweight.decode` (codewords summed in codebook order, then times the scale; no fastmath), so
    bit-identical. Compiled on first use per argument types (`_compile_for`), with SLP vectorisation."""
    key = ("decode", M, C, g, parallel)
    if key in _COMPILED:
        return _COMPILED[key]
    scope = {"np": np, "numba": numba}
    exec(compile(_decode_source(M, C, g), f"<avq decode M={M} C={C} g={g}>", "exec"), scope)
    decode = numba.njit(parallel=parallel, cache=False, error_model="numpy")(scope["decode"])
    _COMPILED[key] = decode
    return decode


_SLP_COMPILED: set[tuple] = set()  # (kernel, argument layouts) compiled by `_compile_for`
_OUT_TYPE = np.empty((0, 0), np.float32)  # stands for any decode output (2-D fp32, C-contiguous) when typing


def _compile_for(kernel, *arrays: np.ndarray) -> None:
    """Compile `kernel` for these arguments' types now, with SLP vectorisation (numba would otherwise
    compile on the first call, without it). Checked on every blocked decode: `numba.typeof` of each
    argument only the first time a layout is seen."""
    layouts = (id(kernel), *((a.dtype.str, a.ndim, a.flags.c_contiguous) for a in arrays))
    if layouts in _SLP_COMPILED:
        return
    signature = tuple(numba.typeof(a) for a in arrays)
    if signature not in kernel.overloads:
        with _slp_vectorize():
            kernel.compile(signature)
    _SLP_COMPILED.add(layouts)


def _numba_threads() -> None:
    """numba's thread count follows torch's (set only on change: the call is not free)."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)


def decoder(
    codes: torch.Tensor, books: torch.Tensor, scales: torch.Tensor, parallel: bool | None = None
) -> Callable | None:
    """The compiled decode of these codes `[N, G, M]` (`books [M, C, g]` and `scales [N]` fp32, as the
    dispatcher caches them), prepared once: a function of the contiguous CPU fp32 `out [N, G*g]` that
    writes the decoded weight into it. None where it does not apply (no numba, another device or dtype).

    Preparing once matters in small layers: the checks and tensor-to-array conversions cost ~5 us a call,
    five times the compiled decode of a 16 -> 16 3x3 conv (measured on an EPYC core). `parallel`: rows
    split over numba's threads or not (`use_threads`; default: from `DECODE_PARALLEL_MIN` weights up)."""
    if codes.device.type != "cpu" or _numba() is None:
        return None
    if books.dtype != torch.float32 or scales.dtype != torch.float32:
        return None
    N, G, M = codes.shape
    _, C, g = books.shape
    parallel = use_threads(N * G * g, DECODE_PARALLEL_MIN, parallel)
    kernel = _COMPILED.get(("decode", M, C, g, parallel)) or _decode_kernel(M, C, g, parallel)
    args = (codes.reshape(N, G * M).numpy(), books.reshape(-1).numpy(), scales.numpy())
    _compile_for(kernel, *args, _OUT_TYPE)  # out: 2-D fp32, C-contiguous

    def decode(out: torch.Tensor) -> None:
        if parallel:
            _numba_threads()
        kernel(*args, out.numpy())

    return decode


def decode_into(
    codes: torch.Tensor,
    books: torch.Tensor,
    scales: torch.Tensor,
    out: torch.Tensor,
    parallel: bool | None = None,
) -> bool:
    """Decode codes `[N, G, M]` into the contiguous CPU fp32 `out [N, G*g]` with the compiled kernel
    (`decoder`); False, with nothing written, where it does not apply (no numba, another device or dtype,
    `out` not contiguous fp32 on the CPU): use `_decode_rows` then."""
    if out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous():
        return False
    decode = decoder(codes, books, scales, parallel)
    if decode is None:
        return False
    decode(out)
    return True


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
    if decode_into(codes, books, scales, out):
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
    `dequantize`; the convolutions run in `x.dtype`. `parallel`: the compiled decode on numba's threads
    or not (`use_threads`).
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
        if not decode_into(codes[lo:hi], books, scales[lo:hi], w, parallel):
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
    `parallel`: the compiled decode on numba's threads or not (`use_threads`).
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
        if w is None or not decode_into(codes[lo:hi], books, scales[lo:hi], w, parallel):
            w = _decode_rows(codes, books2d, scales, lo, hi)  # [hi-lo, K]
        y[:, lo:hi] = x @ w.to(x.dtype).T
    if bias is not None:
        y += bias.to(x.dtype)
    return y
