"""Calibration: statistics of a model's layers along its own sampling trajectory.

- `config`: `CalibrationConfig`; `adapters`: how the sampler calls each model family;
- `sampler`: the one sampler loop (scheduler + classifier-free guidance, with hooks);
- `hessian`: `HessianAccumulator` (streamed `E[x x^T]` of a layer's inputs);
- `statistics`: `calibrate` (Hessians at time steps over the trajectory), `quantizable_layers`, blocks;
- `activations`: 8-bit input quantizers and their range observers (split at skip concatenations).
"""

from avq.calibration.adapters import ModelAdapter, UnsupportedModelError, adapter_for
from avq.calibration.config import CalibrationConfig
from avq.calibration.hessian import HessianAccumulator
from avq.calibration.sampler import SamplerStep, make_ddim_scheduler, run_sampler
from avq.calibration.statistics import block_of, calibrate, group_by_block, quantizable_layers

__all__ = [
    "CalibrationConfig",
    "HessianAccumulator",
    "ModelAdapter",
    "SamplerStep",
    "UnsupportedModelError",
    "adapter_for",
    "block_of",
    "calibrate",
    "group_by_block",
    "make_ddim_scheduler",
    "quantizable_layers",
    "run_sampler",
]
