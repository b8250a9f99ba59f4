"""Prepared forwards: each quantized module's last kernel choice, ready to run again.

Choosing a kernel and gathering its inputs (the fp32 codebook copy, the workspace, the compiled decode's
arrays, the bias in the input's dtype) costs ~25 us of Python a call, as much as the whole FP forward of a
small convolution (16 -> 16 3x3 at 4x4: 9 us on an EPYC core). A denoiser calls each layer with the same
input shape at every step, so `kernels/dispatch.py` does that work once and keeps the result here as a
`Route`: a function of the input that closes over everything prepared. A later call takes it while

- the call looks the same (`call_key`: input shape, dtype and device, torch's thread count, and the
  `AVQ_KERNEL` / `AVQ_DENSE_CACHE_MIB` settings as written), and
- the module still holds the same codes, codebooks, scales and bias, unedited (`kernels/derived.py`: the
  rule the dispatcher's caches follow), and
- nothing has freed a shared resource the choice depended on since (`expire_all`: the dense cache's
  budget, when a module holding part of it dies).

Anything else goes back through the dispatcher, which prepares a new route. One route per module (the
last), so a model called at a few shapes in turn (e.g. CFG on and off) re-prepares, never grows. Edits
that bypass the version counter (`tensor.data[...] = ...`, in-place ops on inference tensors) are not
seen: `dispatch.invalidate(module)` drops the route with the caches. Routes hold prepared tensors, never
the module, so they die with it.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import torch

from .derived import stamp, unchanged


class Route:
    """A prepared forward: `run(x)` for calls matching `key` while `sources` are unchanged."""

    __slots__ = ("key", "stamps", "kernel", "run", "epoch")

    def __init__(self, key: tuple, sources: tuple, kernel: str, run: Callable[[torch.Tensor], torch.Tensor]):
        self.key, self.kernel, self.run = key, kernel, run
        self.stamps = tuple(map(stamp, sources))
        self.epoch = _EPOCH[0]


_ROUTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> its last Route
_EPOCH = [0]  # routes prepared before the last `expire_all()` are not served


def call_key(x: torch.Tensor) -> tuple:
    """What a route's choice depends on besides the module's tensors."""
    env = os.environ
    return (
        x.shape, x.dtype, x.device, torch.get_num_threads(),
        env.get("AVQ_KERNEL"), env.get("AVQ_DENSE_CACHE_MIB"),
    )  # fmt: skip


def _sources(module: torch.nn.Module) -> tuple:
    buffers, params = module._buffers, module._parameters  # not nn.Module.__getattr__: ~0.5 us each
    return buffers["codes"], params["codebooks"], params["scales"], params["bias"]


def lookup(module: torch.nn.Module, key: tuple) -> Route | None:
    """The module's route for a call with `key`, if it is still valid."""
    route = _ROUTES.get(module)
    if route is None or route.key != key or route.epoch != _EPOCH[0]:
        return None
    for old, new in zip(route.stamps, _sources(module), strict=True):
        if not unchanged(old, new):
            return None
    return route


def remember(module: torch.nn.Module, key: tuple, kernel: str, run: Callable) -> Route:
    """Keep `run` (which chose `kernel`) as the module's route for calls with `key`."""
    route = _ROUTES[module] = Route(key, _sources(module), kernel, run)
    return route


def kernel_of(module: torch.nn.Module) -> str | None:
    """The kernel of the module's current route (None: no call prepared yet)."""
    route = _ROUTES.get(module)
    return None if route is None else route.kernel


def expire_all() -> None:
    """Prepare every module's next call again: a choice that was limited by a shared resource (the dense
    cache's budget, when a module that held part of it dies) may now come out differently."""
    _EPOCH[0] += 1


def forget(module: torch.nn.Module | None = None) -> None:
    """Drop the route of `module` (of every module when None)."""
    if module is None:
        _ROUTES.clear()
    else:
        _ROUTES.pop(module, None)
