"""Train the digit classifier that `avq eval` uses for FID/sFID/IS and ship it in
benchmarks/avq_bench/assets/.

    python benchmarks/train_classifier.py [--steps 2000] [--seed 0] [--threads 1] [--out FOLDER]

Deterministic for a given seed and thread count (see `avq_bench.classifier.train_classifier`). The held-out
test accuracy (on the untouched test split) is written into the asset's config.json.
"""

from __future__ import annotations

import argparse
import json

import torch

from avq_bench.classifier import CLASSIFIER_DIR, save_classifier, train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(CLASSIFIER_DIR))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, info = train_classifier(steps=args.steps, seed=args.seed)
    save_classifier(model, args.out, info)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
