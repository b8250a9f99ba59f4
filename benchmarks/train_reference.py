"""Train a shipped reference model, `digits-unet` or `digits-dit` (docs/design.md, "Reference benchmark").

    python benchmarks/train_reference.py --model digits-unet --steps 3000 --seed 0 --threads 1
    python benchmarks/train_reference.py --model digits-dit --resume        # after an interruption

Deterministic for a given seed (and thread count); see avq_bench.training for the recipe. Checkpoints go to
`--checkpoint-dir` (default runs/checkpoints/<model>/, outside the package data) every
`--checkpoint-every` steps; `--resume` continues from there and ends with the same weights as an
uninterrupted run, and refuses a checkpoint of another model or configuration. The EMA weights are saved
(fp16, diffusers `save_pretrained`) with `training.json` to `--out`
(default benchmarks/avq_bench/assets/<model>/).

Time (torch 2.13, batch 64): the shipped models were trained side by side on the 2-core machine with
`--threads 1` each, digits-unet at ~1.5 s/step and digits-dit at ~1.2 s/step, so the default 3000 steps
take 60-75 min. The thread count is part of what determines the weights (float rounding).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from avq_bench.training import (
    DEFAULT_STEPS,
    MODEL_CLASSES,
    CheckpointMismatchError,
    default_config,
    model_stats,
    train,
)

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, choices=sorted(MODEL_CLASSES))
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default: {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: benchmarks/avq_bench/assets/<model>)"
    )
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=None, help="checkpoints (default: runs/checkpoints/<model>)"
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=250, help="steps between checkpoints (default: %(default)s)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = default_config(args.model, steps=args.steps, seed=args.seed)
    out = args.out or REPO / "benchmarks" / "avq_bench" / "assets" / args.model
    ckpt = args.checkpoint_dir or REPO / "runs" / "checkpoints" / args.model
    if args.resume and not (ckpt / "checkpoint.json").is_file():
        parser.error(f"--resume: no checkpoint in {ckpt}")
    try:
        info = train(
            config, out, checkpoint_dir=ckpt, checkpoint_every=args.checkpoint_every, resume=args.resume
        )
    except CheckpointMismatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stats = model_stats(info["ema"])
    print(
        f"{args.model}: {stats['parameters'] / 1e6:.2f} M parameters, "
        f"{100 * stats['big_layer_fraction']:.1f} % in layers of >= 100k weights; "
        f"{info['steps_done']} steps, final loss (EMA) {info['final_loss_ema']:.4f}, "
        f"{info['train_seconds']:.0f} s -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
