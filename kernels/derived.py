"""Data derived from a quantized module's tensors, kept while those tensors are unchanged.

One rule for every such memo (the dispatcher's fp32 codebooks, LUT indices and dense copies, and
`kernels/routes.py`'s prepared forwards): a source tensor is unchanged while it is the same object, at the
same data pointer (`module.to(...)` / `.half()` swap `.data` without moving the version counter) and at the
same version (in-place edits, e.g. PV-Tuning's code updates or an optimizer step, move it). Edits that bypass
the counter (`tensor.data[...] = ...`, in-place ops on inference tensors) are not seen: call
`dispatch.invalidate(module)` after those. Stamps hold weak references: a memo never keeps a replaced
tensor alive.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

Stamp = tuple | None


def stamp(t: torch.Tensor | None) -> Stamp:
    """What `unchanged` compares: the tensor (weakly), its data pointer and its version."""
    if t is None:
        return None
    return weakref.ref(t), t.data_ptr(), -1 if t.is_inference() else t._version  # inference: no counter


def same(old: tuple, t: torch.Tensor) -> bool:
    """`unchanged` for a stamp and a tensor that are both present (the prepared-forward check runs it on
    every call): once `t` is the stamped object, its inference-ness is known, so the stamp's -1 already
    says that `t` has no counter."""
    return old[0]() is t and old[1] == t.data_ptr() and (old[2] < 0 or old[2] == t._version)


def unchanged(old: Stamp, t: torch.Tensor | None) -> bool:
    """Whether `t` is still the tensor `old` stamped, unedited (None stamps None)."""
    if old is None or t is None:
        return old is None and t is None
    return same(old, t)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> {name: (stamps, value)}


def cached(module: torch.nn.Module, name: str, sources: tuple[torch.Tensor, ...], build: Callable):
    """`build(*sources)` memoised on `module` under `name`, rebuilt when any source tensor changes."""
    entries = _CACHE.setdefault(module, {})
    hit = entries.get(name)
    if hit is not None and len(hit[0]) == len(sources) and all(map(unchanged, hit[0], sources)):
        return hit[1]
    with torch.no_grad():
        value = build(*sources)
    entries[name] = (tuple(map(stamp, sources)), value)
    return value


def forget(module: torch.nn.Module | None = None) -> None:
    """Drop the memos of `module` (of every module when None)."""
    if module is None:
        _CACHE.clear()
    else:
        _CACHE.pop(module, None)
