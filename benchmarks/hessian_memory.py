"""Calibration memory of real models, from their configs: every quantizable layer's input Hessian.

    python benchmarks/hessian_memory.py   # -> benchmarks/results/hessian_memory.json

The denoisers of Stable Diffusion 1.5, SDXL and Flux.1 are built from their published configs (written
out below) on the meta device: no weights, no download, no memory. For each model: the number of
quantizable layers (`avq.calibration.quantizable_layers`), weights, the largest fan-in `K`, and the
Hessians' size (`K x K` per layer) summed over all layers in fp32 and as the fp64 accumulators
calibration keeps, next to the largest single layer's: what `--max-hessian-gib` trades against passes.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn as nn

from avq.calibration.statistics import quantizable_layers
from avq_bench.real_configs import FLUX_TRANSFORMER, SD15_UNET, SDXL_UNET
from avq_bench.results import write_results

GIB = 2**30

MODELS = {
    "sd1.5-unet": ("UNet2DConditionModel", SD15_UNET),
    "sdxl-unet": ("UNet2DConditionModel", SDXL_UNET),
    "flux.1-transformer": ("FluxTransformer2DModel", FLUX_TRANSFORMER),
}


def fan_in(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else math.prod(layer.weight.shape[1:])


def measure(name: str, class_name: str, config: dict) -> dict:
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, class_name)(**config)
    layers = [model.get_submodule(n) for n in quantizable_layers(model)]
    ks = [fan_in(layer) for layer in layers]
    weights = sum(layer.weight.numel() for layer in layers)
    return {
        "model": name,
        "class": class_name,
        "config": config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "quantizable_layers": len(layers),
        "quantizable_weights": weights,
        "max_K": max(ks),
        "hessians_fp32_gib": round(sum(4 * k * k for k in ks) / GIB, 2),
        "accumulators_fp64_gib": round(sum(8 * k * k for k in ks) / GIB, 2),
        "largest_fp32_gib": round(4 * max(ks) ** 2 / GIB, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results-dir", default=None, help="results folder (default: benchmarks/results)")
    args = parser.parse_args(argv)
    rows = [measure(name, cls, config) for name, (cls, config) in MODELS.items()]
    for row in rows:
        row["seed"] = None  # nothing random: the figures follow from the configs
        print(
            f"{row['model']:<20} {row['parameters'] / 1e9:6.2f} B params, "
            f"{row['quantizable_layers']} layers, "
            f"max K {row['max_K']}, Hessians {row['hessians_fp32_gib']} GiB fp32 "
            f"({row['accumulators_fp64_gib']} GiB fp64), largest {row['largest_fp32_gib']} GiB"
        )
    print(write_results("hessian_memory", rows, device="meta", results_dir=args.results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
