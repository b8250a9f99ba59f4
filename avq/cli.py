"""The `avq` command line. Each subcommand only parses arguments and calls the Python API.

    avq quantize --model digits-unet|digits-dit|digits-unet-mini|FOLDER --preset w4a16|w2a16|w4a8|w2a8
                 [--method avq|gptq|rtn] --out FOLDER [--json PATH] [--resume] [--num-samples N] [--seed S]
                 [--bits-budget B] [--sequential] [--tracker none|wandb]
    avq finetune --quantized FOLDER --steps N --out FOLDER [--resume] [--tracker none|wandb]
                 [--teacher MODEL] [--semi selective|none|all] [--checkpoint-every N] [--json PATH]
    avq sample   --model digits-unet|digits-dit|digits-unet-mini|FOLDER [--quantized FOLDER] --n N
                 [--steps 20] [--guidance G] [--seed S] [--batch-size B] --out DIR [--json PATH]
    avq eval     SAMPLES.npz [--fp FP_SAMPLES.npz] [--floor FP2.npz] [--reference test|train] [--json PATH]

User errors (unknown model, a folder that is not a diffusers model, a preset that cannot be met, an
unusable checkpoint) exit with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .budget import BudgetError, SensitivityTableError
from .calibration import CalibrationConfig, UnsupportedModelError
from .fileio import write_json_atomic
from .pipeline import (
    METHODS,
    PRESETS,
    CheckpointError,
    PresetError,
    QuantizeReport,
)
from .serialization import FormatError, save_quantized

SHIPPED_MODELS = ("digits-unet", "digits-dit", "digits-unet-mini")
SUPPORTED_CLASSES = (
    "UNet2DModel",
    "UNet2DConditionModel",
    "DiTTransformer2DModel",
    "PixArtTransformer2DModel",
)


class UserError(Exception):
    """Bad input from the command line: reported as one line, exit status 2."""


def load_model(spec: str):
    """A shipped model by name, or a local diffusers model folder (or pipeline folder with `unet/` or
    `transformer/`), in float32 eval mode."""
    import diffusers

    if spec in SHIPPED_MODELS:
        from .reference import load_reference

        return load_reference(spec)
    folder = Path(spec)
    if not folder.exists():
        raise UserError(
            f"unknown model {spec!r}: not a shipped model ({', '.join(SHIPPED_MODELS)}) and no such folder"
        )
    if not folder.is_dir():
        raise UserError(f"{spec}: not a folder (expected a diffusers model folder with config.json)")
    if not (folder / "config.json").is_file() and (folder / "model_index.json").is_file():
        for sub in ("unet", "transformer"):
            if (folder / sub / "config.json").is_file():
                folder = folder / sub
                break
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{spec}: not a diffusers model folder (no config.json)")
    try:
        class_name = json.loads(config_path.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as error:
        raise UserError(f"{config_path}: not a diffusers config ({error})") from None
    if not class_name:
        raise UserError(f"{config_path}: not a diffusers model config (no _class_name)")
    if class_name not in SUPPORTED_CLASSES:
        raise UserError(
            f"{spec}: model class {class_name} is not supported (supported: {', '.join(SUPPORTED_CLASSES)})"
        )
    cls = getattr(diffusers, class_name)
    try:
        return cls.from_pretrained(folder, low_cpu_mem_usage=False).eval()
    except (OSError, ValueError) as error:
        raise UserError(
            f"{spec}: cannot load the {class_name} weights ({str(error).splitlines()[0]})"
        ) from None


def cmd_quantize(args: argparse.Namespace) -> int:
    from .pipeline import preset_config, quantize
    from .tracking import make_tracker

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
    from .finetune import FinetuneConfig, FinetuneError, finetune_folder
    from .training import CheckpointMismatchError

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
    except (FinetuneError, CheckpointMismatchError) as error:
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
    from .sampling import generate_samples, save_samples

    if args.quantized:
        from .serialization import load_quantized

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
    from .data import load_digits_images
    from .metrics import evaluate
    from .sampling import load_samples

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
    figures = evaluate(
        samples,
        labels,
        reference=load_digits_images(args.reference),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avq", description="Additive vector quantization of diffusion models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser(
        "quantize",
        help="quantize a diffusers model (time step-aware calibration, then layer by layer)",
        description="Calibrate on the FP DDIM sampler, quantize every Linear/Conv2d (FP-keep rule in "
        "avq.pipeline), print a per-layer table and save the model (avq method).",
    )
    q.add_argument(
        "--model",
        required=True,
        help=f"shipped model ({', '.join(SHIPPED_MODELS)}) or diffusers model folder",
    )
    q.add_argument("--preset", required=True, choices=PRESETS, help="weight/activation bits")
    q.add_argument(
        "--method", default="avq", choices=METHODS, help="avq (default), or the simulated gptq/rtn baselines"
    )
    q.add_argument("--out", required=True, help="output folder (avq save: config.json + model.safetensors)")
    q.add_argument("--json", help="write the figures (per-layer rows, summary) to this JSON file")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run from <out>.partial/")
    q.add_argument("--num-samples", type=_positive, default=64, help="calibration samples (default 64)")
    q.add_argument("--batch-size", type=_positive, default=16, help="calibration batch size (default 16)")
    q.add_argument(
        "--steps", type=_positive, default=20, help="DDIM steps of the calibration sampler (default 20)"
    )
    q.add_argument(
        "--timesteps-kept", type=_positive, default=10, help="steps whose inputs feed the statistics"
    )
    q.add_argument("--seed", type=int, default=0)
    q.add_argument(
        "--sequential",
        action="store_true",
        help="calibrate block by block on the model quantized so far (one sampler run per block)",
    )
    q.add_argument(
        "--bits-budget",
        type=_positive_float,
        default=None,
        metavar="B",
        help="LAQ: choose each layer's spec (1x8g4, 1x4g2, 2x8g4, 2x4g2 or FP) from its measured effect on "
        "the model output, under B total bits per weight over all Linear/Conv2d weights (codebooks, scales "
        "and FP layers counted); default: the preset's first fitting spec",
    )
    q.add_argument(
        "--sensitivity",
        metavar="JSON",
        default=None,
        help="with --bits-budget: reuse the LAQ sensitivity table of an earlier run of the same model and "
        "calibration (its --json figures) instead of measuring it again, e.g. to sweep budgets",
    )
    q.add_argument(
        "--tracker",
        choices=("none", "wandb"),
        default="none",
        help="log config, per-layer table and figures (wandb: offline unless logged in or WANDB_MODE is set)",
    )
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)

    f = sub.add_parser(
        "finetune",
        help="SeMI-PV: fine-tune an avq save against its FP model (data-free distillation)",
        description="PV-Tuning with selective momentum invalidation (avq.finetune): distill the FP teacher "
        "(the save's recorded source model, or --teacher) into the quantized model on the teacher's own "
        "sampling trajectories; AdamW on codebooks, scales and FP parameters, straight-through code "
        "updates. Checkpoints every --checkpoint-every steps to <out>.partial/ (atomic; --resume after an "
        "interruption). Under `torchrun --nproc_per_node=N` the batches are shared out among the processes.",
    )
    f.add_argument("--quantized", required=True, help="avq save folder (from `avq quantize`)")
    f.add_argument("--steps", type=_positive, required=True, help="optimizer steps")
    f.add_argument("--out", required=True, help="output folder for the fine-tuned avq save")
    f.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    f.add_argument(
        "--tracker",
        choices=("none", "wandb"),
        default="none",
        help="log loss, fraction of codes changed, learning rates and sample grids (wandb: offline unless "
        "logged in or WANDB_MODE is set)",
    )
    f.add_argument(
        "--teacher", help="FP teacher (shipped model or diffusers folder); default: the recorded source"
    )
    f.add_argument("--checkpoint-dir", help="checkpoint folder (default <out>.partial)")
    f.add_argument("--checkpoint-every", type=_positive, help="steps between checkpoints (default 50)")
    f.add_argument("--batch-size", type=_positive, help="trajectory points per step over all processes (16)")
    f.add_argument("--seed", type=int)
    f.add_argument("--semi", choices=("selective", "none", "all"), help="momentum reset on code changes")
    f.add_argument("--lr-codebooks", type=float, help="P step: AdamW rate of the codebooks")
    f.add_argument("--lr-scales", type=float, help="P step: AdamW rate of the scales")
    f.add_argument("--lr-fp", type=float, help="P step: AdamW rate of the parameters left in FP")
    f.add_argument("--lr-shadow", type=float, help="V step: AdamW rate of the straight-through weights")
    f.add_argument("--warmup", type=int, help="steps of linear learning-rate warm-up (10)")
    f.add_argument("--v-every", type=_positive, help="steps between code updates (1)")
    f.add_argument("--max-code-change", type=float, help="max fraction of a layer's codes changed per V step")
    f.add_argument("--trust-ratio", type=float, help="max relative weight change of a layer per V step")
    f.add_argument("--beam-width", type=_positive, help="beam width of the code search")
    f.add_argument("--trajectories", type=_positive, help="teacher trajectories sampled per epoch (32)")
    f.add_argument("--sampling-steps", type=_positive, help="DDIM steps of the teacher trajectories (20)")
    f.add_argument("--guidance", type=float, help="classifier-free guidance of the teacher sampler (2.0)")
    f.add_argument("--timestep-sampling", choices=("uniform", "stratified"))
    f.add_argument("--block-loss-weight", type=float, help="weight of block-output matching (0: off)")
    f.add_argument("--sample-every", type=int, help="log a sample grid every N steps (0: never)")
    f.add_argument(
        "--device", help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK when CUDA is available, else cpu)"
    )
    f.add_argument("--json", help="write the settings, figures and per-step history to this JSON file")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_finetune)

    s = sub.add_parser(
        "sample",
        help="class-balanced DDIM samples (classifier-free guidance) to samples.npz + samples.png",
        description="Sample N images with labels i %% 10 (DDIM, classifier-free guidance) from a shipped "
        "model, a diffusers folder or an avq save (--quantized). Same seed and batch size: same noise.",
    )
    s.add_argument("--model", default="digits-unet-mini", help="shipped model or diffusers folder")
    s.add_argument("--quantized", help="avq save folder (avq.load_quantized); takes precedence over --model")
    s.add_argument("--n", type=_positive, required=True, help="number of samples")
    s.add_argument("--steps", type=_positive, default=20, help="DDIM steps (default 20)")
    s.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance (default 2.0)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=_positive, default=100, help="samples per batch (default 100)")
    s.add_argument("--out", required=True, help="output folder (samples.npz, samples.png)")
    s.add_argument("--json", help="write the run's settings and time to this JSON file")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser(
        "eval",
        help="FID, sFID, IS, precision/recall, class accuracy (+ PSNR/SSIM to FP) of a samples.npz",
        description="Metrics on the shipped digit classifier's features against a digits split; with "
        "--fp, fidelity to FP samples on identical noise; with --floor, the FID floor between two FP "
        "sample sets of different seeds.",
    )
    e.add_argument("samples", help="samples.npz written by `avq sample`")
    e.add_argument("--fp", help="FP samples.npz of the same seed and batch size (PSNR, SSIM, FID to FP)")
    e.add_argument("--floor", help="FP samples.npz of another seed: FID floor")
    e.add_argument(
        "--reference", default="test", choices=("test", "train"), help="real images (default test)"
    )
    e.add_argument("--json", help="write the figures to this JSON file")
    e.set_defaults(func=cmd_eval)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    try:
        return args.func(args)
    except (
        UserError,
        PresetError,
        CheckpointError,
        BudgetError,
        SensitivityTableError,
        UnsupportedModelError,
        FormatError,
        FileNotFoundError,
    ) as error:
        print(f"avq {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"avq {args.command}: interrupted; finished layers are kept, continue with --resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
