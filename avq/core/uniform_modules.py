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

from avq.core.baselines import UniformQuantizedWeight
from avq.core.modules import IntPair, pair

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


class UniformModule(nn.Module):
    """Shared storage, bits and construction of `UniformLinear` / `UniformConv2d`.

    Attributes: `bits`, `group_size` (None: one grid per row), `shape` (the dense weight's), buffers
    `packed` `[out, ceil(K*bits/8)]` uint8, `scales` and `zeros` `[out]` or `[out, ceil(K/g)]` (dtype
    `dtype`, default fp16 as stored), and parameter `bias` `[out]` or None.
    """

    _ndim: int = 0

    def __init__(
        self,
        qweight: UniformQuantizedWeight,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not isinstance(qweight, UniformQuantizedWeight):
            raise TypeError(
                f"{type(self).__name__} needs an avq.UniformQuantizedWeight, got {type(qweight).__name__}"
            )
        if len(qweight.shape) != self._ndim:
            raise ValueError(
                f"{type(self).__name__} needs a {self._ndim}-D weight, got UniformQuantizedWeight of shape "
                f"{list(qweight.shape)}"
            )
        dtype = torch.float16 if dtype is None else dtype
        if not dtype.is_floating_point:
            raise ValueError(f"{type(self).__name__}: dtype must be a floating dtype, got {dtype}")
        self.bits, self.group_size = qweight.bits, qweight.group_size
        self.shape: tuple[int, ...] = tuple(qweight.shape)
        self.register_buffer("packed", pack_codes(qweight.codes, qweight.bits))
        self.register_buffer("scales", qweight.scales.detach().to(dtype, copy=True))
        self.register_buffer("zeros", qweight.zeros.detach().to(dtype, copy=True))
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(
                    f"{type(self).__name__}: bias has shape {list(bias.shape)}, "
                    f"expected [{self.out_features}]"
                )
            self.bias = nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("bias", None)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def num_weights(self) -> int:
        return math.prod(self.shape)

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
        from avq.core.baselines import uniform_name

        return uniform_name(self.bits, self.group_size)

    def _weight(self) -> torch.Tensor:
        return self.qweight.dequantize(torch.float32).to(self.packed.device)

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def _bits_repr(self) -> str:
        return f"{self.name}, total_bits={self.total_bits:.3g}, bias={self.bias is not None}"

    @classmethod
    def from_layer(cls, layer: nn.Linear | nn.Conv2d, qweight: UniformQuantizedWeight) -> UniformModule:
        """The packed replacement of `layer` (its bias, conv geometry, device; grids in its dtype)."""
        if isinstance(layer, nn.Linear):
            target: type[UniformModule] = UniformLinear
        elif isinstance(layer, nn.Conv2d):
            target = UniformConv2d
        else:
            raise TypeError(f"from_layer supports nn.Linear and nn.Conv2d, got {type(layer).__name__}")
        if tuple(qweight.shape) != tuple(layer.weight.shape):
            raise ValueError(
                f"UniformQuantizedWeight of shape {list(qweight.shape)} does not fit {type(layer).__name__} "
                f"weight {list(layer.weight.shape)}"
            )
        dtype = layer.weight.dtype if layer.weight.is_floating_point() else None
        return target._from_layer(layer, qweight.to(layer.weight.device), dtype)

    @classmethod
    def _from_layer(cls, layer: nn.Module, qweight: UniformQuantizedWeight, dtype) -> UniformModule:
        raise NotImplementedError


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


class UniformConv2d(UniformModule):
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
        self.stride = pair(stride, "stride", "UniformConv2d")
        self.padding = padding if isinstance(padding, str) else pair(padding, "padding", "UniformConv2d")
        self.dilation = pair(dilation, "dilation", "UniformConv2d")
        if isinstance(self.padding, str) and self.padding not in ("same", "valid"):
            raise ValueError(f"UniformConv2d: padding must be 'same', 'valid' or ints, got {self.padding!r}")

    @property
    def in_channels(self) -> int:
        return self.shape[1]

    @property
    def out_channels(self) -> int:
        return self.shape[0]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (self.shape[2], self.shape[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._weight().to(x.dtype)
        return F.conv2d(x, weight, self._bias(x.dtype), self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, {self._bits_repr()}"
        )

    @classmethod
    def _from_layer(cls, layer: nn.Module, qweight: UniformQuantizedWeight, dtype) -> UniformConv2d:
        if layer.groups != 1:
            raise ValueError(f"UniformConv2d cannot represent a grouped convolution (groups={layer.groups})")
        if layer.padding_mode != "zeros":
            raise ValueError(
                f"UniformConv2d supports only zero padding, got padding_mode={layer.padding_mode!r}"
            )
        return cls(qweight, layer.bias, layer.stride, layer.padding, layer.dilation, dtype=dtype)
