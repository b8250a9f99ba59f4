"""Time step-aware calibration: input Hessians of a model's layers along its own FP sampling trajectory.

Why the sampler and not noised training images (`avq_bench.reference.collect_hessians`): a diffusion model's
layers see different input distributions at different timesteps (Q-Diffusion), and at sampling time they
see the model's *own* intermediate latents, not forward-noised data. So `calibrate` runs the FP DDIM
sampler (with classifier-free guidance: the model sees the conditional and the null input, and both feed
the statistics, since both run at inference) and accumulates `H = E[x x^T]` of each requested layer at
`num_timesteps_kept` timesteps spread uniformly over the trajectory.

Streamed: hooks add each batch into a float32 `[K, K]` sum (`avq.calibration.hessian.HessianAccumulator`);
activations are never kept. Peak memory is the model's own forward plus the Hessians of the hooked
layers; with
`layers_per_pass=n` only `n` layers are hooked per pass, which bounds memory by those layers' Hessians at
the cost of more passes; `max_hessian_gib=x` packs consecutive layers into passes whose float32
accumulators (`4 K^2` bytes per layer) stay within `x` GiB (a layer bigger than that gets a pass of its
own). Only the first pass samples: it records the model's calls at the kept steps (`DenoiserCalls`, on the
CPU), and every later pass replays those calls instead of sampling again: the same layer inputs, so the
same Hessians, for `kept / steps` of the model calls (`CalibrationConfig.replay`; measured in
`benchmarks/calibration_replay.py`).

A small adapter per model family (`adapter_for`) knows the latent shape and how to condition the model.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from avq.calibration.adapters import adapter_for
from avq.calibration.config import REFERENCE_GUIDANCE, REFERENCE_STEPS, CalibrationConfig
from avq.calibration.hessian import HessianAccumulator
from avq.calibration.sampler import make_ddim_scheduler, run_sampler


# ============================================================================ layers
def quantizable_layers(model: nn.Module) -> list[str]:
    """Every `nn.Linear` and every `nn.Conv2d` with groups == 1 and zero padding, in module order.

    These are the layers whose input Hessian `HessianAccumulator` can stream and that `AQLinear`/`AQConv2d`
    can replace; whether each one *is* quantized is the pipeline's FP-keep rule (`avq.planning.plan`).
    """
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        or (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros")
    ]


# The ModuleLists of top-level blocks in diffusers' denoisers (UNets; DiT/PixArt/SD3; Flux).
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")


def block_of(name: str) -> str:
    """The top-level block of a layer: `down_blocks.1`, `up_blocks.0`, `transformer_blocks.3`,
    `single_transformer_blocks.5`, or the first name component (`conv_in`, `mid_block`, `time_embedding`,
    ...)."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] in BLOCK_LISTS:
        return ".".join(parts[:2])
    return parts[0]


def group_by_block(names: Sequence[str]) -> dict[str, list[str]]:
    """Layer names grouped by `block_of`, blocks in order of first appearance."""
    blocks: dict[str, list[str]] = {}
    for name in names:
        blocks.setdefault(block_of(name), []).append(name)
    return blocks


def hessian_passes(
    model: nn.Module, names: Sequence[str], max_gib: float | None, layers_per_pass: int | None = None
) -> list[list[str]]:
    """Consecutive layers packed into passes whose float32 accumulators (`4 K^2` bytes a layer) stay within
    `max_gib` GiB (None: no limit) and that hold at most `layers_per_pass` layers; a layer larger than the
    budget gets a pass of its own."""
    per_pass = layers_per_pass or max(1, len(names))
    budget = math.inf if max_gib is None else max_gib * 2**30
    chunks: list[list[str]] = [[]]
    used = 0.0
    for name in names:
        K = layer_fan_in(model, name)
        size = 4.0 * K * K
        if chunks[-1] and (len(chunks[-1]) >= per_pass or used + size > budget):
            chunks.append([])
            used = 0.0
        chunks[-1].append(name)
        used += size
    return chunks if chunks[0] else []


SOLVER_BUFFERS = 2  # [K, K] float32 buffers the AQ solver adds to a layer's own Hessian (sequential init)


def default_hessian_gib(device: torch.device | str | None = None, largest_k: int = 0) -> float:
    """The default budget of one pass of Hessians, in GiB: a quarter of the compute device's free memory
    once the solver's working set for the largest layer (`SOLVER_BUFFERS` float32 `[K, K]` buffers) is set
    aside. The other three quarters leave room for calibration's activations, allocator slack and the rest
    of the host (free memory: `free_memory_bytes`). Peak memory of SD 1.5's UNet in float32 on a 24 GiB host:
    `benchmarks/results/scale_cpu.json`."""
    return pass_budget_gib(free_memory_bytes(device), largest_k)


def pass_budget_gib(free_bytes: float, largest_k: int) -> float:
    """`default_hessian_gib` for a given amount of free memory (bytes)."""
    reserve = SOLVER_BUFFERS * 4.0 * largest_k * largest_k
    return max(free_bytes - reserve, 0.0) / 4 / 2**30


def free_memory_bytes(device: torch.device | str | None = None) -> float:
    """Free memory of the compute device: `torch.cuda.mem_get_info` on CUDA, `MemAvailable` of
    /proc/meminfo on a CPU, 16 GiB where neither answers."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return 16.0 * 2**30


def layer_fan_in(model: nn.Module, name: str) -> int:
    """`K` of a Linear or Conv2d layer: the side of its input Hessian."""
    layer = model.get_submodule(name)
    return layer.in_features if isinstance(layer, nn.Linear) else math.prod(layer.weight.shape[1:])


class Recorder:
    """The switch between a trajectory runner and the layer hooks: hooks add inputs only while `active`
    (at the kept steps); the runner calls `step_done()` after every sampler step (progress, when `bar`)."""

    def __init__(self, bar=None):
        self.active = False
        self._bar = bar

    def step_done(self) -> None:
        self.active = False
        if self._bar is not None:
            self._bar.update(1)


class DenoiserCalls:
    """The model's calls `(args, kwargs)` at the kept steps of a calibration's trajectories, recorded (on
    the CPU) while a pass samples them, then replayed by the later passes instead of sampling again.

    A quantize run keeps one for all its passes (the model stays FP until the last one); sequential
    calibration must not, since each block is calibrated on the model quantized so far. Memory: the
    latents and conditioning of the kept calls (SD 1.5 at 64 samples, 10 kept steps, guided: ~0.4 GB)."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] | None = None

    def record(self, model: nn.Module, recorder: Recorder, run_pass: Callable[[Recorder], None]) -> None:
        calls: list[tuple[tuple, dict]] = []

        def keep(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if recorder.active:
                calls.append((detached_copy(args, "cpu"), detached_copy(kwargs, "cpu")))

        handle = model.register_forward_hook(keep, with_kwargs=True)
        try:
            run_pass(recorder)
        finally:
            handle.remove()
        self.calls = calls

    @torch.no_grad()
    def replay(self, model: nn.Module, recorder: Recorder) -> None:
        device = next(model.parameters()).device
        for args, kwargs in self.calls or []:
            recorder.active = True
            # Moved, not copied: the recording is read-only here (a no-op on the CPU).
            model(*detached_copy(args, device, copy=False), **detached_copy(kwargs, device, copy=False))
            recorder.step_done()


def detached_copy(value: Any, device: str | torch.device | None = None, *, copy: bool = True) -> Any:
    """`value` (tensors, or dicts / lists / tuples of them) with its tensors detached and copied, onto
    `device` (None: where they are): recorded model calls must not alias buffers the sampler reuses.
    `copy=False` only moves them (no copy where they already are)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(value.device if device is None else device, copy=copy)
    if isinstance(value, dict):
        return {k: detached_copy(v, device, copy=copy) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(detached_copy(v, device, copy=copy) for v in value)
    return value


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    layer_names: Sequence[str],
    config: CalibrationConfig,
    run_pass: Callable[[Recorder], None],
    *,
    steps_per_pass: int,
    progress: bool = True,
    observers: Mapping[str, Any] | None = None,
    replay: DenoiserCalls | None = None,
) -> dict[str, tuple[torch.Tensor, int]]:
    """`{name: (H [K, K], n_rows)}` of the named layers of `model`, over the trajectories that `run_pass`
    samples: it runs every trajectory once, switching `recorder.active` on at the steps to keep. Layers
    are hooked a pass at a time (`layers_per_pass`, `max_hessian_gib`); with `config.replay` the first
    pass records the model's kept calls and the others replay them (`DenoiserCalls`; `replay` carries
    them over from an earlier call on the same unchanged model), otherwise `run_pass` is called once per
    pass and must reproduce the same trajectories each time. `observers`: see `calibrate`."""
    from tqdm.auto import tqdm

    names = list(dict.fromkeys(layer_names))
    observers = dict(observers or {})
    if not set(observers) <= set(names):
        raise ValueError(
            f"calibrate: observers for layers not calibrated: {sorted(set(observers) - set(names))}"
        )
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"calibrate: {type(model).__name__} has no layer {name!r}") from error
    chunks = hessian_passes(model, names, config.max_hessian_gib, config.layers_per_pass)
    if not config.replay:
        replay = None
    elif replay is None and len(chunks) > 1:
        replay = DenoiserCalls()
    was_training = model.training
    model.eval()
    results: dict[str, tuple[torch.Tensor, int]] = {}
    bar = tqdm(total=len(chunks) * steps_per_pass, desc="calibrate", unit="step", disable=not progress)
    recorder = Recorder(bar)

    def make_hook(acc: HessianAccumulator, observer):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            if recorder.active:
                acc.add(inputs[0])
                if observer is not None:
                    observer.observe(inputs[0])

        return hook

    try:
        for chunk in chunks:
            accumulators = {
                name: HessianAccumulator(
                    model.get_submodule(name),
                    max_rows=config.max_rows_per_call,
                    seed=config.seed ^ zlib.crc32(name.encode()),  # per layer: any layers_per_pass agrees
                )
                for name in chunk
            }
            handles = [
                model.get_submodule(n).register_forward_hook(make_hook(a, observers.get(n)))
                for n, a in accumulators.items()
            ]
            try:
                if replay is None:
                    run_pass(recorder)
                elif replay.calls is None:
                    replay.record(model, recorder, run_pass)
                else:
                    replay.replay(model, recorder)
                    bar.update(steps_per_pass - len(replay.calls))
            finally:
                recorder.active = False
                for handle in handles:
                    handle.remove()
            for name, acc in accumulators.items():
                # A layer the sampler never calls (e.g. an unused branch) has no statistics: n_rows = 0.
                K = acc.sum.shape[0]
                results[name] = (acc.take() if acc.count else torch.zeros(K, K), acc.count)
            del accumulators
    finally:
        bar.close()
        model.train(was_training)
    return results


@torch.no_grad()
def calibrate(
    model: nn.Module,
    layer_names: Sequence[str],
    config: CalibrationConfig | None = None,
    *,
    conditioning: torch.Tensor | None = None,
    scheduler=None,
    progress: bool = True,
    observers: Mapping[str, Any] | None = None,
    replay: DenoiserCalls | None = None,
) -> dict[str, tuple[torch.Tensor, int]]:
    """Input Hessians of the named layers along the FP reference sampling trajectory of a bare model:
    `{name: (H [K, K], n_rows)}` (pipelines: `avq.pipelines.calibration.PipelineSource`).

    `n_rows` is the number of input rows (tokens, or conv patches) averaged into `H`. Deterministic for
    `config.seed` (and thread count), and the same with any `layers_per_pass`. `scheduler`: a diffusers
    scheduler to copy the noise schedule from (default `make_ddim_scheduler()`). `observers`: `{name:
    obj}` whose `obj.observe(input)` sees the same inputs as the Hessian of layer `name` (8-bit activation
    ranges, `avq.calibration.activations.RangeObserver`); every key must be one of `layer_names`.
    `replay`: the kept model calls of an earlier call on the same model and config (`DenoiserCalls`).
    """
    from diffusers import DDIMScheduler

    config = (config or CalibrationConfig()).resolved(REFERENCE_STEPS, REFERENCE_GUIDANCE)
    adapter = adapter_for(model, conditioning=conditioning, prompt_tokens=config.prompt_tokens)
    scheduler = make_ddim_scheduler() if scheduler is None else DDIMScheduler.from_config(scheduler.config)
    kept = set(config.kept_step_indices())
    n_batches = -(-config.num_samples // config.batch_size)

    def run_pass(recorder: Recorder) -> None:
        def before_step(index: int, t: torch.Tensor) -> None:
            recorder.active = index in kept

        # The same generator sequence every pass: identical trajectories for every chunk.
        generator = torch.Generator().manual_seed(config.seed)
        for b in range(n_batches):
            n = min(config.batch_size, config.num_samples - b * config.batch_size)
            x = torch.randn((n, *adapter.latent_shape), generator=generator)
            cond, null = adapter.make_conditions(n, generator)
            run_sampler(
                model,
                adapter,
                x,
                cond,
                null,
                steps=config.num_steps,
                guidance=config.guidance_scale,
                scheduler=scheduler,
                before_step=before_step,
                after_step=lambda step: recorder.step_done(),
            )

    return collect_statistics(
        model,
        layer_names,
        config,
        run_pass,
        steps_per_pass=n_batches * config.num_steps,
        progress=progress,
        observers=observers,
        replay=replay,
    )
