"""Compiled CPU kernels: the LUT gather-sum over the codes and the vectorised decode.

Two backends compute the same: the native C kernels (`kernels/native.py`, built once per host with its C
compiler), else numba, else nothing (`kernels/lut.py` computes through torch). Native comes first because
numba's LLVM costs ~120 MiB resident in a process that runs a kernel (import and first call), more than
W2 saves on a small model's weights; with it numba is never imported. The numba kernels are described
below; `kernels/native.c` runs the same loops (the decode bit-identical, the gather-sum on four partial
sums) and splits rows over POSIX threads where numba uses its own pool.

Gather-sum (`lut_matmul_codes`, used by the dispatcher whenever a backend loads and the compute
dtype is fp32): the blocked loop, written for numba here, reading the *uint8/uint16 codes* in the
blocked layout `[G/J, N, J*M]` (`blocked_codes`, 1 byte per code for B <= 8, a quarter of the int32
index's memory traffic), with M, C and J compile-time constants so the inner loop unrolls. Threads split
the *outputs* (each writes its own slice: no races; aqlm's numba kernel splits the input groups and races
on the shared output with more than one thread). Measured on the 2-core EPYC box, 4096x4096 2x8g8, one row,
one thread each: J = 1 (aqlm's loop order) 1.30 ms, J = 8 0.91 ms, aqlm's kernel 1.44 ms; the dispatcher
runs it with torch's thread count. Compiled once per (M, C, J, code dtype) in a process (~2 s).

Decode (`decoder` / `decode_into`, used by `kernels/lut.py`'s `dequantize`, `dequant_matmul` and
`dequant_conv2d`): each group's codewords summed and scaled straight into the output rows, generated
unrolled per (M, C, g) so that LLVM's SLP vectoriser turns a group into vector loads, adds and a store; one
thread below `DECODE_PARALLEL_MIN` weights (in a model the parallel decode was not faster); bit-identical to
`avq.core.qweight.decode`. On the W2 `digits-unet` (74 layers, 13 M weights, one EPYC core) decoding every
layer once takes 1.1 ms compiled and 11 ms through `kernels/lut.py`'s embedding_bag fallback.

All of it is optional: without either backend (or for other dtypes and devices) `kernels/lut.py` computes
the same through torch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch

from . import native

NUMBA_GROUP_BLOCK = 8  # J of the compiled gather-sum (measured: 8 and 16 within noise, 1 is 40 % slower)
# Sizes below which the compiled kernels run on one thread. Inside a model forward torch's OpenMP threads
# spin between ops and numba's workers compete with them for the cores: measured on 2 EPYC cores right
# after a torch GEMM, the parallel decode was never faster (0.26 M weights: 0.23 ms vs 0.11 serial; 16.8 M:
# 6.2 vs 6.1 ms, the stores bound it), nor the parallel gather-sum at [4096, 4096] one row (1.04 vs
# 0.86 ms; 0.68 vs 0.84 ms on idle threads).
# On an Intel Xeon (2 cores of a 16-core Emerald Rapids VM) the opposite held for the decode: 2 threads
# 1.8-2.9 ms vs 3.0-9.0 ms serial for 16.8 M weights. So these are only the defaults; the measured dispatch
# (`kernels/choice.py`) times its winner again on numba's threads (`parallel=True`) per host.
DECODE_PARALLEL_MIN = 1 << 25  # weights (larger than any SD / SDXL layer)
LUT_PARALLEL_MIN = 1 << 23  # lookups: rows x codes (one row of [4096, 4096] 2x8g8 is 4.2 M)


def use_threads(size: int, threshold: int, parallel: bool | None) -> bool:
    """Whether a compiled kernel of `size` runs on numba's threads: as `parallel` says where given (the
    measured dispatch's threaded candidates), else from `threshold` up; never when torch has one thread."""
    if torch.get_num_threads() <= 1:
        return False
    return size >= threshold if parallel is None else parallel


def group_block(groups: int, target: int) -> int:
    """Largest divisor of `groups` that is <= `target` (blocks must tile the groups exactly)."""
    return max(j for j in range(1, min(target, groups) + 1) if groups % j == 0)


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


def backend() -> str | None:
    """The compiled kernels' backend here: "native", else "numba", else None (torch computes)."""
    if native.available():
        return "native"
    return "numba" if numba_available() else None


def available() -> bool:
    return backend() is not None


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
    from `blocked_codes`; fp32 compute, returns `x.dtype`. Needs a compiled backend (`available()`).
    `parallel`: threaded or not (`use_threads`; default: from `LUT_PARALLEL_MIN` lookups up)."""
    if not available():
        raise RuntimeError(
            "lut_matmul_codes needs the native kernels (a C compiler) or numba; use lut_matmul instead"
        )
    R, K = x.shape
    blocks, N, per_block = codes.shape
    M, C, g = codebooks.shape
    G = K // g
    lut = (x.float().reshape(R * G, g) @ codebooks.float().reshape(M * C, g).T).reshape(R, G * M * C)
    out = torch.zeros(R, N, dtype=torch.float32)
    # Threads only where the gather outweighs starting numba's parallel region (~50 us) and the contention
    # of its workers with torch's OpenMP threads, which spin between the ops of a model's forward.
    parallel = use_threads(R * blocks * N * per_block, LUT_PARALLEL_MIN, parallel)
    if not native.gather_sum(lut, codes, out, parallel):
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
    writes the decoded weight into it. None where it does not apply (no compiled backend, another device
    or dtype).

    Preparing once matters in small layers: the checks and tensor-to-array conversions cost ~5 us a call,
    five times the compiled decode of a 16 -> 16 3x3 conv (measured on an EPYC core). `parallel`: rows
    split over numba's threads or not (`use_threads`; default: from `DECODE_PARALLEL_MIN` weights up)."""
    if codes.device.type != "cpu" or books.dtype != torch.float32 or scales.dtype != torch.float32:
        return None
    N, G, M = codes.shape
    _, C, g = books.shape
    parallel = use_threads(N * G * g, DECODE_PARALLEL_MIN, parallel)
    compiled_natively = native.decoder(codes, books, scales, parallel)
    if compiled_natively is not None or _numba() is None:
        return compiled_natively
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
    (`decoder`); False, with nothing written, where it does not apply (no backend, another device or dtype,
    `out` not contiguous fp32 on the CPU): `kernels/lut.py` decodes through torch then."""
    if out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous():
        return False
    decode = decoder(codes, books, scales, parallel)
    if decode is None:
        return False
    decode(out)
    return True
