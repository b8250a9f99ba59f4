"""`save_quantized` / `load_quantized`: an avq model folder, `config.json` (the diffusers config plus the
`quantization_config` block) and `model.safetensors` (also as `diffusion_pytorch_model.safetensors`, a hard
link, for diffusers' `from_pretrained`), written atomically (`write_folder_atomic`) and read with safetensors
only (no pickle, no network). The format and its checks are in `avq.storage.format`; loading through
diffusers is `avq.storage.diffusers_backend`; both build their modules with `avq.storage.layers`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from avq.calibration.activations import (
    QUANTIZER_ATTR,
    ActQuantizer,
    attach_input_quantizer,
    input_quantizers,
)
from avq.core.modules import AQModule, replace_module
from avq.core.uniform_modules import (
    UniformModule,
)
from avq.storage.atomic import sha256_file, write_folder_atomic
from avq.storage.format import (
    AQ_TENSORS,
    CONFIG_NAME,
    DIFFUSERS_WEIGHTS_NAME,
    FORMAT,
    OWN_FILES,
    UNIFORM_TENSORS,
    VERSION,
    WEIGHTS_NAME,
    WEIGHTS_NAMES,
    FormatError,
    check_quantization_config,
    config_digest,
    format_names,
    json_safe,
    layer_entry,
    model_config,
    read_config,
    verify_checksum,
    verify_config_checksum,
)
from avq.storage.layers import input_quantizer_targets, quantized_layer

log = logging.getLogger("avq")


# ====================================================================== save
def save_quantized(model: nn.Module, folder: str | os.PathLike, *, extra_config: dict | None = None) -> Path:
    """Write `model` (with `AQLinear`/`AQConv2d` layers, and packed `UniformLinear`/`UniformConv2d` ones)
    to `folder`, atomically; return the folder.

    Everything is written to a temporary sibling folder and fsynced, then swapped into place, so a failure
    leaves any previous save untouched. An existing `folder` is replaced as a whole; to never delete files
    that are not ours, it must hold nothing but `config.json`, `model.safetensors` and
    `diffusion_pytorch_model.safetensors`. The weights are written once; the second name is a hard link (a
    copy where the file system has none), so that diffusers' `from_pretrained` finds them.
    `extra_config` (JSON-safe) is stored as `quantization_config["extra"]` (e.g. preset, solver figures).
    A model loaded through diffusers (`avq.storage.diffusers_backend`) carries its old avq block in its
    config: it is replaced by the new one.
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
        if not isinstance(module, (AQModule, UniformModule)):
            continue
        if not name:
            raise FormatError("save_quantized: the model itself is a quantized layer; wrap it in a module")
        qweight = module.qweight  # validates; the float tensors in fp16 as stored
        if isinstance(module, UniformModule):  # levels stay packed; grids in fp16
            tensors[f"{name}.packed"] = module.packed
            tensors |= {f"{name}.{key}": getattr(qweight, key) for key in UNIFORM_TENSORS[1:]}
        else:
            tensors |= {f"{name}.{key}": getattr(qweight, key) for key in AQ_TENSORS}
        layers[name] = layer_entry(module)
    quantizers = input_quantizers(model)
    config = model_config(model)
    previous = config.pop("quantization_config", None)
    if previous is not None and not (isinstance(previous, dict) and previous.get("format") == FORMAT):
        raise FormatError("save_quantized: the model's config already has a 'quantization_config' entry")
    quantization_config: dict[str, Any] = {
        # diffusers reads `quant_method` to pick its quantizer: "avq" is registered on `import avq`
        # (avq.storage.diffusers_backend), so that `<ModelClass>.from_pretrained(folder)` loads this folder.
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
        link_or_copy(weights_path, tmp / DIFFUSERS_WEIGHTS_NAME)
        quantization_config["checksum"] = {
            WEIGHTS_NAME: f"sha256:{sha256_file(weights_path)}",  # and DIFFUSERS_WEIGHTS_NAME, the same file
            CONFIG_NAME: config_digest(config),  # the model config, without this block
        }
        config["quantization_config"] = quantization_config
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return write_folder_atomic(folder, fill)


def link_or_copy(source: Path, target: Path) -> None:
    """`target` as a hard link to `source` (no second copy on disk), or a copy where links fail (file systems
    without hard links, e.g. some network and FAT mounts)."""
    try:
        os.link(source, target)
    except OSError as error:
        log.debug("save_quantized: hard link %s failed (%s); copying", target.name, error)
        shutil.copyfile(source, target)


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
    `quantization_config["layers"]` become `AQLinear`/`AQConv2d` (or, for RTN/GPTQ entries,
    `UniformLinear`/`UniformConv2d`); every other tensor is loaded strictly
    (no tensor missing, none unexpected, matching shapes) and keeps the dtype it was saved in.
    Raises `FormatError` naming the problem for anything malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"load_quantized: folder {folder} not found")
    config = read_config(folder)
    quantization_config = check_quantization_config(config, folder)
    verify_config_checksum(config, quantization_config, source=str(folder / CONFIG_NAME))
    weights_path = weights_file(folder, quantization_config)
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
    modules = {name: quantized_layer(model, name, entry, tensors) for name, entry in layers.items()}
    current = model.state_dict()
    expected: dict[str, torch.Tensor | None] = {  # None: a quantized layer's tensor, checked when built
        key: tensor for key, tensor in current.items() if not any(key.startswith(f"{n}.") for n in layers)
    }
    dense_quantizers = {}  # input quantizers of layers that stay dense (FP)
    targets = input_quantizer_targets(model, quantization_config.get("activations", {}), modules)
    for name, (layer, quantizer) in targets.items():
        if name in modules:  # fresh module: fill its quantizer from the file now
            keys = {k: f"{name}.{QUANTIZER_ATTR}.{k}" for k in ("lo", "hi")}
            if not all(key in tensors for key in keys.values()):
                raise FormatError(f"load_quantized: {WEIGHTS_NAME} is missing the input ranges of {name!r}")
            _attach(layer, name, quantizer, {k: tensors[key] for k, key in keys.items()})
        else:
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
    empty = [key for key, tensor in model.state_dict().items() if tensor.is_meta]
    if empty:  # a skeleton parameter outside the state dict (none in diffusers' models); defensive
        raise FormatError(f"load_quantized: no tensor in the file for {format_names(empty)}")
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
    from accelerate import init_empty_weights

    # Parameters on the meta device (buffers real: some are computed at init and never saved, e.g. DiT's
    # sin-cos position table): every parameter is assigned from the file, so loading a W2 model never
    # allocates its dense fp32 weights, which freed would stay in the process's heap.
    with init_empty_weights():
        return cls.from_config({k: v for k, v in config.items() if k != "quantization_config"})


def weights_file(folder: Path, quantization_config: dict, who: str = "load_quantized") -> Path:
    """The folder's weights file, checked: `model.safetensors` and/or `diffusion_pytorch_model.safetensors`,
    each one present matching the recorded checksum (so two names are one file, or the same bytes)."""
    present = [folder / name for name in WEIGHTS_NAMES if (folder / name).is_file()]
    if not present:
        raise FormatError(
            f"{who}: {folder / WEIGHTS_NAME} not found ({WEIGHTS_NAME} is missing, and so is "
            f"{DIFFUSERS_WEIGHTS_NAME})"
        )
    verify_checksum(present[0], quantization_config, who)
    for other in present[1:]:
        if not os.path.samefile(present[0], other):  # a copy (no hard links there): check its bytes too
            verify_checksum(other, quantization_config, who)
    return present[0]


def _attach(module: AQModule, name: str, quantizer: ActQuantizer, ranges: dict[str, torch.Tensor]) -> None:
    try:
        quantizer.set_ranges(ranges["lo"], ranges["hi"])
        attach_input_quantizer(module, quantizer)
    except ValueError as error:
        raise FormatError(f"load_quantized: input quantizer of {name!r}: {error}") from None
