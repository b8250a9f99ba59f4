"""`python -m avq.demo` (`make demo`): compress the shipped `digits-unet` to W2A8 and compare it to FP.

1. Loads `digits-unet` (a class-conditional diffusers `UNet2DModel`, 13 M parameters, shipped with avq).
2. `avq.quantize` with preset `w2a8`: time step-aware calibration on the FP DDIM-20 guided trajectory,
   AQ `1x8g4` per layer (FP-keep rule for the first/last layers), 8-bit inputs with split ranges at the
   skip concatenations. Prints the per-layer table.
3. Saves the compressed model (`avq.save_quantized`, reports its size against fp16) and loads it back.
4. Samples `--n` digits (10 per class) with the FP and the loaded W2A8 model on identical noise and
   prints FID / class accuracy (classifier features, vs the real test split), PSNR / SSIM to FP, and
   writes the side-by-side grid `<out>/fp_vs_w2a8.png` (left FP, right W2A8).

Calibration is lighter than `avq quantize`'s default (`--calibration-samples`, 32) to keep the demo within
a few minutes on 2 CPU cores; `avq quantize --model digits-unet --preset w2a8` is the full-size run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import avq
from avq.calibration.config import CalibrationConfig
from avq.evaluation.samples import generate_samples
from avq.storage.atomic import write_atomic
from avq_bench.metrics import evaluate
from avq_bench.reference import load_reference

MODEL = "digits-unet"


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir()) / 1e6


def _side_by_side(fp: torch.Tensor, q: torch.Tensor, path: Path) -> None:
    """Two 10x10 grids (FP | quantized), 3x upscaled, written atomically."""
    from PIL import Image

    def grid(x: torch.Tensor) -> np.ndarray:
        imgs = ((x[:100, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()  # [100, 16, 16]
        rows = [np.concatenate(list(imgs[r * 10 : (r + 1) * 10]), axis=1) for r in range(len(imgs) // 10)]
        return np.concatenate(rows, axis=0)

    left, right = grid(fp), grid(q)
    gap = np.full((left.shape[0], 8), 255, dtype=np.uint8)
    image = Image.fromarray(np.concatenate([left, gap, right], axis=1))
    image = image.resize((image.width * 3, image.height * 3), Image.NEAREST)
    write_atomic(path, lambda handle: image.save(handle, format="PNG"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m avq.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="output folder (default %(default)s)"
    )
    parser.add_argument("--n", type=int, default=100, help="samples per model (default %(default)s)")
    parser.add_argument("--calibration-samples", type=int, default=32, help="default %(default)s")
    parser.add_argument("--preset", default="w2a8", choices=("w2a8", "w4a8", "w2a16", "w4a16"))
    parser.add_argument("--model", default=MODEL, choices=("digits-unet", "digits-dit", "digits-unet-mini"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    model = load_reference(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: diffusers {type(model).__name__}, {n_params / 1e6:.1f} M parameters (shipped)")
    fp_mb = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    )
    fp_mb = fp_mb * 2 / 1e6

    report = avq.QuantizeReport()
    calibration = CalibrationConfig(num_samples=args.calibration_samples, batch_size=16)
    t0 = time.perf_counter()
    avq.quantize(model, avq.preset_config(args.preset), calibration, report=report)
    quantize_s = time.perf_counter() - t0
    print(report.table())

    folder = avq.save_quantized(
        model, args.out / f"{args.model}-{args.preset}", extra_config={"model": args.model}
    )
    quantized = avq.load_quantized(folder)
    print(
        f"\nsaved {folder} ({_folder_mb(folder):.2f} MB; the FP model's Linear/Conv2d weights alone are "
        f"{fp_mb:.2f} MB in fp16) and loaded it back with avq.load_quantized"
    )

    fp_model = load_reference(args.model)
    kw = dict(steps=20, guidance=2.0, seed=0, batch_size=min(args.n, 100))
    t0 = time.perf_counter()
    fp, labels = generate_samples(fp_model, args.n, **kw)
    fp_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    q, _ = generate_samples(quantized, args.n, **kw)
    q_s = time.perf_counter() - t0
    fp_fig = evaluate(fp, labels)
    q_fig = evaluate(q, labels, fp_samples=fp)

    s = report.summary()
    print(f"\n{args.n} samples each, DDIM 20 steps, guidance 2, identical noise (FID at this N is noisy;")
    print("benchmarks/quality.py has the 1,000-sample table):")
    print(
        f"{'':<10} {'total bits':>10} {'FID':>8} {'class acc':>9} {'PSNR to FP':>10} {'SSIM to FP':>10} "
        f"{'s/image':>8}"
    )
    print(
        f"{'FP':<10} {16:>10.2f} {fp_fig['fid']:>8.2f} {fp_fig['class_accuracy']:>9.3f} {'':>10} {'':>10} "
        f"{fp_s / args.n:>8.3f}"
    )
    print(
        f"{args.preset.upper():<10} {s['total_bits_all']:>10.2f} {q_fig['fid']:>8.2f} "
        f"{q_fig['class_accuracy']:>9.3f} {q_fig['psnr']:>10.2f} {q_fig['ssim']:>10.3f} {q_s / args.n:>8.3f}"
    )
    grid = args.out / f"fp_vs_{args.preset}.png"
    _side_by_side(fp, q, grid)
    print(f"\ngrid (left FP, right {args.preset.upper()}): {grid}")
    print(f"quantization {quantize_s:.0f} s; demo done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
