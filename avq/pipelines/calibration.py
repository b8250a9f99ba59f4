"""Calibration through the pipeline itself: its own `__call__`, scheduler, text encoders and guidance.

Q-Diffusion's time step-aware calibration on the real inputs: `PipelineSource` runs the pipeline as a
user would (`pipe(prompt=..., num_inference_steps=..., guidance_scale=..., generator=...)`), with
forward hooks on the denoiser's layers. Whatever the family does to build the denoiser's inputs (SD's
CLIP embeddings, SDXL's two encoders with pooled embeddings and `add_time_ids`, PixArt's T5 with its
attention mask and resolution conditioning, SD3's three encoders, Flux's pooled CLIP + T5 and guidance
embedding, a class-conditional DiT's null class, the empty-prompt embedding or
`force_zeros_for_empty_prompt` as the unconditional input) is exactly what the layers see, because the
pipeline does it.

Steps are counted by wrapping `scheduler.step` for the duration of a call (every diffusers pipeline
calls it once per step), so the layer hooks record at `config.kept_step_indices(len(timesteps))`: time
steps spread over the whole trajectory of the pipeline's own schedule (timestep spacing, prediction type
epsilon / v / flow matching: the scheduler's business).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from avq.calibration.config import CalibrationConfig
from avq.calibration.statistics import DenoiserCalls, Recorder, collect_statistics, detached_copy
from avq.evaluation.samples import batch_seed
from avq.pipelines.folders import check_pipeline, denoiser_name
from avq.pipelines.prompts import DEFAULT_PROMPTS
from avq.planning.sensitivity import SwapProbe, relative_mse


def call_defaults(pipe: Any) -> tuple[int, float]:
    """The pipeline's own default `(num_inference_steps, guidance_scale)` from its `__call__` signature
    (guidance 1.0 where it has none, e.g. unconditional LDM)."""
    params = inspect.signature(pipe.__call__).parameters
    steps = params["num_inference_steps"].default if "num_inference_steps" in params else 50
    guidance = params["guidance_scale"].default if "guidance_scale" in params else 1.0
    return int(steps), float(guidance)


def num_classes(pipe: Any) -> int | None:
    """Real classes of a class-conditional pipeline's denoiser (DiT: `num_embeds_ada_norm`), else None."""
    config = pipe.components[denoiser_name(pipe)].config
    for key in ("num_embeds_ada_norm", "num_class_embeds"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class PipelineCall:
    """The kwargs of one batch's `pipe(...)` call and its size."""

    kwargs: dict[str, Any]
    size: int


def batch_calls(pipe: Any, config: CalibrationConfig, *, offset: int = 0) -> list[PipelineCall]:
    """`num_samples` samples in batches of `batch_size`, each batch a `pipe(...)` call: prompts (cycled
    from `config.prompts` or `DEFAULT_PROMPTS`, starting at `offset`) for text-conditioned pipelines,
    class labels for class-conditional ones, `batch_size` for unconditional ones; the generator of batch
    `b` is seeded with `batch_seed(seed, b)`."""
    params = inspect.signature(pipe.__call__).parameters
    calls = []
    n_total = config.num_samples
    for b, start in enumerate(range(0, n_total, config.batch_size)):
        n = min(config.batch_size, n_total - start)
        rows = range(offset + start, offset + start + n)
        kwargs: dict[str, Any] = {"num_inference_steps": config.num_steps}
        if "guidance_scale" in params:
            kwargs["guidance_scale"] = config.guidance_scale
        if "prompt" in params:
            prompts = config.prompts or DEFAULT_PROMPTS
            kwargs["prompt"] = [prompts[i % len(prompts)] for i in rows]
            if config.negative_prompt is not None and "negative_prompt" in params:
                kwargs["negative_prompt"] = [config.negative_prompt] * n
        elif "class_labels" in params:
            classes = config.classes or tuple(range(num_classes(pipe) or 1))
            kwargs["class_labels"] = [classes[i % len(classes)] for i in rows]
        elif "batch_size" in params:
            kwargs["batch_size"] = n
        for key in ("height", "width"):
            if getattr(config, key) is not None and key in params:
                kwargs[key] = getattr(config, key)
                if "use_resolution_binning" in params:  # an explicit size is used as given (PixArt)
                    kwargs["use_resolution_binning"] = False
        if "output_type" in params:
            kwargs["output_type"] = "latent" if _supports_latent_output(pipe) else "np"
        kwargs["generator"] = torch.Generator().manual_seed(batch_seed(config.seed, b))
        calls.append(PipelineCall(kwargs, n))
    return calls


def _supports_latent_output(pipe: Any) -> bool:
    return type(pipe).__name__ not in ("LDMPipeline", "DiTPipeline", "DDPMPipeline", "DDIMPipeline")


@contextlib.contextmanager
def counting_steps(pipe: Any, on_step: Callable[[], None]) -> Iterator[None]:
    """Call `on_step()` after every `pipe.scheduler.step(...)` inside the block."""
    scheduler = pipe.scheduler
    step = scheduler.step

    def counted(*args, **kwargs):
        out = step(*args, **kwargs)
        on_step()
        return out

    scheduler.step = counted
    try:
        yield
    finally:
        del scheduler.step  # back to the class's method


class PipelineSource:
    """Calibration statistics and LAQ probes from a pipeline's own sampling (module docstring)."""

    def __init__(self, pipe: Any, config: CalibrationConfig | None = None):
        check_pipeline(pipe)
        self.pipe = pipe
        self.name = denoiser_name(pipe)
        self.config = (config or CalibrationConfig()).resolved(*call_defaults(pipe))

    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.components[self.name]

    def _check(self, model: nn.Module) -> None:
        if model is not self.denoiser:
            raise ValueError(f"PipelineSource: the model to calibrate must be the pipeline's {self.name}")

    @torch.no_grad()
    def run(self, config: CalibrationConfig, recorder: Recorder | None, *, offset: int = 0) -> None:
        """Every batch call of `config`; `recorder.active` is on while the denoiser runs a kept step."""
        state = {"step": 0, "kept": None}

        def on_step() -> None:
            state["step"] += 1
            if recorder is not None:
                recorder.step_done()

        def before_denoiser(module: nn.Module, args: tuple) -> None:
            if state["kept"] is None:  # the pipeline has set its timesteps by now
                state["kept"] = set(config.kept_step_indices(len(self.pipe.scheduler.timesteps)))
            if recorder is not None:
                recorder.active = state["step"] in state["kept"]

        handle = self.denoiser.register_forward_pre_hook(before_denoiser)
        try:
            for call in batch_calls(self.pipe, config, offset=offset):
                state["step"], state["kept"] = 0, None
                with counting_steps(self.pipe, on_step):
                    self.pipe(**call.kwargs)
        finally:
            handle.remove()

    def statistics(
        self,
        model: nn.Module,
        names: Sequence[str],
        *,
        observers: Mapping[str, Any],
        progress: bool,
        replay: DenoiserCalls | None = None,
    ) -> dict[str, tuple[torch.Tensor, int]]:
        self._check(model)
        config = self.config
        n_calls = -(-config.num_samples // config.batch_size)
        return collect_statistics(
            model,
            names,
            config,
            lambda recorder: self.run(config, recorder),
            steps_per_pass=n_calls * config.num_steps,
            progress=progress,
            observers=observers,
            replay=replay,
        )

    def probe(self, model: nn.Module) -> RecordedProbe:
        """The denoiser's inputs and FP outputs at 5 steps of one batch of up to 4 samples, with prompts and
        noise the calibration did not use (another seed, the next prompts)."""
        from dataclasses import replace

        self._check(model)
        config = replace(
            self.config,
            num_samples=min(4, self.config.num_samples),
            batch_size=min(4, self.config.num_samples),
            num_timesteps_kept=min(5, self.config.num_steps),
            seed=self.config.seed + 1,
        )
        return record_probe(self, config, offset=self.config.num_samples)

    def to_dict(self) -> dict:
        return {"source": "pipeline", "pipeline": type(self.pipe).__name__, **self.config.to_dict()}


@dataclass
class RecordedProbe(SwapProbe):
    """Recorded denoiser calls `(args, kwargs)` and their FP outputs; `error(model)` replays them."""

    calls: list[tuple[tuple, dict]] = field(default_factory=list)
    reference: list[torch.Tensor] = field(default_factory=list)

    @torch.no_grad()
    def outputs(self, model: nn.Module) -> list[torch.Tensor]:
        return [first_tensor(model(*args, **kwargs)).float() for args, kwargs in self.calls]

    def error(self, model: nn.Module) -> float:
        """Relative MSE of `model`'s outputs against the FP reference (conditional and null rows alike)."""
        return relative_mse(self.outputs(model), self.reference)

    @property
    def num_inputs(self) -> int:
        return len(self.calls)

    @torch.no_grad()
    def forward_input(self, model: nn.Module, i: int) -> None:
        args, kwargs = self.calls[i]
        model(*args, **kwargs)


def record_probe(source: PipelineSource, config: CalibrationConfig, *, offset: int = 0) -> RecordedProbe:
    """Run `config`'s calls and keep the denoiser's inputs and outputs at the kept steps."""
    probe = RecordedProbe()
    recorder = Recorder()

    def keep(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if recorder.active:
            probe.calls.append((detached_copy(args), detached_copy(kwargs)))
            probe.reference.append(first_tensor(output).detach().float().clone())

    handle = source.denoiser.register_forward_hook(keep, with_kwargs=True)
    try:
        source.run(config, recorder, offset=offset)
    finally:
        handle.remove()
    return probe


def first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    return output[0]
