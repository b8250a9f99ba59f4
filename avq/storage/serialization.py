"""`save_quantized` / `load_quantized`: a folder with `config.json` and `model.safetensors` (docs/design.md,
"Contracts"); the format itself and its checks are in `avq.storage.format`.

`config.json` is the model's diffusers config plus a `quantization_config` block::

    {"format": "avq", "version": 1, "activation_bits": 16 | 8,
     "activations": {name: {"bits": 8, "channels": C, "splits": [..], "channel_dim": 1 | -1}}  (a8 only),
     "layers": {name: {"kind": "linear" | "conv2d", "spec": {...}, "shape": [...], "bias": bool,
                       "param_dtype": "float32" | "float16" | ...,
                       "stride": [..], "padding": [..] | "same" | "valid", "dilation": [..]  (convs)}},
     "checksum": {"model.safetensors": "sha256:<hex>"},
     "extra": {...}  (only when `save_quantized(extra_config=...)` was given)}

`model.safetensors` holds `model.state_dict()`: for each quantized layer `name.codes` (uint8 for B <= 8,
else uint16), `name.codebooks` and `name.scales` (fp16) and `name.bias`; every other tensor as is.
Layers with an 8-bit input quantizer (`avq.calibration.activations`) also hold `name.input_quantizer.lo/hi`.
`param_dtype` is the dtype of the module's codebook/scale parameters in memory (see `avq.core.modules`); the
file always holds fp16, and loading casts back, so a round trip is bit-exact.
Loading uses safetensors only (no pickle) and never touches the network.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from avq.calibration.activations import (
    QUANTIZER_ATTR,
    ActQuantizer,
    attach_input_quantizer,
    in_channels_of,
    input_quantizers,
)
from avq.core.layout import effective_group_size
from avq.core.modules import AQConv2d, AQLinear, AQModule, replace_module
from avq.core.qweight import QuantizedWeight
from avq.core.spec import QuantSpec
from avq.storage.atomic import sha256_file, write_folder_atomic
from avq.storage.format import (
    AQ_TENSORS,
    CONFIG_NAME,
    FORMAT,
    OWN_FILES,
    PARAM_DTYPES,
    VERSION,
    WEIGHTS_NAME,
    FormatError,
    check_quantization_config,
    format_names,
    json_safe,
    layer_entry,
    model_config,
    read_config,
    verify_checksum,
)

log = logging.getLogger("avq")


# ====================================================================== save
def save_quantized(model: nn.Module, folder: str | os.PathLike, *, extra_config: dict | None = None) -> Path:
    """Write `model` (with `AQLinear`/`AQConv2d` layers) to `folder`, atomically; return the folder.

    Everything is written to a temporary sibling folder and fsynced, then swapped into place, so a failure
    leaves any previous save untouched. An existing `folder` is replaced as a whole; to never delete files
    that are not ours, it must hold nothing but `config.json` and `model.safetensors`.
    `extra_config` (JSON-safe) is stored as `quantization_config["extra"]` (e.g. preset, solver figures).
    """
    folder = Path(os.path.abspath(folder))  # absolute, so that `.parent`/`.name` work for "." too
    if folder.exists():
        if not folder.is_dir():
            raise FormatError(f"save_quantized: {folder} exists and is not a folder")
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in OWN_FILES)
        if foreign:
            raise FormatError(
                f"save_quantized: refusing to replace {folder}: it holds files that are not an avq save "
                f"({', '.join(foreign[:5])}); remove them or choose another folder"
            )

    # Build everything in memory first: a bad model fails before any file is written.
    layers: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = dict(model.state_dict())
    for name, module in model.named_modules():
        if not isinstance(module, AQModule):
            continue
        if not name:
            raise FormatError("save_quantized: the model itself is a quantized layer; wrap it in a module")
        qweight = module.qweight  # validates; codebooks and scales in fp16 as stored
        for key in AQ_TENSORS:
            tensors[f"{name}.{key}"] = getattr(qweight, key)
        layers[name] = layer_entry(module)
    quantizers = input_quantizers(model)
    config = model_config(model)
    if "quantization_config" in config:
        raise FormatError("save_quantized: the model's config already has a 'quantization_config' entry")
    quantization_config: dict[str, Any] = {
        # diffusers reads `quant_method`: with it, UNet2DModel.from_pretrained on an avq folder fails with
        # "Unknown quantization type, got avq" instead of a confusing message; load with avq.load_quantized.
        "quant_method": FORMAT,
        "format": FORMAT,
        "version": VERSION,
        "activation_bits": 16,
        "layers": layers,
        "checksum": {},
    }
    if quantizers:
        bits = {q.bits for q in quantizers.values()}
        if len(bits) != 1:
            raise FormatError(f"save_quantized: input quantizers of mixed bit widths {sorted(bits)}")
        quantization_config["activation_bits"] = bits.pop()
        quantization_config["activations"] = {name: q.to_entry() for name, q in quantizers.items()}
    if extra_config is not None:
        quantization_config["extra"] = json_safe(dict(extra_config), "extra_config")

    def fill(tmp: Path) -> None:
        weights_path = tmp / WEIGHTS_NAME
        save_file(_unshared(tensors), str(weights_path), metadata={"format": "pt"})
        quantization_config["checksum"] = {WEIGHTS_NAME: f"sha256:{sha256_file(weights_path)}"}
        config["quantization_config"] = quantization_config
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return write_folder_atomic(folder, fill)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous, detached CPU tensors; safetensors refuses tensors sharing memory, so copy repeats."""
    seen: set[int] = set()
    result = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen or tensor.numel() == 0:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        result[name] = tensor
    return result


# ====================================================================== load
def load_quantized(
    folder: str | os.PathLike, *, model: nn.Module | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a folder written by `save_quantized` and return the model on `device`.

    Without `model`, the skeleton is the diffusers class named by `config.json`'s `_class_name`, built with
    `from_config` (and put in eval mode, like diffusers' `from_pretrained`). With `model`, that module is
    filled in place (and left untouched if the folder fails a check). Layers listed in
    `quantization_config["layers"]` become `AQLinear`/`AQConv2d`; every other tensor is loaded strictly
    (no tensor missing, none unexpected, matching shapes) and keeps the dtype it was saved in.
    Raises `FormatError` naming the problem for anything malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"load_quantized: folder {folder} not found")
    config = read_config(folder)
    quantization_config = check_quantization_config(config, folder)
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FormatError(f"load_quantized: {weights_path} not found ({WEIGHTS_NAME} is missing)")
    verify_checksum(weights_path, quantization_config)
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except Exception as error:  # SafetensorError, OSError, ...: one clear message for all
        raise FormatError(
            f"load_quantized: {weights_path} is truncated or not a valid safetensors file: {error}"
        ) from error

    built_here = model is None
    if model is None:
        model = _build_skeleton(config)
    layers = quantization_config["layers"]
    # Validate everything before touching `model`, so that a bad file leaves a caller's model as it was.
    modules = {name: _build_layer(model, name, entry, tensors) for name, entry in layers.items()}
    current = model.state_dict()
    expected: dict[str, torch.Tensor | None] = {  # None: a quantized layer's tensor, checked when built
        key: tensor for key, tensor in current.items() if not any(key.startswith(f"{n}.") for n in layers)
    }
    dense_quantizers = {}  # input quantizers of layers that stay dense (simulated or FP)
    for name, entry in quantization_config.get("activations", {}).items():
        quantizer = ActQuantizer.from_entry(entry)
        if name in modules:  # fresh module: fill its quantizer from the file now
            keys = {k: f"{name}.{QUANTIZER_ATTR}.{k}" for k in ("lo", "hi")}
            if not all(key in tensors for key in keys.values()):
                raise FormatError(f"load_quantized: {WEIGHTS_NAME} is missing the input ranges of {name!r}")
            _attach(modules[name], name, quantizer, {k: tensors[key] for k, key in keys.items()})
        else:
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                raise FormatError(f"load_quantized: activations entry {name!r} names no layer") from None
            if in_channels_of(layer) != quantizer.channels:
                raise FormatError(f"load_quantized: activations entry {name!r} does not fit the layer")
            dense_quantizers[name] = quantizer
            for key, tensor in quantizer.state_dict().items():
                expected[f"{name}.{QUANTIZER_ATTR}.{key}"] = tensor
    for name, module in modules.items():
        expected.update({f"{name}.{key}": None for key in module.state_dict()})
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise FormatError(f"load_quantized: {WEIGHTS_NAME} is missing tensor(s) {format_names(missing)}")
    if unexpected:
        raise FormatError(
            f"load_quantized: {WEIGHTS_NAME} has unexpected tensor(s) {format_names(unexpected)}"
        )
    rest = {}
    for key, tensor in tensors.items():
        target = expected[key]
        if target is None:
            continue
        if tensor.shape != target.shape:
            raise FormatError(
                f"load_quantized: tensor {key!r} has shape {list(tensor.shape)}, the model expects "
                f"{list(target.shape)}"
            )
        # Floating tensors keep their saved dtype (a model saved in fp16 loads in fp16); anything else
        # (integer buffers, bools) must match exactly, or the file does not belong to this model.
        if tensor.dtype != target.dtype and not (tensor.is_floating_point() and target.is_floating_point()):
            raise FormatError(
                f"load_quantized: tensor {key!r} has dtype {tensor.dtype}, the model expects {target.dtype}"
            )
        rest[key] = tensor

    for name, module in modules.items():
        replace_module(model, name, module)
    for name, quantizer in dense_quantizers.items():
        attach_input_quantizer(model.get_submodule(name), quantizer)
    result = model.load_state_dict(rest, strict=False, assign=True)
    aq_keys = {key for key, tensor in expected.items() if tensor is None}
    if result.unexpected_keys or set(result.missing_keys) != aq_keys:  # guarded above; defensive
        raise FormatError(f"load_quantized: state dict mismatch: {result}")
    if built_here:
        model.eval()
    return model.to(device)


def _build_skeleton(config: dict) -> nn.Module:
    name = config.get("_class_name")
    if not isinstance(name, str) or not name:
        raise FormatError(
            "load_quantized: config.json has no _class_name, so the model class is unknown; "
            "pass model=<an instance of the original architecture>"
        )
    import diffusers  # deferred: slow to import, and unneeded when the caller passes `model`

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "from_config")):
        raise FormatError(
            f"load_quantized: _class_name {name!r} is not a diffusers model class; "
            "pass model=<an instance of the original architecture>"
        )
    return cls.from_config({k: v for k, v in config.items() if k != "quantization_config"})


def _build_layer(model: nn.Module, name: str, entry: dict, tensors: dict[str, torch.Tensor]) -> AQModule:
    """The quantized module for layer `name` of `model`, from `entry` and the file's tensors."""
    try:
        existing = model.get_submodule(name)
    except AttributeError as error:
        raise FormatError(
            f"load_quantized: quantized layer {name!r} does not exist in the {type(model).__name__} model"
        ) from error
    kind = entry["kind"]
    wanted = (nn.Linear, AQLinear) if kind == "linear" else (nn.Conv2d, AQConv2d)
    if not isinstance(existing, wanted):
        raise FormatError(
            f"load_quantized: layer {name!r} is a {type(existing).__name__} in the model, but saved as {kind}"
        )
    shape = tuple(entry["shape"])
    model_shape = tuple(existing.shape if isinstance(existing, AQModule) else existing.weight.shape)
    if model_shape != shape:
        raise FormatError(
            f"load_quantized: layer {name!r} has weight shape {list(model_shape)} in the model, "
            f"but {list(shape)} in the file"
        )

    def tensor(key: str) -> torch.Tensor:
        full = f"{name}.{key}"
        if full not in tensors:
            raise FormatError(f"load_quantized: {WEIGHTS_NAME} is missing tensor {full!r}")
        return tensors[full]

    try:
        spec = QuantSpec.from_dict(entry["spec"])
        effective_group_size(shape, spec)  # e.g. kernel grouping needs g == kh*kw
        qweight = QuantizedWeight(
            spec=spec,
            shape=shape,
            codes=tensor("codes"),
            codebooks=tensor("codebooks"),
            scales=tensor("scales"),
        )
    except (TypeError, ValueError) as error:
        if isinstance(error, FormatError):
            raise
        raise FormatError(f"load_quantized: layer {name!r}: {error}") from error
    bias = tensor("bias") if entry["bias"] else None
    dtype = PARAM_DTYPES[entry.get("param_dtype", "float16")]
    try:
        if kind == "linear":
            module: AQModule = AQLinear(qweight, bias, dtype=dtype)
        else:
            padding = entry["padding"] if isinstance(entry["padding"], str) else tuple(entry["padding"])
            stride, dilation = tuple(entry["stride"]), tuple(entry["dilation"])
            module = AQConv2d(qweight, bias, stride, padding, dilation, dtype=dtype)
    except ValueError as error:
        raise FormatError(f"load_quantized: layer {name!r}: {error}") from error
    return module


def _attach(module: AQModule, name: str, quantizer: ActQuantizer, ranges: dict[str, torch.Tensor]) -> None:
    try:
        quantizer.set_ranges(ranges["lo"], ranges["hi"])
        attach_input_quantizer(module, quantizer)
    except ValueError as error:
        raise FormatError(f"load_quantized: input quantizer of {name!r}: {error}") from None
