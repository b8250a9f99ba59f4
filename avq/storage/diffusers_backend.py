"""diffusers' own `from_pretrained` for avq folders: after `import avq`,
`UNet2DModel.from_pretrained(folder)`, `UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet")` and
so `DiffusionPipeline.from_pretrained` load an avq save (`avq.save_quantized`) with its `AQLinear`/`AQConv2d`
layers and input quantizers in place, bit-exact with `avq.load_quantized(folder)`.

diffusers has no public plug-in registry for quantization methods: `import avq` adds "avq" to the two dicts
of `diffusers.quantizers.auto` (`AUTO_QUANTIZATION_CONFIG_MAPPING` -> `AvqConfig`, `AUTO_QUANTIZER_MAPPING`
-> `AvqDiffusersQuantizer`) through `avq.storage.diffusers_registry`, without importing diffusers.

How a load goes (`ModelMixin.from_pretrained`, diffusers 0.42; what this module relies on is pinned by
tests/test_diffusers_backend.py):

1. `config.json`'s `quantization_config` has `quant_method: "avq"`: `AvqConfig(**block)` holds the block as
   is and checks it (`avq.storage.format.check_quantization_block`: format, version, layer entries).
2. `AvqDiffusersQuantizer`: `validate_environment` (diffusers loads quantized models only through
   `accelerate`), `update_torch_dtype` (remembers `torch_dtype`).
3. `maybe_update_loaded_keys(keys, checkpoint_files)` names the weights file diffusers reads
   (`diffusion_pytorch_model.safetensors`, the same file as `model.safetensors`): its sha256 is checked, and
   so is the `config.json` beside it (the model config checksum), and its header (names, dtypes, shapes)
   is read.
4. `preprocess_model` -> `_process_model_before_weight_loading`: every layer of `layers` becomes an empty
   AQ module of its spec, shapes and dtypes on the meta device (`avq.storage.layers.quantized_layer`),
   input quantizers of `activations` are attached, and the model's state dict is checked against the file's
   header as strictly as `load_quantized` does (no tensor missing or unexpected, shapes, integer dtypes,
   fp16 codebooks and scales).
5. diffusers loads every tensor into that skeleton (`load_model_dict_into_meta`), casting floating tensors
   to the dtype of the tensor already there, or to `torch_dtype` when given; codes (uint8/uint16) are never
   cast. Without `torch_dtype` every tensor gets the dtype `load_quantized` gives it (the saved dtype;
   codebooks and scales the layer's `param_dtype`); with `torch_dtype=X` the model equals
   `avq.load_quantized(folder).to(X)`.
6. `postprocess_model` -> `_process_model_after_weight_loading`: nothing may be left on the meta device,
   and every AQ layer and input quantizer is validated (codes in range, finite values).

The model is marked quantized by diffusers (`model.is_quantized`, `model.hf_quantizer`): diffusers then
refuses `model.to(dtype)`, `.half()` and `.float()` (pass `torch_dtype=` instead), and `save_pretrained`
(`is_serializable` is False: diffusers would write fp32 codebooks and a stale checksum); save with
`avq.save_quantized(model, folder)`, which replaces the model's old avq block.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from enum import Enum
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from avq.calibration.activations import QUANTIZER_ATTR, attach_input_quantizer, input_quantizers
from avq.core.modules import AQModule, replace_module
from avq.core.uniform_modules import UniformModule
from avq.storage.format import (
    CONFIG_NAME,
    FORMAT,
    STORED_FP16,
    FormatError,
    check_quantization_block,
    format_names,
    json_safe,
    read_config,
    verify_checksum,
    verify_config_checksum,
)
from avq.storage.layers import input_quantizer_targets, quantized_layer

log = logging.getLogger("avq")

QUANT_METHOD = FORMAT  # the `quant_method` diffusers dispatches on: "avq"
AUTO_MODULE = "diffusers.quantizers.auto"  # holds AUTO_QUANTIZER_MAPPING and AUTO_QUANTIZATION_CONFIG_MAPPING
WHO = "from_pretrained (avq)"  # prefix of this path's error messages

# safetensors header dtype names -> torch dtypes
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


class AvqQuantizationMethod(str, Enum):
    """The `quant_method` of `AvqConfig`. diffusers' own `QuantizationMethod` is a closed Enum without "avq";
    diffusers needs a `str` equal to the mapping key that also has `.value` (`from_pretrained` reads
    `quant_method.value` for its user agent)."""

    AVQ = QUANT_METHOD

    def __str__(self) -> str:
        return self.value


# ====================================================================== config
class _AvqConfigLogic:
    """`AvqConfig`: diffusers' quantization config of an avq folder, the `quantization_config` block of its
    `config.json` held as is (`block`), checked on construction; `to_dict()` gives the block back.

    Built by diffusers with `AvqConfig.from_dict(block)` (= `AvqConfig(**block)`). It only describes a folder
    that `avq.save_quantized` wrote: avq quantizes with `avq.quantize`, not inside `from_pretrained`.
    """

    def __init__(self, **block: Any) -> None:
        block = copy.deepcopy(block)
        method = block.setdefault("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise FormatError(f"{WHO}: quant_method is {method!r}, not {QUANT_METHOD!r}")
        self.quant_method = AvqQuantizationMethod.AVQ
        self.block = check_quantization_block(block, WHO)

    @property
    def layers(self) -> dict:
        return self.block["layers"]

    @property
    def activations(self) -> dict:
        return self.block.get("activations", {})

    @property
    def version(self) -> int:
        return self.block["version"]

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.block)

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _AvqConfigLogic) and self.block == other.block

    __hash__ = None  # mutable, compared by value

    def __repr__(self) -> str:
        return (
            f"AvqConfig(version={self.version}, activation_bits={self.block['activation_bits']}, "
            f"layers={len(self.layers)}, activations={len(self.activations)})"
        )


# ====================================================================== quantizer
class _AvqQuantizerLogic:
    """`AvqDiffusersQuantizer`: loads an avq folder inside diffusers' `ModelMixin.from_pretrained` (the
    steps are in this module's docstring). Only pre-quantized folders (`requires_calibration`)."""

    requires_calibration = True  # DiffusersQuantizer.__init__ refuses pre_quantized=False
    required_packages = ["accelerate"]
    use_keep_in_fp32_modules = False  # like load_quantized: torch_dtype applies to every floating tensor

    def __init__(self, quantization_config, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self.torch_dtype: torch.dtype | None = None
        self.weights_path: Path | None = None  # the file diffusers reads, once it says which
        self.header: dict[str, tuple[torch.dtype | None, tuple[int, ...]]] | None = None
        self.config_verified = False

    # ------------------------------------------------------------------ before loading
    def validate_environment(self, *args, **kwargs) -> None:
        from diffusers.utils import is_accelerate_available

        if not is_accelerate_available():
            raise ImportError(
                "Loading an avq folder with diffusers' from_pretrained needs `accelerate` (diffusers loads "
                "every quantized model through it): pip install accelerate. Or load it with "
                "avq.load_quantized(folder)."
            )

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype | None:
        floating = isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point
        if torch_dtype is not None and not floating:
            raise ValueError(f"{WHO}: torch_dtype must be a floating torch.dtype, got {torch_dtype!r}")
        self.torch_dtype = torch_dtype
        return torch_dtype

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list) -> list[str]:
        files = [Path(f) for f in checkpoint_files if isinstance(f, (str, os.PathLike))]
        if len(files) != 1 or len(checkpoint_files) != 1:
            raise FormatError(
                f"{WHO}: an avq folder has one weights file, diffusers found {checkpoint_files!r}"
            )
        path = files[0]
        block = self.quantization_config.block
        verify_checksum(path, block, WHO)
        if (path.parent / CONFIG_NAME).is_file():
            config = read_config(path.parent, WHO)
            if config.get("quantization_config") != block:
                raise FormatError(f"{WHO}: {path.parent / CONFIG_NAME} is not the config being loaded")
            verify_config_checksum(config, block, WHO, source=str(path.parent / CONFIG_NAME))
            self.config_verified = True
        self.weights_path, self.header = path, read_header(path)
        return loaded_keys

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        block = self.quantization_config.block
        if not self.config_verified:  # diffusers did not name the file, or no config.json beside it
            verify_config_checksum(
                config_from_model(model), block, WHO, source=f"{type(model).__name__}.config"
            )
        if self.header is None:
            log.warning("%s: diffusers did not name the weights file: its checksum is not verified", WHO)
        modules = {
            name: quantized_layer(model, name, entry, dtype=self.torch_dtype, who=WHO)
            for name, entry in block["layers"].items()
        }
        targets = input_quantizer_targets(model, block.get("activations", {}), modules, WHO)
        for name, module in modules.items():
            replace_module(model, name, module.to(_device_of(model.get_submodule(name))))
        for layer, quantizer in targets.values():
            attach_input_quantizer(layer, quantizer)  # on the layer's device: meta
        if self.header is not None:
            self._check_against_file(model, modules)
            if self.torch_dtype is None:
                self._keep_saved_dtypes(model, modules)
        return model

    def _check_against_file(self, model: nn.Module, modules: dict[str, AQModule]) -> None:
        """`load_quantized`'s checks, on the file's header: no tensor missing or unexpected, equal shapes,
        integer tensors (codes) of the same dtype, fp16 codebooks and scales, floats for floats."""
        header, expected = self.header, model.state_dict()
        missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
        name = self.weights_path.name
        if missing:
            raise FormatError(f"{WHO}: {name} is missing tensor(s) {format_names(missing)}")
        if unexpected:
            raise FormatError(f"{WHO}: {name} has unexpected tensor(s) {format_names(unexpected)}")
        stored_fp16 = {f"{layer}.{key}" for layer in modules for key in STORED_FP16}
        for key, tensor in expected.items():
            dtype, shape = header[key]
            if shape != tuple(tensor.shape):
                raise FormatError(
                    f"{WHO}: tensor {key!r} has shape {list(shape)}, the model expects {list(tensor.shape)}"
                )
            if key in stored_fp16:
                ok = dtype == torch.float16
            else:
                ok = dtype == tensor.dtype or (
                    dtype is not None and dtype.is_floating_point and tensor.dtype.is_floating_point
                )
            if not ok:
                wanted = torch.float16 if key in stored_fp16 else tensor.dtype
                raise FormatError(f"{WHO}: tensor {key!r} has dtype {dtype}, the model expects {wanted}")

    def _keep_saved_dtypes(self, model: nn.Module, modules: dict[str, AQModule]) -> None:
        """Without `torch_dtype`, give every floating tensor the dtype `load_quantized` gives it: the saved
        one, except the AQ layers' codebooks and scales (`param_dtype`, set when built) and their input
        quantizers' ranges (float32). diffusers then casts each file tensor to the dtype found here."""
        for key, (dtype, _) in self.header.items():
            layer = next((n for n in modules if key.startswith(f"{n}.")), None)
            if layer is not None and key != f"{layer}.bias":
                continue
            owner_name, _, attr = key.rpartition(".")
            owner = model.get_submodule(owner_name)
            for store in (owner._parameters, owner._buffers):
                old = store.get(attr)
                if old is None or not old.is_floating_point() or old.dtype == dtype:
                    continue
                new = torch.empty(old.shape, dtype=dtype, device=old.device)
                store[attr] = (
                    nn.Parameter(new, requires_grad=old.requires_grad) if store is owner._parameters else new
                )

    # ------------------------------------------------------------------ after loading
    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        named = chain(
            model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
        )
        unloaded = sorted(name for name, tensor in named if tensor.device.type == "meta")
        if unloaded:
            raise FormatError(f"{WHO}: tensor(s) {format_names(unloaded)} were not loaded")
        for name, module in model.named_modules():
            if isinstance(module, (AQModule, UniformModule)):
                try:
                    module.qweight  # noqa: B018 - validates codes (range), codebooks and scales (finite)
                except ValueError as error:
                    raise FormatError(f"{WHO}: layer {name!r}: {error}") from None
        for name, quantizer in input_quantizers(model).items():
            try:
                quantizer.set_ranges(quantizer.lo.clone(), quantizer.hi.clone())  # validates
            except ValueError as error:
                raise FormatError(f"{WHO}: {name}.{QUANTIZER_ATTR}: {error}") from None
        return model

    # ------------------------------------------------------------------ properties
    @property
    def is_serializable(self) -> bool:
        return False  # diffusers' save_pretrained would not write an avq folder: use avq.save_quantized

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return False


def read_header(path: Path) -> dict[str, tuple[torch.dtype | None, tuple[int, ...]]]:
    """`{name: (dtype, shape)}` of a safetensors file, from its header only (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            return {
                key: (_SAFETENSORS_DTYPES.get(s.get_dtype()), tuple(s.get_shape()))
                for key, s in slices.items()
            }
    except Exception as error:  # SafetensorError, OSError, ...
        raise FormatError(f"{WHO}: {path} is truncated or not a valid safetensors file: {error}") from error


def config_from_model(model: nn.Module) -> dict:
    """The `config.json` (less `quantization_config`) that diffusers built `model` from, as far as the
    model's resolved config tells: keys the file lacked were filled with defaults and are listed in
    `_use_default_values` (they are left out), keys the class does not know are kept as they were read.
    So a damaged key name (`mid_block_scahe_factor`) changes its digest. Used when diffusers does not say
    which folder it reads; keyword overrides given to `from_pretrained` count as changes."""
    config = dict(model.config)
    defaults = set(config.pop("_use_default_values", None) or ())
    config = {k: v for k, v in config.items() if k not in defaults and k != "quantization_config"}
    return json_safe(config, "model.config")


def _device_of(layer: nn.Module) -> torch.device:
    tensor = next(chain(layer.parameters(), layer.buffers()), None)
    return torch.device("meta") if tensor is None else tensor.device


# ====================================================================== the classes (registered by
# `avq.storage.diffusers_registry`)
_CLASSES: tuple[type, type] | None = None


def built_classes() -> tuple[type, type] | None:
    """`(AvqConfig, AvqDiffusersQuantizer)` if they were made already, else None (never imports diffusers)."""
    return _CLASSES


def backend_classes() -> tuple[type, type]:
    """`(AvqConfig, AvqDiffusersQuantizer)`, made now if need be (imports diffusers)."""
    return _classes()


def _classes() -> tuple[type, type]:
    """`(AvqConfig, AvqDiffusersQuantizer)`: the logic above on diffusers' base classes, made on first use
    so that importing this module (and avq) does not import diffusers."""
    global _CLASSES
    if _CLASSES is None:
        from diffusers.quantizers.base import DiffusersQuantizer
        from diffusers.quantizers.quantization_config import QuantizationConfigMixin

        class AvqConfig(_AvqConfigLogic, QuantizationConfigMixin):
            __doc__ = _AvqConfigLogic.__doc__

        class AvqDiffusersQuantizer(_AvqQuantizerLogic, DiffusersQuantizer):
            __doc__ = _AvqQuantizerLogic.__doc__

        for cls in (AvqConfig, AvqDiffusersQuantizer):
            cls.__qualname__ = cls.__name__  # importable by name (module __getattr__), e.g. for pickle
        _CLASSES = (AvqConfig, AvqDiffusersQuantizer)
    return _CLASSES


def __getattr__(name: str) -> Any:
    if name == "AvqConfig":
        return _classes()[0]
    if name == "AvqDiffusersQuantizer":
        return _classes()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
