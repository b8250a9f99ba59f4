"""The one checkpoint layer: atomic, fsynced, pickle-free, fingerprinted.

Every resumable run (the quantize run, fine-tuning, the benchmark's trainer) keeps its state in a folder
of safetensors files and one JSON metadata file. The JSON file is the commit point: tensor files are
written first (unique temporary name, fsync, rename), the JSON that names them (with their sha256) last,
so a process killed at any moment (`kill -9`) leaves the previous committed state whole.

- `tensor_digest` / `state_digest`: fingerprints of tensors and of a model's state (names, dtypes, shapes,
  bytes), which runs compare to refuse a checkpoint of another model or configuration.
- `save_tensors_atomic` / `load_tensors`: one safetensors file, checked against its sha256 when given.
- `CheckpointFolder`: a folder with a metadata JSON file; `save_snapshot` / `load_snapshot` keep one
  numbered state file (`state-<step>.safetensors`) next to it, for step-based runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from avq.storage.atomic import fsync_dir, sha256_file, write_file_atomic, write_json_atomic

META_NAME = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: another model or configuration, corrupted, or not resumed."""


# ============================================================================ fingerprints
def tensor_digest(digest: Any, tensor: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes into a `hashlib` digest."""
    t = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(f"{t.dtype}{list(tensor.shape)}".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes())


def state_digest(state: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 over a model's (or a state dict's) tensors, by sorted name."""
    tensors = state.state_dict() if isinstance(state, nn.Module) else state
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        tensor_digest(digest, tensors[name])
    return digest.hexdigest()


# ============================================================================ tensor files
def save_tensors_atomic(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], *, checksum: bool = False
) -> str | None:
    """Write `tensors` as a safetensors file through a unique temporary name, fsynced, then renamed over
    `path`; returns the file's sha256 with `checksum` (else None). Tensors go to contiguous CPU memory."""
    from safetensors.torch import save_file

    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    path = write_file_atomic(path, lambda tmp: save_file(contiguous, str(tmp)))
    return sha256_file(path) if checksum else None


def load_tensors(path: str | os.PathLike, *, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file (no pickle); `CheckpointError` if it is missing or fails its `sha256`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: the checkpoint is incomplete")
    if sha256 is not None and sha256_file(path) != sha256:
        raise CheckpointError(f"{path} does not match the checksum its checkpoint recorded: corrupted")
    return load_file(str(path))


# ============================================================================ folders
class CheckpointFolder:
    """A checkpoint folder: a metadata JSON file (`meta_name`, the commit point) and tensor files."""

    def __init__(self, folder: str | os.PathLike, meta_name: str = META_NAME):
        self.folder = Path(folder)
        self.meta_path = self.folder / meta_name

    def exists(self) -> bool:
        return self.meta_path.is_file()

    def read_meta(self) -> dict[str, Any]:
        if not self.meta_path.is_file():
            raise FileNotFoundError(f"no checkpoint to resume: {self.meta_path} does not exist")
        try:
            meta = json.loads(self.meta_path.read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{self.meta_path} is not valid JSON ({error})") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{self.meta_path} is not a checkpoint (expected a JSON object)")
        return meta

    def write_meta(self, meta: Mapping[str, Any]) -> None:
        """Commit: the metadata file is replaced atomically (and the folder entry fsynced)."""
        write_json_atomic(self.meta_path, dict(meta), indent=1)
        fsync_dir(self.folder)

    def save_tensors(self, name: str, tensors: Mapping[str, torch.Tensor], *, checksum: bool = False):
        """Write `<folder>/<name>` atomically; with `checksum` returns its sha256 (record it in the meta)."""
        return save_tensors_atomic(self.folder / name, tensors, checksum=checksum)

    def load_tensors(self, name: str, sha256: str | None = None) -> dict[str, torch.Tensor]:
        return load_tensors(self.folder / name, sha256=sha256)

    # ------------------------------------------------------------------ step snapshots
    def save_snapshot(self, step: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
        """Commit the state after `step` steps: `state-<step>.safetensors`, then the metadata naming it
        (`tensors`, `tensors_sha256`); older state files are removed after the commit."""
        name = f"state-{step:08d}.safetensors"
        digest = self.save_tensors(name, tensors, checksum=True)
        self.write_meta({**meta, "step": step, "tensors": name, "tensors_sha256": digest})
        for old in self.folder.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink()
        return self.meta_path

    def load_snapshot(self, *, format: int, error: type[CheckpointError] = CheckpointError):
        """`(meta, tensors)` of the committed snapshot, after checking its format and checksum; the caller
        checks that the metadata belongs to its run. `error` is the exception type to raise."""
        try:
            meta = self.read_meta()
        except CheckpointError as failure:
            raise error(str(failure)) from None
        if meta.get("format") != format:
            raise error(
                f"{self.meta_path}: checkpoint format {meta.get('format')!r} is not this avq's "
                f"(format {format})"
            )
        try:
            tensors = self.load_tensors(str(meta.get("tensors")), meta.get("tensors_sha256"))
        except CheckpointError as failure:
            raise error(f"{self.meta_path} names a tensor file that cannot be used: {failure}") from None
        return meta, tensors
