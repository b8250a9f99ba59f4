"""The one atomic writer (`write_atomic` and its text/JSON forms) and the fsync / sha256 helpers that
everything avq writes goes through."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("avq")


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


def write_file_atomic(path: str | os.PathLike, fill: Callable[[Path], object]) -> Path:
    """The one atomic writer: `fill(tmp)` writes a uniquely named temporary file in `path`'s folder, which
    is fsynced and then renamed over `path`, so a reader (or a crash) never sees half a file; the rename is
    made durable by fsyncing the folder. Creates the folder; mode 0644."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fill(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """`write_file_atomic` for writers that take an open binary handle (`np.savez`, `PIL.Image.save`)."""

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    return write_file_atomic(path, fill)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`write_atomic` of `text` (UTF-8)."""
    data = text.encode()
    return write_atomic(path, lambda handle: handle.write(data))


def write_json_atomic(path: str | os.PathLike, data: object, indent: int = 2) -> Path:
    """`write_text_atomic` of `data` as JSON (serialised first: a bad value leaves the old file alone)."""
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def write_folder_atomic(folder: str | os.PathLike, fill: Callable[[Path], object]) -> Path:
    """`write_file_atomic` for a folder: `fill(tmp)` writes the files into a uniquely named sibling folder,
    whose files and entries are fsynced before it is renamed to `folder`. A previous `folder` is renamed
    aside first, restored if the rename fails, and deleted after: readers see the old or the new folder,
    never a mix."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would end up on the final folder; mkdir honours the umask.
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        fill(tmp)
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                fsync_file(path)
        for path in sorted(p for p in tmp.rglob("*") if p.is_dir()):
            fsync_dir(path)
        fsync_dir(tmp)
        if not folder.exists():
            os.rename(tmp, folder)
        else:
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(folder, old)
            try:
                os.rename(tmp, folder)
            except BaseException:
                os.rename(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
            if old.exists():
                log.warning("could not delete the previous %s, moved to %s", folder.name, old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(folder.parent)
    return folder
