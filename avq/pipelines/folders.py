"""Pipeline folders in and out: load a diffusers pipeline for quantization, find its denoiser, check it,
and write the quantized pipeline back as a folder diffusers loads.

What is quantized: the denoiser only (`unet` or `transformer`). Text encoders, tokenizers, the VAE,
the scheduler and everything else are left as they are: in the output folder they are hard links to the
source folder's files (copies where links fail), or saved with their own `save_pretrained`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

DENOISERS = ("unet", "transformer")
PIPELINE_INDEX = "model_index.json"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class PipelineError(ValueError):
    """A folder or pipeline that cannot be quantized as asked; the message names the problem."""


def is_pipeline_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / PIPELINE_INDEX).is_file()


def denoiser_name(pipe: Any) -> str:
    """`"unet"` or `"transformer"`: the pipeline component that avq quantizes."""
    components = getattr(pipe, "components", {}) or {}
    for name in DENOISERS:
        if isinstance(components.get(name), nn.Module):
            return name
    raise PipelineError(
        f"{type(pipe).__name__} has no denoiser to quantize (no 'unet' or 'transformer' component; "
        f"components: {sorted(components)})"
    )


def check_pipeline(pipe: Any) -> None:
    """Refuse a pipeline that cannot be calibrated: e.g. a text-to-image pipeline without the text encoder
    its denoiser needs, or a scheduler that cannot be stepped."""
    import inspect

    name = denoiser_name(pipe)
    components = pipe.components
    denoiser = components[name]
    scheduler = components.get("scheduler")
    if (
        scheduler is None
        or not callable(getattr(scheduler, "step", None))
        or not callable(getattr(scheduler, "set_timesteps", None))
    ):
        raise PipelineError(
            f"{type(pipe).__name__}: scheduler {type(scheduler).__name__} cannot drive calibration "
            "(it needs set_timesteps() and step())"
        )
    takes_prompt = "prompt" in inspect.signature(pipe.__call__).parameters
    cross = getattr(denoiser.config, "cross_attention_dim", None) or getattr(
        denoiser.config, "joint_attention_dim", None
    )
    if takes_prompt:
        expected = [n for n in TEXT_ENCODERS if n in components]
        missing = [n for n in expected if components[n] is None and not _optional_encoder(pipe, n)]
        if missing or not expected:
            raise PipelineError(
                f"{type(pipe).__name__}: the {name} is text-conditioned"
                + (f" (cross-attention dim {cross})" if cross else "")
                + f" but the pipeline has no {', '.join(missing or ['text_encoder'])}: calibration encodes "
                "real prompts with the pipeline's own text encoders. Use the complete pipeline folder."
            )


def _optional_encoder(pipe: Any, name: str) -> bool:
    """SDXL refiners run without `text_encoder`; SD3 may drop its T5 (`text_encoder_3`)."""
    cls = type(pipe).__name__
    return (name == "text_encoder" and "Img2Img" in cls) or (
        name == "text_encoder_3" and cls.startswith("StableDiffusion3")
    )


def load_pipeline_folder(
    folder: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """A diffusers pipeline folder (with `model_index.json`), loaded offline for quantization; a folder
    whose denoiser is an avq save loads with that denoiser quantized (`load_pipeline`)."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    if not is_pipeline_folder(folder):
        raise PipelineError(f"{folder} is not a diffusers pipeline folder (no {PIPELINE_INDEX})")
    overrides = {}
    try:
        index = json.loads((folder / PIPELINE_INDEX).read_text())
    except json.JSONDecodeError as error:
        raise PipelineError(f"{folder / PIPELINE_INDEX} is not valid JSON ({error})") from None
    if not isinstance(index, dict) or not any(name in index for name in DENOISERS):
        raise PipelineError(
            f"{folder / PIPELINE_INDEX} names no unet or transformer: no denoiser to quantize"
        )
    missing = [
        name
        for name, entry in index.items()
        if not name.startswith("_")
        and isinstance(entry, list)
        and entry[0] is not None
        and not (folder / name).is_dir()
    ]
    if missing:
        needs = [n for n in missing if n.startswith("text_encoder") or n.startswith("tokenizer")]
        why = " (the denoiser is conditioned on its embeddings)" if needs else ""
        raise PipelineError(
            f"{folder} is missing the component folder(s) {', '.join(m + '/' for m in missing)} listed in "
            f"{PIPELINE_INDEX}{why}; use the complete pipeline folder"
        )
    for name in DENOISERS:
        if name in index and _is_avq_folder(folder / name):
            from avq.storage.serialization import load_quantized

            overrides[name] = load_quantized(folder / name, device=device).to(dtype)
    try:
        pipe = DiffusionPipeline.from_pretrained(
            folder, torch_dtype=dtype, local_files_only=True, **overrides
        )
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PipelineError(f"{folder}: cannot load the pipeline ({first})") from None
    pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(folder: str | os.PathLike, *, device: str | torch.device = "cpu", dtype=torch.float32):
    """A quantized pipeline folder written by `save_pipeline` (or any pipeline folder), ready to run."""
    pipe = load_pipeline_folder(folder, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=False)
    return pipe


def _is_avq_folder(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        block = json.loads(config.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return block.get("quant_method") == "avq" or block.get("format") == "avq"


def save_pipeline(
    pipe: Any,
    folder: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    extra_config: dict | None = None,
) -> Path:
    """Write `pipe` as a pipeline folder whose denoiser is an avq folder (`avq.save_quantized`); every
    other component is hard-linked from `source` (default: the folder the pipeline was loaded from) or
    saved with its own `save_pretrained`. Written atomically as a whole (`write_folder_atomic`).
    `extra_config` goes into the denoiser's `quantization_config` (`avq.save_quantized`)."""
    from avq.storage.atomic import write_folder_atomic
    from avq.storage.serialization import save_quantized

    name = denoiser_name(pipe)
    source = Path(source or getattr(pipe.config, "_name_or_path", "") or "")
    folder = Path(folder)
    if folder.exists() and not is_pipeline_folder(folder):
        raise PipelineError(f"{folder} exists and is not a pipeline folder; choose another --out")

    def fill(tmp: Path) -> None:
        pipe.save_config(tmp)  # model_index.json
        for component, module in pipe.components.items():
            if module is None:
                continue
            if component == name:
                save_quantized(module, tmp / component, extra_config=extra_config)
            elif source.is_dir() and (source / component).is_dir():
                _link_tree(source / component, tmp / component)
            elif hasattr(module, "save_pretrained"):
                module.save_pretrained(tmp / component)

    return write_folder_atomic(folder, fill)


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of `src` under `dst` (a copy where the file system refuses links)."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
