"""`CalibrationConfig`: how much of the FP sampler runs to collect calibration statistics, and on what."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

# The reference sampler's defaults (bare models, e.g. the shipped digit models): DDIM, 20 steps, CFG 2.
REFERENCE_STEPS = 20
REFERENCE_GUIDANCE = 2.0


@dataclass(frozen=True)
class CalibrationConfig:
    """How much of the FP sampler to run for statistics.

    `num_steps` / `guidance_scale`: None takes the model's own defaults: a pipeline's `__call__` defaults
    (e.g. 50 steps and guidance 7.5 for Stable Diffusion, 28 and 3.5 for Flux), or DDIM 20 steps with
    guidance 2 for a bare model (`REFERENCE_STEPS`, `REFERENCE_GUIDANCE`). `num_timesteps_kept` of those
    steps (spread uniformly, first and last included) feed the Hessians; None keeps every step.
    `max_rows_per_call`: each layer adds a random subset of at most this many input rows (tokens / conv
    patches) per forward (`HessianAccumulator(max_rows=...)`): with the defaults a layer still sees >= 40k
    rows, and calibrating `digits-unet` is ~4x faster than with all of them (None). `guidance_scale` > 1
    runs classifier-free guidance (conditional and null inputs both recorded); 1 runs the conditional
    input only. `replay`: when the layers need several passes, only the first samples; the others replay
    the model calls it recorded at the kept steps (the same Hessians for `kept / steps` of the calls);
    False samples every pass again.

    Conditioning of pipelines (`avq.pipelines`): `prompts` (cycled over the `num_samples` samples; None:
    the built-in captions `avq.pipelines.prompts.DEFAULT_PROMPTS`), `negative_prompt` (None: the
    pipeline's own null input, the empty prompt), `classes` for class-conditional pipelines (None: the
    model's classes in turn), `height` / `width` in pixels (None: the pipeline's default, from the
    denoiser's sample size and the VAE's scale factor). Bare text-conditioned models without a text
    encoder get random prompt embeddings of `prompt_tokens` tokens.
    """

    num_samples: int = 64
    batch_size: int = 16
    num_steps: int | None = None
    guidance_scale: float | None = None
    num_timesteps_kept: int | None = 10
    seed: int = 0
    layers_per_pass: int | None = None
    max_hessian_gib: float | None = None
    max_rows_per_call: int | None = 1024
    prompt_tokens: int = 8
    prompts: tuple[str, ...] | None = None
    negative_prompt: str | None = None
    classes: tuple[int, ...] | None = None
    height: int | None = None
    width: int | None = None
    replay: bool = True

    def __post_init__(self) -> None:
        for name in ("num_samples", "batch_size", "prompt_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CalibrationConfig.{name} must be an int >= 1, got {value!r}")
        for name in (
            "num_steps",
            "num_timesteps_kept",
            "layers_per_pass",
            "max_rows_per_call",
            "height",
            "width",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"CalibrationConfig.{name} must be None or an int >= 1, got {value!r}")
        if self.max_hessian_gib is not None and not self.max_hessian_gib > 0:
            raise ValueError(f"CalibrationConfig.max_hessian_gib must be > 0, got {self.max_hessian_gib!r}")
        if self.guidance_scale is not None and not (
            isinstance(self.guidance_scale, (int, float)) and math.isfinite(self.guidance_scale)
        ):
            raise ValueError(
                "CalibrationConfig.guidance_scale must be None or a finite number, "
                f"got {self.guidance_scale!r}"
            )
        if self.prompts is not None:
            if isinstance(self.prompts, str) or not all(isinstance(p, str) for p in self.prompts):
                raise ValueError("CalibrationConfig.prompts must be a tuple of strings")
            if not self.prompts:
                raise ValueError("CalibrationConfig.prompts is empty: give at least one prompt (or None)")
            object.__setattr__(self, "prompts", tuple(self.prompts))
        if self.classes is not None:
            if not self.classes or not all(isinstance(c, int) and c >= 0 for c in self.classes):
                raise ValueError(f"CalibrationConfig.classes must be non-negative ints, got {self.classes!r}")
            object.__setattr__(self, "classes", tuple(self.classes))

    def resolved(self, steps: int, guidance: float) -> CalibrationConfig:
        """This config with `num_steps` / `guidance_scale` filled in from the model's defaults where None."""
        return replace(
            self,
            num_steps=steps if self.num_steps is None else self.num_steps,
            guidance_scale=guidance if self.guidance_scale is None else self.guidance_scale,
        )

    def kept_step_indices(self, num_steps: int | None = None) -> list[int]:
        """Indices into the sampler's `num_steps` steps (default `self.num_steps`) where statistics are
        collected."""
        steps = self.num_steps if num_steps is None else num_steps
        if steps is None:
            raise ValueError("kept_step_indices: the number of steps is not resolved yet (num_steps is None)")
        n = steps if self.num_timesteps_kept is None else min(self.num_timesteps_kept, steps)
        if n == 1:
            return [steps - 1]
        return sorted({round(i * (steps - 1) / (n - 1)) for i in range(n)})

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("prompts", "classes"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data
