"""The subcommands: each parses nothing itself, reads its `argparse.Namespace` and calls the Python API."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

from avq.calibration.config import CalibrationConfig
from avq.cli.models import UserError, load_model
from avq.extras import require_bench
from avq.run.report import QuantizeReport
from avq.storage.atomic import write_json_atomic
from avq.storage.checkpoint import CheckpointError
from avq.storage.serialization import save_quantized


def cmd_quantize(args: argparse.Namespace) -> int:
    from avq.planning.presets import preset_config
    from avq.run.quantize import quantize
    from avq.tracking import make_tracker

    # a8 / unknown / budget with gptq|rtn: raises before any heavy work
    config = preset_config(args.preset, args.method, bits_budget=args.bits_budget, sequential=args.sequential)
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    if out.exists() and (
        not out.is_dir() or any(p.name not in ("config.json", "model.safetensors") for p in out.iterdir())
    ):
        raise UserError(f"--out {out}: exists and is not an avq save; choose another folder")
    if partial.exists() and not args.resume:
        raise UserError(f"{partial} holds an interrupted run: pass --resume to continue it, or delete it")
    sensitivity = _load_sensitivity(args.sensitivity, args.bits_budget) if args.sensitivity else None
    model = load_model(args.model)
    calibration = CalibrationConfig(
        num_samples=args.num_samples,
        batch_size=min(args.batch_size, args.num_samples),
        num_steps=args.steps,
        num_timesteps_kept=args.timesteps_kept,
        seed=args.seed,
    )
    tracker = make_tracker(
        args.tracker,
        {"model": args.model, "quantize": config.to_dict(), "calibration": calibration.to_dict()},
    )
    try:
        start = time.perf_counter()
        report = QuantizeReport()
        model = quantize(
            model,
            config,
            calibration,
            checkpoint_dir=partial,
            resume=args.resume,
            progress=not args.quiet,
            report=report,
            sensitivity=sensitivity,
        )
        seconds = time.perf_counter() - start
        tracker.log_layers(report.rows)
        budget = {k: v for k, v in (report.budget or {}).items() if k not in ("choice", "sensitivity")}
        tracker.log_metrics({"seconds": seconds, "summary": report.summary(), "budget": budget})
    finally:
        tracker.finish()
    print(report.table())
    figures = {
        "command": " ".join(["avq", *sys.argv[1:]]) if args.argv is None else " ".join(["avq", *args.argv]),
        "model": args.model,
        "calibration": calibration.to_dict(),
        "seconds": round(seconds, 2),
        **report.to_dict(),
    }
    if config.method == "avq":
        save_quantized(
            model,
            out,
            extra_config={
                "model": args.model,  # the FP source: `avq finetune` takes its teacher from here
                "preset": args.preset,
                "method": args.method,
                "summary": report.summary(),
                **({"bits_budget": args.bits_budget} if args.bits_budget is not None else {}),
            },
        )
        print(f"saved {out}")
    else:
        print(f"{args.method} is simulated (dense weights, dequantized): no avq model saved; figures only")
    if args.json:
        write_json_atomic(args.json, figures)
    shutil.rmtree(partial, ignore_errors=True)
    return 0


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
        _write_json(args.json, {"command": " ".join(["avq", *command]), **figures})
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from avq.evaluation.samples import generate_samples, save_samples

    if args.quantized:
        from avq.storage.serialization import load_quantized

        model = load_quantized(args.quantized)
    else:
        model = load_model(args.model)
    start = time.perf_counter()
    samples, labels = generate_samples(
        model,
        args.n,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    seconds = time.perf_counter() - start
    meta = {
        "model": args.model,
        "quantized": args.quantized,
        "n": args.n,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    path = save_samples(args.out, samples, labels, meta)
    print(f"wrote {path} ({args.n} samples, {seconds:.1f} s) and {path.with_suffix('.png')}")
    if args.json:
        _write_json(args.json, {**meta, "out": str(path), "seconds": round(seconds, 2)})
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from avq.evaluation.samples import load_samples

    bench = require_bench("avq eval (FID on the digit classifier's features)")

    def read(path: str):
        try:
            return load_samples(path)
        except ValueError as error:
            raise UserError(str(error)) from None

    samples, labels, meta = read(args.samples)
    fp = read(args.fp)[0] if args.fp else None
    floor = read(args.floor)[0] if args.floor else None
    if fp is not None and fp.shape != samples.shape:
        raise UserError(
            f"--fp {args.fp}: shape {list(fp.shape)} differs from the samples' {list(samples.shape)}"
        )
    if samples.shape[1:] != (1, 16, 16):
        raise UserError(
            f"{args.samples}: the digit classifier needs [N, 1, 16, 16] samples, got {list(samples.shape)}"
        )
    start = time.perf_counter()
    figures = bench.metrics.evaluate(
        samples,
        labels,
        reference=bench.data.load_digits_images(args.reference),
        fp_samples=fp,
        floor_samples=floor,
    )
    figures["seconds"] = round(time.perf_counter() - start, 2)
    fid_line = f"FID {figures['fid']:.3f}  sFID {figures['sfid']:.3f}  (vs {args.reference} split)"
    print(fid_line)
    if "fid_to_fp" in figures or "fid_floor" in figures:
        to_fp = (
            f"FID to FP {figures['fid_to_fp']:.3f}  sFID to FP {figures['sfid_to_fp']:.3f}"
            if fp is not None
            else ""
        )
        floor_text = (
            f"floor FID {figures['fid_floor']:.3f}  sFID {figures['sfid_floor']:.3f}"
            if floor is not None
            else ""
        )
        print("  ".join(t for t in (to_fp, f"({floor_text})" if floor_text else "") if t))
    print(
        f"IS {figures['is']:.3f} ± {figures['is_std']:.3f}  precision {figures['precision']:.3f}  "
        f"recall {figures['recall']:.3f}"
    )
    print(
        f"class accuracy {figures['class_accuracy']:.4f} (classifier on the reference: "
        f"{figures['reference_accuracy']:.4f})"
    )
    if fp is not None:
        print(f"PSNR to FP {figures['psnr']:.2f} dB  SSIM to FP {figures['ssim']:.4f}")
    if args.json:
        _write_json(
            args.json,
            {
                "samples": args.samples,
                "fp": args.fp,
                "floor": args.floor,
                "reference": args.reference,
                "sample_meta": meta,
                **figures,
            },
        )
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


def _write_json(path: str, figures: dict) -> None:
    # json cannot hold inf (identical images' PSNR): written as null.
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in figures.items()}
    write_json_atomic(path, clean)
