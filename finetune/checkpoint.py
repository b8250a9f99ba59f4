"""Resumable fine-tuning checkpoints: pickle-free, atomic, refused for another model, spec or config.

On the shared checkpoint layer (`avq.storage.checkpoint`, as the quantize run and the benchmark's
trainer): a folder with

- `state-<step>.safetensors`: the student's state dict (`model.<key>`: codes, codebooks, scales, FP
  parameters, activation ranges), the straight-through shadows (`shadow.<layer>`) and the optimizer state
  (`optim.<tensor name>.exp_avg | exp_avg_sq | step`, see `avq.finetune.optim`);
- `checkpoint.json`: format, step, the `FinetuneConfig`, the identity of the run (student: class,
  architecture config, per-layer specs and shapes, sha256 of its *initial* tensors; teacher: class,
  config, sha256), the tensor file's name and sha256, the per-step history, seconds, world size.

Both are written to unique temporary names, fsynced and renamed; `checkpoint.json` goes last and is the
commit point, so a process killed at any moment (`kill -9`) leaves the previous checkpoint whole. Older tensor
files are deleted after the commit. Nothing else is needed to resume: the teacher data of every step is a
pure function of the step (`avq.finetune.data`), and so are the learning rates.

`load_checkpoint` refuses, with `FinetuneCheckpointError` naming the difference, a checkpoint of another
model (class or architecture), another quantization (a layer's spec or shape), other starting weights,
another teacher, or another configuration (any field except the run-only ones, `RUN_ONLY_FIELDS`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from avq.core.modules import AQModule
from avq.storage.checkpoint import CheckpointError, CheckpointFolder, state_digest

from .config import FinetuneConfig, FinetuneError
from .optim import SlotAdamW
from .pv import ShadowLayer

CHECKPOINT_FORMAT = 1


class FinetuneCheckpointError(FinetuneError, CheckpointError):
    """A fine-tuning checkpoint that belongs to another model, quantization, teacher or configuration."""


# ============================================================================ identity
def architecture_config(model: nn.Module) -> dict[str, Any]:
    """The model's diffusers config as JSON data, without private (`_...`) keys and without the avq
    `quantization_config` block: what makes two models the same architecture."""
    config = getattr(model, "config", None)
    data = dict(config) if config is not None else {}
    clean = {k: v for k, v in data.items() if not k.startswith("_") and k != "quantization_config"}
    return json.loads(json.dumps(clean, sort_keys=True, default=str))


def run_identity(student: nn.Module, teacher: nn.Module) -> dict[str, Any]:
    """What a checkpoint must match besides the config (call on the *initial* student)."""
    layers = {
        name: {"spec": m.spec.name, "shape": list(m.shape)}
        for name, m in student.named_modules()
        if isinstance(m, AQModule)
    }
    return {
        "student": {
            "class": type(student).__name__,
            "config": architecture_config(student),
            "layers": layers,
            "digest": state_digest(student),
        },
        "teacher": {
            "class": type(teacher).__name__,
            "config": architecture_config(teacher),
            "digest": state_digest(teacher),
        },
    }


# ============================================================================ write
def save_checkpoint(
    folder: str | os.PathLike,
    *,
    step: int,
    config: FinetuneConfig,
    identity: dict[str, Any],
    student: nn.Module,
    shadows: Sequence[ShadowLayer],
    optimizer: SlotAdamW,
    history: list[dict[str, Any]],
    seconds: float,
    world_size: int,
) -> Path:
    """Write the state after `step` steps (module docstring: contents and atomicity); returns the json."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in student.state_dict().items():
        tensors[f"model.{key}"] = value.detach().cpu().contiguous().clone()
    for layer in shadows:
        tensors[f"shadow.{layer.name}"] = layer.delta.detach().cpu().contiguous().clone()
    for key, value in optimizer.state_tensors().items():
        tensors[f"optim.{key}"] = value
    meta = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "identity": identity,
        "history": history,
        "seconds": seconds,
        "world_size": world_size,
        "torch": torch.__version__,
    }
    return CheckpointFolder(folder).save_snapshot(step, tensors, meta)


def has_checkpoint(folder: str | os.PathLike) -> bool:
    return CheckpointFolder(folder).exists()


# ============================================================================ read
def load_checkpoint(
    folder: str | os.PathLike, *, config: FinetuneConfig, identity: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`(meta, tensors)` of the checkpoint in `folder`, after checking that it belongs to this run."""
    store = CheckpointFolder(folder)
    path = store.meta_path
    if not store.exists():
        raise FileNotFoundError(f"no fine-tuning checkpoint to resume: {path} does not exist")
    meta, tensors = store.load_snapshot(format=CHECKPOINT_FORMAT, error=FinetuneCheckpointError)
    _check_identity(path, meta.get("identity") or {}, identity)
    wanted, saved = config.result_dict(), meta.get("config") or {}
    saved = {k: v for k, v in saved.items() if k in wanted or k not in config.to_dict()}
    diff = sorted(k for k in set(wanted) | set(saved) if wanted.get(k) != saved.get(k))
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs run {wanted.get(k)!r}" for k in diff)
        raise FinetuneCheckpointError(
            f"{path} was written with another fine-tuning configuration; refusing to resume. "
            f"Differences: {details}. Resume with the same settings, or start over in another folder."
        )
    return meta, tensors


def _check_identity(path: Path, saved: dict[str, Any], run: dict[str, Any]) -> None:
    s_student, r_student = saved.get("student") or {}, run["student"]
    if s_student.get("class") != r_student["class"] or s_student.get("config") != r_student["config"]:
        keys = sorted(
            k
            for k in set(s_student.get("config") or {}) | set(r_student["config"])
            if (s_student.get("config") or {}).get(k) != r_student["config"].get(k)
        )
        raise FinetuneCheckpointError(
            f"{path} is a checkpoint of another model: a {s_student.get('class')} "
            f"(config differs in {', '.join(keys[:8]) or 'nothing'}), not this {r_student['class']}; "
            "refusing to resume. Use another checkpoint folder."
        )
    s_layers, r_layers = s_student.get("layers") or {}, r_student["layers"]
    if s_layers != r_layers:
        lines = []
        for name in sorted(set(s_layers) | set(r_layers)):
            a, b = s_layers.get(name), r_layers.get(name)
            if a != b:
                show = lambda e: "FP" if e is None else f"{e['spec']} {e['shape']}"  # noqa: E731
                lines.append(f"{name}: checkpoint {show(a)} vs model {show(b)}")
        raise FinetuneCheckpointError(
            f"{path} is a checkpoint of another quantization of this model ({len(lines)} layer(s) differ: "
            f"{'; '.join(lines[:5])}); refusing to resume."
        )
    if s_student.get("digest") != r_student["digest"]:
        raise FinetuneCheckpointError(
            f"{path} is a checkpoint of another quantized model (same architecture and specs, other "
            "starting weights: codes, codebooks or FP parameters differ); refusing to resume."
        )
    s_teacher, r_teacher = saved.get("teacher") or {}, run["teacher"]
    if s_teacher != r_teacher:
        raise FinetuneCheckpointError(
            f"{path} was fine-tuned against another teacher (FP model {s_teacher.get('class')} with other "
            "config or weights); refusing to resume. Pass the same --teacher."
        )


@torch.no_grad()
def restore(
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    student: nn.Module,
    shadows: Sequence[ShadowLayer],
    optimizer: SlotAdamW,
) -> None:
    """Put the checkpoint's student state, shadows and optimizer state in place (exactly)."""
    head = "model."
    state = {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)}
    try:
        student.load_state_dict(state, strict=True)
        for layer in shadows:
            key = f"shadow.{layer.name}"
            if key not in tensors:
                raise KeyError(f"shadow of {layer.name!r} is missing")
            layer.delta.copy_(tensors[key].to(layer.delta.device))
        head = "optim."
        optimizer.load_state_tensors({k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)})
    except (KeyError, RuntimeError, ValueError) as error:
        raise FinetuneCheckpointError(
            f"checkpoint {meta.get('tensors')} does not fit this run: {error}"
        ) from None
