"""`quantize_pipeline`: quantize a diffusers pipeline's denoiser, calibrated on the pipeline itself."""

from __future__ import annotations

from typing import Any

from avq.calibration.config import CalibrationConfig
from avq.pipelines.calibration import PipelineSource
from avq.planning.presets import QuantizeConfig


def is_pipeline(obj: Any) -> bool:
    """A diffusers `DiffusionPipeline` (checked by class, without importing diffusers eagerly)."""
    return any(cls.__name__ == "DiffusionPipeline" for cls in type(obj).__mro__)


def quantize_pipeline(
    pipe: Any, config: QuantizeConfig, calibration: CalibrationConfig | None = None, **options: Any
) -> Any:
    """Quantize `pipe`'s denoiser (`unet` or `transformer`) in place and return `pipe`.

    Calibration runs the pipeline's own `__call__` (`avq.pipelines.calibration.PipelineSource`): its
    scheduler, default steps and guidance (`calibration.num_steps` / `guidance_scale` override them), its
    text encoders on real prompts (`calibration.prompts`, default the built-in captions) and its own null
    input. Text encoders and the VAE are not quantized. `options` are those of `avq.quantize`
    (`checkpoint_dir`, `resume`, `progress`, `report`, `on_layer`, `sensitivity`).
    """
    from avq.run.quantize import quantize

    source = PipelineSource(pipe, calibration)
    quantize(source.denoiser, config, source, **options)
    return pipe
