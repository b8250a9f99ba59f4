"""Memory of loading a quantized model: `avq.load_quantized` of a saved W2 model, each load in a fresh
process, against the model's dense fp32 weights -> benchmarks/results/load_memory_cpu.json.

    python benchmarks/load_memory.py                                  # LDM-4-shaped UNet, 264 M weights
    python benchmarks/load_memory.py --ldm-channels 32 --repeats 1    # a small one (smoke test)

The W2 folder is written once into `--work` (`e2e_step.quantize_random`: every layer `avq.quantize` would
quantize at w2a16, with random codes, codebooks and scales: memory does not depend on the values). Each load
runs in a fresh subprocess that has imported torch, avq and diffusers' UNet classes first, and reports the
growth of its resident set (`VmRSS`) and of its peak (`VmHWM`) over the resident set before the call, and
the call's wall time. The dense fp32 size is what the model's weights would take unquantized: a loader
that built the dense model first would peak above it.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MIB = 2**20


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def prepare(folder: Path, args: argparse.Namespace) -> dict:
    """Write the W2 folder (once) and return the model's sizes."""
    import e2e_step

    import avq

    model = e2e_step.build_model("ldm4-imagenet", torch.float32, torch.device("cpu"), args)
    dense_params = sum(p.numel() for p in model.parameters())
    plans = e2e_step.quantize_random(model)
    avq.save_quantized(model, folder)
    stored = sum(f.stat().st_size for f in folder.iterdir() if f.name == "model.safetensors")
    return {
        "params": dense_params,
        "quantized_layers": len(plans),
        "dense_fp32_mib": dense_params * 4 / MIB,
        "stored_mib": stored / MIB,
    }


def load_once(folder: Path) -> dict:
    """One load in this (fresh) process: resident-set growth, peak growth, seconds."""
    import diffusers.models.unets.unet_2d  # noqa: F401  (import costs out of the figure)

    import avq

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    model = avq.load_quantized(folder)
    seconds = time.perf_counter() - start
    gc.collect()
    return {
        "load_seconds": seconds,
        "rss_before_mib": before,
        "rss_delta_mib": _status_mib("VmRSS") - before,
        "peak_delta_mib": _status_mib("VmHWM") - before,
        "tensors_mib": sum(t.numel() * t.element_size() for t in model.state_dict().values()) / MIB,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ldm-channels", type=int, default=192, help="LDM-4 model_channels (192 = real)")
    parser.add_argument("--ldm-sample-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="loads, each in a fresh process")
    parser.add_argument("--work", type=Path, default=Path("runs/load_memory"))
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.worker is not None:
        print(json.dumps(load_once(args.worker)))
        return 0
    from avq_bench.results import write_results

    folder = args.work / f"ldm4-c{args.ldm_channels}-w2a16"
    sizes = prepare(folder, args)
    loads = []
    for _ in range(args.repeats):
        command = [sys.executable, __file__, "--worker", str(folder)]
        out = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, timeout=1800).stdout
        loads.append(json.loads(out.strip().splitlines()[-1]))
        print(loads[-1], file=sys.stderr)
    row = {
        "model": "ldm4-imagenet",
        "ldm_channels": args.ldm_channels,
        "sample_size": args.ldm_sample_size,
        "preset": "w2a16",
        "values": "random codes/codebooks/scales (memory does not depend on the values)",
        **sizes,
        "loads": loads,
        "peak_delta_mib_median": statistics.median(r["peak_delta_mib"] for r in loads),
        "load_seconds_median": statistics.median(r["load_seconds"] for r in loads),
        "memory_method": "VmRSS / VmHWM after clear_refs=5 (/proc/self/status), fresh process per load",
        "seed": 0,
    }
    print(write_results("load_memory_cpu", [row], device=torch.device("cpu"), results_dir=args.results_dir))
    print(
        f"W2 LDM-4-shaped ({sizes['params'] / 1e6:.0f} M weights, {sizes['dense_fp32_mib']:.0f} MiB fp32): "
        f"load peak +{row['peak_delta_mib_median']:.0f} MiB, {row['load_seconds_median']:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
