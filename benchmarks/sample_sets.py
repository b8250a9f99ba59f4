"""Cached, resumable sample sets shared by the benchmark scripts (`reference_fp.py`, `quality.py`).

A set is identified by (tag, seed, guidance, steps, batch_size); its batches are cached one file each under
`runs/samples/<tag>-s<seed>-g<guidance>-t<steps>-b<batch_size>/` (outside git). Batch `b` uses the noise
of `(seed, b)` (`avq_bench.reference.sample` seeded as in `avq.evaluation.samples.generate_samples`), so a
set of `n`
samples is the first `ceil(n / batch_size)` batches: FP sets are sampled once and reused by every script
and every N, and a run killed midway (a 5,000-sample set of `digits-unet` takes ~30 min on 2 CPU cores)
continues from its last finished batch. Batch files are written atomically (`save_samples`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from avq.evaluation.samples import batch_seed, load_samples, save_samples
from avq_bench.reference import NUM_CLASSES, sample

REPO = Path(__file__).resolve().parent.parent
# (model, sample indices [B], seed) -> images [B, 1, 16, 16] in [-1, 1]
BatchSampler = Callable[[object, torch.Tensor, int], torch.Tensor]
CACHE = REPO / "runs" / "samples"


def _is_loader(model: object) -> bool:
    """A callable that returns the model, not the model: neither a module nor a pipeline (which is callable
    too, but has `components`)."""
    return callable(model) and not isinstance(model, torch.nn.Module) and not hasattr(model, "components")


def set_folder(tag: str, seed: int, guidance: float, steps: int, batch_size: int) -> Path:
    return CACHE / f"{tag}-s{seed}-g{guidance:g}-t{steps}-b{batch_size}"


def get_samples(
    model: torch.nn.Module | object | Callable[[], object],
    tag: str,
    n: int,
    *,
    seed: int = 0,
    guidance: float = 2.0,
    steps: int = 20,
    batch_size: int = 250,
    progress: bool = True,
    sample_batch: BatchSampler | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`(samples [n, 1, 16, 16], labels [n] = i % 10, sampling seconds per image)`; the time is the one
    measured when each batch was sampled (stored with it), so a cached set reports it too.

    `model`: the model, or a callable returning it (called only if a batch is missing).
    `sample_batch(model, indices, seed)`: how a batch of sample indices is drawn (default: the class-
    conditional sampler, class `i % 10`; `avq_bench.t2i.sample_batch` for the text-to-image pipeline, the
    prompt of `i`); `model` is then whatever it takes (a pipeline).
    """
    folder = set_folder(tag, seed, guidance, steps, batch_size)
    labels = torch.arange(n, dtype=torch.int64) % NUM_CLASSES
    chunks, seconds = [], 0.0
    n_batches = -(-n // batch_size)
    for b in tqdm(range(n_batches), desc=f"sample {tag} s{seed}", unit="batch", disable=not progress):
        path = folder / f"batch{b:05d}"
        if (path / "samples.npz").is_file():
            chunk, _, meta = load_samples(path / "samples.npz")
            seconds += meta["seconds"]
        else:
            if _is_loader(model):
                model = model()
            indices = torch.arange(b * batch_size, (b + 1) * batch_size)  # full batches
            batch_labels = indices % NUM_CLASSES
            start = time.perf_counter()
            if sample_batch is None:
                chunk = sample(model, batch_labels, steps=steps, guidance=guidance, seed=batch_seed(seed, b))
            else:
                chunk = sample_batch(model, indices, batch_seed(seed, b))
            elapsed = time.perf_counter() - start
            seconds += elapsed
            save_samples(path, chunk, batch_labels, {"tag": tag, "batch": b, "seconds": elapsed}, grid=0)
        chunks.append(chunk)
    samples = torch.cat(chunks)[:n]
    return samples, labels, seconds / (n_batches * batch_size)
