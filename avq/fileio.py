"""File helpers shared by every writer that must not lose data: fsync and sha256 of files and folders."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk (before it is renamed into place)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames inside a folder durable; a no-op where folders cannot be opened (e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(Path(path), "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a uniquely named temporary file in the same folder, fsynced, then
    renamed over it: a reader (or a crash) never sees half a file. Creates the folder; mode 0644."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: object, indent: int = 2) -> Path:
    """`write_text_atomic` of `data` as JSON (serialised first: a bad value leaves the old file alone)."""
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")
