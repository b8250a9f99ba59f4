"""The avq folder format: constants, the `quantization_config` block, and its checks.

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
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from avq.calibration.activations import (
    ActQuantizer,
)
from avq.core.modules import AQConv2d, AQModule
from avq.core.spec import QuantSpec
from avq.storage.atomic import sha256_file

log = logging.getLogger("avq")

FORMAT = "avq"
VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
OWN_FILES = {CONFIG_NAME, WEIGHTS_NAME}
AQ_TENSORS = ("codes", "codebooks", "scales")
PARAM_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


class FormatError(ValueError):
    """A folder is not a valid avq save: the message names the file, layer or tensor at fault."""


def layer_entry(module: AQModule) -> dict:
    if module.codebooks.dtype not in PARAM_DTYPES.values():
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


def model_config(model: nn.Module) -> dict:
    """The diffusers config (with `_class_name`) as JSON-safe data; `{}` for a model without one."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    if callable(getattr(model, "to_json_string", None)):  # diffusers ConfigMixin
        return json.loads(model.to_json_string())
    if isinstance(config, Mapping):
        return json_safe(dict(config), "model.config")
    if callable(getattr(config, "to_dict", None)):  # e.g. a transformers PretrainedConfig
        return json_safe(config.to_dict(), "model.config")
    raise FormatError(f"save_quantized: cannot serialise model.config of type {type(config).__name__}")


def json_safe(data: dict, what: str) -> dict:
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


def read_config(folder: Path) -> dict:
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


def check_quantization_config(config: dict, folder: Path) -> dict:
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
        check_layer_entry(name, entry)
    return qc


def check_layer_entry(name: str, entry: Any) -> None:
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
    if not (isinstance(shape, list) and len(shape) == ndim and all(is_int(d) and d > 0 for d in shape)):
        raise fail(f"shape must be {ndim} positive ints, got {shape!r}")
    if not isinstance(entry.get("bias"), bool):
        raise fail(f"bias must be true or false, got {entry.get('bias')!r}")
    if entry.get("param_dtype", "float16") not in PARAM_DTYPES:
        raise fail(f"param_dtype must be one of {sorted(PARAM_DTYPES)}, got {entry.get('param_dtype')!r}")
    if kind == "conv2d":
        for key in ("stride", "padding", "dilation"):
            value = entry.get(key)
            if key == "padding" and value in ("same", "valid"):
                continue
            if not (isinstance(value, list) and len(value) == 2 and all(is_int(v) for v in value)):
                raise fail(f"{key} must be a pair of ints, got {value!r}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def verify_checksum(path: Path, qc: dict) -> None:
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


def format_names(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
