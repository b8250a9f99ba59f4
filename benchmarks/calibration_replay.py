"""Several calibration passes: sampling every pass again against replaying the first pass's kept calls.

    python benchmarks/calibration_replay.py    # -> benchmarks/results/calibration_replay.json

A model whose Hessians do not fit memory at once is calibrated in passes (`max_hessian_gib`). Every pass
needs the same layer inputs: either the sampler runs the whole trajectory again (`replay=False`), or the
first pass records the model's calls at the kept steps and the later passes replay only those
(`replay=True`, the default; `avq.calibration.statistics.DenoiserCalls`). This times both through
`avq.calibration.calibrate` on each reference model at the default calibration (64 samples, 20 DDIM steps,
10 kept), every quantizable layer split into `--passes` passes, checks that the Hessians are identical, and
records the model calls made and the memory the recording holds.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from avq.calibration import CalibrationConfig, calibrate
from avq.calibration.statistics import DenoiserCalls, quantizable_layers
from avq_bench.reference import load_reference
from avq_bench.results import write_results

MODELS = ("digits-unet", "digits-dit")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    rows = []
    for model_name in args.models:
        model = load_reference(model_name).eval()
        names = quantizable_layers(model)
        per_pass = math.ceil(len(names) / args.passes)
        hessians = {}
        for replay in (False, True):
            config = CalibrationConfig(layers_per_pass=per_pass, replay=replay)
            calls: list[int] = []
            handle = model.register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
            recording = DenoiserCalls()
            start = time.perf_counter()
            try:
                hessians[replay] = calibrate(model, names, config, progress=True, replay=recording)
            finally:
                handle.remove()
            seconds = time.perf_counter() - start
            recorded = sum(_bytes(c) for c in recording.calls or [])
            rows.append(
                {
                    "model": model_name,
                    "replay": replay,
                    "passes": math.ceil(len(names) / per_pass),
                    "layers": len(names),
                    "config": config.to_dict(),
                    "seed": config.seed,
                    "seconds": seconds,
                    "model_calls": len(calls),
                    "recorded_mib": recorded / 2**20,
                    "threads": torch.get_num_threads(),
                }
            )
            print(f"{model_name} replay={replay}: {seconds:.1f} s, {len(calls)} model calls")
        same = all(torch.equal(hessians[True][n][0], hessians[False][n][0]) for n in names)
        rows[-1]["hessians_identical"] = rows[-2]["hessians_identical"] = same
        rows[-1]["seconds_ratio"] = rows[-1]["seconds"] / rows[-2]["seconds"]
        print(f"{model_name}: replay / sample = {rows[-1]['seconds_ratio']:.3f}, Hessians identical: {same}")
    print(write_results("calibration_replay", rows, results_dir=args.results_dir))
    return 0


def _bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_bytes(v) for v in value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
