"""The one sampler loop: a diffusers scheduler with classifier-free guidance over a model adapter.

Calibration (`statistics.calibrate`), LAQ's probe (`avq.planning.sensitivity.make_probe`), fine-tuning's
teacher trajectories (`avq.finetune.data`) and sample sets (`avq.evaluation.samples`) all run this loop;
they differ only in what they do around each model call, which they say with two hooks:

- `before_step(index, t)`: just before the model is called at step `index` (e.g. switch layer hooks on);
- `after_step(step)`: with the `SamplerStep` (the latents fed in, the conditional and null outputs and the
  guided epsilon the scheduler steps with).

With guidance (`guidance != 1` and a null input) the conditional and null inputs run as one batch of
`2n`, conditional rows first, and `eps = eps_null + guidance * (eps_cond - eps_null)`. `evaluate_null`
runs the null input even without guidance (fine-tuning keeps both outputs as targets).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from avq.calibration.adapters import ModelAdapter, cat_kwargs, to_device

NUM_TRAIN_TIMESTEPS = 1000


def make_ddim_scheduler(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """DDIM (eta 0) over the standard linear-beta 1000-step schedule (the reference models' schedule)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=num_train_timesteps)


@dataclass
class SamplerStep:
    """What the model saw and returned at one step of the loop."""

    index: int  # position in the schedule, 0 = most noise
    t: torch.Tensor  # the scheduler's timestep, on the model's device
    x: torch.Tensor  # [n, C, H, W] latents fed to the model
    kwargs: dict  # the model's conditioning kwargs as called ([2n, ...] rows when `both`)
    both: bool  # conditional and null inputs ran as one batch of 2n
    out_cond: torch.Tensor  # [n, C, H, W] output with the condition
    out_null: torch.Tensor | None  # [n, C, H, W] output with the null condition (None: not run)
    eps: torch.Tensor  # [n, C, H, W] the (guided) prediction the scheduler stepped with

    @property
    def model_input(self) -> torch.Tensor:
        """The latents exactly as the model took them (`[2n, ...]` when `both`)."""
        return torch.cat([self.x, self.x]) if self.both else self.x


@torch.no_grad()
def run_sampler(
    model: nn.Module,
    adapter: ModelAdapter,
    noise: torch.Tensor,
    cond: dict,
    null: dict | None,
    *,
    steps: int,
    guidance: float,
    scheduler=None,
    evaluate_null: bool = False,
    before_step: Callable[[int, torch.Tensor], None] | None = None,
    after_step: Callable[[SamplerStep], None] | None = None,
) -> torch.Tensor:
    """Sample from `noise` `[n, C, H, W]` in `steps` steps; returns the final latents (model dtype/device).

    `cond` / `null`: the adapter's conditioning kwargs for the `n` samples (`null` None: the model has no
    null input, so no guidance). `scheduler`: a diffusers scheduler instance, reset to `steps` steps
    (default `make_ddim_scheduler()`). Hooks: module docstring.
    """
    scheduler = make_ddim_scheduler() if scheduler is None else scheduler
    scheduler.set_timesteps(steps)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    guided = null is not None and guidance != 1
    both = null is not None and (guided or evaluate_null)
    kwargs = to_device(cat_kwargs(cond, null) if both else cond, device, dtype)
    x = noise.to(device, dtype)
    for index, t in enumerate(scheduler.timesteps):
        t_in = t.to(device)
        if before_step is not None:
            before_step(index, t_in)
        if both:
            out_cond, out_null = adapter.forward(model, torch.cat([x, x]), t_in, kwargs).chunk(2)
        else:
            out_cond, out_null = adapter.forward(model, x, t_in, kwargs), None
        eps = out_null + guidance * (out_cond - out_null) if guided else out_cond
        if after_step is not None:
            after_step(SamplerStep(index, t_in, x, kwargs, both, out_cond, out_null, eps))
        x = scheduler.step(eps, t, x).prev_sample
    return x
