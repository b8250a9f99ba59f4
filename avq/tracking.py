"""Experiment tracking: one small protocol so the pipeline and CLI log the same way with or without wandb.

Why offline by default: quantization runs on machines with no network (and the reference benchmark is
fully offline), so `WandbTracker` writes a local run directory (`wandb sync` uploads it later) unless the
user has chosen otherwise: an explicit `WANDB_MODE`, or a logged-in wandb (`WANDB_API_KEY`, or an
`api.wandb.ai` entry in `~/.netrc` as `wandb login` writes it).
"""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from avq.extras import require

TRACKERS = ("none", "wandb")


@runtime_checkable
class Tracker(Protocol):
    def log_config(self, config: Mapping[str, Any]) -> None: ...
    def log_layers(self, rows: Sequence[Mapping[str, Any]], key: str = "layers") -> None: ...
    def log_metrics(self, metrics: Mapping[str, Any]) -> None: ...
    def log_images(self, key: str, images: torch.Tensor | np.ndarray, caption: str | None = None) -> None: ...
    def finish(self) -> None: ...


class NullTracker:
    """Logs nothing (the default)."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        pass

    def log_layers(self, rows: Sequence[Mapping[str, Any]], key: str = "layers") -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        pass

    def log_images(self, key: str, images: torch.Tensor | np.ndarray, caption: str | None = None) -> None:
        pass

    def finish(self) -> None:
        pass


def _logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def default_wandb_mode() -> str | None:
    """None (wandb reads `WANDB_MODE` itself) when set; "online" when logged in; otherwise "offline"."""
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if _logged_in() else "offline"


def image_grid(images: torch.Tensor | np.ndarray, nrow: int | None = None) -> np.ndarray:
    """`[N, C, H, W]` (or `[N, H, W]`) samples in [-1, 1] -> one uint8 grid `[rows*H, cols*W, C]`
    (C = 1 squeezed to a grey `[.., ..]` image), 1-pixel black gutters."""
    x = (
        torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
        .detach()
        .float()
        .cpu()
    )
    if x.ndim == 3:
        x = x[:, None]
    n, c, h, w = x.shape
    cols = nrow or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    grid = torch.full((c, rows * (h + 1) - 1, cols * (w + 1) - 1), -1.0)  # black gutters and empty cells
    for i in range(n):
        r, col = divmod(i, cols)
        grid[:, r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = x[i]
    out = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return out[..., 0] if c == 1 else out


def _cell(value: Any) -> Any:
    """wandb.Table cells: numbers and strings as is; lists/None/other as text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return None if value is None else str(value)


class WandbTracker:
    """Logs to a wandb run: config, per-layer rows as a `wandb.Table`, final metrics in the summary,
    sample grids as `wandb.Image`. `mode`: "offline"/"online"/"disabled"; default `default_wandb_mode()`."""

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        project: str = "avq",
        name: str | None = None,
        dir: str | os.PathLike | None = None,
        mode: str | None = None,
    ):
        wandb = require("wandb", "track", "--tracker wandb (experiment tracking)")
        self._wandb = wandb
        # wandb reads WANDB_DIR once per process (its settings singleton): read it on every run instead.
        dir = dir if dir is not None else os.environ.get("WANDB_DIR")
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            name=name,
            config=dict(config or {}),
            dir=None if dir is None else str(dir),
            mode=mode or default_wandb_mode(),
            reinit="finish_previous",
        )

    @property
    def run_dir(self) -> Path:
        """The run's local folder (`.../wandb/offline-run-*/` in offline mode)."""
        return Path(self.run.dir).parent

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_layers(self, rows: Sequence[Mapping[str, Any]], key: str = "layers") -> None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        data = [[_cell(row.get(c)) for c in columns] for row in rows]
        self.run.log({key: self._wandb.Table(columns=columns, data=data)})

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        flat = {k: v for k, v in _flatten(metrics).items() if isinstance(v, (int, float)) or v is None}
        self.run.log({k: v for k, v in flat.items() if v is not None})
        self.run.summary.update(flat)

    def log_images(self, key: str, images: torch.Tensor | np.ndarray, caption: str | None = None) -> None:
        self.run.log({key: self._wandb.Image(image_grid(images), caption=caption)})

    def finish(self) -> None:
        self.run.finish()


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def make_tracker(kind: str, config: Mapping[str, Any] | None = None, **options: Any) -> Tracker:
    """`"none"` -> `NullTracker`; `"wandb"` -> `WandbTracker(config, **options)`."""
    if kind == "none":
        return NullTracker()
    if kind == "wandb":
        return WandbTracker(config, **options)
    raise ValueError(f"unknown tracker {kind!r}; use one of {', '.join(TRACKERS)}")
