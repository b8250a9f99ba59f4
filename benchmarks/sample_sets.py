"""Cached sample sets shared by the benchmark scripts (`reference_fp.py`, `quality.py`).

A set is identified by (model tag, n, seed, guidance, steps, batch_size) and cached under `runs/samples/`
(outside git) as `avq sample` writes it, so that the FP sets that feed both the FP row and the
PSNR/SSIM-to-FP columns of the quality table are sampled once. Batch `b` of a set uses the noise of
`(seed, b)` (`avq.sampling.generate_samples`), so the first `k * batch_size` samples of a bigger set equal a
smaller set of the same seed: `get_samples` reuses a cached bigger set.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from avq.sampling import generate_samples, load_samples, save_samples

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "runs" / "samples"


def _folder(tag: str, n: int, seed: int, guidance: float, steps: int, batch_size: int) -> Path:
    return CACHE / f"{tag}-n{n}-s{seed}-g{guidance:g}-t{steps}-b{batch_size}"


def get_samples(
    model_or_loader,
    tag: str,
    n: int,
    *,
    seed: int = 0,
    guidance: float = 2.0,
    steps: int = 20,
    batch_size: int = 250,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """`(samples [n, 1, 16, 16], labels [n], seconds per image or None when read from the cache)`.

    `model_or_loader`: the model, or a callable returning it (not called on a cache hit).
    """
    for path in sorted(CACHE.glob(f"{tag}-n*-s{seed}-g{guidance:g}-t{steps}-b{batch_size}/samples.npz")):
        samples, labels, meta = load_samples(path)
        if meta.get("n") == n or (meta.get("n", 0) >= n and n % batch_size == 0):
            return samples[:n], labels[:n], None
    model = (
        model_or_loader()
        if callable(model_or_loader) and not isinstance(model_or_loader, torch.nn.Module)
        else model_or_loader
    )
    start = time.perf_counter()
    samples, labels = generate_samples(
        model, n, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size, progress=progress
    )
    seconds = time.perf_counter() - start
    meta = {
        "tag": tag,
        "n": n,
        "seed": seed,
        "guidance": guidance,
        "steps": steps,
        "batch_size": batch_size,
        "seconds": seconds,
    }
    save_samples(_folder(tag, n, seed, guidance, steps, batch_size), samples, labels, meta)
    return samples, labels, seconds / n
