"""What the V step adds: SeMI-PV fine-tuning with the V step in the input metric, in plain L2, and off
(P only), over several seeds, on one layer-wise quantized model -> v_step_ablation.json.

    avq quantize --model digits-unet-mini --preset w2a8 --out runs/pv_resume_mini/quantized
    python benchmarks/v_step_ablation.py --quantized runs/pv_resume_mini/quantized --model digits-unet-mini

Each run fine-tunes a fresh copy of the saved model against its FP teacher (`avq.finetune`, default config but
`--steps` and `--trajectories`, one thread, seeds `--seeds`); a row holds the held-out distillation loss
(`--heldout` teacher trajectories the training never draws, sampled once: `heldout_pool`, `distillation_loss`)
before and after, the share of codes the V steps changed, and the wall time. The summary rows give mean and
sample standard deviation per mode. This is the quick, model-output-level check; the quality table's
`avq-p-only` / seed rows are the sample-level one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import avq
from avq.finetune import HELDOUT_TRAJECTORIES, FinetuneConfig, distillation_loss, finetune, heldout_pool
from avq_bench.reference import load_reference
from avq_bench.results import write_results

MODES = {"metric": {"v_metric": "hessian"}, "l2": {"v_metric": "l2"}, "p-only": {"v_every": 0}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quantized", type=Path, required=True, help="a layer-wise avq save")
    parser.add_argument("--model", required=True, help="the FP teacher (a shipped model name)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--trajectories",
        type=int,
        default=FinetuneConfig.trajectories_per_epoch,
        help="teacher trajectories drawn per epoch (default: the fine-tuning default)",
    )
    parser.add_argument(
        "--heldout",
        type=int,
        default=HELDOUT_TRAJECTORIES,
        help="held-out teacher trajectories the losses are taken on (default: %(default)s)",
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    teacher = load_reference(args.model).eval()
    pool = heldout_pool(teacher, trajectories=args.heldout)
    before = distillation_loss(avq.load_quantized(args.quantized).eval(), teacher, pool=pool)
    rows = []
    for mode in args.modes:
        for seed in args.seeds:
            config = FinetuneConfig(
                steps=args.steps, seed=seed, trajectories_per_epoch=args.trajectories, **MODES[mode]
            )
            start = time.perf_counter()
            student, history = finetune(avq.load_quantized(args.quantized), teacher, config, progress=False)
            row = {
                "model": args.model,
                "mode": mode,
                "seed": seed,
                "steps": args.steps,
                "heldout_loss_before": before,
                "heldout_trajectories": args.heldout,
                "heldout_loss_after": distillation_loss(student.eval(), teacher, pool=pool),
                "codes_changed_total": sum(h["codes_changed"] for h in history),
                "seconds": round(time.perf_counter() - start, 1),
                "finetune_config": config.to_dict(),
            }
            print({k: v for k, v in row.items() if k != "finetune_config"}, flush=True)
            rows.append(row)
    for mode in args.modes:
        losses = [r["heldout_loss_after"] for r in rows if r["mode"] == mode]
        rows.append(
            {
                "model": args.model,
                "mode": mode,
                "summary": True,
                "seeds": args.seeds,
                "heldout_loss_mean": statistics.mean(losses),
                "heldout_loss_sd": statistics.stdev(losses) if len(losses) > 1 else None,
            }
        )
        print(rows[-1], flush=True)
    print(write_results("v_step_ablation", rows, results_dir=args.results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
