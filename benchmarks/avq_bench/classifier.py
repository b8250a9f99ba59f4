"""The reference benchmark's feature network: a small CNN digit classifier (docs/design.md, "Metrics").

FID, sFID and IS are defined on an Inception network trained on ImageNet; 16x16 digits need a network
that has seen digits. The project trains its own (`benchmarks/train_classifier.py`) and ships it as
package data (`benchmarks/avq_bench/assets/digits-classifier/`: `config.json` + `model.safetensors`), so
evaluation runs offline and with no pickle. Its roles mirror Inception's:

- `features(x)[0]`, pooled: global average of the last conv block (post-ReLU), like pool3 -> FID.
- `features(x)[1]`, spatial: the first `spatial_channels` channels of the 8x8 map of the second block,
  flattened, like the first 7 channels of Inception's mixed_6/conv that sFID uses -> sFID.
- `logits(x)`: softmax -> Inception Score and class accuracy.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from avq.storage.atomic import write_json_atomic
from avq.storage.checkpoint import save_tensors_atomic
from avq_bench.data import load_digits_images, random_affine

ASSET_NAME = "digits-classifier"
CLASSIFIER_DIR = Path(__file__).resolve().parent / "assets" / ASSET_NAME
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of `DigitClassifier` (stored in the asset's config.json)."""

    image_size: int = 16
    channels: tuple[int, int, int] = (32, 64, 128)
    # Channels of the 8x8 map kept for sFID: 4 * 8 * 8 = 256 dims, fewer than the 359 test images, so the
    # reference covariance has full rank. Only slices features: changing it needs no retraining.
    spatial_channels: int = 4
    num_classes: int = 10
    dropout: float = 0.2


class DigitClassifier(nn.Module):
    """Three conv blocks on 16x16 images in [-1, 1]: 16x16 -> 8x8 -> 4x4 -> global average -> linear."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ClassifierConfig()
        c1, c2, c3 = config.channels
        self.block1 = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU()
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU()
        )
        self.block3 = nn.Sequential(nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU())
        self.dropout = nn.Dropout(config.dropout)
        self.fc = nn.Linear(c3, config.num_classes)

    def _trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"expected images [N, 1, H, W], got shape {list(x.shape)}")
        h = F.max_pool2d(self.block1(x), 2)  # [N, c1, 8, 8]
        mid = self.block2(h)  # [N, c2, 8, 8]
        pooled = self.block3(F.max_pool2d(mid, 2)).mean(dim=(2, 3))  # [N, c3]
        return pooled, mid

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(pooled [N, c3], spatial [N, spatial_channels * 8 * 8])` of images `x` [N, 1, 16, 16]."""
        pooled, mid = self._trunk(x)
        spatial = mid[:, : self.config.spatial_channels].flatten(1)
        return pooled, spatial

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [N, num_classes]."""
        return self.fc(self.dropout(self._trunk(x)[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


@torch.no_grad()
def accuracy(
    model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> float:
    """Top-1 accuracy of `model` (put in eval mode) on `images` [N, 1, 16, 16]."""
    model.eval()
    preds = torch.cat(
        [model.logits(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)]
    )
    return (preds == labels).float().mean().item()


def train_classifier(
    *,
    steps: int = 2000,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    config: ClassifierConfig | None = None,
    progress: bool = True,
) -> tuple[DigitClassifier, dict]:
    """Train a `DigitClassifier` on the train split with `random_affine` augmentation.

    Deterministic for a given `seed` (and thread count): initialisation and dropout follow
    `torch.manual_seed(seed)`, batches and augmentation one generator seeded with `seed`. AdamW with a
    cosine schedule, a fixed number of steps: the test split is only measured at the end, never used to
    choose anything. Returns the model (eval mode) and a dict of training facts incl. `test_accuracy`.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    config = config or ClassifierConfig()
    images, labels = load_digits_images("train", size=config.image_size, seed=0)
    model = DigitClassifier(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    bar = tqdm(range(steps), desc="train digits-classifier", disable=not progress, unit="step")
    running = None
    for _ in bar:
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        x = random_affine(images[idx], generator)
        loss = F.cross_entropy(model(x), labels[idx], label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
    seconds = time.perf_counter() - start
    model.eval()
    test_images, test_labels = load_digits_images("test", size=config.image_size, seed=0)
    info = {
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "final_loss_ema": running,
        "train_accuracy": accuracy(model, images, labels),
        "test_accuracy": accuracy(model, test_images, test_labels),
        "test_split": "load_digits_images('test', seed=0)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    return model, info


def save_classifier(model: DigitClassifier, folder: str | Path, training: dict | None = None) -> Path:
    """Write `config.json` (architecture + `training` facts) and `model.safetensors` (float32)."""
    folder = Path(folder)
    save_tensors_atomic(folder / WEIGHTS_FILE, model.state_dict())
    payload = {"_class_name": "DigitClassifier", **asdict(model.config), "training": training or {}}
    write_json_atomic(folder / "config.json", payload)
    return folder


def load_classifier(folder: str | Path | None = None) -> DigitClassifier:
    """The shipped digit classifier (or one saved by `save_classifier` in `folder`), float32, eval mode.

    Loads offline with no pickle (safetensors + JSON).
    """
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else CLASSIFIER_DIR
    config_path, weights_path = folder / "config.json", folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"no digit classifier in {folder} (expected config.json + {WEIGHTS_FILE}); "
            "it is made by `python benchmarks/train_classifier.py`"
        )
    raw = json.loads(config_path.read_text())
    fields = {k: raw[k] for k in ClassifierConfig.__dataclass_fields__ if k in raw}
    if "channels" in fields:
        fields["channels"] = tuple(fields["channels"])
    model = DigitClassifier(ClassifierConfig(**fields))
    model.load_state_dict(load_file(str(weights_path)))
    return model.eval().requires_grad_(False)
