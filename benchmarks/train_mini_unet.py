"""Train the shipped `digits-unet-mini` reference model (benchmarks/avq_bench/assets/digits-unet-mini/).

    python benchmarks/train_mini_unet.py --out benchmarks/avq_bench/assets/digits-unet-mini \
        --steps 4000 --seed 0 \
        --samples-png runs/digits-unet-mini-samples.png

Trains on the CPU in a few minutes (see avq_bench.reference.train_mini_unet), then optionally draws a grid of
DDIM samples (20 steps, guidance 2), one row per digit 0..9, to check by eye that the model is real.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from avq_bench.reference import sample, train_mini_unet

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "avq_bench" / "assets" / "digits-unet-mini"


def save_grid(images: torch.Tensor, path: Path, *, columns: int, upscale: int = 4) -> None:
    """`[N, 1, H, W]` images in [-1, 1] -> one PNG grid (rows of `columns`), nearest-upscaled."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = -(-n // columns)
    pad = 1
    grid = torch.full((rows * (h + pad) + pad, columns * (w + pad) + pad), 0.5)
    pixels = (images[:, 0].float() + 1) / 2
    for i in range(n):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            pixels[i]
        )
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(array, mode="L").resize(
        (array.shape[1] * upscale, array.shape[0] * upscale), Image.NEAREST
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default: %(default)s)")
    parser.add_argument(
        "--samples-png", type=Path, default=None, help="also write a PNG grid of guided DDIM samples here"
    )
    parser.add_argument(
        "--samples-only", action="store_true", help="skip training; sample the model already in --out"
    )
    parser.add_argument("--guidance", type=float, default=2.0, help="CFG scale of the samples (default: 2)")
    args = parser.parse_args(argv)

    if not args.samples_only:
        out = train_mini_unet(args.out, steps=args.steps, seed=args.seed, batch_size=args.batch_size)
        print(f"saved {out}")
    if args.samples_png is not None:
        from diffusers import UNet2DModel

        model = UNet2DModel.from_pretrained(args.out, torch_dtype=torch.float32, low_cpu_mem_usage=False)
        model = model.eval()
        columns = 10
        labels = torch.arange(10).repeat_interleave(columns)
        images = sample(model, labels, steps=20, guidance=args.guidance, seed=args.seed)
        save_grid(images, args.samples_png, columns=columns)
        print(f"samples (rows = digits 0..9) -> {args.samples_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
