"""Models named on the command line: a shipped reference model or a local diffusers folder."""

from __future__ import annotations

import json
from pathlib import Path

from avq.extras import require_bench

SHIPPED_MODELS = ("digits-unet", "digits-dit", "digits-unet-mini")
SUPPORTED_CLASSES = (
    "UNet2DModel",
    "UNet2DConditionModel",
    "DiTTransformer2DModel",
    "PixArtTransformer2DModel",
)


class UserError(Exception):
    """Bad input from the command line: reported as one line, exit status 2."""


def load_model(spec: str):
    """A shipped model by name, or a local diffusers model folder (or pipeline folder with `unet/` or
    `transformer/`), in float32 eval mode."""
    import diffusers

    if spec in SHIPPED_MODELS:
        return require_bench(f"the shipped model {spec!r}").reference.load_reference(spec)
    folder = Path(spec)
    if not folder.exists():
        raise UserError(
            f"unknown model {spec!r}: not a shipped model ({', '.join(SHIPPED_MODELS)}) and no such folder"
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
        raise UserError(f"{spec}: not a diffusers model folder (no config.json)")
    try:
        class_name = json.loads(config_path.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as error:
        raise UserError(f"{config_path}: not a diffusers config ({error})") from None
    if not class_name:
        raise UserError(f"{config_path}: not a diffusers model config (no _class_name)")
    if class_name not in SUPPORTED_CLASSES:
        raise UserError(
            f"{spec}: model class {class_name} is not supported (supported: {', '.join(SUPPORTED_CLASSES)})"
        )
    cls = getattr(diffusers, class_name)
    try:
        return cls.from_pretrained(folder, low_cpu_mem_usage=False).eval()
    except (OSError, ValueError) as error:
        raise UserError(
            f"{spec}: cannot load the {class_name} weights ({str(error).splitlines()[0]})"
        ) from None
