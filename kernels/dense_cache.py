"""Opt-in dense cache (`AVQ_DENSE_CACHE_MIB`, default 0): quantized modules keep their decoded weight across
calls while all kept weights fit that many MiB (first come, first served), and run `F.linear` / `F.conv2d`
on it: the dense model's speed for that much memory. The dispatcher checks it before its automatic choice;
`AVQ_KERNEL` bypasses it. When a module holding part of the budget dies, its bytes are returned and every
prepared forward is re-prepared (`routes.expire_all`), so the room can go to a module that had to decode.
"""

from __future__ import annotations

import os
import weakref

import torch

from . import lut, routes
from .derived import cached

HELD = [0]  # bytes of decoded weights counted for live modules
OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> {dtype: bytes counted}


def budget() -> int:
    """Bytes of decoded weights the user lets AQ modules keep (`AVQ_DENSE_CACHE_MIB`; default 0: none)."""
    value = os.environ.get("AVQ_DENSE_CACHE_MIB", "").strip()
    if not value:
        return 0
    try:
        mib = float(value)
    except ValueError:
        raise ValueError(f"AVQ_DENSE_CACHE_MIB={value!r} is not a number of MiB") from None
    if mib < 0:
        raise ValueError(f"AVQ_DENSE_CACHE_MIB must be >= 0, got {value!r}")
    return int(mib * 2**20)


def kept(module, dtype: torch.dtype) -> torch.Tensor | None:
    """The module's decoded `[out, K]` weight kept across calls (rebuilt when codes, codebooks or scales
    change), while all modules' kept weights fit `budget()`; None when it does not fit."""
    owned = OWNERS.get(module)
    if owned is None or dtype not in owned:
        need = module.shape[0] * module.codes.shape[1] * module.codebooks.shape[-1] * dtype.itemsize
        if HELD[0] + need > budget():
            return None
        if owned is None:
            owned = OWNERS[module] = {}
            weakref.finalize(module, _release, owned)  # counted bytes are returned when the module dies
        owned[dtype] = need
        HELD[0] += need

    def decode(codes, books, scales) -> torch.Tensor:
        return lut.dequantize(codes, books.float(), scales.float()).to(dtype)

    return cached(module, f"dense_{dtype}", (module.codes, module.codebooks, module.scales), decode)


def _release(owned: dict) -> None:
    HELD[0] -= sum(owned.values())
    routes.expire_all()  # the freed room may now go to a module that had to decode
