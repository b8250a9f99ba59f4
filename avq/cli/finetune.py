"""`avq finetune`: SeMI-PV fine-tuning of an avq save against its FP teacher."""

from __future__ import annotations

import argparse
import sys

from avq.cli.models import UserError, resolve_dtype, write_json
from avq.storage.checkpoint import CheckpointError

# `avq finetune` option -> FinetuneConfig field (options left unset keep the config's defaults)
_FINETUNE_OPTIONS = {
    "batch_size": "batch_size",
    "seed": "seed",
    "lr_codebooks": "lr_codebooks",
    "lr_scales": "lr_scales",
    "lr_fp": "lr_fp",
    "lr_shadow": "lr_shadow",
    "warmup": "warmup",
    "v_every": "v_every",
    "v_metric": "v_metric",
    "max_code_change": "max_code_change",
    "trust_ratio": "trust_ratio",
    "beam_width": "beam_width",
    "semi": "semi",
    "trajectories": "trajectories_per_epoch",
    "sampling_steps": "sampling_steps",
    "guidance": "guidance_scale",
    "timestep_sampling": "timestep_sampling",
    "block_loss_weight": "block_loss_weight",
    "checkpoint_every": "checkpoint_every",
    "sample_every": "sample_every",
}


def cmd_finetune(args: argparse.Namespace) -> int:
    from avq.finetune import FinetuneConfig, FinetuneError, finetune_folder

    overrides = {
        field: getattr(args, option)
        for option, field in _FINETUNE_OPTIONS.items()
        if getattr(args, option) is not None
    }
    try:
        config = FinetuneConfig(steps=args.steps, **overrides)
    except ValueError as error:
        raise UserError(str(error)) from None
    try:
        figures = finetune_folder(
            args.quantized,
            args.out,
            config,
            teacher=args.teacher,
            checkpoint_dir=args.checkpoint_dir,
            resume=args.resume,
            tracker=args.tracker,
            progress=not args.quiet,
            device=args.device,
            sampling=_pipeline_sampling(args),
            dtype=resolve_dtype(args.dtype),
        )
    except (FinetuneError, CheckpointError) as error:
        raise UserError(str(error)) from None
    if figures["rank"] != 0:
        return 0
    history = figures["history"]
    if history:
        print(
            f"fine-tuned {figures['steps_done']} steps (SeMI {config.semi}, {figures['world_size']} "
            f"process(es)): loss {history[0]['loss']:.4g} -> {history[-1]['loss']:.4g}, "
            f"{figures['codes_changed_total']:.2%} of codes changed in all, {figures['seconds']:.1f} s"
        )
    if figures["saved"]:
        print(f"saved {args.out}")
    if args.json:
        command = sys.argv[1:] if args.argv is None else args.argv
        write_json(args.json, {"command": " ".join(["avq", *command]), **figures})
    return 0


def _pipeline_sampling(args: argparse.Namespace):
    """The teacher pipeline's sampling settings when `--quantized` is a pipeline folder (None otherwise):
    `--prompts`, `--sampling-steps` / `--guidance` (default: the pipeline's own), `--height` / `--width`."""
    from avq.calibration.config import CalibrationConfig
    from avq.pipelines.folders import is_pipeline_folder
    from avq.pipelines.prompts import read_prompts

    if not is_pipeline_folder(args.quantized):
        for option in ("prompts", "height", "width"):
            if getattr(args, option) is not None:
                raise UserError(f"--{option} needs a quantized pipeline folder as --quantized")
        return None
    return CalibrationConfig(
        num_steps=args.sampling_steps,
        guidance_scale=args.guidance,
        prompts=read_prompts(args.prompts) if args.prompts else None,
        height=args.height,
        width=args.width,
    )
