"""The `avq` command line. Each subcommand only parses arguments and calls the Python API.

    avq quantize --model PIPELINE_FOLDER|MODEL_FOLDER|digits-unet|digits-dit|digits-unet-mini|digits-t2i
                 --preset w4a16|w2a16|w4a8|w2a8 [--method avq|gptq|rtn] --out FOLDER [--json PATH] [--resume]
                 [--group-size G (gptq/rtn)]
                 [--prompts FILE] [--num-samples N] [--steps S] [--guidance G] [--height H --width W]
                 [--classes C ...] [--device cpu|cuda] [--dtype float32|float16|bfloat16] [--seed S]
                 [--bits-budget B] [--sequential] [--max-hessian-gib G] [--tracker none|wandb]
    avq finetune --quantized FOLDER --steps N --out FOLDER [--resume] [--tracker none|wandb]
                 [--teacher MODEL] [--semi selective|none|all] [--checkpoint-every N] [--json PATH]
    avq sample   --model PIPELINE_FOLDER|MODEL_FOLDER|SHIPPED [--quantized FOLDER]
                 (--prompt TEXT ... | --prompts FILE | --classes C ... | --n N) [--steps S] [--guidance G]
                 [--seed S] [--batch-size B] [--device D] [--dtype T] --out DIR [--json PATH]
    avq bench    [--shape N K] [--spec 2x8g8] [--rows 1 16 256] [--device D] [--dtype T] [--json PATH]
    avq eval     SAMPLES.npz [--fp FP_SAMPLES.npz] [--floor FP2.npz] [--reference test|train] [--json PATH]

User errors (unknown model, a folder that is neither a pipeline nor a model, a pipeline without the text
encoder its denoiser needs, an empty prompts file, `--device cuda` without CUDA, a preset that cannot be
met, an unusable checkpoint, a save of a newer avq) exit with status 2 and a one-line message, before
anything is written.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from avq.calibration.adapters import UnsupportedModelError
from avq.cli.models import UserError, load_model, resolve_shipped_pipeline
from avq.cli.parser import build_parser
from avq.extras import MissingExtraError
from avq.pipelines.folders import PipelineError
from avq.pipelines.prompts import PromptsError
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
        for option in ("model", "teacher"):  # a shipped pipeline's name stands for its folder
            if isinstance(getattr(args, option, None), str):
                setattr(args, option, resolve_shipped_pipeline(getattr(args, option)))
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
        PipelineError,
        PromptsError,
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
