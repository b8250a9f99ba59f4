"""The forwards of `AQLinear` / `AQConv2d`: each call's kernel (`kernels/choice.py`: the `AVQ_KERNEL`
override, the fixed rules, the choice measured per host) run on the module's weight data
(`kernels/weights.py`).

Opt-in dense cache (`AVQ_DENSE_CACHE_MIB`, `kernels/dense_cache.py`): decoded weights kept within a budget,
checked before the automatic choice; `AVQ_KERNEL` bypasses it.

Prepared forwards (`kernels/routes.py`): the kernel and its inputs are worked out
on a module's first call of a kind and kept as a route, served again while the input shape, dtype, device,
thread count and settings, and the module's codes, codebooks, scales and bias are unchanged (choosing
and gathering cost ~25 us of Python a call, which small layers cannot hide). Candidates are timed as
prepared runners: their preparation is paid once per route, not per call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import choice, compiled, conv, dense_cache, derived, fused, lut, routes, weights


def invalidate(module: torch.nn.Module | None = None) -> None:
    """Drop cached kernel data and the prepared forward of `module` (or of every module)."""
    routes.forget(module)
    derived.forget(module)


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
        codes, books = module.codes, weights.books_f32(module)
        return lambda x2d: triton_vqgemm.vq_matmul(x2d, codes, books, scales, bias)
    if x.dtype != torch.float64 and x.device.type == "cpu" and compiled.available():
        blocked, books = weights.blocked_codes(module), weights.books_f32(module)
        return lambda x2d: compiled.lut_matmul_codes(x2d, blocked, books, scales, bias, parallel)
    index = weights.lut_index(module)
    books = weights.books_f32(module) if x.dtype != torch.float64 else module.codebooks.detach().double()
    return lambda x2d: lut.lut_matmul(x2d, index, books, scales, bias)


def _linear_runner(kernel: str, module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """`AQLinear`'s forward through `kernel` (a `-mt` name: its compiled kernels threaded), its
    inputs prepared for calls like `x`."""
    K, N = module.shape[1], module.shape[0]
    kernel, parallel = choice.split_threaded(kernel)
    if kernel == "fused":  # CPU: the native decode-GEMM, the weight never written
        run = fused.linear(x, *weights.fused_inputs(module), parallel)
        if run is None:
            raise ValueError(f"the fused kernel does not take this Linear call (input {tuple(x.shape)})")
        return run
    if kernel == "dequant" or (kernel == "dequant-blocked" and x.device.type != "cpu"):
        decode, bias = weights.decoder(module, x.dtype, parallel), module._bias(x.dtype)
        return lambda x: F.linear(x, decode(), bias)
    if kernel == "dequant-blocked":  # CPU: decode and multiply block by block (see kernels/lut.py)
        codes, books, scales = module.codes, weights.books_f32(module), weights.scales_f32(module)
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
    if not choice.needs_autograd(module, x) and (route := routes.lookup(module, key)) is not None:
        return route.run(x)
    forced = choice.kernel_override()
    if choice.needs_autograd(module, x):
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
        candidates = choice.linear_candidates(module, x, rows)
        kernel, y, run = choice.measured(
            module, x, rows, lambda: choice.measured_key(module, x, rows), candidates,
            lambda k: _linear_runner(k, module, x),
        )  # fmt: skip
        if kernel is None:
            kernel = choice.choose_linear_kernel(x.device, x.dtype, rows, module.spec, N)
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
    kernel, parallel = choice.split_threaded(kernel)
    if kernel == "fused":  # CPU: the native decode-GEMM, the weight never written
        run = fused.conv2d(x, *weights.fused_inputs(module), shape, *geometry, parallel)
        if run is None:
            raise ValueError(f"the fused kernel does not take this conv call (input {tuple(x.shape)})")
        return run
    if kernel == "dequant-blocked" and x.device.type == "cpu" and x.dim() == 4:
        codes, books, scales = module.codes, weights.books_f32(module), weights.scales_f32(module)
        bias = None if module.bias is None else module.bias.detach()
        return lambda x: lut.dequant_conv2d(x, codes, books, scales, bias, shape, *geometry, parallel)
    if kernel in ("dequant", "dequant-blocked") or x.dim() != 4:  # unbatched [C, H, W]: F.conv2d
        decode, bias = weights.decoder(module, x.dtype, parallel), module._bias(x.dtype)
        return lambda x: F.conv2d(x, decode().view(shape), bias, *geometry)
    matmul, kernel_size = _fused_runner(kernel, module, x), module.kernel_size
    return lambda x: conv.implicit_gemm(x, matmul, kernel_size, *geometry)


def conv2d(module, x: torch.Tensor) -> torch.Tensor:
    """Forward of `AQConv2d`."""
    key = routes.call_key(x)
    if not choice.needs_autograd(module, x) and (route := routes.lookup(module, key)) is not None:
        return route.run(x)
    forced = choice.kernel_override()
    if choice.needs_autograd(module, x):
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
            candidates = choice.conv_candidates(module, x)
            kernel, y, run = choice.measured(  # CPU: measured (see choice.conv_candidates)
                module, x, rows, lambda: choice.conv_measured_key(module, x, rows, candidates), candidates,
                lambda k: _conv_runner(k, module, x),
            )  # fmt: skip
            kernel = kernel or "dequant"
        else:
            kernel = "triton" if x.device.type == "cuda" else "lut"
    if run is None:
        run = _dense_runner(module, dense, x) if dense is not None else _conv_runner(kernel, module, x)
    routes.remember(module, key, kernel, run)
    return y if y is not None else run(x)
