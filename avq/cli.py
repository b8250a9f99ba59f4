"""The `avq` command line. Each subcommand only parses arguments and calls the Python API.

    avq quantize --model digits-unet-mini|FOLDER --preset w4a16|w2a16|w4a8|w2a8 [--method avq|gptq|rtn]
                 --out FOLDER [--json PATH] [--resume] [--num-samples N] [--seed S]

User errors (unknown model, a folder that is not a diffusers model, a preset that cannot be met, an
unusable checkpoint) exit with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .calibration import CalibrationConfig, UnsupportedModelError
from .pipeline import (
    METHODS,
    PRESETS,
    ActivationQuantizationNotImplementedError,
    CheckpointError,
    PresetError,
    QuantizeReport,
)
from .serialization import FormatError, save_quantized

SHIPPED_MODELS = ("digits-unet-mini",)
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

    config = preset_config(args.preset, args.method)  # a8 / unknown: raises before any heavy work
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    if out.exists() and (
        not out.is_dir() or any(p.name not in ("config.json", "model.safetensors") for p in out.iterdir())
    ):
        raise UserError(f"--out {out}: exists and is not an avq save; choose another folder")
    if partial.exists() and not args.resume:
        raise UserError(f"{partial} holds an interrupted run: pass --resume to continue it, or delete it")
    model = load_model(args.model)
    calibration = CalibrationConfig(
        num_samples=args.num_samples,
        batch_size=min(args.batch_size, args.num_samples),
        num_steps=args.steps,
        num_timesteps_kept=args.timesteps_kept,
        seed=args.seed,
    )
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
    )
    seconds = time.perf_counter() - start
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
            extra_config={"preset": args.preset, "method": args.method, "summary": report.summary()},
        )
        print(f"saved {out}")
    else:
        print(f"{args.method} is simulated (dense weights, dequantized): no avq model saved; figures only")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    shutil.rmtree(partial, ignore_errors=True)
    return 0


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
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
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
        ActivationQuantizationNotImplementedError,
        CheckpointError,
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
