"""`QuantizedWeight`: what one additively quantized layer stores, and how it decodes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from avq.core.bits import storage_bits
from avq.core.layout import effective_group_size
from avq.core.spec import QuantSpec


def code_dtype(nbits: int) -> torch.dtype:
    """Smallest unsigned integer dtype that holds `nbits`-bit codes."""
    if nbits <= 8:
        return torch.uint8
    if nbits <= 16:
        return torch.uint16
    raise ValueError(f"codes of {nbits} bits are not supported (max 16)")


class StoredWeight:
    """What every stored quantized weight shares: the `[out, K]` view of `shape`, bit accounting, checks.

    Subclasses are dataclasses with a `shape` field, tensor fields named in `_tensors`, and
    `storage_bits` (everything stored, in bits).
    """

    shape: tuple[int, ...]
    _tensors: tuple[str, ...] = ()

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        """K: the fan-in of the `[out, K]` matrix view."""
        return math.prod(self.shape[1:])

    @property
    def num_weights(self) -> int:
        return self.out_features * self.in_features

    @property
    def storage_bits(self) -> int:
        raise NotImplementedError

    @property
    def total_bits(self) -> float:
        """Bits per weight with everything stored counted (docs/design.md, "Total bits")."""
        return self.storage_bits / self.num_weights

    def to(self, device: torch.device | str):
        return replace(self, **{name: getattr(self, name).to(device) for name in self._tensors})

    def _check_tensors(self, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        """Raise naming the first tensor whose type, shape, dtype or finiteness is not as `expected`."""
        owner = type(self).__name__
        for name, (shape, dtype) in expected.items():
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{owner}.{name} must be a tensor, got {type(tensor).__name__}")
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{owner}.{name} has shape {list(tensor.shape)}, expected {list(shape)}")
            if tensor.dtype != dtype:
                raise ValueError(f"{owner}.{name} has dtype {tensor.dtype}, expected {dtype}")
        for name, (_, dtype) in expected.items():
            if dtype.is_floating_point and not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"{owner}.{name} contains NaN or inf")

    def _check_code_range(self, codes: torch.Tensor, nbits: int) -> None:
        if nbits < 8 * codes.element_size() and codes.numel():
            top = int(codes.to(torch.int32).max())  # uint16 has no max() in torch
            if top >= 1 << nbits:
                raise ValueError(
                    f"{type(self).__name__}.codes holds {top}, out of range for {nbits}-bit codes"
                )


@dataclass
class QuantizedWeight(StoredWeight):
    """An additively quantized Linear `[out, in]` or Conv2d `[out, in, kh, kw]` weight.

    `W[o, j*g:(j+1)*g] ~= scales[o] * sum_m codebooks[m, codes[o, j, m]]` on the `[out, K]` matrix view.
    Codebooks and scales are held in fp16, exactly as stored, so every reported error is the error of
    what is saved.
    """

    spec: QuantSpec
    shape: tuple[int, ...]
    codes: torch.Tensor  # [out, K/g, M], uint8 (B <= 8) or uint16
    codebooks: torch.Tensor  # [M, 2^B, g], fp16
    scales: torch.Tensor  # [out], fp16
    info: dict = field(default_factory=dict, compare=False)  # solver figures (error, rounds, seconds)

    _tensors = ("codes", "codebooks", "scales")

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        self.validate()

    @property
    def group_size(self) -> int:
        return self.codebooks.shape[-1]

    def validate(self) -> None:
        """Raise `ValueError` naming the first inconsistency between the tensors and the spec."""
        spec, M, g = self.spec, self.spec.num_codebooks, self.spec.group_size
        effective_group_size(self.shape, spec)  # K divisible by g; kernel grouping needs g == kh*kw
        out, K = self.out_features, self.in_features
        self._check_tensors(
            {
                "codes": ((out, K // g, M), code_dtype(spec.nbits)),
                "codebooks": ((M, spec.codebook_size, g), torch.float16),
                "scales": ((out,), torch.float16),
            }
        )
        self._check_code_range(self.codes, spec.nbits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The decoded weight, shaped like the original."""
        return decode(self.codes, self.codebooks, self.scales).to(dtype).reshape(self.shape)

    @property
    def code_bits(self) -> float:
        return self.spec.code_bits

    @property
    def storage_bits(self) -> int:
        """Everything stored: codes at B bits, codebooks and scales in fp16 (`avq.core.bits`)."""
        return storage_bits(self.shape, self.spec)


def decode(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`[out, G, M]` codes -> `[out, G*g]` float32 weights (differentiable in codebooks and scales)."""
    M = codebooks.shape[0]
    idx = codes.to(torch.int64)  # [out, G, M]
    books = codebooks.float()
    groups = books[0][idx[..., 0]]  # [out, G, g]
    for m in range(1, M):
        groups = groups + books[m][idx[..., m]]
    return (groups * scales.float()[:, None, None]).reshape(codes.shape[0], -1)
