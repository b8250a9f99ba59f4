"""FP figures of the shipped reference models (docs/design.md, "Reference benchmark") -> reference_fp.json.

    python benchmarks/reference_fp.py                       # both models, 5,000 samples per set
    python benchmarks/reference_fp.py --models digits-unet --n 1000

For each model: `--n` class-balanced samples (DDIM 20 steps, guidance `--guidance`, seed 0) evaluated
against the real test split (FID/sFID on the metric classifier's pooled/spatial features, IS, k-NN
precision/recall, class accuracy), the FID floor (the same model, another seed: FID between the two FP
sets), and the sampling time per image. The time is measured apart from the (cached, resumable) sample
sets, which may have been sampled over several runs and under any load: one extra batch of `--time-images`
samples (batch 0's noise and labels, not cached) is sampled and timed at the end, with the thread count
recorded, so rerunning the script on an idle machine once the sets exist re-times the model.
Sanity rows put the numbers in context: real vs real (the train split against the test split: what a
perfect model can reach with a 359-image reference), and two broken models, one that outputs clipped
Gaussian noise and one that outputs a single digit (copies of one real image), each scored with the same
labels as a model's samples. A 10x10 grid of each model's first samples is written next to the JSON
(`reference_fp_<model>.png`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from sample_sets import CACHE, get_samples

from avq.evaluation.samples import batch_seed, save_samples
from avq_bench.data import load_digits_images
from avq_bench.metrics import evaluate
from avq_bench.reference import NUM_CLASSES, load_reference, sample
from avq_bench.results import default_results_dir, write_results

MODELS = ("digits-unet", "digits-dit")
FIGURES = ("fid", "sfid", "is", "is_std", "precision", "recall", "class_accuracy", "reference_accuracy")


def _row(kind: str, figures: dict, **extra) -> dict:
    row = {"kind": kind, **extra, **{k: figures[k] for k in FIGURES if k in figures}}
    for key in ("fid_floor", "sfid_floor", "n_samples", "n_reference"):
        if key in figures:
            row[key] = figures[key]
    return row


def time_sampling(model: torch.nn.Module, n: int, guidance: float) -> float:
    """Seconds per image of sampling `n` images in one batch (DDIM 20; batch 0's noise and labels)."""
    labels = torch.arange(n) % NUM_CLASSES
    sample(model, labels[:2], steps=20, guidance=guidance, seed=batch_seed(0, 0))  # warm-up
    start = time.perf_counter()
    sample(model, labels, steps=20, guidance=guidance, seed=batch_seed(0, 0))
    return (time.perf_counter() - start) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=[*MODELS, "digits-unet-mini"])
    parser.add_argument("--n", type=int, default=5000, help="samples per set (default %(default)s)")
    parser.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance (default 2)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument(
        "--time-images", type=int, default=250, help="images in the timed batch (default %(default)s)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--name", default="reference_fp", help="results file stem")
    parser.add_argument("--results-dir", type=Path, default=None, help="default benchmarks/results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    results_dir = args.results_dir or default_results_dir()
    results_dir.mkdir(parents=True, exist_ok=True)
    test = load_digits_images("test")
    rows = []
    labels = None
    for model_name in args.models:
        load = lambda m=model_name: load_reference(m)  # noqa: E731
        kw = dict(guidance=args.guidance, batch_size=args.batch_size)
        samples, labels, _ = get_samples(load, f"{model_name}-fp", args.n, seed=0, **kw)
        floor, _, _ = get_samples(load, f"{model_name}-fp", args.n, seed=1, **kw)
        figures = evaluate(samples, labels, reference=test, floor_samples=floor)
        model = load().eval()
        params = sum(p.numel() for p in model.parameters())
        per_image = time_sampling(model, args.time_images, args.guidance)
        rows.append(
            _row(
                "model",
                figures,
                model=model_name,
                parameters=params,
                guidance=args.guidance,
                steps=20,
                seconds_per_image=per_image,
                timed_images=args.time_images,
                threads=torch.get_num_threads(),
            )
        )
        print(
            f"{model_name}: FID {figures['fid']:.3f} (floor {figures['fid_floor']:.3f}), "
            f"class acc {figures['class_accuracy']:.4f}, IS {figures['is']:.2f}, "
            f"{per_image:.4f} s/image"
        )
        grid_dir = CACHE / f"{model_name}-grid"
        save_samples(grid_dir, samples[:100], labels[:100], {"model": model_name})
        shutil.copyfile(grid_dir / "samples.png", results_dir / f"{args.name}_{model_name}.png")

    # Sanity rows, scored with the same balanced labels as the model rows.
    n = args.n
    labels = torch.arange(n) % 10
    train_images, train_labels = load_digits_images("train")
    real = evaluate(train_images, train_labels, reference=test)
    rows.append(_row("sanity", real, model="real train split (1,438 images) vs test split"))
    noise = torch.randn((n, 1, 16, 16), generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    rows.append(_row("sanity", evaluate(noise, labels, reference=test), model="broken: Gaussian noise"))
    one = train_images[train_labels == 0][:1].expand(n, -1, -1, -1).contiguous()
    rows.append(_row("sanity", evaluate(one, labels, reference=test), model="broken: one digit (a real 0)"))
    for row in rows[-3:]:
        print(f"{row['model']}: FID {row['fid']:.3f}, class acc {row['class_accuracy']:.4f}")
    path = write_results(args.name, rows, results_dir=results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
