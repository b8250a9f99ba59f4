"""`CalibrationConfig`: how much of the FP sampler runs to collect calibration statistics."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CalibrationConfig:
    """How much of the FP sampler to run for statistics.

    `num_timesteps_kept` of the `num_steps` DDIM steps (spread uniformly, first and last included) feed
    the Hessians; None keeps every step. `max_rows_per_call`: each layer adds a random subset of at most
    this many input rows (tokens / conv patches) per forward (`HessianAccumulator(max_rows=...)`): with
    the defaults a layer still sees >= 40k rows, and calibrating `digits-unet` is ~4x faster than with
    all of them (None). `guidance_scale` > 1 runs classifier-free guidance (conditional
    and null inputs both recorded); 1 runs the conditional input only. `prompt_tokens` is the sequence
    length of the random prompt embeddings of text-conditioned models when none are given.
    """

    num_samples: int = 64
    batch_size: int = 16
    num_steps: int = 20
    guidance_scale: float = 2.0
    num_timesteps_kept: int | None = 10
    seed: int = 0
    layers_per_pass: int | None = None
    max_hessian_gib: float | None = None
    max_rows_per_call: int | None = 1024
    prompt_tokens: int = 8

    def __post_init__(self) -> None:
        for name in ("num_samples", "batch_size", "num_steps", "prompt_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CalibrationConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("num_timesteps_kept", "layers_per_pass", "max_rows_per_call"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"CalibrationConfig.{name} must be None or an int >= 1, got {value!r}")
        if self.max_hessian_gib is not None and not self.max_hessian_gib > 0:
            raise ValueError(f"CalibrationConfig.max_hessian_gib must be > 0, got {self.max_hessian_gib!r}")
        if not (isinstance(self.guidance_scale, (int, float)) and math.isfinite(self.guidance_scale)):
            raise ValueError(
                f"CalibrationConfig.guidance_scale must be a finite number, got {self.guidance_scale!r}"
            )

    def kept_step_indices(self) -> list[int]:
        """Indices into the sampler's step sequence where statistics are collected."""
        n = (
            self.num_steps
            if self.num_timesteps_kept is None
            else min(self.num_timesteps_kept, self.num_steps)
        )
        if n == 1:
            return [self.num_steps - 1]
        return sorted({round(i * (self.num_steps - 1) / (n - 1)) for i in range(n)})

    def to_dict(self) -> dict:
        return asdict(self)
