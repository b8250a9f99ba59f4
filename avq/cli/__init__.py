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

import sys
from collections.abc import Sequence

from avq.calibration.adapters import UnsupportedModelError
from avq.cli.models import UserError, load_model
from avq.cli.parser import build_parser
from avq.extras import MissingExtraError
from avq.planning.budget import BudgetError
from avq.planning.presets import PresetError
from avq.planning.sensitivity import SensitivityTableError
from avq.storage.checkpoint import CheckpointError
from avq.storage.serialization import FormatError

__all__ = ["UserError", "build_parser", "load_model", "main"]


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
        MissingExtraError,
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
