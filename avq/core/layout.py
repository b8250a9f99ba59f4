"""How a Linear or Conv2d weight is laid out as a `[out, K]` matrix of groups (docs/design.md, "Group")."""

from __future__ import annotations

import torch

from avq.core.spec import QuantSpec


def effective_group_size(shape: tuple[int, ...], spec: QuantSpec) -> int:
    """The group size that `spec` implies for a weight of `shape`, after checking that it fits.

    Kernel grouping (KAQ) makes one group of each `kh x kw` kernel, which in the flattened
    `[out, in*kh*kw]` (`F.unfold` order) layout is exactly `kh*kw` consecutive entries. 1x1 convs and
    Linear layers have no kernel to group, so they fall back to grouping along K.
    """
    if len(shape) not in (2, 4):
        raise ValueError(
            f"expected a Linear [out, in] or Conv2d [out, in, kh, kw] weight, got shape {tuple(shape)}"
        )
    K = _fan_in(shape)
    g = spec.group_size
    if spec.conv_grouping == "kernel" and len(shape) == 4 and shape[2] * shape[3] > 1:
        kernel = shape[2] * shape[3]
        if g != kernel:
            raise ValueError(
                f"kernel grouping needs group_size == kh*kw = {kernel} for weight {tuple(shape)}, got {g}"
            )
    if K % g != 0:
        raise ValueError(f"K = {K} (in*kh*kw of weight {tuple(shape)}) is not divisible by group_size {g}")
    return g


def _fan_in(shape: tuple[int, ...]) -> int:
    K = 1
    for d in shape[1:]:
        K *= int(d)
    return K


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """`[out, in(, kh, kw)]` -> `[out, K]`; for convs K is in `F.unfold` order (in, kh, kw)."""
    return weight.reshape(weight.shape[0], -1)
