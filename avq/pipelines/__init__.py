"""Diffusers pipelines in and out: quantize the denoiser of a Stable Diffusion, SDXL, PixArt, SD3, Flux,
DiT or latent-diffusion pipeline, calibrated on the pipeline's own sampling, and write it back as a
pipeline folder that diffusers loads.

- `folders`: load a pipeline folder, find and check its denoiser, `save_pipeline` / `load_pipeline`;
- `calibration`: `PipelineSource`, statistics and LAQ probes from the pipeline's own `__call__`;
- `prompts`: the built-in calibration captions and `--prompts FILE`;
- `quantize`: `quantize_pipeline(pipe, config, calibration)`.
"""

from avq.pipelines.calibration import PipelineSource
from avq.pipelines.folders import (
    PipelineError,
    denoiser_name,
    is_pipeline_folder,
    load_pipeline,
    load_pipeline_folder,
    save_pipeline,
)
from avq.pipelines.prompts import DEFAULT_PROMPTS, PromptsError, read_prompts
from avq.pipelines.quantize import is_pipeline, quantize_pipeline

__all__ = [
    "DEFAULT_PROMPTS",
    "PipelineError",
    "PipelineSource",
    "PromptsError",
    "denoiser_name",
    "is_pipeline",
    "is_pipeline_folder",
    "load_pipeline",
    "load_pipeline_folder",
    "quantize_pipeline",
    "read_prompts",
    "save_pipeline",
]
