"""Quantized drop-in modules: `AQLinear` and `AQConv2d` hold a `QuantizedWeight` instead of a dense weight.

Codes are a buffer (integers are not trained by gradient; PV-Tuning's V step updates them directly),
codebooks and scales are `nn.Parameter`s so that fine-tuning can train them. Their values are the stored
fp16 values; their dtype is fp16 by default, but `from_layer` gives them the replaced layer's dtype: diffusers
infers a model's dtype from its *first* floating parameter (`ModelMixin.dtype`) and casts e.g. the timestep
embedding to it, so fp16 codebooks in `conv_in` make an fp32 UNet fail ("mat1 and mat2 must have the same
dtype") in its first dense Linear. Decoding always runs in float32, so the forward is identical either way.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from avq.core.qweight import QuantizedWeight, decode
from avq.core.spec import QuantSpec
from avq.kernels import dispatch

IntPair = int | tuple[int, int]


class QuantizedLayer(nn.Module):
    """What every quantized drop-in layer shares: the stored-weight type check, the dense `shape`, the
    float dtype of its stored floats, the bias, and the Linear / Conv2d subclass for a layer
    (`AQModule` and `avq.core.uniform_modules.UniformModule` derive from it)."""

    _ndim: int = 0  # rank of the dense weight this module replaces (2 for Linear, 4 for Conv2d)
    _stored: type = object  # the stored-weight class the module takes

    def __init__(self, qweight, bias: torch.Tensor | None, dtype: torch.dtype | None) -> None:
        super().__init__()
        who, kind = type(self).__name__, self._stored.__name__
        if not isinstance(qweight, self._stored):
            raise TypeError(f"{who} needs an avq.{kind}, got {type(qweight).__name__}")
        if len(qweight.shape) != self._ndim:
            raise ValueError(
                f"{who} needs a {self._ndim}-D weight, got {kind} of shape {list(qweight.shape)}"
            )
        self.shape: tuple[int, ...] = tuple(qweight.shape)
        if dtype is not None and not dtype.is_floating_point:  # the stored floats' dtype (default fp16)
            raise ValueError(f"{who}: dtype must be a floating dtype, got {dtype}")
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"{who}: bias has shape {list(bias.shape)}, expected [{self.out_features}]")
            self.bias = nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("bias", None)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def num_weights(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    @classmethod
    def _for_layer(cls, layer: nn.Module, qweight, linear: type, conv: type) -> QuantizedLayer:
        """`linear` or `conv` (subclasses of `cls`) built for `layer` from `qweight` of the layer's shape, on
        its device, the stored floats in its dtype."""
        if isinstance(layer, nn.Linear):
            target = linear
        elif isinstance(layer, nn.Conv2d):
            target = conv
        else:
            raise TypeError(f"from_layer supports nn.Linear and nn.Conv2d, got {type(layer).__name__}")
        if not issubclass(target, cls):
            raise TypeError(f"{cls.__name__}.from_layer cannot take a {type(layer).__name__}")
        if tuple(qweight.shape) != tuple(layer.weight.shape):
            raise ValueError(
                f"{type(qweight).__name__} of shape {list(qweight.shape)} does not fit "
                f"{type(layer).__name__} weight {list(layer.weight.shape)}"
            )
        dtype = layer.weight.dtype if layer.weight.is_floating_point() else None
        return target._from_layer(layer, qweight.to(layer.weight.device), dtype)

    @classmethod
    def _from_layer(cls, layer: nn.Module, qweight, dtype: torch.dtype | None) -> QuantizedLayer:
        raise NotImplementedError


class AQModule(QuantizedLayer):
    """Shared storage, bit accounting and construction of `AQLinear` / `AQConv2d`.

    Attributes: `spec` (`QuantSpec`), `shape` (the original dense weight shape), buffer `codes`
    `[out, K/g, M]` (uint8 for B <= 8, else uint16), parameters `codebooks` `[M, 2^B, g]` and `scales`
    `[out]` (dtype `dtype`, default fp16 as stored), and `bias` `[out]` (its own dtype) or None.
    """

    _stored = QuantizedWeight

    def __init__(
        self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, *, dtype: torch.dtype | None = None
    ):
        super().__init__(qweight, bias, dtype)
        dtype = torch.float16 if dtype is None else dtype
        self.spec: QuantSpec = qweight.spec
        # Codes are shared with `qweight` (they can be large); the float tensors are copied so that
        # training this module never edits the QuantizedWeight (or a teacher layer) it was built from.
        self.register_buffer("codes", qweight.codes.detach())
        self.codebooks = nn.Parameter(qweight.codebooks.detach().to(dtype, copy=True))
        self.scales = nn.Parameter(qweight.scales.detach().to(dtype, copy=True))

    @property
    def qweight(self) -> QuantizedWeight:
        """A validated `QuantizedWeight` of the current tensors (detached).

        Codebooks and scales are cast to fp16, the stored precision: if they were trained in a wider
        dtype, this is where they are rounded to what will be saved.
        """
        return QuantizedWeight(
            spec=self.spec,
            shape=self.shape,
            codes=self.codes.detach(),
            codebooks=self.codebooks.detach().to(torch.float16),
            scales=self.scales.detach().to(torch.float16),
        )

    # ------------------------------------------------------------------ bits
    @property
    def code_bits(self) -> float:
        """Bits of codes per weight, `M*B/g`."""
        return self.spec.code_bits

    @property
    def total_bits(self) -> float:
        """Bits per weight of everything stored for the weight: codes at B bits, codebooks and scales in
        fp16 (docs/design.md, "Total bits"). The bias is not counted: it is not part of the weight and a
        dense layer carries it too."""
        return self.qweight.total_bits

    # ------------------------------------------------------------------ forward
    def _weight(self) -> torch.Tensor:
        """The dense weight, float32, shaped like the original (differentiable in codebooks and scales).

        The dequantize path of the kernel dispatch (`avq.kernels.dispatch`, whose `AVQ_KERNEL` forces
        triton|lut|dequant|fused): used whenever autograd needs gradients; inference forwards go through the
        fused kernels.
        """
        return decode(self.codes, self.codebooks, self.scales).reshape(self.shape)

    def _bits_repr(self) -> str:
        return (
            f"spec={self.spec.name}, code_bits={self.code_bits:.3g}, total_bits={self.total_bits:.3g}, "
            f"bias={self.bias is not None}"
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_layer(cls, layer: nn.Linear | nn.Conv2d, qweight: QuantizedWeight) -> AQModule:
        """The quantized replacement of `layer`: its bias (copied), conv geometry, device and dtype.

        `AQModule.from_layer` picks `AQLinear` or `AQConv2d` from the layer's type; the subclasses accept
        only their own kind. Raises `ValueError` for what the quantized modules cannot represent
        (grouped convs, non-zero padding modes): the caller keeps such layers in full precision.
        """
        return cls._for_layer(layer, qweight, AQLinear, AQConv2d)


class AQLinear(AQModule):
    """`nn.Linear` with an additively quantized weight `[out, in]`."""

    _ndim = 2

    def __init__(
        self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, *, dtype: torch.dtype | None = None
    ):
        super().__init__(qweight, bias, dtype=dtype)

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.linear(self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._bits_repr()}"

    @classmethod
    def _from_layer(cls, layer: nn.Module, qweight: QuantizedWeight, dtype: torch.dtype | None) -> AQLinear:
        return cls(qweight, layer.bias, dtype=dtype)


class ConvGeometry:
    """What a quantized `nn.Conv2d` keeps besides its weight (groups=1, zero padding only): stride, padding
    and dilation, its shape properties and their repr. Shared by `AQConv2d` and `UniformConv2d`."""

    shape: tuple[int, ...]

    def _set_geometry(self, stride: IntPair, padding: IntPair | str, dilation: IntPair) -> None:
        who = type(self).__name__
        self.stride = pair(stride, "stride", who)
        self.padding = padding if isinstance(padding, str) else pair(padding, "padding", who)
        self.dilation = pair(dilation, "dilation", who)
        if isinstance(self.padding, str) and self.padding not in ("same", "valid"):
            raise ValueError(f"{who}: padding must be 'same', 'valid' or ints, got {self.padding!r}")

    @property
    def in_channels(self) -> int:
        return self.shape[1]

    @property
    def out_channels(self) -> int:
        return self.shape[0]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (self.shape[2], self.shape[3])

    def _geometry_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}"
        )

    @classmethod
    def _check_layer(cls, layer: nn.Conv2d) -> None:
        """Refuse what a quantized conv cannot represent (the caller keeps such layers in FP)."""
        if layer.groups != 1:
            raise ValueError(f"{cls.__name__} cannot represent a grouped convolution (groups={layer.groups})")
        if layer.padding_mode != "zeros":
            raise ValueError(
                f"{cls.__name__} supports only zero padding, got padding_mode={layer.padding_mode!r}"
            )


class AQConv2d(ConvGeometry, AQModule):
    """`nn.Conv2d` (groups=1, zero padding) with an additively quantized weight `[out, in, kh, kw]`."""

    _ndim = 4

    def __init__(
        self,
        qweight: QuantizedWeight,
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
        return dispatch.conv2d(self, x)

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, {self._bits_repr()}"

    @classmethod
    def _from_layer(cls, layer: nn.Module, qweight: QuantizedWeight, dtype: torch.dtype | None) -> AQConv2d:
        cls._check_layer(layer)
        return cls(qweight, layer.bias, layer.stride, layer.padding, layer.dilation, dtype=dtype)


def pair(value: IntPair, name: str, who: str = "AQConv2d") -> tuple[int, int]:
    """A conv's stride / padding / dilation as a pair of ints (`who` names the module in the error)."""
    both = (value, value) if isinstance(value, int) else tuple(value)
    if len(both) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in both):
        raise ValueError(f"{who}: {name} must be an int or a pair of ints, got {value!r}")
    return (int(both[0]), int(both[1]))


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at the dotted path `name` under `root` (e.g. `"down_blocks.0.resnets.1.conv1"`) and return
    the module it replaced. Works through `nn.Sequential`/`ModuleList`/`ModuleDict` (numeric names)."""
    if not name:
        raise ValueError("replace_module: cannot replace the root module itself (empty name)")
    parent_name, _, child = name.rpartition(".")
    parent = root
    for part in parent_name.split(".") if parent_name else []:
        parent = parent._modules.get(part)
        if parent is None:
            raise AttributeError(f"replace_module: {type(root).__name__} has no submodule {name!r}")
    old = parent._modules.get(child)
    if old is None:
        raise AttributeError(f"replace_module: {type(root).__name__} has no submodule {name!r}")
    setattr(parent, child, new)
    return old
