"""Train the text-to-image reference model `digits-t2i` (a stock diffusers `StableDiffusionPipeline`).

    python benchmarks/train_t2i.py --threads 1
    python benchmarks/train_t2i.py --threads 1 --resume        # after an interruption

Deterministic for a given seed (and thread count); see avq_bench.t2i_training for the recipe (VAE stage,
then UNet stage). Checkpoints go to `--checkpoint-dir` (default runs/checkpoints/digits-t2i/) every
`--checkpoint-every` steps; `--resume` continues from there and ends with the same weights as an
uninterrupted run, and refuses a checkpoint of another configuration. The pipeline (fp16 VAE and UNet, no
text-encoder weights: `avq_bench.t2i.pipeline_folder` links them) and `training.json` go to `--out`
(default benchmarks/avq_bench/assets/digits-t2i/).

Time (torch 2.13, batch 64, --threads 1 on the 2-core machine): the shipped model's 1500 VAE steps took
275 s (0.18 s/step) and its 7000 UNet steps 3498 s (0.50 s/step on average; ~0.39 s/step on a free core,
up to ~0.9 while other jobs shared the cores): 63 min in all. The thread count is part of what determines
the weights (float rounding).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import torch

from avq_bench.t2i_training import T2IConfig, train
from avq_bench.training import CheckpointMismatchError

REPO = Path(__file__).resolve().parent.parent
# T2IConfig fields settable from the command line (the model configs are not)
OPTIONS = [f for f in fields(T2IConfig) if f.type in ("int", "float")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for field in OPTIONS:
        kind = int if field.type == "int" else float
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=kind, default=field.default, help="(default: %(default)s)")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "avq_bench" / "assets" / "digits-t2i"
    )
    parser.add_argument("--checkpoint-dir", type=Path, default=REPO / "runs" / "checkpoints" / "digits-t2i")
    parser.add_argument("--checkpoint-every", type=int, default=250, help="steps (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = T2IConfig(**{f.name: getattr(args, f.name) for f in OPTIONS})
    if args.resume and not (args.checkpoint_dir / "vae" / "checkpoint.json").is_file():
        parser.error(f"--resume: no checkpoint in {args.checkpoint_dir}")
    try:
        info = train(
            config,
            args.out,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
        )
    except CheckpointMismatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"digits-t2i: VAE {info['vae_parameters'] / 1e6:.2f} M + UNet {info['parameters'] / 1e6:.2f} M "
        f"parameters; VAE test MSE {info['vae_test_mse']:.4f}, scaling {info['scaling_factor']}; "
        f"UNet loss (EMA) {info['unet_loss_ema']:.4f}; {info['train_seconds']:.0f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
