"""What the subcommands share: models named on the command line (a shipped reference model, a diffusers
model folder or a pipeline folder), the compute device and dtype, and the JSON figures writer."""

from __future__ import annotations

import json
import math
from pathlib import Path

from avq.extras import require_bench
from avq.storage.atomic import write_json_atomic

SHIPPED_MODELS = ("digits-unet", "digits-dit", "digits-unet-mini")
SHIPPED_PIPELINES = ("digits-t2i",)  # text-to-image pipeline folders of avq_bench (`avq_bench.t2i`)
SUPPORTED_CLASSES = (
    "UNet2DModel",
    "UNet2DConditionModel",
    "DiTTransformer2DModel",
    "PixArtTransformer2DModel",
)


class UserError(Exception):
    """Bad input from the command line: reported as one line, exit status 2."""


def resolve_shipped_pipeline(spec: str | None) -> str | None:
    """A shipped pipeline's name -> its folder, laid out loadable (`avq_bench.t2i.pipeline_folder` links
    the text encoder's weights from their installed package); any other value unchanged."""
    if spec not in SHIPPED_PIPELINES:
        return spec
    import importlib

    require_bench(f"the shipped pipeline {spec!r}")
    return str(importlib.import_module("avq_bench.t2i").pipeline_folder())


def load_model(spec: str):
    """A shipped model by name, or a local diffusers model folder, in float32 eval mode (a pipeline
    folder is loaded whole by `avq.pipelines`; here only its `unet/` or `transformer/`)."""
    import diffusers

    if spec in SHIPPED_MODELS:
        return require_bench(f"the shipped model {spec!r}").reference.load_reference(spec)
    folder = Path(spec)
    if not folder.exists():
        raise UserError(
            f"unknown model {spec!r}: not a shipped model ({', '.join(SHIPPED_MODELS + SHIPPED_PIPELINES)}) "
            "and no such folder"
        )
    if not folder.is_dir():
        raise UserError(f"{spec}: not a folder (expected a diffusers model folder with config.json)")
    if not (folder / "config.json").is_file() and (folder / "model_index.json").is_file():
        for sub in ("unet", "transformer"):
            if (folder / sub / "config.json").is_file():
                folder = folder / sub
                break
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(
            f"{spec}: neither a diffusers pipeline folder (model_index.json) nor a model folder (config.json)"
        )
    try:
        class_name = json.loads(config_path.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as error:
        raise UserError(f"{config_path}: not a diffusers config ({error})") from None
    if not class_name:
        raise UserError(f"{config_path}: not a diffusers model config (no _class_name)")
    if class_name not in SUPPORTED_CLASSES and class_name != "Transformer2DModel":
        raise UserError(
            f"{spec}: model class {class_name} is not supported (supported: {', '.join(SUPPORTED_CLASSES)})"
        )
    # Hub DiT / PixArt folders say `Transformer2DModel`: diffusers remaps them to their own classes.
    cls = getattr(diffusers, class_name)
    try:
        return cls.from_pretrained(folder, low_cpu_mem_usage=False, local_files_only=True).eval()
    except (OSError, ValueError) as error:
        raise UserError(
            f"{spec}: cannot load the {class_name} weights ({str(error).splitlines()[0]})"
        ) from None


DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def resolve_device(name: str | None):
    """`--device`: default `cuda` when available, else `cpu`; a CUDA device without CUDA is refused."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UserError(f"--device {name}: not a torch device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def resolve_dtype(name: str):
    """`--dtype`: float32 (default), float16 or bfloat16."""
    import torch

    if name not in DTYPES:
        raise UserError(f"--dtype {name}: use float32, float16 or bfloat16")
    return getattr(torch, DTYPES[name])


def write_json(path: str, figures: dict) -> None:
    # json cannot hold inf (identical images' PSNR): written as null.
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in figures.items()}
    write_json_atomic(path, clean)
