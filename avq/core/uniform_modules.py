"""Packed uniform drop-in modules: `UniformLinear` and `UniformConv2d` hold an RTN/GPTQ result
(`UniformQuantizedWeight`) as it is stored, not as a dense weight.

The levels are bit-packed at the layer's width (`pack_codes`: 4 levels a byte at 2 bits, 2 at 4 bits, any
width from 2 to 8 bits, each row padded to whole bytes), with one fp16 scale and zero per output row, or per
row and group of `group_size` inputs. So a saved int2 model holds 2 bits a weight plus its grids, like the
AQ modules hold their codes and codebooks, and `total_bits` is what the file holds. The forward unpacks
and decodes the weight on every call (the baselines' reference path; no fused kernel). Scales and zeros are
buffers, not parameters: fine-tuning does not train the uniform layers' grids (their bias is trained with
the other FP parameters). Their in-memory dtype follows the replaced layer's, like the AQ modules'
codebooks; what is saved is fp16.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from avq.core.baselines import UniformQuantizedWeight, decode_levels, uniform_name
from avq.core.modules import AQModule, ConvGeometry, IntPair, QuantizedLayer
from avq.core.qweight import QuantizedWeight

_BYTE = 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`[rows, K]` uint8 levels below `2**bits` -> `[rows, ceil(K * bits / 8)]` uint8: the levels' bits
    one after another, least significant first, each row starting on a byte."""
    rows, K = codes.shape
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(rows, K * bits)  # [rows, K*bits] of 0/1
    stream = F.pad(stream, (0, -(K * bits) % _BYTE))
    weights = torch.tensor([1 << i for i in range(_BYTE)], dtype=torch.uint8, device=codes.device)
    return (stream.reshape(rows, -1, _BYTE) * weights).sum(-1, dtype=torch.uint8)  # [rows, bytes]


def unpack_codes(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """The inverse of `pack_codes`: `[rows, bytes]` uint8 -> `[rows, K]` uint8 levels."""
    rows = packed.shape[0]
    shifts = torch.arange(_BYTE, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1)[:, : K * bits]  # [rows, K*bits]
    level = torch.tensor([1 << i for i in range(bits)], dtype=torch.uint8, device=packed.device)
    return (stream.reshape(rows, K, bits) * level).sum(-1, dtype=torch.uint8)


def packed_shape(out: int, K: int, bits: int) -> tuple[int, int]:
    return (out, math.ceil(K * bits / _BYTE))


class UniformModule(QuantizedLayer):
    """Shared storage, bits and construction of `UniformLinear` / `UniformConv2d`.

    Attributes: `bits`, `group_size` (None: one grid per row), `shape` (the dense weight's), buffers
    `packed` `[out, ceil(K*bits/8)]` uint8, `scales` and `zeros` `[out]` or `[out, ceil(K/g)]` (dtype
    `dtype`, default fp16 as stored), and parameter `bias` `[out]` or None.
    """

    _stored = UniformQuantizedWeight

    def __init__(
        self,
        qweight: UniformQuantizedWeight,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(qweight, bias, dtype)
        dtype = torch.float16 if dtype is None else dtype
        self.bits, self.group_size = qweight.bits, qweight.group_size
        self.register_buffer("packed", pack_codes(qweight.codes, qweight.bits))
        self.register_buffer("scales", qweight.scales.detach().to(dtype, copy=True))
        self.register_buffer("zeros", qweight.zeros.detach().to(dtype, copy=True))

    @property
    def qweight(self) -> UniformQuantizedWeight:
        """A validated `UniformQuantizedWeight` of the current tensors (levels unpacked, grids in fp16)."""
        K = math.prod(self.shape[1:])
        return UniformQuantizedWeight(
            bits=self.bits,
            shape=self.shape,
            codes=unpack_codes(self.packed, self.bits, K),
            scales=self.scales.detach().to(torch.float16),
            zeros=self.zeros.detach().to(torch.float16),
            group_size=self.group_size,
        )

    @property
    def code_bits(self) -> float:
        return float(self.bits)

    @property
    def total_bits(self) -> float:
        """Bits per weight of everything stored for the weight (levels and fp16 grids; not the bias)."""
        return self.qweight.total_bits

    @property
    def name(self) -> str:
        """The report's name of this representation: `int2`, `int4g128`, ..."""
        return uniform_name(self.bits, self.group_size)

    def _weight(self) -> torch.Tensor:
        """The dense float32 weight, decoded on every call (no validation: this is the forward's path)."""
        codes = unpack_codes(self.packed, self.bits, math.prod(self.shape[1:]))  # [out, K]
        return decode_levels(codes, self.scales, self.zeros, self.group_size).reshape(self.shape)

    def _bits_repr(self) -> str:
        return f"{self.name}, total_bits={self.total_bits:.3g}, bias={self.bias is not None}"

    @classmethod
    def from_layer(cls, layer: nn.Linear | nn.Conv2d, qweight: UniformQuantizedWeight) -> UniformModule:
        """The packed replacement of `layer` (its bias, conv geometry, device; grids in its dtype)."""
        return cls._for_layer(layer, qweight, UniformLinear, UniformConv2d)


class UniformLinear(UniformModule):
    """`nn.Linear` with a packed uniform weight `[out, in]`."""

    _ndim = 2

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight().to(x.dtype), self._bias(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._bits_repr()}"

    @classmethod
    def _from_layer(cls, layer: nn.Module, qweight: UniformQuantizedWeight, dtype) -> UniformLinear:
        return cls(qweight, layer.bias, dtype=dtype)


class UniformConv2d(ConvGeometry, UniformModule):
    """`nn.Conv2d` (groups=1, zero padding) with a packed uniform weight `[out, in, kh, kw]`."""

    _ndim = 4

    def __init__(
        self,
        qweight: UniformQuantizedWeight,
        bias: torch.Tensor | None = None,
        stride: IntPair = 1,
        padding: IntPair | str = 0,
        dilation: IntPair = 1,
        *,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(qweight, bias, dtype=dtype)
        self._set_geometry(stride, padding, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._weight().to(x.dtype)
        return F.conv2d(x, weight, self._bias(x.dtype), self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, {self._bits_repr()}"

    @classmethod
    def _from_layer(cls, layer: nn.Module, qweight: UniformQuantizedWeight, dtype) -> UniformConv2d:
        cls._check_layer(layer)
        return cls(qweight, layer.bias, layer.stride, layer.padding, layer.dilation, dtype=dtype)


def quantized_module(
    layer: nn.Linear | nn.Conv2d, result: QuantizedWeight | UniformQuantizedWeight
) -> QuantizedLayer:
    """The drop-in replacement of `layer` for a solved weight: AQ, or packed uniform (RTN / GPTQ)."""
    if isinstance(result, UniformQuantizedWeight):
        return UniformModule.from_layer(layer, result)
    return AQModule.from_layer(layer, result)
