"""The avq folder format: constants, the `quantization_config` block, and its checks.

`config.json` is the model's diffusers config plus a `quantization_config` block::

    {"quant_method": "avq", "format": "avq", "version": 1, "activation_bits": 16 | 8,
     "activations": {name: {"bits": 8, "channels": C, "splits": [..], "channel_dim": 1 | -1}}  (a8 only),
     "layers": {name: {"kind": "linear" | "conv2d", "spec": {...}, "shape": [...], "bias": bool,
                       "param_dtype": "float32" | "float16" | ...,
                       "stride": [..], "padding": [..] | "same" | "valid", "dilation": [..]  (convs)}
                      | {"kind": ..., "method": "uniform", "bits": 2..8, "group_size": int | null,
                         "shape": [...], "bias": bool, "param_dtype": ..., conv geometry as above}},
     "checksum": {"model.safetensors": "sha256:<hex>", "config.json": "sha256:<hex>"},
     "extra": {...}  (only when `save_quantized(extra_config=...)` was given)}

`model.safetensors` holds `model.state_dict()`: for each quantized layer `name.codes` (uint8 for B <= 8,
else uint16), `name.codebooks` and `name.scales` (fp16) and `name.bias`; every other tensor as is.
Layers with an 8-bit input quantizer (`avq.calibration.activations`) also hold `name.input_quantizer.lo/hi`.
`param_dtype` is the dtype of the module's codebook/scale parameters in memory (see `avq.core.modules`); the
file always holds fp16, and loading casts back, so a round trip is bit-exact. Uniform (RTN / GPTQ) layers
(`avq.core.uniform_modules`) hold `name.packed` (uint8, the levels bit-packed at `bits` a weight),
`name.scales` and `name.zeros` (fp16, one per row or per row and group) and `name.bias`.

`diffusion_pytorch_model.safetensors` is the same file under the name diffusers' `from_pretrained` looks for
(a hard link, or a copy where the file system has none; `avq.storage.diffusers_backend`). A folder may hold
either name or both; each one present must match the `model.safetensors` checksum.

The `config.json` checksum is the sha256 of the canonical JSON (`canonical_json`) of the config without its
`quantization_config` block: a damaged key (say `mid_block_scale_factor` -> `mid_block_scahe_factor`) would
otherwise load silently, with diffusers' default in its place. Folders saved before it existed have no such
entry and load with a warning.
"""

from __future__ import annotations

import hashlib
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
from avq.core.baselines import MAX_BITS, MIN_BITS
from avq.core.modules import AQConv2d, AQModule
from avq.core.spec import QuantSpec
from avq.core.uniform_modules import UniformConv2d, UniformModule
from avq.storage.atomic import sha256_file

log = logging.getLogger("avq")

FORMAT = "avq"
VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # the same file, for diffusers
WEIGHTS_NAMES = (WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME)
OWN_FILES = {CONFIG_NAME, *WEIGHTS_NAMES}
AQ_TENSORS = ("codes", "codebooks", "scales")
UNIFORM_TENSORS = ("packed", "scales", "zeros")
STORED_FP16 = ("codebooks", "scales", "zeros")  # the quantized layers' float tensors, fp16 in the file
PARAM_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


class FormatError(ValueError):
    """A folder is not a valid avq save: the message names the file, layer or tensor at fault."""


def layer_entry(module: AQModule | UniformModule) -> dict:
    uniform = isinstance(module, UniformModule)
    floats = module.scales if uniform else module.codebooks
    if floats.dtype not in PARAM_DTYPES.values():
        raise FormatError(f"save_quantized: layer tensors of dtype {floats.dtype} are not supported")
    entry: dict[str, Any] = {"kind": "conv2d" if isinstance(module, (AQConv2d, UniformConv2d)) else "linear"}
    if uniform:
        entry |= {"method": "uniform", "bits": module.bits, "group_size": module.group_size}
    else:
        entry["spec"] = module.spec.to_dict()
    entry |= {
        "shape": list(module.shape),
        "bias": module.bias is not None,
        "param_dtype": str(floats.dtype).removeprefix("torch."),
    }
    if entry["kind"] == "conv2d":
        entry["stride"] = list(module.stride)
        entry["padding"] = module.padding if isinstance(module.padding, str) else list(module.padding)
        entry["dilation"] = list(module.dilation)
    return entry


def is_uniform_entry(entry: dict) -> bool:
    return entry.get("method") == "uniform"


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


def read_config(folder: Path, who: str = "load_quantized") -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FormatError(f"{who}: {path} not found ({CONFIG_NAME} is missing)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FormatError(f"{who}: {path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise FormatError(f"{who}: {path} must hold a JSON object, got {type(config).__name__}")
    return config


def check_quantization_config(config: dict, folder: Path, who: str = "load_quantized") -> dict:
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise FormatError(f"{who}: {folder / CONFIG_NAME} has no quantization_config block: not an avq save")
    return check_quantization_block(qc, who)


def check_quantization_block(qc: dict, who: str = "load_quantized") -> dict:
    """Check a `quantization_config` block (format, version, activations, layer entries); return it."""
    if qc.get("format") != FORMAT:
        raise FormatError(f"{who}: quantization_config format is {qc.get('format')!r}, not {FORMAT!r}")
    version = qc.get("version")
    if is_int(version) and version > VERSION:
        raise FormatError(
            f"{who}: unsupported quantization_config version {version}: the folder was written by a newer "
            f"avq version (this avq reads version {VERSION}); upgrade avq to load it"
        )
    if version != VERSION:
        raise FormatError(
            f"{who}: unsupported quantization_config version {version!r}; this avq reads version {VERSION}"
        )
    if qc.get("activation_bits") not in (8, 16):
        raise FormatError(
            f"{who}: activation_bits={qc.get('activation_bits')!r} is not supported by this "
            "version of avq (16: activations untouched, or 8)"
        )
    activations = qc.get("activations", {})
    if qc["activation_bits"] == 8 and not activations:
        raise FormatError(f"{who}: activation_bits=8 but no 'activations' entries")
    if not isinstance(activations, dict):
        raise FormatError(f"{who}: quantization_config.activations must be an object")
    for name, entry in activations.items():
        try:
            ActQuantizer.from_entry(entry)
        except (KeyError, TypeError, ValueError) as error:
            raise FormatError(f"{who}: activations entry {name!r} is malformed: {error}") from None
    layers = qc.get("layers")
    if not isinstance(layers, dict):
        raise FormatError(f"{who}: quantization_config.layers must be an object")
    for name, entry in layers.items():
        check_layer_entry(name, entry, who)
    return qc


def check_layer_entry(name: str, entry: Any, who: str = "load_quantized") -> None:
    def fail(problem: str) -> FormatError:
        return FormatError(f"{who}: quantization_config layer {name!r}: {problem}")

    if not name or not isinstance(entry, dict):
        raise fail("must be a non-empty name mapped to an object")
    kind = entry.get("kind")
    if kind not in ("linear", "conv2d"):
        raise fail(f"kind must be 'linear' or 'conv2d', got {kind!r}")
    if entry.get("method", "aq") not in ("aq", "uniform"):
        raise fail(f"method must be 'aq' (the default) or 'uniform', got {entry.get('method')!r}")
    if is_uniform_entry(entry):
        bits, group = entry.get("bits"), entry.get("group_size")
        if not (is_int(bits) and MIN_BITS <= bits <= MAX_BITS):
            raise fail(f"bits must be an int from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
        if not (group is None or (is_int(group) and group > 0)):
            raise fail(f"group_size must be a positive int or null, got {group!r}")
    else:
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


def canonical_json(config: dict) -> str:
    """`config` without its `quantization_config` block, as compact JSON with sorted keys (ASCII only): the
    same text for the same data however the file was formatted, so its hash survives a re-indented file."""
    rest = {key: value for key, value in config.items() if key != "quantization_config"}
    return json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)


def config_digest(config: dict) -> str:
    """The checksum entry of `config.json`: `sha256:<hex>` of `canonical_json(config)`."""
    return "sha256:" + hashlib.sha256(canonical_json(config).encode("ascii")).hexdigest()


def verify_config_checksum(
    config: dict, qc: dict, who: str = "load_quantized", source: str = CONFIG_NAME
) -> None:
    """Check the model config (`config.json` less its `quantization_config`) against its recorded sha256.

    A folder saved before this entry existed has none: it loads, with a warning.
    """
    checksum = qc.get("checksum")
    recorded = checksum.get(CONFIG_NAME) if isinstance(checksum, dict) else None
    if recorded is None:
        log.warning(
            "%s: %s has no checksum entry for %s (saved by an older avq): its model config is not verified",
            who,
            source,
            CONFIG_NAME,
        )
        return
    if not isinstance(recorded, str) or not recorded.startswith("sha256:"):
        raise FormatError(f"{who}: the checksum entry for {CONFIG_NAME} is not 'sha256:<hex>'")
    actual = config_digest(config)
    if recorded != actual:
        raise FormatError(
            f"{who}: checksum mismatch for the model config in {source}: a key or value outside "
            f"quantization_config was changed, the file was tampered or corrupted (recorded {recorded}, "
            f"found {actual})"
        )


def verify_checksum(path: Path, qc: dict, who: str = "load_quantized") -> None:
    """Check a weights file (either name) against the recorded `model.safetensors` sha256."""
    checksum = qc.get("checksum")
    recorded = checksum.get(WEIGHTS_NAME) if isinstance(checksum, dict) else None
    if not isinstance(recorded, str) or not recorded.startswith("sha256:"):
        raise FormatError(
            f"{who}: quantization_config.checksum has no 'sha256:<hex>' entry for {WEIGHTS_NAME}"
        )
    actual = sha256_file(path)
    if recorded != f"sha256:{actual}":
        raise FormatError(
            f"{who}: checksum mismatch for {path}: the file was tampered or corrupted "
            f"(recorded {recorded}, found sha256:{actual})"
        )


def format_names(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
