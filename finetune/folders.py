"""The folder-to-folder jobs behind `avq finetune` (an avq save, or a quantized pipeline folder), and
`finetune_pipeline`: a quantized pipeline's denoiser against the FP pipeline's, on the FP pipeline's own
trajectories (`avq.finetune.pipeline_data`)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from avq import distributed
from avq.calibration.config import CalibrationConfig

from .checkpoint import has_checkpoint
from .config import FinetuneConfig, FinetuneError
from .loop import History, finetune
from .pipeline_data import PipelineTeacherData


def finetune_pipeline(
    student_pipe: Any,
    teacher_pipe: Any,
    config: FinetuneConfig | None = None,
    *,
    sampling: CalibrationConfig | None = None,
    **options: Any,
) -> tuple[nn.Module, History]:
    """SeMI-PV on `student_pipe`'s quantized denoiser against `teacher_pipe`'s FP one (in place).

    `sampling`: the teacher's sampling settings (prompts, steps and guidance: None takes the pipeline's
    defaults, height/width); `config.trajectories_per_epoch` / `sampling_batch` / `seed` set how many
    trajectories each epoch samples and how. `options` are `finetune`'s (`checkpoint_dir`, `resume`,
    `tracker`, `progress`, `stop_after`, `device`).
    """
    from avq.pipelines.folders import denoiser_name

    config = FinetuneConfig() if config is None else config
    name = denoiser_name(student_pipe)
    device = options.get("device")
    ctx = distributed.DistContext(device=torch.device(device) if device is not None else torch.device("cpu"))
    teacher_pipe.to(ctx.device)
    data = PipelineTeacherData(teacher_pipe, config, ctx, sampling)
    return finetune(
        student_pipe.components[name], teacher_pipe.components[name], config, data=data, **options
    )


def finetune_pipeline_folder(
    quantized: Path,
    out: Path,
    config: FinetuneConfig,
    *,
    teacher: str | None,
    checkpoint_dir: str | os.PathLike | None,
    resume: bool,
    tracker: str,
    progress: bool,
    stop_after: int | None,
    device: str | torch.device | None,
    sampling: CalibrationConfig | None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """`avq finetune` on a quantized pipeline folder (`avq quantize` of a pipeline): the teacher is the FP
    pipeline folder recorded in its denoiser's save, or `teacher`; the result is a pipeline folder."""
    from avq.pipelines.folders import denoiser_name, is_pipeline_folder, load_pipeline_folder, save_pipeline
    from avq.tracking import make_tracker

    partial = Path(checkpoint_dir) if checkpoint_dir is not None else out.with_name(out.name + ".partial")
    if out.exists() and not is_pipeline_folder(out):
        raise FinetuneError(f"--out {out}: exists and is not a pipeline folder; choose another folder")
    if has_checkpoint(partial) and not resume:
        raise FinetuneError(f"{partial} holds an interrupted run: pass --resume to continue it, or delete it")
    if resume and not has_checkpoint(partial):
        raise FileNotFoundError(f"no fine-tuning checkpoint to resume in {partial}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    student = load_pipeline_folder(quantized, device=device, dtype=dtype)
    name = denoiser_name(student)
    block = json.loads((quantized / name / "config.json").read_text()).get("quantization_config") or {}
    extra = block.get("extra") or {}
    source = teacher or extra.get("model")
    if not source or not is_pipeline_folder(source):
        raise FinetuneError(
            f"{quantized}: the FP pipeline folder to distill from is unknown (recorded: {source!r}); "
            "pass --teacher FP_PIPELINE_FOLDER"
        )
    fp = load_pipeline_folder(source, device=device, dtype=dtype)
    run_tracker = make_tracker(
        tracker, {"quantized": str(quantized), "teacher": str(source), "finetune": config.to_dict()}
    )
    started = time.perf_counter()
    try:
        _, history = finetune_pipeline(
            student,
            fp,
            config,
            sampling=sampling,
            checkpoint_dir=partial,
            resume=resume,
            tracker=run_tracker,
            progress=progress,
            stop_after=stop_after,
            device=device,
        )
    finally:
        run_tracker.finish()
    steps_done = history[-1]["step"] if history else 0
    summary = {
        "config": config.to_dict(),
        "teacher": str(source),
        "sampling": None if sampling is None else sampling.to_dict(),
        "steps_done": steps_done,
        "final_loss": history[-1]["loss"] if history else None,
        "codes_changed_total": sum(h["codes_changed"] for h in history),
        "world_size": 1,
    }
    figures = {
        **summary,
        "quantized": str(quantized),
        "out": str(out),
        "seconds": round(time.perf_counter() - started, 2),
        "saved": False,
        "rank": 0,
        "history": history,
    }
    if steps_done == config.steps:
        student.to("cpu")
        save_pipeline(student, out, source=quantized, extra_config={**extra, "finetune": summary})
        shutil.rmtree(partial, ignore_errors=True)
        figures["saved"] = True
    return figures


def finetune_folder(
    quantized: str | os.PathLike,
    out: str | os.PathLike,
    config: FinetuneConfig,
    *,
    teacher: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    tracker: str = "none",
    progress: bool = True,
    stop_after: int | None = None,
    device: str | torch.device | None = None,
    sampling: Any = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """`avq finetune`: load the avq save `quantized` and its teacher, fine-tune, save to `out`. A pipeline
    folder goes to `finetune_pipeline_folder` (`sampling`: the teacher pipeline's
    sampling settings, a `CalibrationConfig`).

    The teacher is `teacher` (a shipped model name or a diffusers folder) or else the FP source recorded
    in the save (`quantization_config.extra.model`, written by `avq quantize`). Checkpoints go to
    `checkpoint_dir` (default `<out>.partial`), which is removed after the final save. The save records
    the fine-tuning settings and figures under `quantization_config.extra.finetune`. `dtype`: the compute
    dtype of the student and the teacher (default float32). `device`: default
    `cuda:LOCAL_RANK` when CUDA is available, else CPU. Returns the figures (on every rank; only the main
    rank writes files).
    """
    from avq.pipelines.folders import is_pipeline_folder
    from avq.storage.serialization import CONFIG_NAME, load_quantized, save_quantized
    from avq.tracking import NullTracker, make_tracker

    quantized, out = Path(quantized), Path(out)
    if out.exists() and out.resolve() == quantized.resolve():
        raise FinetuneError(f"--out {out} is the input folder; write the fine-tuned model elsewhere")
    if is_pipeline_folder(quantized):
        return finetune_pipeline_folder(
            quantized,
            out,
            config,
            teacher=teacher,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            tracker=tracker,
            progress=progress,
            stop_after=stop_after,
            device=device,
            sampling=sampling,
            dtype=dtype,
        )
    partial = Path(checkpoint_dir) if checkpoint_dir is not None else out.with_name(out.name + ".partial")
    if out.exists() and out.resolve() == quantized.resolve():
        raise FinetuneError(f"--out {out} is the input folder; write the fine-tuned model elsewhere")
    if out.exists() and (
        not out.is_dir() or any(p.name not in (CONFIG_NAME, "model.safetensors") for p in out.iterdir())
    ):
        raise FinetuneError(f"--out {out}: exists and is not an avq save; choose another folder")
    if has_checkpoint(partial) and not resume:
        raise FinetuneError(f"{partial} holds an interrupted run: pass --resume to continue it, or delete it")
    if resume and not has_checkpoint(partial):
        raise FileNotFoundError(f"no fine-tuning checkpoint to resume in {partial}")
    ctx = distributed.setup(device)
    try:
        student = load_quantized(quantized).to(dtype)
        extra = json.loads((quantized / CONFIG_NAME).read_text())["quantization_config"].get("extra") or {}
        source = teacher or extra.get("model")
        if not source:
            raise FinetuneError(
                f"{quantized} records no FP source model (quantization_config.extra.model); pass --teacher"
            )
        from avq.cli import load_model

        fp = load_model(str(source)).to(dtype)
        run_tracker = (
            make_tracker(
                tracker,
                {"quantized": str(quantized), "teacher": str(source), "finetune": config.to_dict()},
            )
            if ctx.is_main
            else NullTracker()
        )
        started = time.perf_counter()
        try:
            student, history = finetune(
                student,
                fp,
                config,
                checkpoint_dir=partial,
                resume=resume,
                tracker=run_tracker,
                progress=progress,
                stop_after=stop_after,
                device=ctx.device,
            )
        finally:
            run_tracker.finish()
        seconds = time.perf_counter() - started
        steps_done = history[-1]["step"] if history else 0
        summary = {
            "config": config.to_dict(),
            "teacher": str(source),
            "steps_done": steps_done,
            "final_loss": history[-1]["loss"] if history else None,
            "codes_changed_total": sum(h["codes_changed"] for h in history),
            "world_size": ctx.world_size,
        }
        figures = {
            **summary,
            "quantized": str(quantized),
            "out": str(out),
            "seconds": round(seconds, 2),
            "saved": False,
            "rank": ctx.rank,
            "history": history,
        }
        if steps_done == config.steps:
            if ctx.is_main:
                save_quantized(student.cpu(), out, extra_config={**extra, "finetune": summary})
                shutil.rmtree(partial, ignore_errors=True)
            figures["saved"] = True
            distributed.barrier(ctx)
        return figures
    finally:
        distributed.teardown(ctx)
