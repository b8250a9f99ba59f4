"""Kernel dispatch for `AQLinear` / `AQConv2d` forwards.

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

Per-module derived data (an fp32 copy of the codebooks; the codes in the compiled LUT kernel's blocked
layout, 1-2 bytes per code, or without compiled kernels the int32 LUT index, 4 bytes per code, held only by
modules that ran the LUT path) is memoised by `kernels/derived.py` until a source tensor is replaced or
edited, e.g. when PV-Tuning updates codes; edits that bypass the version counter need `invalidate(module)`.

Opt-in dense cache (`AVQ_DENSE_CACHE_MIB`, `kernels/dense_cache.py`): decoded weights kept within a budget,
checked before the automatic choice; `AVQ_KERNEL` bypasses it.

Prepared forwards (`kernels/routes.py`): the choice above and the inputs of the chosen kernel are worked out
on a module's first call of a kind and kept as a route, served again while the input shape, dtype, device,
thread count and settings, and the module's codes, codebooks, scales and bias are unchanged (choosing
and gathering cost ~25 us of Python a call, which small layers cannot hide). Candidates are timed as
prepared runners: their preparation is paid once per route, not per call.

The "dequant" path decodes into one workspace per (thread, device, dtype), shared by all layers (so it
holds one dense weight, not a dense copy of the model); CUDA work on one stream is ordered, so reuse is
safe there, but layers run concurrently on several CUDA streams would need their own workspaces.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from . import autotune, compiled, conv, dense_cache, derived, fused, lut, routes
from .derived import cached

KERNELS = ("triton", "lut", "dequant", "fused")
TRITON_MAX_ROWS = 256  # GPU: above this, decode + cuBLAS (first guess; re-measure on the GPU)
LUT_MAX_ROWS = 4  # CPU: measured on 2 EPYC cores over the benchmark's shapes (see use_lut)
LUT_MAX_NBITS = 8  # B = 16 makes the LUT 256x larger than B = 8: never pays on CPU
MEASURE_MAX_ROWS = 64  # CPU: the LUT is a candidate up to here; above, the decode amortises
THREADED = "-mt"  # suffix of a measured candidate's variant on the compiled kernels' threads
THREADED_MIN_WEIGHTS = 1 << 20  # below, starting the threads (~50 us) outweighs a second core
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


def _measured(
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


# ----------------------------------------------------------------------------- derived data
def invalidate(module: torch.nn.Module | None = None) -> None:
    """Drop cached kernel data and the prepared forward of `module` (or of every module)."""
    routes.forget(module)
    derived.forget(module)


def _books_f32(module) -> torch.Tensor:
    return cached(module, "books_f32", (module.codebooks,), lambda b: b.detach().float().contiguous())


def _scales_f32(module) -> torch.Tensor:
    return cached(module, "scales_f32", (module.scales,), lambda s: s.detach().float().contiguous())


def _lut_index(module) -> torch.Tensor:
    C = module.spec.codebook_size
    return cached(module, "lut_index", (module.codes,), lambda c: lut.lut_index(c, C))


def _fused_inputs(module) -> tuple[torch.Tensor, ...]:
    """codes, fp32 codebooks, scales and bias, as `kernels/fused.py` takes them."""
    bias = None if module.bias is None else module.bias.detach().float().contiguous()
    return module.codes, _books_f32(module), _scales_f32(module), bias


def _blocked_codes(module) -> torch.Tensor:
    return cached(module, "blocked_codes", (module.codes,), compiled.blocked_codes)


# ----------------------------------------------------------------------------- workspace
_WORKSPACE = threading.local()  # per thread: {(device, dtype): (flat buffer, {(N, K): its view})}


def _workspace(N: int, K: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An `[N, K]` view of a reusable flat buffer shared by all layers (sized to the largest weight decoded
    so far).

    Fresh multi-MiB CPU allocations are page-faulted in on every call, which costs as much as decoding;
    one buffer per (thread, device, dtype) holds a single dense weight, not one per layer. The views are
    kept with their buffer (slicing and viewing cost ~3 us a call, as much as decoding a small layer).
    """
    pool = getattr(_WORKSPACE, "pool", None)
    if pool is None:
        pool = _WORKSPACE.pool = {}
    held = pool.get((device, dtype))  # (flat buffer, {(N, K): its view})
    if held is None or held[0].numel() < N * K:
        held = pool[(device, dtype)] = (torch.empty(N * K, device=device, dtype=dtype), {})
    view = held[1].get((N, K))
    if view is None:
        view = held[1][(N, K)] = held[0][: N * K].view(N, K)
    return view


def _decoder(module, dtype: torch.dtype, parallel: bool | None = None) -> Callable[[], torch.Tensor]:
    """A function returning the module's decoded `[out, K]` weight in `dtype`, in the shared workspace
    (valid until the next decode on this thread); its inputs are gathered once, here. `parallel`: the
    compiled decode's threading (`compiled.use_threads`)."""
    N, K = module.shape[0], module.codes.shape[1] * module.codebooks.shape[-1]
    codes, books, scales = module.codes, _books_f32(module), _scales_f32(module)
    device = codes.device
    kernel = compiled.decoder(codes, books, scales, parallel) if dtype == torch.float32 else None
    if kernel is None:
        return lambda: lut.dequantize(codes, books, scales, out=_workspace(N, K, device, dtype))

    def decode() -> torch.Tensor:
        out = _workspace(N, K, device, dtype)
        kernel(out)
        return out

    return decode


def dense_weight(module, dtype: torch.dtype) -> torch.Tensor:
    """Decoded `[out, K]` weight in `dtype` without autograd; bit-identical to `module._weight().to(dtype)`.

    Valid until the next call on this thread (it lives in the shared workspace).
    """
    return _decoder(module, dtype)()


# ----------------------------------------------------------------------------- forwards
# Each forward is prepared once per (module, kind of call) as a `routes.Route`; the functions below build
# the runners, `linear` / `conv2d` choose which and keep it.
def _fused_runner(
    kernel: str, module, x: torch.Tensor, parallel: bool | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`x2d [R, K] -> [R, N]` (bias added) through the fused `kernel` ("triton" or "lut"; `parallel`: the
    compiled gather-sum's threading)."""
    bias = None if module.bias is None else module.bias.detach()
    scales = module.scales.detach()
    if kernel == "triton":
        from . import triton_vqgemm  # imported lazily: CPU users never need triton

        if x.device.type != "cuda" and not triton_vqgemm.INTERPRET:
            raise RuntimeError(
                "AVQ_KERNEL=triton needs a CUDA tensor (or TRITON_INTERPRET=1 set before triton is "
                f"imported, for testing); got a {x.device.type} input"
            )
        codes, books = module.codes, _books_f32(module)
        return lambda x2d: triton_vqgemm.vq_matmul(x2d, codes, books, scales, bias)
    if x.dtype != torch.float64 and x.device.type == "cpu" and compiled.available():
        blocked, books = _blocked_codes(module), _books_f32(module)
        return lambda x2d: compiled.lut_matmul_codes(x2d, blocked, books, scales, bias, parallel)
    index = _lut_index(module)
    books = _books_f32(module) if x.dtype != torch.float64 else module.codebooks.detach().double()
    return lambda x2d: lut.lut_matmul(x2d, index, books, scales, bias)


def _linear_runner(kernel: str, module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """`AQLinear`'s forward through `kernel` (a `-mt` name: its compiled kernels threaded), its
    inputs prepared for calls like `x`."""
    K, N = module.shape[1], module.shape[0]
    kernel, parallel = split_threaded(kernel)
    if kernel == "fused":  # CPU: the native decode-GEMM, the weight never written
        run = fused.linear(x, *_fused_inputs(module), parallel)
        if run is None:
            raise ValueError(f"the fused kernel does not take this Linear call (input {tuple(x.shape)})")
        return run
    if kernel == "dequant" or (kernel == "dequant-blocked" and x.device.type != "cpu"):
        decode, bias = _decoder(module, x.dtype, parallel), module._bias(x.dtype)
        return lambda x: F.linear(x, decode(), bias)
    if kernel == "dequant-blocked":  # CPU: decode and multiply block by block (see kernels/lut.py)
        codes, books, scales = module.codes, _books_f32(module), _scales_f32(module)
        bias = None if module.bias is None else module.bias.detach()

        def blocked(x: torch.Tensor) -> torch.Tensor:
            y = lut.dequant_matmul(x.reshape(x.numel() // K, K), codes, books, scales, bias, parallel)
            return y.reshape(*x.shape[:-1], N)

        return blocked
    matmul = _fused_runner(kernel, module, x, parallel)
    return lambda x: matmul(x.reshape(x.numel() // K, K)).reshape(*x.shape[:-1], N)


def _dense_runner(module, dense: torch.Tensor, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward on the module's kept dense weight (`dense_cache.kept`)."""
    bias = module._bias(x.dtype)
    if len(module.shape) == 2:
        return lambda x: F.linear(x, dense, bias)
    weight, geometry = dense.view(module.shape), (module.stride, module.padding, module.dilation)
    return lambda x: F.conv2d(x, weight, bias, *geometry)


def linear(module, x: torch.Tensor) -> torch.Tensor:
    """Forward of `AQLinear`."""
    key = routes.call_key(x)
    if not needs_autograd(module, x) and (route := routes.lookup(module, key)) is not None:
        return route.run(x)
    forced = kernel_override()
    if needs_autograd(module, x):
        return F.linear(x, module._weight().to(x.dtype), module._bias(x.dtype))
    K, N = module.shape[1], module.shape[0]
    rows = x.numel() // K if K else 0
    if forced == "fused" and not fused.takes_linear(x, K):
        forced = "dequant"
    dense = None if forced else dense_cache.kept(module, x.dtype)
    kernel, y, run = forced, None, None
    if dense is not None:
        kernel = "dense-cached"
    elif not forced:
        kernel, y, run = _measured(
            module, x, rows, lambda: measured_key(module, x, rows), linear_candidates(module, x, rows),
            lambda k: _linear_runner(k, module, x),
        )  # fmt: skip
        if kernel is None:
            kernel = choose_linear_kernel(x.device, x.dtype, rows, module.spec, N)
    if run is None:
        run = _dense_runner(module, dense, x) if dense is not None else _linear_runner(kernel, module, x)
    routes.remember(module, key, kernel, run)
    return y if y is not None else run(x)


def _conv_runner(kernel: str, module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """`AQConv2d`'s forward through `kernel`, its inputs prepared for calls like `x`: the decoded weight
    whole ("dequant"), a block of output channels at a time ("dequant-blocked", CPU 4-d input;
    `lut.dequant_conv2d`), decoded inside the native GEMM ("fused", CPU fp32; `kernels/fused.py`), or an
    implicit GEMM through a fused kernel ("lut", "triton"); a `-mt` name: the compiled kernels threaded."""
    geometry = (module.stride, module.padding, module.dilation)
    shape = module.shape
    kernel, parallel = split_threaded(kernel)
    if kernel == "fused":  # CPU: the native decode-GEMM, the weight never written
        run = fused.conv2d(x, *_fused_inputs(module), shape, *geometry, parallel)
        if run is None:
            raise ValueError(f"the fused kernel does not take this conv call (input {tuple(x.shape)})")
        return run
    if kernel == "dequant-blocked" and x.device.type == "cpu" and x.dim() == 4:
        codes, books, scales = module.codes, _books_f32(module), _scales_f32(module)
        bias = None if module.bias is None else module.bias.detach()
        return lambda x: lut.dequant_conv2d(x, codes, books, scales, bias, shape, *geometry, parallel)
    if kernel in ("dequant", "dequant-blocked") or x.dim() != 4:  # unbatched [C, H, W]: F.conv2d
        decode, bias = _decoder(module, x.dtype, parallel), module._bias(x.dtype)
        return lambda x: F.conv2d(x, decode().view(shape), bias, *geometry)
    matmul, kernel_size = _fused_runner(kernel, module, x), module.kernel_size
    return lambda x: conv.implicit_gemm(x, matmul, kernel_size, *geometry)


def conv2d(module, x: torch.Tensor) -> torch.Tensor:
    """Forward of `AQConv2d`."""
    key = routes.call_key(x)
    if not needs_autograd(module, x) and (route := routes.lookup(module, key)) is not None:
        return route.run(x)
    forced = kernel_override()
    if needs_autograd(module, x):
        weight = module._weight().to(x.dtype)
        return F.conv2d(x, weight, module._bias(x.dtype), module.stride, module.padding, module.dilation)
    if forced == "fused" and not fused.takes_conv(x, module):
        forced = "dequant"
    dense = None if forced else dense_cache.kept(module, x.dtype)
    kernel, y, run = forced, None, None
    if dense is not None:
        kernel = "dense-cached"
    elif not forced:
        geometry = (module.kernel_size, module.stride, module.padding, module.dilation)
        rows = conv.rows_of(x, *geometry)
        if conv.choose_conv_strategy(x.device, rows, module.shape[0]) == "dequant":
            candidates = conv_candidates(module, x)
            kernel, y, run = _measured(  # CPU: measured (see conv_candidates)
                module, x, rows, lambda: conv_measured_key(module, x, rows, candidates), candidates,
                lambda k: _conv_runner(k, module, x),
            )  # fmt: skip
            kernel = kernel or "dequant"
        else:
            kernel = "triton" if x.device.type == "cuda" else "lut"
    if run is None:
        run = _dense_runner(module, dense, x) if dense is not None else _conv_runner(kernel, module, x)
    routes.remember(module, key, kernel, run)
    return y if y is not None else run(x)
