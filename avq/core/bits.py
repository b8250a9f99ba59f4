"""Bit accounting: the one place that says how many bits a stored weight costs (docs/design.md, "Total bits").

Codes are stored at `B` bits each (packed in the smallest unsigned dtype on disk, counted at `B`);
codebooks, scales and zero points in fp16; a layer kept in full precision counts `FP16_BITS` per weight.
"""

from __future__ import annotations

import math

from avq.core.spec import QuantSpec, UniformSpec

FP16_BITS = 16


def storage_bits(
    shape: tuple[int, ...], representation: QuantSpec | UniformSpec | int, group_size: int | None = None
) -> int:
    """Bits stored for a Linear `[out, in]` or Conv2d `[out, in, kh, kw]` weight.

    `representation`: a `QuantSpec` (AQ: `out * K/g * M` codes of `B` bits, `M * 2^B * g` fp16 codewords,
    one fp16 scale per row) or an int bit width (uniform: `out * K` codes, one fp16 scale and zero per row,
    or with `group_size` per `ceil(K / group_size)` groups of each row; a `UniformSpec` holds both).
    """
    out, K = int(shape[0]), math.prod(int(d) for d in shape[1:])
    if isinstance(representation, QuantSpec):
        spec = representation
        codes = out * (K // spec.group_size) * spec.num_codebooks * spec.nbits
        return codes + (spec.num_codebooks * spec.codebook_size * spec.group_size + out) * FP16_BITS
    if isinstance(representation, UniformSpec):
        representation, group_size = representation.bits, representation.group_size
    bits = int(representation)
    groups = 1 if group_size is None else -(-K // int(group_size))
    return out * K * bits + 2 * out * groups * FP16_BITS


def total_bits(
    shape: tuple[int, ...], representation: QuantSpec | UniformSpec | int, group_size: int | None = None
) -> float:
    """Total bits per weight: everything stored (`storage_bits`) over the number of weights."""
    weights = int(shape[0]) * math.prod(int(d) for d in shape[1:])
    return storage_bits(shape, representation, group_size) / weights
