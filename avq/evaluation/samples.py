"""Sample sets for `avq sample` / `avq eval`: class-conditional sampling on the one sampler loop, and
`samples.npz` + PNG grid files.

Files are written atomically and read without pickle.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

from avq.calibration.adapters import UnsupportedModelError, adapter_for
from avq.calibration.sampler import run_sampler
from avq.storage.atomic import write_atomic


# ------------------------------------------------------------------------------------- sample sets
def batch_seed(seed: int, batch: int) -> int:
    """The noise seed of batch `batch` of a sample set of seed `seed` (`SeedSequence([seed, batch])`)."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


@torch.no_grad()
def sample_classes(
    model: nn.Module,
    labels: Sequence[int] | torch.Tensor,
    *,
    steps: int = 20,
    guidance: float = 2.0,
    seed: int = 0,
    scheduler=None,
) -> torch.Tensor:
    """Samples `[n, C, H, W]` (float32, CPU, clamped to [-1, 1]) of a class-conditional model for `labels`,
    from noise of seed `seed`, with classifier-free guidance against the model's own null class
    (`avq.calibration.sampler`; default scheduler: DDIM over the linear 1000-step schedule)."""
    adapter = adapter_for(model)
    if adapter.null_class is None:
        raise UnsupportedModelError(f"{type(model).__name__} is not class-conditional: no labels to sample")
    labels = torch.as_tensor(labels, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(
        (labels.shape[0], *adapter.latent_shape), generator=generator
    )  # CPU noise: any device
    device = next(model.parameters()).device
    cond = {"class_labels": labels.to(device)}
    null = {"class_labels": torch.full_like(cond["class_labels"], adapter.null_class)}
    x = run_sampler(
        model,
        adapter,
        noise,
        cond,
        null,
        steps=steps,
        guidance=guidance,
        scheduler=scheduler,
        evaluate_null=True,
    )
    return x.float().clamp(-1, 1).cpu()


def generate_samples(
    model,
    n: int,
    *,
    steps: int = 20,
    guidance: float = 2.0,
    seed: int = 0,
    batch_size: int = 100,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` class-balanced samples (label `i % num_classes`, the model's real classes) of a class-conditional
    model, as `(samples float32 [n, C, H, W] in [-1, 1], labels int64 [n])`, via `sample_classes`.

    Batch `b` draws its noise from seed `SeedSequence([seed, b])`, so sets of different seeds share no
    noise, and an FP and a quantized model with the same `(seed, batch_size)` see identical noise (what
    PSNR/SSIM to FP need). The samples depend on `batch_size`: keep it fixed when comparing.
    """
    from tqdm.auto import tqdm

    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got {n}, {batch_size}")
    num_classes = adapter_for(model).null_class
    if num_classes is None:
        raise UnsupportedModelError(f"{type(model).__name__} is not class-conditional: no labels to sample")
    labels = torch.arange(n, dtype=torch.int64) % num_classes
    chunks = []
    starts = range(0, n, batch_size)
    for b, start in enumerate(tqdm(starts, desc="sample", unit="batch", disable=not progress)):
        y = labels[start : start + batch_size]
        chunks.append(sample_classes(model, y, steps=steps, guidance=guidance, seed=batch_seed(seed, b)))
    return torch.cat(chunks).float(), labels


def save_samples(folder, samples: torch.Tensor, labels: torch.Tensor, meta: dict, grid: int = 100):
    """Write `samples.npz` (`samples` float32 [N, C, H, W] in [-1, 1], `labels` int64 [N], `meta` a JSON
    string) and `samples.png` (the first `grid` samples, 10 per row; small images 2x upscaled) into
    `folder`, each atomically (`write_atomic`): an interrupted run never leaves half a file.
    Returns the npz path.
    """
    import json
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    arrays = {
        "samples": samples.detach().cpu().float().numpy(),
        "labels": labels.detach().cpu().numpy().astype(np.int64),
        "meta": np.array(json.dumps(meta, sort_keys=True)),
    }
    path = write_atomic(folder / "samples.npz", lambda f: np.savez(f, **arrays))
    shown = _to_uint8(samples[:grid])  # [G, H, W, C]
    if len(shown):
        cols = min(10, len(shown))
        rows = -(-len(shown) // cols)
        h, w, c = shown.shape[1:]
        canvas = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), dtype=np.uint8)
        for i, img in enumerate(shown):
            r, col = divmod(i, cols)
            canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = img
        image = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
        if h <= 64:  # small images: upscale the grid so it can be seen
            image = image.resize((image.width * 2, image.height * 2), Image.NEAREST)
        write_atomic(folder / "samples.png", lambda f: image.save(f, format="PNG"))
    return path


def _to_uint8(samples: torch.Tensor) -> np.ndarray:
    """`[N, C, H, W]` in [-1, 1] -> `[N, H, W, C]` uint8 (C = 1 or 3; others keep their first channel)."""
    x = samples.detach().cpu().float()
    if x.shape[1] not in (1, 3):
        x = x[:, :1]
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def save_image_files(folder, samples: torch.Tensor) -> list:
    """One PNG per sample, `folder/images/00000.png`, ..., each written atomically."""
    from pathlib import Path

    from PIL import Image

    folder = Path(folder) / "images"
    paths = []
    for i, img in enumerate(_to_uint8(samples)):
        image = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        paths.append(write_atomic(folder / f"{i:05d}.png", lambda f, im=image: im.save(f, format="PNG")))
    return paths


def load_samples(path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Read a `samples.npz` written by `save_samples` (no pickle). Raises ValueError naming the problem."""
    import json
    import zipfile
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such samples file")
    if not zipfile.is_zipfile(path):  # np.load would try (and refuse) to unpickle anything else
        raise ValueError(f"{path}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"samples", "labels"} - set(data.files)
            if missing:
                raise ValueError(f"{path}: not an avq samples file (missing {sorted(missing)})")
            samples, labels = data["samples"], data["labels"]
            meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ValueError(f"{path}: not a readable .npz file ({error})") from None
    if samples.ndim != 4 or labels.shape != (samples.shape[0],) or samples.shape[0] < 2:
        raise ValueError(
            f"{path}: expected samples [N >= 2, C, H, W] and labels [N], "
            f"got {list(samples.shape)}, {list(labels.shape)}"
        )
    return torch.from_numpy(samples.astype(np.float32)), torch.from_numpy(labels.astype(np.int64)), meta
