"""A quantized module's weight as the CPU/GPU kernels take it: data derived from its tensors, and its
dense weight decoded into a workspace shared by all layers.

Per-module derived data (an fp32 copy of the codebooks; the codes in the compiled LUT kernel's blocked
layout, 1-2 bytes per code, or without compiled kernels the int32 LUT index, 4 bytes per code, held only by
modules that ran the LUT path) is memoised by `kernels/derived.py` until a source tensor is replaced or
edited, e.g. when PV-Tuning updates codes; edits that bypass the version counter need `invalidate(module)`.

The "dequant" path decodes into one workspace per (thread, device, dtype), shared by all layers (so it
holds one dense weight, not a dense copy of the model); CUDA work on one stream is ordered, so reuse is
safe there, but layers run concurrently on several CUDA streams would need their own workspaces.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from . import compiled, lut
from .derived import cached


def books_f32(module) -> torch.Tensor:
    return cached(module, "books_f32", (module.codebooks,), lambda b: b.detach().float().contiguous())


def scales_f32(module) -> torch.Tensor:
    return cached(module, "scales_f32", (module.scales,), lambda s: s.detach().float().contiguous())


def lut_index(module) -> torch.Tensor:
    C = module.spec.codebook_size
    return cached(module, "lut_index", (module.codes,), lambda c: lut.lut_index(c, C))


def fused_inputs(module) -> tuple[torch.Tensor, ...]:
    """codes, fp32 codebooks, scales and bias, as `kernels/fused.py` takes them."""
    bias = None if module.bias is None else module.bias.detach().float().contiguous()
    return module.codes, books_f32(module), scales_f32(module), bias


def blocked_codes(module) -> torch.Tensor:
    return cached(module, "blocked_codes", (module.codes,), compiled.blocked_codes)


# ----------------------------------------------------------------------------- the decoded weight
WORKSPACE = threading.local()  # per thread: {(device, dtype): (flat buffer, {(N, K): its view})}


def workspace(N: int, K: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An `[N, K]` view of a reusable flat buffer shared by all layers (sized to the largest weight decoded
    so far).

    Fresh multi-MiB CPU allocations are page-faulted in on every call, which costs as much as decoding;
    one buffer per (thread, device, dtype) holds a single dense weight, not one per layer. The views are
    kept with their buffer (slicing and viewing cost ~3 us a call, as much as decoding a small layer).
    """
    pool = getattr(WORKSPACE, "pool", None)
    if pool is None:
        pool = WORKSPACE.pool = {}
    held = pool.get((device, dtype))  # (flat buffer, {(N, K): its view})
    if held is None or held[0].numel() < N * K:
        held = pool[(device, dtype)] = (torch.empty(N * K, device=device, dtype=dtype), {})
    view = held[1].get((N, K))
    if view is None:
        view = held[1][(N, K)] = held[0][: N * K].view(N, K)
    return view


def decoder(module, dtype: torch.dtype, parallel: bool | None = None) -> Callable[[], torch.Tensor]:
    """A function returning the module's decoded `[out, K]` weight in `dtype`, in the shared workspace
    (valid until the next decode on this thread); its inputs are gathered once, here. `parallel`: the
    compiled decode's threading (`compiled.use_threads`)."""
    N, K = module.shape[0], module.codes.shape[1] * module.codebooks.shape[-1]
    codes, books, scales = module.codes, books_f32(module), scales_f32(module)
    device = codes.device
    kernel = compiled.decoder(codes, books, scales, parallel) if dtype == torch.float32 else None
    if kernel is None:
        return lambda: lut.dequantize(codes, books, scales, out=workspace(N, K, device, dtype))

    def decode() -> torch.Tensor:
        out = workspace(N, K, device, dtype)
        kernel(out)
        return out

    return decode


def dense_weight(module, dtype: torch.dtype) -> torch.Tensor:
    """Decoded `[out, K]` weight in `dtype` without autograd; bit-identical to `module._weight().to(dtype)`.

    Valid until the next call on this thread (it lives in the shared workspace).
    """
    return decoder(module, dtype)()
