"""The SeMI-PV fine-tuning loop (`finetune`), its held-out loss (`distillation_loss` over `heldout_pool`),
and the folder-to-folder job behind `avq finetune` (`finetune_folder`).

One step: this rank's shard of the step's teacher-trajectory batch (`avq.finetune.data`) -> student
forward with the straight-through shadows installed (`avq.finetune.pv.straight_through`) -> loss = MSE of
the model output against the teacher's (conditional and, with `distill_null`, null-conditioned rows), plus
`block_loss_weight` x the mean over top-level blocks of the MSE of their outputs -> backward -> gradients
averaged over ranks and clipped -> AdamW (`SlotAdamW`): P step on codebooks / scales / FP parameters and
the straight-through step on the shadows -> every `v_every` steps the code update (`v_step`) and SeMI
(`semi_reset`). The student runs in eval mode (no dropout): the run is a deterministic function of the
models, the config and the thread count, so a resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from avq import distributed
from avq.calibration.adapters import adapter_for

from .checkpoint import load_checkpoint, restore, run_identity, save_checkpoint
from .config import FinetuneConfig, FinetuneError
from .data import TeacherData, TrajectoryPool, build_pool, model_inputs, pool_batch
from .optim import SlotAdamW
from .pipeline_data import PipelineTeacherData
from .pv import (
    ShadowLayer,
    make_shadows,
    p_step_parameters,
    recording_metrics,
    shadow_name,
    straight_through,
    v_step,
)
from .semi import semi_reset

History = list[dict[str, Any]]
SAMPLE_GRID = 16  # samples in each logged grid
HELDOUT_TRAJECTORIES = 16  # held-out teacher trajectories a loss is taken on, by default


# ============================================================================ checks
def check_pair(student: nn.Module, teacher: nn.Module) -> None:
    """The teacher must be the FP architecture of the student (same class and diffusers config)."""
    from .checkpoint import architecture_config

    if type(student) is not type(teacher):
        raise FinetuneError(
            f"the teacher is a {type(teacher).__name__}, the quantized student a {type(student).__name__}: "
            "the teacher must be the FP model the student was quantized from"
        )
    a, b = architecture_config(student), architecture_config(teacher)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        raise FinetuneError(
            f"the teacher's {type(teacher).__name__} config differs from the student's in "
            f"{', '.join(diff[:8])}: the teacher must be the FP model the student was quantized from"
        )


# ============================================================================ block outputs
def block_names(model: nn.Module) -> list[str]:
    """Top-level blocks whose outputs the optional block term matches: `down_blocks.*`, `mid_block`,
    `up_blocks.*` (UNets), `transformer_blocks.*` (DiT / PixArt)."""
    names = []
    for attr in ("down_blocks", "mid_block", "up_blocks", "transformer_blocks"):
        block = getattr(model, attr, None)
        if isinstance(block, nn.ModuleList):
            names += [f"{attr}.{i}" for i in range(len(block))]
        elif isinstance(block, nn.Module):
            names.append(attr)
    return names


@contextlib.contextmanager
def capture_outputs(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """`{name: first tensor output}` of the named submodules during the block (forward hooks)."""
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, args, output):
            while isinstance(output, (tuple, list)):
                output = output[0]
            captured[name] = output

        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


# ============================================================================ the loop
def _distillation_loss(
    student: nn.Module,
    teacher: nn.Module,
    data: TeacherData | PipelineTeacherData,
    batch: Any,
    config: FinetuneConfig,
    blocks: list[str],
) -> torch.Tensor:
    """MSE of the student's output against the teacher's on this rank's rows (+ the block term)."""
    with contextlib.ExitStack() as stack:
        got = stack.enter_context(capture_outputs(student, blocks)) if blocks else {}
        out, target = data.outputs(student, batch)
    loss = F.mse_loss(out.float(), target.float())
    if blocks:
        with torch.no_grad(), capture_outputs(teacher, blocks) as want:
            data.outputs(teacher, batch)
        block = sum(F.mse_loss(got[n].float(), want[n].float()) for n in blocks) / len(blocks)
        loss = loss + config.block_loss_weight * block
    return loss


def _code_update(
    shadows: list[ShadowLayer], optimizer: SlotAdamW, config: FinetuneConfig, ctx: distributed.DistContext
) -> dict[str, Any]:
    """The V step's code update, the ranks' agreement check, then SeMI; the step's record entries."""
    metrics = [s.metric for s in shadows if s.metric is not None]
    if ctx.distributed and metrics:  # every rank saw its share of the batch: decide on the whole batch
        distributed.all_reduce_mean_(metrics, ctx)
    changes = v_step(
        shadows,
        max_code_change=config.max_code_change,
        trust_ratio=config.trust_ratio,
        beam_width=config.beam_width,
    )
    distributed.check_same(
        [c.codes_changed for c in changes] + [float(c.new_codes.sum()) for c in changes],
        ctx,
        "the codes changed by the V step",
    )
    record: dict[str, Any] = dict(semi_reset(config.semi, optimizer, shadows, changes))
    record["codes_changed"] = sum(c.codes_changed for c in changes) / sum(s.num_codes for s in shadows)
    record["groups_changed"] = sum(int(c.groups.numel()) for c in changes)
    record["trust_rejected"] = sum(c.trust_rejected for c in changes)
    return record


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    config: FinetuneConfig | None = None,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    tracker=None,
    progress: bool = True,
    stop_after: int | None = None,
    device: str | torch.device | None = None,
    conditioning: torch.Tensor | None = None,
    data: PipelineTeacherData | None = None,
) -> tuple[nn.Module, History]:
    """Fine-tune the quantized `student` (in place) against its FP `teacher` with SeMI-PV.

    `data`: where the teacher trajectories come from; default the reference sampler around `teacher`
    (`avq.finetune.data.TeacherData`); a pipeline's own sampling with `PipelineTeacherData`
    (`finetune_pipeline`).

    `checkpoint_dir`: write a checkpoint every `config.checkpoint_every` steps and at the end; `resume`:
    continue from it (refused with `FinetuneCheckpointError` for another model, spec, teacher or config).
    `tracker`: an `avq.tracking` tracker (metrics every `log_every` steps; sample grids every
    `sample_every`); only the main rank logs. `stop_after`: end after that many steps (with a checkpoint),
    as an interruption would. Under torchrun the process group is set up here unless the caller did
    (`avq.distributed`). `conditioning`: class labels / prompt embeddings for the trajectories
    (`avq.calibration.adapter_for`). Returns `(student, history)`: one dict per step done (this call and
    the resumed ones): step, loss, learning rates, code-change and SeMI counts.
    """
    config = FinetuneConfig() if config is None else config
    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"config must be an avq.finetune.FinetuneConfig, got {type(config).__name__}")
    if resume and checkpoint_dir is None:
        raise FinetuneError("resume=True needs a checkpoint_dir")
    ctx = distributed.setup(device)
    try:
        return _finetune(
            student,
            teacher,
            config,
            ctx,
            checkpoint_dir,
            resume,
            tracker,
            progress,
            stop_after,
            conditioning,
            data,
        )
    finally:
        distributed.teardown(ctx)


def _finetune(
    student, teacher, config, ctx, checkpoint_dir, resume, tracker, progress, stop_after, conditioning, data
) -> tuple[nn.Module, History]:
    from tqdm.auto import tqdm

    from avq.tracking import NullTracker

    check_pair(student, teacher)
    if config.batch_size % ctx.world_size:
        raise FinetuneError(
            f"batch_size {config.batch_size} cannot be split evenly over {ctx.world_size} processes"
        )
    student.to(ctx.device)
    teacher.to(ctx.device).eval().requires_grad_(False)
    was_training = student.training
    student.eval()
    shadows = make_shadows(student)
    if not shadows:
        raise FinetuneError(
            f"the student {type(student).__name__} has no AQLinear/AQConv2d layers: nothing to fine-tune "
            "(pass a model quantized with the avq method)"
        )
    for param in student.parameters():
        param.requires_grad_(True)
    if ctx.distributed:  # every rank starts from rank 0's tensors, as DDP does
        distributed.broadcast_(list(student.state_dict().values()), ctx)
    identity = run_identity(student, teacher)
    optimizer = SlotAdamW(
        p_step_parameters(student) + [(shadow_name(s.name), "shadow", s.delta, 2) for s in shadows],
        config.learning_rates(),
        betas=config.betas,
        weight_decay=config.weight_decay,
    )
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    history: History = []
    start, seconds_before = 0, 0.0
    if resume:
        meta, tensors = load_checkpoint(ckpt, config=config, identity=identity)
        restore(meta, tensors, student=student, shadows=shadows, optimizer=optimizer)
        start, history, seconds_before = int(meta["step"]), list(meta["history"]), float(meta["seconds"])
    end = config.steps if stop_after is None else max(start, min(config.steps, stop_after))
    tracker = tracker if (tracker is not None and ctx.is_main) else NullTracker()
    if data is None:
        data = TeacherData(teacher, adapter_for(teacher, conditioning=conditioning), config, ctx)
    blocks = block_names(student) if config.block_loss_weight > 0 else []
    trained = optimizer.params()
    started = time.perf_counter()

    def checkpoint(step: int) -> None:
        if ckpt is not None and ctx.is_main:
            save_checkpoint(
                ckpt,
                step=step,
                config=config,
                identity=identity,
                student=student,
                shadows=shadows,
                optimizer=optimizer,
                history=history,
                seconds=seconds_before + time.perf_counter() - started,
                world_size=ctx.world_size,
            )
        distributed.barrier(ctx)

    def log_samples(step: int) -> None:
        if ctx.is_main and config.sample_every:
            tracker.log_images("samples", data.sample_grid(student), caption=f"step {step}")

    bar = tqdm(
        range(start, end),
        initial=start,
        total=config.steps,
        desc="finetune (SeMI-PV)",
        unit="step",
        disable=not (progress and ctx.is_main),
    )
    try:
        with straight_through(shadows):
            for step in bar:
                optimizer.zero_grad()
                # A V step in the input metric records this batch's input Gram blocks on the way.
                measure = config.is_v_step(step) and config.v_metric == "hessian"
                with recording_metrics(shadows) if measure else contextlib.nullcontext():
                    loss = _distillation_loss(student, teacher, data, data.batch(step), config, blocks)
                loss.backward()
                for p in trained:  # an unused tensor gets a zero gradient on every rank alike
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                value = loss.detach().reshape(1).clone()
                distributed.all_reduce_mean_([p.grad for p in trained] + [value], ctx)
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
                scale = config.lr_factor(step)
                optimizer.step(scale)
                record: dict[str, Any] = {"step": step + 1, "loss": float(value)}
                record.update({f"lr/{g}": optimizer.lr(g, scale) for g in optimizer.lrs})
                record.update(dict.fromkeys(("groups_changed", "trust_rejected"), 0), codes_changed=0.0)
                record.update(dict.fromkeys(("reset_groups", "reset_codewords", "reset_all"), 0))
                if config.is_v_step(step):
                    record.update(_code_update(shadows, optimizer, config, ctx))
                history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.3g}", changed=f"{record['codes_changed']:.2%}")
                done = step + 1
                if done % config.log_every == 0:
                    tracker.log_metrics(record)
                if config.sample_every and done % config.sample_every == 0:
                    log_samples(done)
                if config.checkpoint_every and done % config.checkpoint_every == 0 and done < end:
                    checkpoint(done)
    finally:
        bar.close()
        student.train(was_training)
    if end > start or not resume:
        checkpoint(end)
    if end == config.steps and config.sample_every and config.steps % config.sample_every:
        log_samples(end)
    return student, history


# ============================================================================ evaluation
@torch.no_grad()
def heldout_pool(
    teacher: nn.Module,
    config: FinetuneConfig | None = None,
    *,
    trajectories: int = HELDOUT_TRAJECTORIES,
    conditioning: torch.Tensor | None = None,
) -> TrajectoryPool:
    """`trajectories` held-out teacher trajectories (a stream the training never draws), sampled once so
    that several students can be scored against them (`distillation_loss(..., pool=)`)."""
    config = FinetuneConfig() if config is None else config
    adapter = adapter_for(teacher, conditioning=conditioning)
    ctx = distributed.DistContext(device=next(teacher.parameters()).device)
    return build_pool(teacher, adapter, config, 0, ctx, stream="heldout", trajectories=trajectories)


@torch.no_grad()
def distillation_loss(
    student: nn.Module,
    teacher: nn.Module,
    config: FinetuneConfig | None = None,
    *,
    trajectories: int = HELDOUT_TRAJECTORIES,
    batch_size: int = 64,
    conditioning: torch.Tensor | None = None,
    pool: TrajectoryPool | None = None,
) -> float:
    """The fine-tuning loss (model-output term) of `student` over every point of `trajectories` held-out
    teacher trajectories (a stream the training never draws), on one process. `pool`: those trajectories
    from `heldout_pool` (same teacher, config and conditioning), instead of sampling them again."""
    config = FinetuneConfig() if config is None else config
    adapter = adapter_for(teacher, conditioning=conditioning)
    if pool is None:
        pool = heldout_pool(teacher, config, trajectories=trajectories, conditioning=conditioning)
    points = torch.arange(pool.x.shape[0] * pool.x.shape[1])
    param = next(student.parameters())
    total, count = 0.0, 0
    for lo in range(0, points.numel(), batch_size):
        batch = pool_batch(pool, points[lo : lo + batch_size])
        x, t, kwargs, target = model_inputs(batch, config.distill_null, param.device, param.dtype)
        out = adapter.forward(student, x, t, kwargs)
        total += float(F.mse_loss(out.float(), target.float(), reduction="sum"))
        count += target.numel()
    return total / count
