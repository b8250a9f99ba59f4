"""`avq quantize`: a shipped model, a diffusers model folder or a pipeline folder in, an avq save (or a
pipeline folder whose denoiser is one) out."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from avq import distributed
from avq.calibration.config import CalibrationConfig
from avq.cli.models import UserError, load_model, resolve_device, resolve_dtype, write_json
from avq.run.report import QuantizeReport


def calibration_from_args(args: argparse.Namespace, *, pipeline: bool) -> CalibrationConfig:
    """The `CalibrationConfig` of the calibration options; prompts and classes only for pipelines."""
    from avq.pipelines.prompts import read_prompts

    if not pipeline:
        for option in ("prompts", "negative_prompt", "classes", "height", "width"):
            if getattr(args, option) is not None:
                flag = "--" + option.replace("_", "-")
                raise UserError(f"{flag} needs a pipeline folder (model_index.json) as --model")
    return CalibrationConfig(
        num_samples=args.num_samples,
        batch_size=min(args.batch_size, args.num_samples),
        num_steps=args.steps,
        guidance_scale=args.guidance,
        num_timesteps_kept=args.timesteps_kept,
        seed=args.seed,
        max_hessian_gib=args.max_hessian_gib,
        prompts=read_prompts(args.prompts) if args.prompts else None,
        negative_prompt=args.negative_prompt,
        classes=tuple(args.classes) if args.classes else None,
        height=args.height,
        width=args.width,
    )


def cmd_quantize(args: argparse.Namespace) -> int:
    from avq.core.aq import SolverOptions
    from avq.pipelines.folders import is_pipeline_folder
    from avq.planning.presets import default_laq_floor, preset_config

    overrides = {}
    if args.solver_rounds is not None:
        if args.method != "avq":
            raise UserError(f"--solver-rounds tunes the AQ solver; --method {args.method} has none")
        overrides["solver"] = SolverOptions(max_rounds=args.solver_rounds)
    if args.laq_min_bits is not None:  # with the conditioning layers' floor, which may be higher
        overrides["laq_floor"] = (*default_laq_floor(args.preset), ("*", args.laq_min_bits))
    # a8 / unknown / budget with gptq|rtn: raises before any heavy work
    config = preset_config(
        args.preset,
        args.method,
        **overrides,
        bits_budget=args.bits_budget,
        sequential=args.sequential,
        group_size=args.group_size,
        laq_uniform=args.laq_uniform,
        laq_probe=args.laq_probe,
    )
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    pipeline = is_pipeline_folder(args.model)
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    own = {"config.json", "model.safetensors", "diffusion_pytorch_model.safetensors"}
    if out.exists() and not (
        (pipeline and out.is_dir() and (out / "model_index.json").is_file())
        or (not pipeline and out.is_dir() and all(p.name in own for p in out.iterdir()))
    ):
        raise UserError(f"--out {out}: exists and is not an avq save of this kind; choose another folder")
    if partial.exists() and not args.resume:
        raise UserError(f"{partial} holds an interrupted run: pass --resume to continue it, or delete it")
    sensitivity = _load_sensitivity(args.sensitivity, args.bits_budget) if args.sensitivity else None
    calibration = calibration_from_args(args, pipeline=pipeline)  # reads --prompts: fails before loading
    # Under torchrun the ranks share each pass's layers; without --device each takes cuda:LOCAL_RANK.
    ctx = distributed.setup(device if args.device else None)
    device = ctx.device
    try:
        return _run(args, config, calibration, sensitivity, pipeline, device, dtype, out, partial, ctx)
    finally:
        distributed.teardown(ctx)


def _run(args, config, calibration, sensitivity, pipeline, device, dtype, out, partial, ctx) -> int:
    from avq.pipelines.folders import load_pipeline_folder, save_pipeline
    from avq.run.quantize import quantize
    from avq.storage.serialization import save_quantized
    from avq.tracking import NullTracker, make_tracker

    if pipeline:
        target = load_pipeline_folder(args.model, device=device, dtype=dtype)
    else:
        target = load_model(args.model).to(device=device, dtype=dtype)
    tracker = (
        make_tracker(
            args.tracker,
            {"model": args.model, "quantize": config.to_dict(), "calibration": calibration.to_dict()},
        )
        if ctx.is_main
        else NullTracker()
    )
    try:
        start = time.perf_counter()
        report = QuantizeReport()
        target = quantize(
            target,
            config,
            calibration,
            checkpoint_dir=partial,
            resume=args.resume,
            progress=not args.quiet and ctx.is_main,
            report=report,
            sensitivity=sensitivity,
        )
        seconds = time.perf_counter() - start
        tracker.log_layers(report.rows)
        budget = {k: v for k, v in (report.budget or {}).items() if k not in ("choice", "sensitivity")}
        tracker.log_metrics({"seconds": seconds, "summary": report.summary(), "budget": budget})
    finally:
        tracker.finish()
    if not ctx.is_main:  # the main rank reports and saves
        return 0
    print(report.table())
    figures = {
        "command": " ".join(["avq", *sys.argv[1:]]) if args.argv is None else " ".join(["avq", *args.argv]),
        "model": args.model,
        "calibration": calibration.to_dict(),
        "device": str(device),
        "seconds": round(seconds, 2),
        **report.to_dict(),
    }
    extra = {
        "model": args.model,  # the FP source: `avq finetune` takes its teacher from here
        "preset": args.preset,
        "method": args.method,
        "summary": report.summary(),
        **({"bits_budget": args.bits_budget} if args.bits_budget is not None else {}),
    }
    if pipeline:
        save_pipeline(target, out, source=args.model, extra_config=extra)
        print(f"saved the pipeline {out} (its denoiser quantized; every other component as it was)")
    else:
        save_quantized(target, out, extra_config=extra)
        print(f"saved {out}")
    if args.json:
        write_json(args.json, figures)
    shutil.rmtree(partial, ignore_errors=True)
    return 0


def _load_sensitivity(path: str, bits_budget: float | None) -> dict:
    """The LAQ sensitivity table in `path`: the `--json` figures of an earlier LAQ run, or a bare table."""
    if bits_budget is None:
        raise UserError("--sensitivity reuses an LAQ table: it needs --bits-budget")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"--sensitivity {path}: cannot read a JSON table ({error})") from None
    if isinstance(data, dict) and isinstance(data.get("budget"), dict):
        data = data["budget"].get("sensitivity")

    def is_table(value: object) -> bool:  # {layer: {option: {"error": ..., "total_bits": ...}}}
        return isinstance(value, dict) and all(
            isinstance(opts, dict) and all(isinstance(o, dict) and "error" in o for o in opts.values())
            for opts in value.values()
        )

    if not data or not is_table(data):
        raise UserError(
            f"--sensitivity {path}: no LAQ sensitivity table in it (use the --json of an LAQ run)"
        )
    return data
