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

from .derived import same, stamp, unchanged


class Route:
    """A prepared forward: `run(x)` for calls matching `key` while `sources` are unchanged."""

    __slots__ = ("owner", "key", "stamps", "kernel", "run", "epoch")

    def __init__(self, module, key: tuple, kernel: str, run: Callable[[torch.Tensor], torch.Tensor]):
        self.owner = weakref.ref(module)  # which module it was prepared for (ids are reused)
        self.key, self.kernel, self.run = key, kernel, run
        self.stamps = tuple(map(stamp, _sources(module)))
        self.epoch = _EPOCH[0]


# id(module) -> its last Route. A plain dict: a WeakKeyDictionary lookup builds a weak reference on every
# call (~0.4 us, a quarter of the whole check); entries leave when their module dies (`remember`).
_ROUTES: dict[int, Route] = {}
_EPOCH = [0]  # routes prepared before the last `expire_all()` are not served


# The environment variables a choice depends on, read on every call. From CPython's encoded dict behind
# `os.environ` where it has one: `os.environ.get` of an unset name raises and catches a KeyError, ~1 us
# each, half of the whole check.
SETTINGS = ("AVQ_KERNEL", "AVQ_DENSE_CACHE_MIB")
_RAW = getattr(os.environ, "_data", None)
_KERNEL, _CACHE = map(os.environ.encodekey, SETTINGS) if isinstance(_RAW, dict) else (None, None)


def _settings() -> tuple:
    """The `SETTINGS` as written (raw values: they are only compared)."""
    if _KERNEL is not None and getattr(os.environ, "_data", None) is _RAW:
        return _RAW.get(_KERNEL), _RAW.get(_CACHE)
    return tuple(map(os.environ.get, SETTINGS))


def call_key(x: torch.Tensor) -> tuple:
    """What a route's choice depends on besides the module's tensors."""
    return (x.shape, x.dtype, x.device, torch.get_num_threads(), *_settings())


def _sources(module: torch.nn.Module) -> tuple:
    buffers, params = module._buffers, module._parameters  # not nn.Module.__getattr__: ~0.5 us each
    return buffers["codes"], params["codebooks"], params["scales"], params["bias"]


def lookup(module: torch.nn.Module, key: tuple) -> Route | None:
    """The module's route for a call with `key`, if it is still valid. On every quantized forward: kept to
    ~1 us (the FP forward of a small convolution is ~9 us)."""
    route = _ROUTES.get(id(module))
    if route is None or route.key != key or route.epoch != _EPOCH[0] or route.owner() is not module:
        return None
    codes, books, scales, bias = route.stamps
    buffers, params = module._buffers, module._parameters
    if (
        same(codes, buffers["codes"])
        and same(books, params["codebooks"])
        and same(scales, params["scales"])
        and unchanged(bias, params["bias"])
    ):
        return route
    return None


def remember(module: torch.nn.Module, key: tuple, kernel: str, run: Callable) -> Route:
    """Keep `run` (which chose `kernel`) as the module's route for calls with `key`."""
    if module not in _WATCHED:  # its entry leaves with it
        _WATCHED.add(module)
        weakref.finalize(module, _drop, id(module)).atexit = False  # nothing to drop at exit
    route = _ROUTES[id(module)] = Route(module, key, kernel, run)
    return route


_WATCHED: weakref.WeakSet = weakref.WeakSet()  # modules whose death removes their entry


def _drop(ident: int) -> None:
    route = _ROUTES.get(ident)
    if route is not None and route.owner() is None:
        del _ROUTES[ident]


def kernel_of(module: torch.nn.Module) -> str | None:
    """The kernel of the module's current route (None: no call prepared yet)."""
    route = _ROUTES.get(id(module))
    return None if route is None or route.owner() is not module else route.kernel


def expire_all() -> None:
    """Prepare every module's next call again: a choice that was limited by a shared resource (the dense
    cache's budget, when a module that held part of it dies) may now come out differently."""
    _EPOCH[0] += 1


def forget(module: torch.nn.Module | None = None) -> None:
    """Drop the route of `module` (of every module when None)."""
    if module is None:
        _ROUTES.clear()
    elif kernel_of(module) is not None:
        del _ROUTES[id(module)]
