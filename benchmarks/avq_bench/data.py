"""The reference benchmark's data: scikit-learn's handwritten digits at 16x16 in [-1, 1] (docs/design.md).

`load_digits` ships with scikit-learn (1,797 8x8 images, values 0..16, 10 classes), so nothing is
downloaded. Images are upsampled bilinearly to `size x size` and scaled to [-1, 1] (background -1).

The train/test split is stratified 80/20: within each class, the images are shuffled by
`numpy.random.default_rng(seed)` and the first `round(0.2 * n_class)` go to "test". The default `seed=0`
is the canonical split of the shipped reference models (1,438 train / 359 test images).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.2


def load_digits_images(
    split: str = "train", size: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as `(images float32 [N, 1, size, size] in [-1, 1], labels int64 [N])`.

    `split` is "train", "test" or "all"; `seed` picks the stratified 80/20 split (module docstring).
    Images keep the order of `load_digits` within a split.
    """
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32))[:, None]  # [N, 1, 8, 8], 0..16
    labels = torch.from_numpy(digits.target.astype(np.int64))
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images / 8.0 - 1.0).clamp(-1.0, 1.0)  # 0..16 -> [-1, 1]
    if split != "all":
        test = split_mask(labels.numpy(), seed)
        keep = torch.from_numpy(test if split == "test" else ~test)
        images, labels = images[keep], labels[keep]
    return images.contiguous(), labels.contiguous()


def split_mask(labels: np.ndarray, seed: int = 0, test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """Boolean mask of the test images of a stratified split (deterministic for a given `seed`)."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_test = int(round(test_fraction * len(members)))
        test[rng.permutation(members)[:n_test]] = True
    return test


def random_affine(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    max_degrees: float = 10.0,
    max_shift: float = 1.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Small random rotation (up to `max_degrees`), translation (up to `max_shift` pixels per axis) and
    scale (within `scale_range`) of each image of `[N, C, H, W]` images in [-1, 1].

    Deterministic for a given `generator` state (all randomness is drawn from it, on the CPU).
    Pixels that come from outside the image are background (-1).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {list(images.shape)}")
    n, _, h, w = images.shape
    draw = torch.rand(n, 4, generator=generator, dtype=torch.float32)  # CPU draws: device-independent
    angle = (2 * draw[:, 0] - 1) * math.radians(max_degrees)
    lo, hi = scale_range
    scale = lo + (hi - lo) * draw[:, 1]
    # affine_grid works in normalised coordinates: one pixel is 2/W (x) or 2/H (y).
    shift_x = (2 * draw[:, 2] - 1) * max_shift * 2 / w
    shift_y = (2 * draw[:, 3] - 1) * max_shift * 2 / h
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # output -> input sampling map
    theta = torch.stack(
        [torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1
    )  # [N, 2, 3]
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Sample the image shifted to [0, 2] so that zero padding lands on the background value -1.
    warped = F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (warped - 1).clamp(-1.0, 1.0)
