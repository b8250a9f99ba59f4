"""Where calibration statistics come from: the reference sampler around a bare model, or a pipeline.

The quantize run (`avq.run.quantize`) asks a source for two things and does not care which it is:

- `statistics(model, names, observers=..., progress=...)`: `{name: (H [K, K], n_rows)}` along the FP
  sampling trajectory (and the observers' 8-bit ranges), from the model as it is now (sequential
  calibration calls it again on the partly quantized model);
- `probe(model)`: LAQ's small fixed set of model inputs with the FP outputs (`.error(model)`).

`SamplerSource` drives a bare denoiser with the one sampler loop (`avq.calibration.sampler`) and the
model-family adapters; `avq.pipelines.calibration.PipelineSource` runs the pipeline's own `__call__`
(its scheduler, text encoders and guidance) with hooks on the denoiser.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

from avq.calibration.config import REFERENCE_GUIDANCE, REFERENCE_STEPS, CalibrationConfig
from avq.calibration.statistics import DenoiserCalls, calibrate


@runtime_checkable
class CalibrationSource(Protocol):
    config: CalibrationConfig

    def statistics(
        self,
        model: nn.Module,
        names: Sequence[str],
        *,
        observers: Mapping[str, Any],
        progress: bool,
        replay: DenoiserCalls | None = None,
    ) -> dict[str, tuple[torch.Tensor, int]]: ...

    def probe(self, model: nn.Module): ...

    def to_dict(self) -> dict: ...


class SamplerSource:
    """Calibration of a bare model on the reference sampler (DDIM, `REFERENCE_STEPS` steps by default)."""

    def __init__(self, config: CalibrationConfig, conditioning: torch.Tensor | None = None):
        self.config = config.resolved(REFERENCE_STEPS, REFERENCE_GUIDANCE)
        self.conditioning = conditioning

    def statistics(
        self,
        model: nn.Module,
        names: Sequence[str],
        *,
        observers: Mapping[str, Any],
        progress: bool,
        replay: DenoiserCalls | None = None,
    ) -> dict[str, tuple[torch.Tensor, int]]:
        return calibrate(
            model,
            names,
            self.config,
            conditioning=self.conditioning,
            progress=progress,
            observers=observers,
            replay=replay,
        )

    def probe(self, model: nn.Module):
        """8 samples at 5 timesteps of a trajectory of another seed than the calibration's."""
        from avq.planning.sensitivity import make_probe

        config = self.config
        probe_config = replace(
            config,
            num_samples=min(8, config.num_samples),
            batch_size=min(8, config.num_samples),
            num_timesteps_kept=min(5, config.num_steps),
            seed=config.seed + 1,  # not the calibration trajectories
            layers_per_pass=None,
        )
        return make_probe(model, probe_config, conditioning=self.conditioning)

    def to_dict(self) -> dict:
        return {"source": "sampler", **self.config.to_dict()}
