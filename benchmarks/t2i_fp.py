"""FP figures of the text-to-image reference model `digits-t2i` per guidance scale -> t2i_fp.json.

    python benchmarks/t2i_fp.py --threads 1                          # guidance 2, 3, 5; 500 samples each
    python benchmarks/t2i_fp.py --guidance 3 --n 1000 --splits held_out

For each split ("held_out": phrasings never seen in training or calibration; "train": the training
phrasings) and guidance: `--n` samples of `avq_bench.t2i.prompt_set(split, n)` (digits balanced, DDIM 20
steps through the pipeline, seed 0), scored by `avq_bench.metrics.evaluate` against the real test split,
with `prompt_alignment` (the digit classifier reads the prompted digit), and the FID floor (seed 1 against
seed 0). A 10x10 grid of the held-out samples at each guidance is written next to the JSON.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from avq.evaluation.samples import save_samples
from avq_bench import t2i
from avq_bench.metrics import evaluate
from avq_bench.results import default_results_dir, write_results

FIGURES = ("fid", "fid_floor", "sfid", "sfid_floor", "is", "precision", "recall", "n_samples")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--guidance", type=float, nargs="+", default=[2.0, 3.0, 5.0])
    parser.add_argument("--splits", nargs="+", default=["held_out", "train"], choices=sorted(t2i.SPLITS))
    parser.add_argument("--n", type=int, default=500, help="samples per set (default %(default)s)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--folder", type=Path, default=None, help="pipeline folder (default: the shipped one)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--name", default="t2i_fp", help="results file stem")
    parser.add_argument("--results-dir", type=Path, default=None, help="default benchmarks/results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results_dir = args.results_dir or default_results_dir()
    results_dir.mkdir(parents=True, exist_ok=True)
    pipe = t2i.load_pipeline(args.folder)
    rows = []
    for split in args.splits:
        pairs = t2i.prompt_set(split, args.n)
        captions, digits = [c for c, _ in pairs], torch.tensor([d for _, d in pairs])
        for guidance in args.guidance:
            start = time.perf_counter()
            images = t2i.sample_prompts(pipe, captions, guidance=guidance, steps=args.steps, seed=0)
            per_image = (time.perf_counter() - start) / len(images)
            floor = t2i.sample_prompts(pipe, captions, guidance=guidance, steps=args.steps, seed=1)
            figures = evaluate(images, digits, floor_samples=floor)
            row = {"model": t2i.NAME, "split": split, "guidance": guidance, "steps": args.steps}
            row.update(prompt_alignment=figures["class_accuracy"], **{k: figures[k] for k in FIGURES})
            row.update(seconds_per_image=per_image, threads=torch.get_num_threads())
            rows.append(row)
            print(
                f"{split} guidance {guidance}: alignment {row['prompt_alignment']:.4f}, FID {row['fid']:.3f} "
                f"(floor {row['fid_floor']:.3f}), IS {row['is']:.2f}, {per_image:.4f} s/image",
                flush=True,
            )
            if split == "held_out":
                with tempfile.TemporaryDirectory() as tmp:
                    save_samples(tmp, images[:100], digits[:100], {"split": split, "guidance": guidance})
                    shutil.copyfile(Path(tmp) / "samples.png", results_dir / f"{args.name}_g{guidance:g}.png")
    path = write_results(args.name, rows, results_dir=results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
