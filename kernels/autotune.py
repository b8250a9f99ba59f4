"""Measured kernel choice per host, like Triton's autotuning: time the candidates once, keep the winner.

Fixed thresholds do not hold across hosts: on an AMD EPYC the CPU LUT GEMV at one row beat dense fp32
2.5x, on an Intel Xeon of the same 2-core kind it ran at 0.6-0.7x. So the first call of each
(op, device, dtype, shape, spec, row bucket, threads) runs every candidate (one warm-up call each: kernels
compile, per-module caches fill; then `REPEATS` timed calls, more where the two fastest are close) and
the fastest one serves every later call with that key. Winners are kept in memory and on disk, one JSON
file per host (CPU model, cores, torch and numba versions) under the user's cache folder, so a second
process starts warm:

    $AVQ_CACHE_DIR, else $XDG_CACHE_HOME/avq, else ~/.cache/avq      ->  kernels-<host hash>.json

Writes are atomic (`avq.storage.atomic`); a file that cannot be read is ignored (and replaced), one that
cannot be written leaves the in-memory choice in place. `AVQ_KERNEL` still forces a kernel and bypasses all
of this; `forget()` clears the memory (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

log = logging.getLogger("avq")

REPEATS = 5  # timed calls per candidate after its warm-up; the minimum counts (least disturbed by load)
# While the two fastest minima are within CLOSE of each other, REPEATS more rounds, up to MAX_ROUNDS: on
# a shared host one burst of load had flipped close calls (digits-unet at batch 8, its 3x3 convs at 4x4:
# decode + conv won 30 of 30 isolated measurements, 0.96 against 1.01 ms, yet some of the model's first
# forwards chose the fused kernel, ~1.2x slower there).
CLOSE = 0.10
MAX_ROUNDS = 20
_LOCK = threading.Lock()
_CHOICES: dict[str, dict] | None = None  # key -> {"kernel": name, "ms": {candidate: ms}}


def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo`, else `platform.processor()`), e.g. "AMD EPYC"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 0


SYSFS_CPU = Path("/sys/devices/system/cpu")


def hyperthreaded_cores() -> int:
    """Usable CPUs that share a physical core with another usable CPU (SMT siblings, from sysfs; 0 where
    unknown). A "2-core" VM can be one core's two hyperthreads: then two threads of compute do not double
    its throughput, and parallel kernels fight over one core."""
    usable = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
    shared = 0
    for cpu in usable:
        try:
            text = (SYSFS_CPU / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text()
        except OSError:
            return 0
        siblings: set[int] = set()
        for part in text.strip().split(","):
            lo, _, hi = part.partition("-")
            siblings.update(range(int(lo), int(hi or lo) + 1))
        shared += bool((siblings - {cpu}) & usable)
    return shared


def _kernels_digest() -> str:
    """A hash of this package's kernel sources: choices measured with other kernels are not reused."""
    digest = hashlib.sha256()
    sources = ("lut.py", "dispatch.py", "choice.py", "weights.py", "conv.py", "fused.py", "compiled.py")
    sources += ("native.c",)
    for name in sources:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:12]


_KERNELS = _kernels_digest()


def host() -> str:
    """What the choices are valid for: CPU model, usable cores, torch and numba versions, the kernels,
    whether the native kernels may build (without building them: GPU choices never need them)."""
    try:  # the installed version, without importing numba (kernels/compiled.py imports it on first use)
        numba_version = importlib.metadata.version("numba")
    except importlib.metadata.PackageNotFoundError:
        numba_version = "none"
    return (
        f"{cpu_model()}|{usable_cores()} cores|torch {torch.__version__}|numba {numba_version}"
        f"|kernels {_KERNELS}|native {os.environ.get('AVQ_NATIVE', '1')}"
    )


def cache_root() -> Path:
    """The user's avq cache folder: `$AVQ_CACHE_DIR`, else `$XDG_CACHE_HOME/avq`, else `~/.cache/avq`."""
    root = os.environ.get("AVQ_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "avq"


def cache_file() -> Path:
    digest = hashlib.sha256(host().encode()).hexdigest()[:16]
    return cache_root() / f"kernels-{digest}.json"


def _load() -> dict[str, dict]:
    global _CHOICES
    if _CHOICES is None:
        _CHOICES = {}
        path = cache_file()
        try:
            data = json.loads(path.read_text())
            if data.get("host") == host():
                _CHOICES.update(data.get("choices", {}))
        except (OSError, ValueError, AttributeError):
            pass  # no file yet, or an unreadable one: measured again and rewritten
    return _CHOICES


def _save(choices: dict[str, dict]) -> None:
    from avq.storage.atomic import write_json_atomic

    path = cache_file()
    try:
        on_disk = json.loads(path.read_text()).get("choices", {})  # another process's, meanwhile
    except (OSError, ValueError, AttributeError):
        on_disk = {}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"host": host(), "choices": {**on_disk, **choices}}, indent=1)
    except OSError as err:  # a read-only home: the choice still holds for this process
        log.warning("avq: could not save kernel choices to %s (%s)", path, err)


def timings() -> dict[str, dict[str, float]]:
    """Each measured key's candidate times (ms), as recorded on this host (a copy: for benchmarks)."""
    with _LOCK:
        return {key: dict(entry.get("ms", {})) for key, entry in _load().items()}


def forget() -> None:
    """Drop the in-memory choices (the next call reads the disk file again)."""
    global _CHOICES
    with _LOCK:
        _CHOICES = None


@contextlib.contextmanager
def fresh_cache(prefix: str = "avq-kernels-") -> Iterator[Path]:
    """Choices measured anew, in an empty cache folder (`AVQ_CACHE_DIR`, which subprocesses inherit), as
    on a new host; the folder is removed and the user's cache restored after. For benchmarks: a run must
    not read choices that earlier runs measured under other conditions."""
    user = os.environ.get("AVQ_CACHE_DIR")
    folder = tempfile.mkdtemp(prefix=prefix)
    os.environ["AVQ_CACHE_DIR"] = folder
    forget()
    try:
        yield Path(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if user is None:
            os.environ.pop("AVQ_CACHE_DIR", None)
        else:
            os.environ["AVQ_CACHE_DIR"] = user
        forget()


def chosen(key: str) -> str | None:
    """The kernel measured fastest for `key` on this host, or None if not measured yet."""
    with _LOCK:
        entry = _load().get(key)
    return entry["kernel"] if entry else None


def _close(best: dict[str, float]) -> bool:
    """Whether the two fastest times are within `CLOSE` of each other (one candidate: never)."""
    first, second = (sorted(best.values()) + [float("inf")])[:2]
    return second <= first * (1 + CLOSE)


def measure(key: str, candidates: dict[str, Callable[[], torch.Tensor]]) -> tuple[str, torch.Tensor]:
    """Time each candidate (a warm-up call, then `REPEATS` rounds of one call each, interleaved so that a
    burst of load hits all alike, and more rounds while the two fastest are within `CLOSE`, up to
    `MAX_ROUNDS`; minimum), record the fastest for `key` in memory and on disk, and return its name and its
    output (each candidate computes the same call). Timings a round before recorded for `key` (the
    dispatcher's threaded round follows its first) are kept beside these."""
    outputs = {name: run() for name, run in candidates.items()}  # warm-up: compiles, fills caches
    best = dict.fromkeys(candidates, float("inf"))
    rounds = 0
    while rounds < MAX_ROUNDS and (rounds == 0 or _close(best)):
        for _ in range(REPEATS):
            for name, run in candidates.items():
                start = time.perf_counter()
                outputs[name] = run()
                best[name] = min(best[name], time.perf_counter() - start)
        rounds += REPEATS
    timings = {name: seconds * 1e3 for name, seconds in best.items()}
    winner = min(timings, key=timings.__getitem__)
    with _LOCK:
        choices = _load()
        earlier = choices.get(key, {}).get("ms", {})  # a first round's timings (dispatch's threaded round)
        choices[key] = {"kernel": winner, "ms": {**earlier, **{k: round(v, 4) for k, v in timings.items()}}}
        _save(choices)
    return winner, outputs[winner]
