"""The native CPU kernels (`kernels/native.c`), built on first use with the host's C compiler.

Why not only numba: numba's LLVM costs ~55 MiB resident on import and ~63 MiB more on the first call of a
compiled kernel in a process, even one read from numba's disk cache; on a small model that is more than its
quantization saves (`digits-unet`: 52 MB of fp32 weights). It also compiles every kernel again in every
process (~2 s each). The C source here compiles in well under a second, once per host: the library is kept
in the user's cache folder (`$AVQ_CACHE_DIR`, else `$XDG_CACHE_HOME/avq`, else `~/.cache/avq`) under a
name hashed from the source, the compiler command, its flags and the CPU model, written atomically, and
loaded with ctypes (which releases the GIL during the call).

`library()` is None, after one logged warning, where no C compiler is found or the build fails; the
dispatcher then uses numba (`kernels/compiled.py`), and without numba torch. `AVQ_NATIVE=0` turns the
native kernels off; `CC` names the compiler (default: `cc`, else `gcc`, else `clang`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from avq.storage.atomic import write_file_atomic

from .autotune import cache_root, cpu_model

log = logging.getLogger("avq")

SOURCE = Path(__file__).with_name("native.c")
ABI = 3  # avq_native_abi() of the source above
MAX_BOOKS = 16  # native.c's MAX_BOOKS: the most codebooks its decode takes
# No -ffast-math and no contraction into FMAs: the decode must round exactly as avq.core.qweight.decode.
# No loop vectoriser (the SLP vectoriser still turns a group into vector operations): gcc 12 vectorised the
# loops over groups and outputs with emulated gathers, measured 12-15 % slower on the gather-sum at
# [4096, 4096] 2x8g8 than the same loops on scalar loads (numba's code) and up to 3x on the decode.
FLAGS = (
    "-O3",
    "-march=native",
    "-fno-tree-loop-vectorize",
    "-ffp-contract=off",
    "-fPIC",
    "-shared",
    "-pthread",
    "-std=c99",
)


def openmp_flags() -> tuple[str, ...]:
    """`-fopenmp` where torch's OpenMP runtime is a `libgomp.so.1`: the loader then gives this library the
    same runtime, so the kernels' parallel loops run on torch's own threads (native.c, parallel_range).
    Elsewhere (Intel's or LLVM's runtime, no /proc) nothing: a second runtime's threads would fight
    torch's, and POSIX threads do no worse."""
    try:
        with open("/proc/self/maps") as f:
            loaded = {line.rsplit("/", 1)[-1].strip() for line in f if "/" in line}
    except OSError:
        return ()
    gomp = any(name.startswith("libgomp.so.1") for name in loaded)
    other = any(name.startswith(("libiomp", "libomp")) for name in loaded)
    return ("-fopenmp",) if gomp and not other else ()


def flags(openmp: bool = True) -> tuple[str, ...]:
    """The compiler flags of a build: `FLAGS`, and `openmp_flags()` unless `openmp` is False."""
    return (*FLAGS, *openmp_flags()) if openmp else FLAGS


_LOCK = threading.Lock()
_LIBRARY: ctypes.CDLL | None = None
_TRIED = False

_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "avq_decode_u8": (_PTR, _PTR, _PTR, _PTR, _I64, _I64, _INT, _INT, _INT, _INT),
    "avq_decode_u16": (_PTR, _PTR, _PTR, _PTR, _I64, _I64, _INT, _INT, _INT, _INT),
    "avq_gather_sum_u8": (_PTR, _PTR, _PTR, _I64, _I64, _I64, _INT, _INT, _INT),
    "avq_gather_sum_u16": (_PTR, _PTR, _PTR, _I64, _I64, _I64, _INT, _INT, _INT),
    "avq_fused_u8": (*(_PTR,) * 9, _I64, _I64, _INT, _INT, _INT, _I64, _I64, _INT),
    "avq_fused_u16": (*(_PTR,) * 9, _I64, _I64, _INT, _INT, _INT, _I64, _I64, _INT),
    "avq_transpose_f32": (_PTR, _I64, _I64, _I64, _PTR, _I64, _I64),
}
_SUFFIX = {torch.uint8: "u8", torch.uint16: "u16"}


def compiler() -> str | None:
    """The C compiler to build with: `$CC`, else the first of cc, gcc, clang on the PATH (None: none)."""
    named = os.environ.get("CC")
    if named:
        return shutil.which(named.split()[0]) and named
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def library_path(cc: str, openmp: bool = True) -> Path:
    """Where the build for this source, compiler command and host lives (`-march=native`: the CPU model
    counts). Not the compiler's version: a build by an older compiler still runs, and asking for the version
    would start a subprocess in every process that loads the library."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cc.encode(), " ".join(flags(openmp)).encode()):
        digest.update(part)
        digest.update(b"\0")
    digest.update(cpu_model().encode())
    return cache_root() / "native" / f"avq_native-{digest.hexdigest()[:16]}.so"


def build(cc: str, path: Path, openmp: bool = True) -> Path:
    """Compile `native.c` into `path` (atomically: a concurrent process never loads half a library)."""

    def compile_into(tmp: Path) -> None:
        command = [*cc.split(), *flags(openmp), str(SOURCE), "-o", str(tmp)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}:\n{done.stderr.strip()[-2000:]}")

    return write_file_atomic(path, compile_into)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.avq_native_abi() != ABI:
        raise RuntimeError(f"{path} has ABI {lib.avq_native_abi()}, expected {ABI}")
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded native library, built on the first call of a process if this host has none yet; None
    where it is turned off (`AVQ_NATIVE=0`) or cannot be built (warned once)."""
    global _LIBRARY, _TRIED
    if _TRIED:
        return _LIBRARY
    with _LOCK:
        if _TRIED:
            return _LIBRARY
        _TRIED = True
        if os.environ.get("AVQ_NATIVE", "1") == "0":
            return None
        cc = compiler()
        if cc is None:
            log.warning("avq: no C compiler found ($CC, cc, gcc, clang): the native CPU kernels are off")
            return None
        # with OpenMP where it shares torch's runtime; a compiler without OpenMP (no omp.h) builds without
        for openmp in (True, False) if openmp_flags() else (False,):
            try:
                _LIBRARY = _load_or_build(cc, openmp)
                break
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                if not openmp:
                    log.warning("avq: the native CPU kernels are off: %s", error)
        return _LIBRARY


def _load_or_build(cc: str, openmp: bool) -> ctypes.CDLL:
    path = library_path(cc, openmp)
    try:
        return _load(path)
    except (OSError, RuntimeError):  # not built yet on this host (or a file that does not load)
        log.info("avq: building the native CPU kernels with %s into %s", cc, path)
        return _load(build(cc, path, openmp))


def available() -> bool:
    return library() is not None


def forget() -> None:
    """Load (or build) again on the next call (tests)."""
    global _LIBRARY, _TRIED
    with _LOCK:
        _LIBRARY, _TRIED = None, False


def _threads(parallel: bool) -> int:
    return max(1, torch.get_num_threads()) if parallel else 1


def decoder(codes: torch.Tensor, books: torch.Tensor, scales: torch.Tensor, parallel: bool = False):
    """The native decode of codes `[N, G, M]` (uint8/uint16; `books [M, C, g]`, `scales [N]` contiguous
    CPU fp32), prepared once: a function of the contiguous CPU fp32 `out [N, G*g]` that writes the decoded
    weight into it, bit-identical to `avq.core.qweight.decode`. None where it does not apply."""
    lib = library()
    suffix = _SUFFIX.get(codes.dtype)
    if lib is None or suffix is None or codes.device.type != "cpu" or books.shape[0] > MAX_BOOKS:
        return None
    if books.dtype != torch.float32 or scales.dtype != torch.float32:
        return None
    codes = codes.contiguous()
    books, scales = books.contiguous(), scales.contiguous()
    N, G, M = codes.shape
    _, C, g = books.shape
    kernel = getattr(lib, f"avq_decode_{suffix}")
    threads = _threads(parallel)
    pointers = (codes.data_ptr(), books.data_ptr(), scales.data_ptr())

    def decode(out: torch.Tensor) -> None:
        kernel(*pointers, out.data_ptr(), N, G, M, C, g, threads)

    # the pointers are only valid while their tensors live (`contiguous()` may have made copies): the
    # function holds them
    decode.inputs = (codes, books, scales)  # type: ignore[attr-defined]
    return decode


def gather_sum(lut: torch.Tensor, codes: torch.Tensor, out: torch.Tensor, parallel: bool = False) -> bool:
    """`out [R, N] += ` the LUT gather-sum over `codes [G/J, N, J*M]` (`compiled.blocked_codes`); `lut
    [R, G*M*C]` fp32, on the CPU. False, with nothing written, where the native kernels do not apply
    (`out` not a contiguous fp32 CPU tensor among them: the kernel writes through its pointer)."""
    lib = library()
    suffix = _SUFFIX.get(codes.dtype)
    if lib is None or suffix is None or lut.dtype != torch.float32:
        return False
    if any(t.device.type != "cpu" for t in (lut, codes, out)) or out.dtype != torch.float32:
        return False
    if not out.is_contiguous():
        return False
    lut, codes = lut.contiguous(), codes.contiguous()
    blocks, N, per_block = codes.shape
    R = lut.shape[0]
    C = lut.shape[1] // (blocks * per_block)
    kernel = getattr(lib, f"avq_gather_sum_{suffix}")
    kernel(lut.data_ptr(), codes.data_ptr(), out.data_ptr(), R, blocks, N, per_block, C, _threads(parallel))
    return True


def fused(
    codes: torch.Tensor,
    books: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    koff: torch.Tensor,
    runs: torch.Tensor,
    ostride: int,
    parallel: bool = False,
):
    """The fused decode-GEMM (`native.c`, "fused GEMM") of codes `[N, G, M]` (`books [M, C, g]`, `scales
    [N]`, `bias [N]` contiguous CPU fp32), prepared once for one input geometry: `koff [K]` int64, the
    input offset of each weight column, and `runs [2, V]` int64, each run of 8 outputs' input and output
    offsets. Returns a function `(x, out)` writing `out[vo + n*ostride + i]` from the contiguous fp32 `x`,
    or None where it does not apply."""
    lib = library()
    suffix = _SUFFIX.get(codes.dtype)
    if lib is None or suffix is None or codes.device.type != "cpu" or books.shape[0] > MAX_BOOKS:
        return None
    if any(t is not None and t.dtype != torch.float32 for t in (books, scales, bias)):
        return None
    codes, books, scales = codes.contiguous(), books.contiguous(), scales.contiguous()
    bias = None if bias is None else bias.contiguous()
    N, G, M = codes.shape
    _, C, g = books.shape
    kernel = getattr(lib, f"avq_fused_{suffix}")
    vx, vo = runs[0].contiguous(), runs[1].contiguous()
    head = (koff.data_ptr(), vx.data_ptr(), vo.data_ptr(), codes.data_ptr(), books.data_ptr())
    tail = (scales.data_ptr(), None if bias is None else bias.data_ptr())
    shape = (N, G, M, C, g, vx.numel(), ostride, _threads(parallel))

    def run(x: torch.Tensor, out: torch.Tensor) -> None:
        kernel(x.data_ptr(), *head, *tail, out.data_ptr(), *shape)

    run.inputs = (codes, books, scales, bias, koff, vx, vo)  # type: ignore[attr-defined]
    return run


def transpose(rows: int, cols: int, ld_src: int, ld_dst: int, pad_rows: int):
    """The native transpose for one shape, prepared once: a function `(src, dst)` of contiguous CPU fp32
    tensors writing `dst[c*ld_dst + r] = src[r*ld_src + c]` (r < rows, c < cols) and zeros for rows <= r <
    pad_rows; the caller guarantees the sizes (it writes through the pointers). None without the library."""
    lib = library()
    if lib is None:
        return None
    kernel = lib.avq_transpose_f32

    def run(src: torch.Tensor, dst: torch.Tensor) -> None:
        kernel(src.data_ptr(), rows, cols, ld_src, dst.data_ptr(), ld_dst, pad_rows)

    return run
