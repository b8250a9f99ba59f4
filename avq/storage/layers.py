"""The module of one saved layer entry (`quantized_layer`: `AQLinear`/`AQConv2d`, or for RTN/GPTQ entries
`UniformLinear`/`UniformConv2d`, from a file's tensors or empty for a loader to fill) and the input
quantizers an entry's `activations` block asks for (`input_quantizer_targets`). Shared by `load_quantized`
(`avq.storage.serialization`) and diffusers' loading (`avq.storage.diffusers_backend`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from avq.calibration.activations import ActQuantizer, in_channels_of
from avq.core.baselines import UniformQuantizedWeight, grid_shape
from avq.core.layout import effective_group_size
from avq.core.modules import AQConv2d, AQLinear, AQModule
from avq.core.qweight import QuantizedWeight, code_dtype
from avq.core.spec import QuantSpec
from avq.core.uniform_modules import UniformConv2d, UniformLinear, UniformModule, packed_shape, unpack_codes
from avq.storage.format import PARAM_DTYPES, WEIGHTS_NAME, FormatError, is_uniform_entry


def quantized_layer(
    model: nn.Module,
    name: str,
    entry: dict,
    tensors: dict[str, torch.Tensor] | None = None,
    *,
    dtype: torch.dtype | None = None,
    who: str = "load_quantized",
) -> AQModule | UniformModule:
    """The `AQLinear`/`AQConv2d` (or, for an RTN/GPTQ entry, `UniformLinear`/`UniformConv2d`) for layer
    `name` of `model` as described by its (checked) layer `entry`.

    Checks that `model` has a layer of that kind and weight shape there. With `tensors` (a state dict), the
    module holds the file's codes, codebooks, scales and bias, validated; without, it is an empty module of
    the right spec, shapes and dtypes (zero codes, codebooks and scales; a loader fills it afterwards, like
    diffusers' `from_pretrained` through `avq.storage.diffusers_backend`). Codebooks and scales get `dtype`,
    by default the entry's `param_dtype`.
    """
    try:
        existing = model.get_submodule(name)
    except AttributeError as error:
        raise FormatError(
            f"{who}: quantized layer {name!r} does not exist in the {type(model).__name__} model"
        ) from error
    kind = entry["kind"]
    linear = (nn.Linear, AQLinear, UniformLinear)
    wanted = linear if kind == "linear" else (nn.Conv2d, AQConv2d, UniformConv2d)
    if not isinstance(existing, wanted):
        raise FormatError(
            f"{who}: layer {name!r} is a {type(existing).__name__} in the model, but saved as {kind}"
        )
    shape = tuple(entry["shape"])
    quantized = isinstance(existing, (AQModule, UniformModule))
    model_shape = tuple(existing.shape if quantized else existing.weight.shape)
    if model_shape != shape:
        raise FormatError(
            f"{who}: layer {name!r} has weight shape {list(model_shape)} in the model, "
            f"but {list(shape)} in the file"
        )
    dtype = PARAM_DTYPES[entry.get("param_dtype", "float16")] if dtype is None else dtype

    def tensor(key: str) -> torch.Tensor:
        full = f"{name}.{key}"
        if full not in tensors:
            raise FormatError(f"{who}: {WEIGHTS_NAME} is missing tensor {full!r}")
        return tensors[full]

    if is_uniform_entry(entry):
        return _uniform_layer(name, entry, shape, tensor if tensors is not None else None, dtype, who)
    try:
        spec = QuantSpec.from_dict(entry["spec"])
        effective_group_size(shape, spec)  # e.g. kernel grouping needs g == kh*kw
        if tensors is None:
            out, groups = shape[0], math.prod(shape[1:]) // spec.group_size
            books = (spec.num_codebooks, spec.codebook_size, spec.group_size)
            qweight = QuantizedWeight(
                spec=spec,
                shape=shape,
                codes=torch.zeros(out, groups, spec.num_codebooks, dtype=code_dtype(spec.nbits)),
                codebooks=torch.zeros(books, dtype=torch.float16),
                scales=torch.zeros(out, dtype=torch.float16),
            )
            bias = torch.zeros(out, dtype=dtype) if entry["bias"] else None
        else:
            qweight = QuantizedWeight(
                spec=spec,
                shape=shape,
                codes=tensor("codes"),
                codebooks=tensor("codebooks"),
                scales=tensor("scales"),
            )
            bias = tensor("bias") if entry["bias"] else None
    except (TypeError, ValueError) as error:
        if isinstance(error, FormatError):
            raise
        raise FormatError(f"{who}: layer {name!r}: {error}") from error
    try:
        if kind == "linear":
            module: AQModule = AQLinear(qweight, bias, dtype=dtype)
        else:
            padding = entry["padding"] if isinstance(entry["padding"], str) else tuple(entry["padding"])
            stride, dilation = tuple(entry["stride"]), tuple(entry["dilation"])
            module = AQConv2d(qweight, bias, stride, padding, dilation, dtype=dtype)
    except ValueError as error:
        raise FormatError(f"{who}: layer {name!r}: {error}") from error
    return module


def _uniform_layer(
    name: str, entry: dict, shape: tuple, tensor: Any, dtype: torch.dtype, who: str
) -> UniformModule:
    """`quantized_layer` for an RTN/GPTQ entry: the file's packed levels and grids (`tensor(key)`), or
    zeros of the right shapes when `tensor` is None (filled by a loader afterwards)."""
    bits, group = entry["bits"], entry["group_size"]
    out, K = shape[0], math.prod(shape[1:])
    try:
        if tensor is None:
            levels = torch.zeros(out, K, dtype=torch.uint8)
            scales = zeros = torch.zeros(grid_shape(out, K, group), dtype=torch.float16)
            bias = torch.zeros(out, dtype=dtype) if entry["bias"] else None
        else:
            packed = tensor("packed")
            if packed.dtype != torch.uint8 or tuple(packed.shape) != packed_shape(out, K, bits):
                raise ValueError(
                    f"packed levels must be uint8 {list(packed_shape(out, K, bits))}, got "
                    f"{packed.dtype} {list(packed.shape)}"
                )
            levels, scales, zeros = unpack_codes(packed, bits, K), tensor("scales"), tensor("zeros")
            bias = tensor("bias") if entry["bias"] else None
        qweight = UniformQuantizedWeight(
            bits=bits, shape=shape, codes=levels, scales=scales, zeros=zeros, group_size=group
        )
        if entry["kind"] == "linear":
            return UniformLinear(qweight, bias, dtype=dtype)
        padding = entry["padding"] if isinstance(entry["padding"], str) else tuple(entry["padding"])
        stride, dilation = tuple(entry["stride"]), tuple(entry["dilation"])
        return UniformConv2d(qweight, bias, stride, padding, dilation, dtype=dtype)
    except (TypeError, ValueError) as error:
        if isinstance(error, FormatError):
            raise
        raise FormatError(f"{who}: layer {name!r}: {error}") from error


def input_quantizer_targets(
    model: nn.Module, activations: dict, modules: dict[str, AQModule], who: str = "load_quantized"
) -> dict[str, tuple[nn.Module, ActQuantizer]]:
    """`{name: (layer, quantizer)}` for the (checked) `activations` entries: the layer that gets the input
    quantizer (the new module of `modules`, or the layer of `model` that stays as it is) and a fresh
    `ActQuantizer` of the entry's geometry (ranges not set); checks that it fits the layer."""
    targets = {}
    for name, entry in activations.items():
        quantizer = ActQuantizer.from_entry(entry)
        if name in modules:
            layer = modules[name]
        else:
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                raise FormatError(f"{who}: activations entry {name!r} names no layer") from None
        if (
            not isinstance(layer, (nn.Linear, nn.Conv2d, AQModule, UniformModule))
            or in_channels_of(layer) != quantizer.channels
        ):
            raise FormatError(f"{who}: activations entry {name!r} does not fit the layer")
        targets[name] = (layer, quantizer)
    return targets
