"""Data-free distillation data: noisy latents `x_t` from the FP teacher's own sampling trajectories.

No dataset: every epoch samples `trajectories_per_epoch` fresh trajectories with the teacher's guided DDIM
sampler (the one sampler loop of `avq.calibration.sampler`, as calibration uses it): new noise and
random labels (or random prompt embeddings) each epoch. Each trajectory contributes every step of the
schedule, so the inputs cover the whole range of timesteps, as the model meets them when sampling. At each
point the sampler already evaluates the teacher with the condition and with the null condition; those
outputs are kept as the distillation targets (no second teacher forward per training step).

Determinism and ranks: trajectory `i` of epoch `e` draws its noise and condition from its own generator,
seeded with `(seed, e, i)`, and the trajectories are sampled in fixed chunks of `sampling_batch`; chunk
`c` is sampled by rank `c % world_size` and the results are all-gathered. So the pool of an epoch is the
same bits whatever the number of ranks, and it is a pure function of `(teacher, config, epoch)`: a resumed
run rebuilds it instead of storing it. The order of the points within an epoch comes from a generator
seeded with `(seed, e)`, so the batch of every step is a pure function of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from avq.calibration.adapters import ModelAdapter, cat_kwargs, to_device
from avq.calibration.sampler import SamplerStep, make_ddim_scheduler, run_sampler
from avq.distributed import DistContext, all_gather_rows, shard

from .config import FinetuneConfig

_STREAMS = {"train": 0, "sample": 1, "heldout": 2, "order": 3}


def stream_seed(seed: int, stream: str, *keys: int) -> int:
    """A 63-bit seed for `(seed, stream, *keys)` (numpy's SeedSequence: independent streams)."""
    return int(np.random.SeedSequence([seed, _STREAMS[stream], *keys]).generate_state(2, np.uint64)[0] >> 1)


def _select(kwargs: dict | None, index: torch.Tensor) -> dict | None:
    if kwargs is None:
        return None
    return {k: v[index] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def trajectory_inputs(
    adapter: ModelAdapter, seed: int, stream: str, epoch: int, indices: range
) -> tuple[torch.Tensor, dict, dict | None]:
    """Start noise `[n, C, H, W]`, condition kwargs and null kwargs (None: unconditional model) of the
    trajectories `indices` of `epoch`, each from its own generator."""
    noise, conds, nulls = [], [], []
    for i in indices:
        generator = torch.Generator().manual_seed(stream_seed(seed, stream, epoch, i))
        noise.append(torch.randn((1, *adapter.latent_shape), generator=generator))
        cond, null = adapter.make_conditions(1, generator)
        conds.append(cond)
        nulls.append(null)
    null = None if nulls[0] is None else cat_kwargs(*nulls)
    return torch.cat(noise), cat_kwargs(*conds), null


@dataclass
class SamplerRun:
    """One batch of guided DDIM trajectories: the samples, every step's input and the model outputs."""

    final: torch.Tensor  # [n, C, H, W] the samples
    x: torch.Tensor  # [n, S, C, H, W]: x_t fed to the model at each step
    out_cond: torch.Tensor  # [n, S, *out]: model output with the condition
    out_null: torch.Tensor | None  # [n, S, *out]: with the null condition (None: none exists)


@torch.no_grad()
def sample_trajectories(
    model: nn.Module,
    adapter: ModelAdapter,
    noise: torch.Tensor,
    cond: dict,
    null: dict | None,
    *,
    steps: int,
    guidance: float,
) -> SamplerRun:
    """One batch of trajectories on the shared sampler loop (`avq.calibration.sampler`, as calibration).

    Every step's input and outputs are recorded; the model sees the null input whenever a null condition
    exists, guided or not (the null outputs are distillation targets too).
    """
    xs, outs_c, outs_u = [], [], []

    def keep(step: SamplerStep) -> None:
        xs.append(step.x)
        outs_c.append(step.out_cond)
        outs_u.append(step.out_null)

    final = run_sampler(
        model,
        adapter,
        noise,
        cond,
        null,
        steps=steps,
        guidance=guidance,
        evaluate_null=True,
        after_step=keep,
    )
    return SamplerRun(
        final=final,
        x=torch.stack(xs, 1),
        out_cond=torch.stack(outs_c, 1),
        out_null=None if outs_u[0] is None else torch.stack(outs_u, 1),
    )


def sampler_timesteps(steps: int) -> torch.Tensor:
    """The DDIM schedule's timesteps `[S]` (int64), high noise first."""
    scheduler = make_ddim_scheduler()
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.to(torch.int64).clone()


# ============================================================================ pools and batches
@dataclass
class TrajectoryPool:
    """One epoch's teacher trajectories: `N` trajectories x `S` steps."""

    epoch: int
    x: torch.Tensor  # [N, S, C, H, W]
    timesteps: torch.Tensor  # [S] int64
    out_cond: torch.Tensor  # [N, S, *out] teacher outputs (targets) with the condition
    out_null: torch.Tensor | None  # [N, S, *out] with the null condition
    cond: dict  # condition kwargs, tensors [N, ...]
    null: dict | None  # null kwargs, tensors [N, ...]


@dataclass
class Batch:
    """This rank's rows of one step: `n` trajectory points."""

    x: torch.Tensor  # [n, C, H, W]
    t: torch.Tensor  # [n] int64
    cond: dict
    null: dict | None
    target_cond: torch.Tensor  # [n, *out]
    target_null: torch.Tensor | None


def build_pool(
    teacher: nn.Module,
    adapter: ModelAdapter,
    config: FinetuneConfig,
    epoch: int,
    ctx: DistContext,
    *,
    stream: str = "train",
    trajectories: int | None = None,
) -> TrajectoryPool:
    """Sample the pool of `epoch` (module docstring: seeds, chunks shared out among ranks)."""
    n = config.trajectories_per_epoch if trajectories is None else trajectories
    chunk = config.sampling_batch
    chunks = [range(lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]
    mine = chunks[ctx.rank :: ctx.world_size]
    per_rank = -(-len(chunks) // ctx.world_size)  # chunks per rank, padded to the largest share
    noise, cond, null = trajectory_inputs(adapter, config.seed, stream, epoch, range(n))
    runs = []
    for indices in mine:
        index = torch.tensor(list(indices))
        run = sample_trajectories(
            teacher,
            adapter,
            noise[index],
            _select(cond, index),
            _select(null, index),
            steps=config.sampling_steps,
            guidance=config.guidance_scale,
        )
        runs.append(run)
    param = next(teacher.parameters())
    # Every adapter returns outputs shaped like the latents (learned-sigma halves are cut).
    row_shape = (config.sampling_steps, *adapter.latent_shape)
    fields = ["x", "out_cond"] + (["out_null"] if null is not None else [])
    pooled = {}
    for name in fields:
        local = [getattr(r, name) for r in runs]
        if ctx.world_size == 1:
            pooled[name] = torch.cat(local)
            continue
        # Pad this rank's chunks to `per_rank` full chunks, gather, and put chunk c back at position c.
        padded = torch.zeros((per_rank * chunk, *row_shape), dtype=param.dtype, device=param.device)
        for j, part in enumerate(local):
            padded[j * chunk : j * chunk + part.shape[0]] = part
        gathered = all_gather_rows(padded, ctx)
        ordered = []
        for c, indices in enumerate(chunks):
            rank, slot = c % ctx.world_size, c // ctx.world_size
            ordered.append(gathered[rank][slot * chunk : slot * chunk + len(indices)])
        pooled[name] = torch.cat(ordered)
    return TrajectoryPool(
        epoch=epoch,
        x=pooled["x"],
        timesteps=sampler_timesteps(config.sampling_steps),
        out_cond=pooled["out_cond"],
        out_null=pooled.get("out_null"),
        cond=cond,
        null=null,
    )


def epoch_order(config: FinetuneConfig, epoch: int) -> torch.Tensor:
    """Flat point indices `trajectory * S + step` of `epoch` in the order batches take them `[N * S]`."""
    N, S = config.trajectories_per_epoch, config.sampling_steps
    generator = torch.Generator().manual_seed(stream_seed(config.seed, "order", epoch))
    if config.timestep_sampling == "uniform":
        return torch.randperm(N * S, generator=generator)
    # stratified: round k visits every timestep once (in random order), each with another trajectory
    traj = torch.stack([torch.randperm(N, generator=generator) for _ in range(S)], 1)  # [N, S]
    steps = torch.stack([torch.randperm(S, generator=generator) for _ in range(N)])  # [N, S]
    return (traj.gather(1, steps) * S + steps).reshape(-1)


class TeacherData:
    """The batch of every step, from the pool of its epoch (rebuilt when the epoch changes)."""

    def __init__(self, teacher: nn.Module, adapter: ModelAdapter, config: FinetuneConfig, ctx: DistContext):
        self.teacher, self.adapter, self.config, self.ctx = teacher, adapter, config, ctx
        self.pool: TrajectoryPool | None = None
        self.order: torch.Tensor | None = None
        self.pools_built = 0

    def epoch_of(self, step: int) -> int:
        return step // self.config.steps_per_epoch

    def batch(self, step: int) -> Batch:
        """This rank's shard of the batch of `step` (0-based)."""
        config = self.config
        epoch = self.epoch_of(step)
        if self.pool is None or self.pool.epoch != epoch:
            self.pool = build_pool(self.teacher, self.adapter, config, epoch, self.ctx)
            self.order = epoch_order(config, epoch)
            self.pools_built += 1
        b = step % config.steps_per_epoch
        rows = self.order[b * config.batch_size : (b + 1) * config.batch_size]  # the whole batch
        points = rows[shard(config.batch_size, self.ctx)]
        return pool_batch(self.pool, points)

    def outputs(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """`(model output, teacher target)` on the batch's rows: conditional, then (`distill_null`) null."""
        param = next(model.parameters())
        x, t, kwargs, target = model_inputs(batch, self.config.distill_null, param.device, param.dtype)
        return self.adapter.forward(model, x, t, kwargs), target

    @torch.no_grad()
    def sample_grid(self, model: nn.Module, n: int = 16) -> torch.Tensor:
        """`n` samples `[n, C, H, W]` of `model` with the teacher's sampler, from fixed noise and conditions
        (the "sample" stream of the seed), so grids of successive steps are comparable."""
        config = self.config
        noise, cond, null = trajectory_inputs(self.adapter, config.seed, "sample", 0, range(n))
        final = run_sampler(
            model,
            self.adapter,
            noise,
            cond,
            null,
            steps=config.sampling_steps,
            guidance=config.guidance_scale,
        )
        return final.float().clamp(-1, 1).cpu()


def model_inputs(batch: Batch, distill_null: bool, device: torch.device, dtype: torch.dtype):
    """`(x, t, kwargs, target)` rows for the student: the conditional rows, then the null rows."""
    if distill_null and batch.null is not None:
        x = torch.cat([batch.x, batch.x])
        t = torch.cat([batch.t, batch.t])
        kwargs = cat_kwargs(batch.cond, batch.null)
        target = torch.cat([batch.target_cond, batch.target_null])
    else:
        x, t, kwargs, target = batch.x, batch.t, batch.cond, batch.target_cond
    return x.to(device, dtype), t.to(device), to_device(kwargs, device, dtype), target.to(device)


def pool_batch(pool: TrajectoryPool, points: torch.Tensor) -> Batch:
    """The rows `points` (flat `trajectory * S + step` indices) of `pool`."""
    S = pool.timesteps.shape[0]
    traj, step = points // S, points % S
    device = pool.x.device
    return Batch(
        x=pool.x[traj, step],
        t=pool.timesteps[step].to(device),
        cond=_select(pool.cond, traj),
        null=_select(pool.null, traj),
        target_cond=pool.out_cond[traj, step],
        target_null=None if pool.out_null is None else pool.out_null[traj, step],
    )
