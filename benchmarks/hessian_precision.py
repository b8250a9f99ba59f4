"""float32 Hessian accumulation against float64, on the product's own calibration.

    python benchmarks/hessian_precision.py            # -> benchmarks/results/hessian_precision.json
    python benchmarks/hessian_precision.py --quick    # digits-unet-mini, fewer samples (smoke test)

Calibration (`avq.calibration.calibrate`, default settings, the reference sampler) sums each layer's
`x x^T` into a float32 `[K, K]` buffer on the compute device (half the memory of float64: 26 GiB instead
of 52 for SD 1.5's Hessians). This runs it once on a shipped model with a float64 accumulator riding along
on every layer (the same rows: same seed, same row subsets) and reports, per layer:

- `rel_fro`: `|H32 - H64|_F / |H64|_F`;
- `max_abs_over_diag`: `max |H32 - H64|` over the mean diagonal, to set against the solver's damping
  (at least `1e-5` when a Hessian is singular, `0.01` in the sequential init and GPTQ);
- for the `--solve` largest layers, the AQ solver's relative error (against the float64 Hessian) when it
  is given the float32 Hessian and when it is given the float64 one: what the difference does downstream.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib

import torch

import avq
from avq.calibration.config import CalibrationConfig
from avq.calibration.hessian import HessianAccumulator
from avq.calibration.statistics import calibrate, quantizable_layers
from avq_bench.reference import load_reference
from avq_bench.results import write_results


class Float64Rider:
    """An observer (`calibrate(observers=...)`) that feeds a float64 accumulator the same rows."""

    def __init__(self, layer: torch.nn.Module, config: CalibrationConfig, name: str):
        self.acc = HessianAccumulator(
            layer,
            max_rows=config.max_rows_per_call,
            seed=config.seed ^ zlib.crc32(name.encode()),  # as calibration seeds the layer's own
            dtype=torch.float64,
        )
        self.count = 0

    def observe(self, x: torch.Tensor) -> None:
        self.acc.add(x)
        self.count += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="digits-unet")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--solve", type=int, default=3, help="solve the N largest layers both ways")
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)

    model_name = "digits-unet-mini" if args.quick else args.model
    model = load_reference(model_name)
    config = CalibrationConfig(num_samples=8, batch_size=8) if args.quick else CalibrationConfig()
    names = quantizable_layers(model)
    riders = {n: Float64Rider(model.get_submodule(n), config, n) for n in names}
    start = time.perf_counter()
    results = calibrate(model, names, config, observers=riders, progress=not args.quick)
    seconds = time.perf_counter() - start

    rows = []
    for name in names:
        H32, n_rows = results[name]
        rider = riders[name]
        H64 = rider.acc.sum / rider.acc.count
        if rider.acc.count != n_rows:
            raise RuntimeError(f"{name}: the float64 rider saw {rider.acc.count} rows, calibration {n_rows}")
        diff = H32.double() - H64
        rows.append(
            {
                "model": model_name,
                "layer": name,
                "K": H32.shape[0],
                "n_rows": n_rows,
                "batches": rider.count,
                "rel_fro": float(diff.norm() / H64.norm()),
                "max_abs_over_diag": float(diff.abs().max() / H64.diagonal().mean()),
            }
        )
    largest = sorted(rows, key=lambda r: -r["K"])[: args.solve]
    spec = avq.QuantSpec(1, 8, 4)
    options = {"max_rounds": 2} if args.quick else {}
    for row in largest:
        weight = model.get_submodule(row["layer"]).weight.detach()
        H32, _ = results[row["layer"]]
        rider = riders[row["layer"]]
        H64 = rider.acc.sum / rider.acc.count
        errors = {}
        for label, H in (("float32", H32), ("float64", H64.float())):
            q = avq.quantize_weight(weight, H, spec, **options)
            errors[label] = avq.relative_error(weight, q.dequantize(), H64)
        row["aq_spec"] = spec.name
        row["aq_error_float32_sum"] = errors["float32"]
        row["aq_error_float64_sum"] = errors["float64"]

    summary = {
        "model": model_name,
        "summary": True,
        "layers": len(rows),
        "calibration": config.to_dict(),
        "calibration_seconds": round(seconds, 1),
        "max_rel_fro": max(r["rel_fro"] for r in rows),
        "max_abs_over_diag": max(r["max_abs_over_diag"] for r in rows),
        "max_batches": max(r["batches"] for r in rows),
    }
    for row in largest:
        print(
            f"{row['layer']}: K={row['K']} AQ {spec.name} error with float32 sum "
            f"{row['aq_error_float32_sum']:.6g}, float64 sum {row['aq_error_float64_sum']:.6g}"
        )
    print(
        f"{len(rows)} layers: max |H32-H64|_F/|H64|_F = {summary['max_rel_fro']:.3g}, "
        f"max |H32-H64| / mean diag = {summary['max_abs_over_diag']:.3g} "
        f"(up to {summary['max_batches']} batches)"
    )
    name = "hessian_precision_quick" if args.quick else "hessian_precision"
    path = write_results(name, [*rows, summary], device="cpu", results_dir=args.results_dir)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
