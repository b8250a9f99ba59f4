"""Which kernel serves an `AQLinear` / `AQConv2d` call: the `AVQ_KERNEL` override, the fixed rules and the
choice measured per host (`kernels/autotune.py`).

Environment variable `AVQ_KERNEL` (read at every call, so it can be flipped between calls):
    unset, ""  or "auto"  automatic choice (rule below)
    "triton"              fused Triton VQ-GEMM (`kernels/triton_vqgemm.py`); needs CUDA, or
                          `TRITON_INTERPRET=1` set before triton is first imported (tests)
    "lut"                 lookup-table GEMM (`kernels/lut.py`): on CPU the compiled gather-sum (native C
                          or numba, `kernels/compiled.py`) when one builds and the compute is fp32, else
                          plain torch
    "dequant"             decode the dense weight, then `F.linear` / `F.conv2d` (whole)
    "fused"               the native CPU decode-GEMM (`kernels/fused.py`) wherever it takes the call (fp32,
                          outputs in runs of 8), "dequant" elsewhere
Any other value raises `ValueError`. Convolutions under "triton"/"lut" run as implicit GEMMs over
unfolded input (`kernels/conv.py`).

Automatic rule, first match wins (`M_rows` = rows of the GEMM: batch*tokens, or B*Ho*Wo for convs):
1. autograd needs gradients (grad mode on and x, codebooks, scales or bias requires grad): the
   differentiable `AQModule._weight()` decode, so backward reaches codebooks and scales (fine-tuning).
   This holds even under a forced `AVQ_KERNEL`: the fused kernels have no backward.
2. CUDA and x in fp16/bf16/fp32: Linear -> "triton" if `M_rows <= TRITON_MAX_ROWS`, else "dequant"
   (decode once, then cuBLAS: at large M_rows the GEMM dominates and cuBLAS wins). Conv2d -> per
   `conv.choose_conv_strategy`.
3. CPU, measured (`kernels/autotune.py`): the first call of each (dtype, shape, spec, M_rows bucket,
   threads) on this host times the candidates and the fastest serves from then on, remembered on disk
   for later processes. Linear (`linear_candidates`): "lut" (B <= 8 and M_rows <= MEASURE_MAX_ROWS),
   "dequant" (the whole weight decoded, one GEMM), "dequant-blocked" (a block of output rows decoded and
   multiplied while cache-resident) and "fused" (fp32, M_rows >= 8, padded to a multiple of 8: the native
   decode-GEMM, below). Conv2d (`conv_candidates`): "dequant"; "dequant-blocked" where the weight spans more
   than two decode blocks (`lut.dequant_conv2d`: at low resolution the blocks beat even the FP conv, e.g.
   1280 -> 1280 3x3 at 8x8 on 2 EPYC cores: 13.5 ms vs FP 22.7 ms and 28.8 ms whole); "fused" where the
   native decode-GEMM takes the call (fp32, outputs in runs of 8; `kernels/fused.py`: the weight is
   decoded inside the multiply and never written, e.g. 256 -> 256 3x3 at 4x4 on an EPYC core: 0.29 ms vs
   FP 0.46 ms and 0.51 ms decode + conv); a conv with one candidate is not measured. With more than one
   torch thread, fp32 input and a weight of at least
   `THREADED_MIN_WEIGHTS`, the fastest candidate is then timed against itself on the compiled kernels' threads
   (`<kernel>-mt`: its compiled kernels parallel): whether a second core pays differs by host (2 Intel
   Xeon cores decode 2-3x faster than one, 2 EPYC cores were no faster inside a model while the native
   kernels ran on threads of their own, not torch's), so it is measured, not a fixed size threshold.
   The fixed rule `use_lut` (B <= 8 and M_rows == 1, or M_rows <= LUT_MAX_ROWS and
   `M_rows * M * 2^B <= out_features`) is what `choose_linear_kernel` reports where nothing is measured
   (fp64); it held on an AMD EPYC and not on an Intel Xeon.
4. Anything else (other devices, fp64 on CUDA): "dequant".
The thresholds are measured by `benchmarks/kernels.py` (CPU figures in its results file; the GPU ones
are first guesses until it runs on a GPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from collections.abc import Callable, Iterator

import torch

from . import autotune, compiled, fused, lut

KERNELS = ("triton", "lut", "dequant", "fused")
TRITON_MAX_ROWS = 256  # GPU: above this, decode + cuBLAS (first guess; re-measure on the GPU)
LUT_MAX_ROWS = 4  # CPU: measured on 2 EPYC cores over the benchmark's shapes (see use_lut)
LUT_MAX_NBITS = 8  # B = 16 makes the LUT 256x larger than B = 8: never pays on CPU
MEASURE_MAX_ROWS = 64  # CPU: the LUT is a candidate up to here; above, the decode amortises
THREADED = "-mt"  # suffix of a measured candidate's variant on the compiled kernels' threads
# Below, a second core is not timed. From 64 K the threaded decode won the isolated measurements of
# digits-unet's 3x3 convs at batch 8 (0.95 against 1.04 ms), yet its steps then ran 1.00-1.05x FP against
# 0.97-1.02x (three runs each, side by side, ad hoc): a measurement of one layer in a loop does not see
# what a parallel region costs the layers around it.
THREADED_MIN_WEIGHTS = 1 << 20
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- selection
def kernel_override() -> str | None:
    """The kernel forced by `AVQ_KERNEL`, or None for automatic; `ValueError` for unknown values."""
    value = os.environ.get("AVQ_KERNEL", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in KERNELS:
        raise ValueError(
            f"AVQ_KERNEL={os.environ['AVQ_KERNEL']!r} is not a kernel; use one of {', '.join(KERNELS)} "
            "(or leave it unset for automatic dispatch)"
        )
    return value


@contextlib.contextmanager
def forced_kernel(value: str | None) -> Iterator[None]:
    """Set `AVQ_KERNEL` to `value` (None: unset, i.e. automatic) for a block, then restore it."""
    old = os.environ.get("AVQ_KERNEL")
    if value is None:
        os.environ.pop("AVQ_KERNEL", None)
    else:
        os.environ["AVQ_KERNEL"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("AVQ_KERNEL", None)
        else:
            os.environ["AVQ_KERNEL"] = old


def needs_autograd(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """True when a backward pass through this forward is possible (then only the decode path is used)."""
    if not torch.is_grad_enabled():
        return False
    tensors = (x, module.codebooks, module.scales, module.bias)
    return any(t is not None and t.requires_grad for t in tensors)


def use_lut(rows: int, spec, out_features: int) -> bool:
    """Whether the CPU LUT GEMM beats blocked dequantize + GEMM (rule step 3; measured, e.g. 4096x4096
    2x8g8: 2.0 vs 30 ms at 1 row, 4.3 vs 9.1 ms at 4 rows, 16 vs 11 ms at 16 rows)."""
    if spec.nbits > LUT_MAX_NBITS:
        return False
    return rows == 1 or (
        rows <= LUT_MAX_ROWS and rows * spec.num_codebooks * spec.codebook_size <= out_features
    )


def choose_linear_kernel(device: torch.device, dtype: torch.dtype, rows: int, spec, out_features: int) -> str:
    """The fixed-rule choice for a Linear GEMM (rule steps 2-4; on CPU only where nothing is measured)."""
    if device.type == "cuda" and dtype in _TRITON_DTYPES:
        return "triton" if rows <= TRITON_MAX_ROWS else "dequant"
    if device.type == "cpu" and use_lut(rows, spec, out_features):
        return "lut"
    return "dequant"


# module -> {(device, dtype, row bucket, threads): measured kernel}
_CHOSEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bucket(rows: int) -> int:
    """Rows rounded up to a power of two: calls of one bucket share a measured choice."""
    return 1 << max(0, rows - 1).bit_length()


def linear_candidates(module, x: torch.Tensor, rows: int) -> tuple[str, ...]:
    """The CPU kernels timed for a Linear call of `rows` rows (rule step 3): the LUT up to
    `MEASURE_MAX_ROWS`, the decode whole and in blocks, the native decode-GEMM where it takes the call."""
    candidates = ("dequant", "dequant-blocked")
    if rows <= MEASURE_MAX_ROWS and module.spec.nbits <= LUT_MAX_NBITS:
        candidates = ("lut", *candidates)
    if fused.takes_linear(x, module.shape[1]):
        candidates += ("fused",)
    return candidates


def threadable(module, x: torch.Tensor) -> bool:
    """Whether a second thread might pay for this call's compiled kernels, so that the measured winner is
    also timed on the compiled kernels' threads (`-mt`): fp32 input (the compiled kernels' dtype), more than
    one torch thread, at least `THREADED_MIN_WEIGHTS`."""
    if x.dtype != torch.float32 or torch.get_num_threads() <= 1:
        return False
    return math.prod(module.shape) >= THREADED_MIN_WEIGHTS and compiled.available()


def split_threaded(kernel: str) -> tuple[str, bool | None]:
    """`"dequant-mt"` -> `("dequant", True)`: the kernel and its compiled kernels' threading (None: the
    default size rule of `kernels/compiled.py`)."""
    if kernel.endswith(THREADED):
        return kernel.removesuffix(THREADED), True
    return kernel, None


def measured_key(module, x: torch.Tensor, rows: int) -> str | None:
    """The autotuning key of a CPU Linear call whose kernel is measured (rule step 3), else None: rows
    are bucketed to the next power of two."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    bucket = _bucket(rows)
    N, K = module.shape[0], module.shape[1]
    return f"linear|cpu|{x.dtype}|{N}x{K}|{module.spec.name}|rows<={bucket}|threads={torch.get_num_threads()}"


def conv_candidates(module, x: torch.Tensor) -> tuple[str, ...]:
    """The CPU kernels timed for a Conv2d call (rule step 3): the whole decode, the decode in blocks where
    the weight spans more than two of them, the native decode-GEMM where it takes the call."""
    candidates = ("dequant",)
    if x.dim() == 4 and 4 * math.prod(module.shape) > 2 * lut.DEQUANT_BLOCK_BYTES:
        candidates += ("dequant-blocked",)
    if fused.takes_conv(x, module):
        candidates += ("fused",)
    return candidates


def conv_measured_key(module, x: torch.Tensor, rows: int, candidates: tuple[str, ...]) -> str | None:
    """The autotuning key of a CPU Conv2d call with more than one candidate (rule step 3), else None."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if len(candidates) < 2:
        return None
    shape, geometry = "x".join(map(str, module.shape)), f"s{module.stride}p{module.padding}d{module.dilation}"
    return (
        f"conv|cpu|{x.dtype}|{shape}|{geometry}|{module.spec.name}|rows<={_bucket(rows)}"
        f"|threads={torch.get_num_threads()}"
    )


def measured(
    module, x, rows, key_of, candidates, runner_of
) -> tuple[str | None, torch.Tensor | None, Callable | None]:
    """The measured kernel of this call and, on the call that timed the candidates, its output and its
    prepared runner.

    The module's own memo first (the disk-backed choice needs a key string and a lock on every call), then
    the host's recorded choice for `key_of()`, else the first call of its kind on this host prepares
    `runner_of(name)` for each of `candidates`, times their calls (not their preparation, which a route
    pays once) and keeps the fastest; where `threadable`, the winner is then timed against its own variant
    on the compiled kernels' threads (one more candidate, not one per kernel: the first forward of a large
    model times every layer). `(None, None, None)`: not measured (no key)."""
    memo = _CHOSEN.setdefault(module, {})
    short = (x.device.type, x.dtype, _bucket(rows), torch.get_num_threads())
    kernel = memo.get(short)
    if kernel is not None and split_threaded(kernel)[0] in candidates:  # (a bucket's calls may differ)
        return kernel, None, None
    key = key_of()
    if key is None:  # the fixed rule (exact rows), not memoised
        return None, None, None
    kernel, y, runner = autotune.chosen(key), None, None
    if split_threaded(kernel or "")[0] not in candidates:  # not measured yet on this host (or other kernels)
        runners = {k: runner_of(k) for k in candidates}
        kernel, y = autotune.measure(key, {k: (lambda r=r: r(x)) for k, r in runners.items()})
        if threadable(module, x):
            runners[kernel + THREADED] = runner_of(kernel + THREADED)
            pair = {k: (lambda r=runners[k]: r(x)) for k in (kernel, kernel + THREADED)}
            kernel, y = autotune.measure(key, pair)
        runner = runners[kernel]
    memo[short] = kernel
    return kernel, y, runner
