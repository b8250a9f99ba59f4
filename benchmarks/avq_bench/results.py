"""Benchmark results files: `benchmarks/results/<name>.json` (docs/design.md, "Results files").

Schema: `{"command", "commit", "device", "date", "torch", "triton", "rows": [...]}`. `commit` is
`git rev-parse HEAD`, suffixed `+dirty` when the working tree has changes; `date` is UTC ISO 8601.
README tables are generated from these files, never typed by hand.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from avq.storage.atomic import write_text_atomic

REPO = Path(__file__).resolve().parents[2]


def default_results_dir() -> Path:
    """`benchmarks/results` of the source checkout avq runs from, else of the working directory."""
    if (REPO / "benchmarks").is_dir():
        return REPO / "benchmarks" / "results"
    return Path.cwd() / "benchmarks" / "results"


def current_command(argv: Sequence[str] | None = None) -> str:
    """The command line as a user would type it: `python <script or -m module> args...`."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return "python"
    first = argv[0]
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and first.endswith(".py"):
        module = spec.name.removesuffix(".__main__")
        head = ["python", "-m", module]
    else:
        path = Path(first)
        if path.is_absolute():
            for base in (REPO, Path.cwd()):
                try:
                    path = path.relative_to(base)
                    break
                except ValueError:
                    continue
        head = ["python", str(path)]
    return shlex.join(head + argv[1:])


def git_commit(cwd: Path = REPO) -> str:
    """`git rev-parse HEAD` (+ `+dirty` if tracked files have uncommitted changes), or "unknown".

    Untracked files do not count: a benchmark writes its own outputs (grids, JSON) before this is read.
    A copy of the tree sent to another machine names its commit in `AVQ_SOURCE_COMMIT`, which wins when
    set: the device machine's copy carries a `.git` of the session's base commit with the later commits as
    uncommitted changes (seen: `scale_h200.json` says `df546ca+dirty` for a tree at `6fb6303`).
    """
    if os.environ.get("AVQ_SOURCE_COMMIT"):
        return os.environ["AVQ_SOURCE_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if status.strip() else "")


# The tree the running code was loaded from: read when the benchmark starts (this module is imported at the
# top of every benchmark), not when it writes, since the tree may change while a long run goes on.
STARTED_AT = git_commit()


def run_stamp() -> dict:
    """`{commit, dirty, command}` of this process as it started: what a row it computes carries, so that
    rows of earlier runs collected into one file keep their own (`write_results` adds it to rows without)."""
    return {
        "commit": STARTED_AT.removesuffix("+dirty"),
        "dirty": STARTED_AT.endswith("+dirty"),
        "command": current_command(),
    }


def device_name(device: str | torch.device | None = None) -> str:
    """The CUDA device name for a CUDA `device` (default: CUDA if available), else the CPU model and
    the number of cores this process may use (and how many of them are hyperthreads of one core)."""
    device = torch.device(device) if device is not None else None
    if (device is None and torch.cuda.is_available()) or (device is not None and device.type == "cuda"):
        return torch.cuda.get_device_name(device)
    from avq.kernels.autotune import cpu_model, hyperthreaded_cores, usable_cores

    model, cores, smt = cpu_model(), usable_cores(), hyperthreaded_cores()
    return f"{model}, {cores} cores" + (f" ({smt} of them hyperthread siblings)" if smt else "")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_slug(device: str | torch.device) -> str:
    """A results file's device suffix: `cpu`, or the GPU's model (`NVIDIA H200` -> `h200`)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    words = device_name(device).lower().replace("nvidia", "").split()
    return "-".join(w for w in words if w.isalnum()) or "cuda"


def _format(payload: dict) -> str:
    """Indented JSON with one row per line (readable, and diffs stay one line per changed row)."""
    head = [f" {json.dumps(k)}: {json.dumps(v, allow_nan=False)}" for k, v in payload.items() if k != "rows"]
    rows = [f"  {json.dumps(row, allow_nan=False)}" for row in payload["rows"]]
    body = ' "rows": [\n' + ",\n".join(rows) + "\n ]" if rows else ' "rows": []'
    return "{\n" + ",\n".join([*head, body]) + "\n}\n"


def write_results(
    name: str,
    rows: Sequence[dict],
    *,
    command: str | None = None,
    device: str | torch.device | None = None,
    results_dir: str | Path | None = None,
) -> Path:
    """Write `<results_dir>/<name>.json` atomically (`avq.storage.atomic.write_text_atomic`).

    `command` defaults to the current command line (`python` for the interpreter); `device` is what the
    figures were measured on (default: CUDA if available, else the CPU); `results_dir` defaults to the
    repository's `benchmarks/results`. Rows must be JSON-serialisable dicts; each row is stamped with the
    commit this process started from (`STARTED_AT`), whether that tree was dirty and the command, unless it
    carries its own (rows collected from earlier runs, `run_stamp()`).
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad results name {name!r}: expected a plain file stem such as 'layer_solver'")
    folder = Path(results_dir) if results_dir is not None else default_results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    command = command if command is not None else current_command()
    commit = STARTED_AT
    stamp = {"commit": commit.removesuffix("+dirty"), "dirty": commit.endswith("+dirty"), "command": command}
    payload = {
        "command": command,
        "commit": commit,
        "device": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "rows": [{**stamp, **row} for row in rows],  # rows computed elsewhere keep their own stamp
    }
    text = _format(payload)
    return write_text_atomic(folder / f"{name}.json", text)
