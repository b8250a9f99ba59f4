"""Scale check: peak RSS and seconds per block when calibrating an LDM-4-ImageNet-shaped UNet on 2 samples.

    python benchmarks/calibration_rss.py                   # -> benchmarks/results/calibration_rss_cpu.json
    python benchmarks/calibration_rss.py --max-seconds 600 # stop after the block that crosses 10 min

The model is a randomly initialised diffusers `UNet2DModel` shaped like LDM-4 ImageNet
(`e2e_step.ldm4_config`: latent 64x64x3, channel multipliers 1-2-3-5, 2 res blocks per level, attention
at 32/16/8, 1001 classes)
with `--channels` 224 (about 360 M parameters; diffusers' attention blocks have no feed-forward, so the
real LDM-4 width 192 gives 264 M, short of the ~400 M of LDM-4 itself).

Calibration runs top-level block by top-level block (`conv_in`, `time_embedding`, `down_blocks.i`,
`mid_block`, `up_blocks.i`, `conv_out`): one `avq.calibrate` call per block, 2 samples, DDIM 20 steps
with guidance (batch 4 per forward), 10 timesteps kept, the block's Hessian accumulators packed into
passes of at most `--max-hessian-gib` GiB (`CalibrationConfig.max_hessian_gib`); each block's Hessians
are dropped before the next, as a block-wise quantizer would. Each row: the block, its layers, passes,
seconds, the process's peak RSS during the block (VmHWM after `clear_refs`, absolute) and the largest
Hessian. The run stops after the block that crosses `--max-seconds`.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time

import torch
from e2e_step import ldm4_config, peak_memory

from avq.calibration.config import CalibrationConfig
from avq.calibration.statistics import _passes, calibrate, group_by_block, quantizable_layers
from avq_bench.results import write_results

GIB = 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--channels", type=int, default=224, help="model_channels (default %(default)s)")
    parser.add_argument("--max-hessian-gib", type=float, default=4.0, help="per pass (default %(default)s)")
    parser.add_argument(
        "--max-seconds", type=float, default=1200, help="stop after this (default %(default)s)"
    )
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--name", default="calibration_rss_cpu")
    args = parser.parse_args(argv)

    from diffusers import UNet2DModel

    torch.manual_seed(0)
    with peak_memory(torch.device("cpu")) as build_mem:
        model = UNet2DModel(**ldm4_config(args.channels)).eval()
    params = sum(p.numel() for p in model.parameters())
    print(
        f"LDM-4-shaped UNet2DModel, channels {args.channels}: {params / 1e6:.0f} M parameters, "
        f"peak RSS after build {build_mem['peak_mib'] / 1024:.2f} GiB"
    )
    config = CalibrationConfig(
        num_samples=args.samples,
        batch_size=args.samples,
        num_steps=20,
        guidance_scale=2.0,
        num_timesteps_kept=10,
        max_hessian_gib=args.max_hessian_gib,
    )
    rows = []
    start = time.perf_counter()
    for block, names in group_by_block(quantizable_layers(model)).items():
        t0 = time.perf_counter()
        with peak_memory(torch.device("cpu")) as mem:
            hessians = calibrate(model, names, config, progress=True)
        seconds = time.perf_counter() - t0
        largest = max(h.shape[0] for h, _ in hessians.values())
        row = {
            "block": block,
            "layers": len(names),
            "passes": len(_passes(model, names, config)),
            "seconds": round(seconds, 1),
            "peak_rss_gib": round(mem["peak_mib"] / 1024, 3),
            "largest_K": largest,
            "largest_hessian_gib_f64": round(8 * largest**2 / GIB, 3),
            "parameters": params,
            "channels": args.channels,
            "samples": args.samples,
        }
        rows.append(row)
        print(
            f"{block:<16} {len(names):>3} layers {row['passes']:>2} passes {seconds:>7.1f} s  "
            f"peak RSS {row['peak_rss_gib']:.2f} GiB  largest K {largest}"
        )
        del hessians
        gc.collect()
        if time.perf_counter() - start > args.max_seconds:
            print(f"stopping after {block}: --max-seconds {args.max_seconds:g} reached")
            break
    peak = max(r["peak_rss_gib"] for r in rows)
    print(
        f"peak RSS over {len(rows)} blocks: {peak:.2f} GiB (limit 16 GiB: {'ok' if peak <= 16 else 'OVER'})"
    )
    path = write_results(args.name, rows, device="cpu")
    print(f"wrote {path}")
    return 0 if math.isfinite(peak) else 1


if __name__ == "__main__":
    sys.exit(main())
