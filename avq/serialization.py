"""The saved format: a folder with `config.json` and `model.safetensors` (design.md, "Contracts").

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
Layers with an 8-bit input quantizer (`avq.activations`) also hold `name.input_quantizer.lo/hi`.
`param_dtype` is the dtype of the module's codebook/scale parameters in memory (see `avq.modules`); the
file always holds fp16, and loading casts back, so a round trip is bit-exact.
Loading uses safetensors only (no pickle) and never touches the network.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .activations import (
    QUANTIZER_ATTR,
    ActQuantizer,
    attach_input_quantizer,
    in_channels_of,
    input_quantizers,
)
from .fileio import fsync_dir, fsync_file, sha256_file
from .layout import effective_group_size
from .modules import AQConv2d, AQLinear, AQModule, replace_module
from .qweight import QuantizedWeight
from .spec import QuantSpec

log = logging.getLogger("avq")

FORMAT = "avq"
VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_OWN_FILES = {CONFIG_NAME, WEIGHTS_NAME}
_AQ_TENSORS = ("codes", "codebooks", "scales")
_PARAM_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


class FormatError(ValueError):
    """A folder is not a valid avq save: the message names the file, layer or tensor at fault."""


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
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in _OWN_FILES)
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
        for key in _AQ_TENSORS:
            tensors[f"{name}.{key}"] = getattr(qweight, key)
        layers[name] = _layer_entry(module)
    quantizers = input_quantizers(model)
    config = _model_config(model)
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
        quantization_config["extra"] = _json_safe(dict(extra_config), "extra_config")

    folder.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would end up on the final folder; mkdir honours the umask.
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        weights_path = tmp / WEIGHTS_NAME
        save_file(_unshared(tensors), str(weights_path), metadata={"format": "pt"})
        fsync_file(weights_path)
        quantization_config["checksum"] = {WEIGHTS_NAME: f"sha256:{sha256_file(weights_path)}"}
        config["quantization_config"] = quantization_config
        config_path = tmp / CONFIG_NAME
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        fsync_file(config_path)
        fsync_dir(tmp)
        _swap_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _layer_entry(module: AQModule) -> dict:
    if module.codebooks.dtype not in _PARAM_DTYPES.values():
        raise FormatError(f"save_quantized: codebooks of dtype {module.codebooks.dtype} are not supported")
    entry: dict[str, Any] = {
        "kind": "conv2d" if isinstance(module, AQConv2d) else "linear",
        "spec": module.spec.to_dict(),
        "shape": list(module.shape),
        "bias": module.bias is not None,
        "param_dtype": str(module.codebooks.dtype).removeprefix("torch."),
    }
    if isinstance(module, AQConv2d):
        entry["stride"] = list(module.stride)
        entry["padding"] = module.padding if isinstance(module.padding, str) else list(module.padding)
        entry["dilation"] = list(module.dilation)
    return entry


def _model_config(model: nn.Module) -> dict:
    """The diffusers config (with `_class_name`) as JSON-safe data; `{}` for a model without one."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    if callable(getattr(model, "to_json_string", None)):  # diffusers ConfigMixin
        return json.loads(model.to_json_string())
    if isinstance(config, Mapping):
        return _json_safe(dict(config), "model.config")
    if callable(getattr(config, "to_dict", None)):  # e.g. a transformers PretrainedConfig
        return _json_safe(config.to_dict(), "model.config")
    raise FormatError(f"save_quantized: cannot serialise model.config of type {type(config).__name__}")


def _json_safe(data: dict, what: str) -> dict:
    def default(value: Any) -> Any:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if hasattr(value, "tolist"):  # numpy arrays/scalars, tensors
            return value.tolist()
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        raise TypeError(f"{type(value).__name__} is not JSON-serialisable")

    try:
        return json.loads(json.dumps(data, default=default))
    except (TypeError, ValueError) as error:
        raise FormatError(f"save_quantized: {what} is not JSON-safe: {error}") from error


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


def _swap_into_place(tmp: Path, folder: Path) -> None:
    """Rename `tmp` to `folder`; a previous `folder` is renamed aside first and restored on failure."""
    if not folder.exists():
        os.rename(tmp, folder)
    else:
        old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(folder, old)
        try:
            os.rename(tmp, folder)
        except BaseException:
            os.rename(old, folder)
            raise
        shutil.rmtree(old, ignore_errors=True)
        if old.exists():
            log.warning("save_quantized: could not delete the previous save moved to %s", old)
    fsync_dir(folder.parent)


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
    config = _read_config(folder)
    quantization_config = _check_quantization_config(config, folder)
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FormatError(f"load_quantized: {weights_path} not found ({WEIGHTS_NAME} is missing)")
    _verify_checksum(weights_path, quantization_config)
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
        raise FormatError(f"load_quantized: {WEIGHTS_NAME} is missing tensor(s) {_names(missing)}")
    if unexpected:
        raise FormatError(f"load_quantized: {WEIGHTS_NAME} has unexpected tensor(s) {_names(unexpected)}")
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


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FormatError(f"load_quantized: {path} not found ({CONFIG_NAME} is missing)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FormatError(f"load_quantized: {path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise FormatError(f"load_quantized: {path} must hold a JSON object, got {type(config).__name__}")
    return config


def _check_quantization_config(config: dict, folder: Path) -> dict:
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise FormatError(
            f"load_quantized: {folder / CONFIG_NAME} has no quantization_config block: not an avq save"
        )
    if qc.get("format") != FORMAT:
        raise FormatError(
            f"load_quantized: quantization_config format is {qc.get('format')!r}, not {FORMAT!r}"
        )
    if qc.get("version") != VERSION:
        raise FormatError(
            f"load_quantized: unsupported quantization_config version {qc.get('version')!r}; "
            f"this avq reads version {VERSION}"
        )
    if qc.get("activation_bits") not in (8, 16):
        raise FormatError(
            f"load_quantized: activation_bits={qc.get('activation_bits')!r} is not supported by this "
            "version of avq (16: activations untouched, or 8)"
        )
    activations = qc.get("activations", {})
    if qc["activation_bits"] == 8 and not activations:
        raise FormatError("load_quantized: activation_bits=8 but no 'activations' entries")
    if not isinstance(activations, dict):
        raise FormatError("load_quantized: quantization_config.activations must be an object")
    for name, entry in activations.items():
        try:
            ActQuantizer.from_entry(entry)
        except (KeyError, TypeError, ValueError) as error:
            raise FormatError(f"load_quantized: activations entry {name!r} is malformed: {error}") from None
    layers = qc.get("layers")
    if not isinstance(layers, dict):
        raise FormatError("load_quantized: quantization_config.layers must be an object")
    for name, entry in layers.items():
        _check_layer_entry(name, entry)
    return qc


def _check_layer_entry(name: str, entry: Any) -> None:
    def fail(problem: str) -> FormatError:
        return FormatError(f"load_quantized: quantization_config layer {name!r}: {problem}")

    if not name or not isinstance(entry, dict):
        raise fail("must be a non-empty name mapped to an object")
    kind = entry.get("kind")
    if kind not in ("linear", "conv2d"):
        raise fail(f"kind must be 'linear' or 'conv2d', got {kind!r}")
    try:
        QuantSpec.from_dict(entry.get("spec"))
    except (TypeError, ValueError, AttributeError) as error:
        raise fail(f"invalid spec {entry.get('spec')!r}: {error}") from error
    shape = entry.get("shape")
    ndim = 2 if kind == "linear" else 4
    if not (isinstance(shape, list) and len(shape) == ndim and all(_is_int(d) and d > 0 for d in shape)):
        raise fail(f"shape must be {ndim} positive ints, got {shape!r}")
    if not isinstance(entry.get("bias"), bool):
        raise fail(f"bias must be true or false, got {entry.get('bias')!r}")
    if entry.get("param_dtype", "float16") not in _PARAM_DTYPES:
        raise fail(f"param_dtype must be one of {sorted(_PARAM_DTYPES)}, got {entry.get('param_dtype')!r}")
    if kind == "conv2d":
        for key in ("stride", "padding", "dilation"):
            value = entry.get(key)
            if key == "padding" and value in ("same", "valid"):
                continue
            if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value)):
                raise fail(f"{key} must be a pair of ints, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _verify_checksum(path: Path, qc: dict) -> None:
    checksum = qc.get("checksum")
    recorded = checksum.get(WEIGHTS_NAME) if isinstance(checksum, dict) else None
    if not isinstance(recorded, str) or not recorded.startswith("sha256:"):
        raise FormatError(
            f"load_quantized: quantization_config.checksum has no 'sha256:<hex>' entry for {WEIGHTS_NAME}"
        )
    actual = sha256_file(path)
    if recorded != f"sha256:{actual}":
        raise FormatError(
            f"load_quantized: checksum mismatch for {path}: the file was tampered or corrupted "
            f"(recorded {recorded}, found sha256:{actual})"
        )


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
    dtype = _PARAM_DTYPES[entry.get("param_dtype", "float16")]
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


def _names(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
