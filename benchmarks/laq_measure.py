"""LAQ's default sensitivity measure against the whole-model one, on the reference models.

    python benchmarks/laq_measure.py                      # -> benchmarks/results/laq_measure.json
    python benchmarks/laq_measure.py --models digits-dit  # one model

At SD 1.5 size LAQ cannot afford what it measured before: every candidate of every layer solved for 2
rounds and swapped into the model for a probe of its output (`benchmarks/scale.py --bits-budget`). The
default now solves each candidate's initialisation only (`laq_measure_rounds=0`) and probes one candidate
per layer, scaling the others by their Hessian-weighted layer errors (`laq_probe_all=False`,
`avq.planning.sensitivity`). This checks on each reference model, at W2A8, through `avq.quantize` itself:

- `uniform`: one spec for all layers (the preset's first fitting spec, as `avq quantize --preset w2a8`);
- `laq-whole-model`: LAQ measured the old way (`laq_probe_all=True`, `laq_measure_rounds=2`), at a budget
  of the uniform run's total bits (equal total bits over all Linear/Conv2d weights);
- `laq-default`: LAQ with the default measure (short solves, one probe per layer on the whole model), same
  budget;
- `laq-block-probe`: the same with the probe on the layer's top-level block only, scaled by the block's
  gain from one whole-model probe (`laq_probe="block"`, `avq.planning.block_probe`), same budget.
(Rows of commit 8f077ea, when the block probe was the default for a run, name them `laq-model-probe` and
`laq-default`; each row's `config.laq_probe` says which probe it used.)

Each row: total bits, the seconds LAQ spent measuring, and the denoiser's error against FP on held-out
inputs (the FP sampler's trajectories of another seed than calibration and probe: 16 samples, 5 timesteps,
relative MSE and its SNR in dB). Each `agreement` row compares a cheaper table (`against`:
`laq-default` or `laq-block-probe`) with the whole-model one: the Spearman rank correlation of their errors
over every (layer, candidate), the median and largest factor between the estimates and the probed values,
the share of layers given the same choice, and the measuring time ratio.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter

import torch

import avq
from avq.calibration.config import CalibrationConfig
from avq.planning.presets import preset_config
from avq.planning.sensitivity import FP, make_probe
from avq.run.report import QuantizeReport
from avq_bench.reference import load_reference
from avq_bench.results import write_results

MODELS = ("digits-unet", "digits-dit")
HELD_OUT = CalibrationConfig(num_samples=16, batch_size=16, num_timesteps_kept=5, seed=4321)
RUNS = {  # name: QuantizeConfig overrides (the budget is added for the LAQ runs)
    "uniform": {},
    "laq-whole-model": {"laq_probe_all": True, "laq_measure_rounds": 2, "laq_probe": "model"},
    "laq-default": {"laq_probe": "model"},
    "laq-block-probe": {"laq_probe": "block"},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--preset", default="w2a8")
    parser.add_argument("--seed", type=int, default=0, help="calibration seed")
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    rows: list[dict] = []
    for model_name in args.models:
        held_out = make_probe(load_reference(model_name).eval(), HELD_OUT)
        tables: dict[str, dict] = {}
        budget = None
        for run, overrides in RUNS.items():
            model = load_reference(model_name)
            laq = run != "uniform"
            config = preset_config(args.preset, bits_budget=budget if laq else None, **overrides)
            report = QuantizeReport()
            start = time.perf_counter()
            avq.quantize(model, config, CalibrationConfig(seed=args.seed), report=report, progress=True)
            seconds = time.perf_counter() - start
            total_bits = report.summary()["total_bits_all"]
            budget = budget or total_bits  # the LAQ runs spend what the uniform run spends
            error = held_out.error(model.eval())
            row = {
                "kind": "run",
                "model": model_name,
                "run": run,
                "preset": args.preset,
                "config": config.to_dict(),
                "seed": args.seed,
                "bits_budget": config.bits_budget,
                "total_bits": total_bits,
                "seconds": seconds,
                "measure_seconds": report.budget.get("measure_seconds") if laq else None,
                "held_out_relative_mse": error,
                "held_out_snr_db": -10 * math.log10(error) if error > 0 else None,
                "threads": torch.get_num_threads(),
            }
            if laq:
                tables[run] = report.budget
                row["specs_chosen"] = dict(sorted(Counter(report.budget["choice"].values()).items()))
            rows.append(row)
            print(
                f"{model_name} {run}: {total_bits:.4f} total bits, "
                f"held-out SNR {row['held_out_snr_db']:.2f} dB"
                + (f", measuring {row['measure_seconds']:.0f} s" if laq else "")
            )
            write_results("laq_measure", rows, results_dir=args.results_dir)  # kept as each run ends
        for cheaper in ("laq-default", "laq-block-probe"):
            rows.append(
                {
                    "kind": "agreement",
                    "model": model_name,
                    "against": cheaper,
                    **_agreement(tables["laq-whole-model"], tables[cheaper]),
                }
            )
    out = write_results("laq_measure", rows, results_dir=args.results_dir)
    print(out)
    return 0


def _agreement(whole: dict, default: dict) -> dict:
    """How the default table compares with the whole-model one (same layers and candidates)."""
    a, b, factors = [], [], []
    for layer, options in whole["sensitivity"].items():
        for option, entry in options.items():
            if option == FP:
                continue
            mine = default["sensitivity"][layer][option]
            a.append(entry["error"])
            b.append(mine["error"])
            if not mine.get("probed", True) and entry["error"] > 0 and mine["error"] > 0:
                factors.append(max(mine["error"] / entry["error"], entry["error"] / mine["error"]))
    same = sum(whole["choice"][n] == default["choice"][n] for n in whole["choice"])
    factors.sort()
    return {
        "spearman": _spearman(a, b),
        "pairs": len(a),
        "scaled_estimates": len(factors),
        "median_factor_scaled_vs_probed": factors[len(factors) // 2] if factors else None,
        "max_factor_scaled_vs_probed": factors[-1] if factors else None,
        "same_choice": same / len(whole["choice"]),
        "measure_seconds_ratio": default["measure_seconds"] / whole["measure_seconds"],
    }


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (torch.tensor(v, dtype=torch.float64).argsort().argsort().double() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


if __name__ == "__main__":
    sys.exit(main())
