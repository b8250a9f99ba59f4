"""Where a W2 step's time goes on CPU: each quantized layer against its FP layer, on the input it sees in
one denoising step.

    python benchmarks/layer_times.py --model sd1.5    # -> benchmarks/results/layer_times_sd1.5_b1_cpu.json
    python benchmarks/layer_times.py --model digits-unet --batch 8

`benchmarks/e2e_step.py` times whole steps; on a shared 2-core host their rounds scatter by 5-10 %, more
than W2 and FP differ on a large model. This splits the step: one FP forward (models and inputs as
`e2e_step` builds them) records every quantizable layer's input; the model is then quantized as
`e2e_step` does (random codes: times do not depend on the values), each AQ layer's kernel is measured on
its own input in a fresh choice cache (as on a new host), and each layer and its FP twin are timed in
interleaved calls (`--rounds`, least time each). Rows:
- `"kind": "layer"`: name, op, weight shape, input shape, `fp_ms`, `w2_ms`, the kernel `auto` chose, its
  multiply-adds and `fp_gflops` / `w2_gflops` (2 x multiply-adds / time);
- `"kind": "group"`: the layers summed per (op, feature map or token count): where W2 wins and loses, and
  the group's GFLOP/s;
- `"kind": "step"`: the FP step's time (`--rounds` forwards, least), the FP layers' sum and their share of
  the step (the rest, e.g. attention and norms, is the same work in both), `ceiling`: the W2/FP ratio of
  a step if its layers ran at these times, `1 - share + share * w2_sum / fp_sum`, and `gemm_gflops`: a
  2048 x 2048 fp32 matmul on the same threads, the host's dense GEMM rate to read the layers' against
  (where FP's conv already runs near it, W2 = that GEMM plus a decode cannot be faster).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn as nn
from e2e_step import MODELS, build_model, model_available, model_inputs, quantize_random

from avq.calibration.statistics import quantizable_layers
from avq.core.modules import AQModule
from avq.kernels import autotune, routes
from avq_bench.results import write_results


def call_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def layer_inputs(model: nn.Module, names: list[str], inputs: dict) -> dict[str, torch.Tensor]:
    """The first input each named layer sees in one forward (copies)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: seen.setdefault(name, args[0].detach().clone())
        )
        for name in names
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def where(x: torch.Tensor) -> str:
    """A layer input's feature map (`32x32`) or token count (`tok77`)."""
    if x.dim() == 4:
        return f"{x.shape[-2]}x{x.shape[-1]}"
    return f"tok{x.shape[-2] if x.dim() >= 3 else 1}"


def gflops(macs: int, ms: float) -> float:
    return 2 * macs / (ms * 1e6)


def gemm_gflops(rounds: int, size: int = 2048) -> float:
    """GFLOP/s of a `size`-square fp32 matmul (least time of `rounds`) on torch's threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    return gflops(size**3, min(call_ms(lambda: a @ b) for _ in range(max(3, rounds))))


def measure(name: str, batch: int, rounds: int, args: argparse.Namespace) -> list[dict]:
    cpu = torch.device("cpu")
    model = build_model(name, torch.float32, cpu, args)
    inputs = model_inputs(model, batch, cpu, torch.float32)
    xs = layer_inputs(model, list(quantizable_layers(model)), inputs)  # (also the warm-up forward)
    with torch.no_grad():
        step_ms = min(call_ms(lambda: model(**inputs)) for _ in range(rounds))
    fp_layers = {n: copy.deepcopy(model.get_submodule(n)) for n in xs}
    quantize_random(model)
    rows: list[dict] = []
    with autotune.fresh_cache("avq-layer-times-"), torch.no_grad():
        for layer_name, x in xs.items():
            w2, fp = model.get_submodule(layer_name), fp_layers[layer_name]
            if not isinstance(w2, AQModule):  # kept FP by the plan
                continue
            before = autotune.timings()
            y = w2(x)  # the kernel measured and its route prepared
            measured = [ms for key, ms in autotune.timings().items() if before.get(key) != ms]
            macs = y.numel() * math.prod(w2.shape[1:])  # per output: one multiply-add per weight of a row
            times = {"fp": float("inf"), "w2": float("inf")}
            for _ in range(rounds):
                times["fp"] = min(times["fp"], call_ms(lambda: fp(x)))  # noqa: B023 (called here)
                times["w2"] = min(times["w2"], call_ms(lambda: w2(x)))  # noqa: B023
            rows.append({
                "kind": "layer", "model": name, "batch": batch, "layer": layer_name,
                "op": "conv" if len(w2.shape) == 4 else "linear", "shape": list(w2.shape),
                "input": list(x.shape), "at": where(x), "fp_ms": times["fp"], "w2_ms": times["w2"],
                "kernel": routes.kernel_of(w2), "macs": macs, "fp_gflops": gflops(macs, times["fp"]),
                "w2_gflops": gflops(macs, times["w2"]), "measured_ms": measured[0] if measured else None,
            })  # fmt: skip
    groups: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0, 0])
    for row in rows:
        group = groups[(row["op"], row["at"])]
        group[0], group[1] = group[0] + row["fp_ms"], group[1] + row["w2_ms"]
        group[2], group[3] = group[2] + 1, group[3] + row["macs"]
    for (op, at), (fp_ms, w2_ms, count, macs) in sorted(groups.items()):
        rows.append({
            "kind": "group", "model": name, "batch": batch, "op": op, "at": at, "layers": count,
            "fp_ms": fp_ms, "w2_ms": w2_ms, "w2_over_fp": w2_ms / fp_ms, "macs": macs,
            "fp_gflops": gflops(macs, fp_ms), "w2_gflops": gflops(macs, w2_ms),
        })  # fmt: skip
    fp_sum = sum(r["fp_ms"] for r in rows if r["kind"] == "layer")
    w2_sum = sum(r["w2_ms"] for r in rows if r["kind"] == "layer")
    share = min(1.0, fp_sum / step_ms)
    rows.append({
        "kind": "step", "model": name, "batch": batch, "threads": torch.get_num_threads(),
        "rounds": rounds, "fp_step_ms": step_ms, "fp_layers_ms": fp_sum, "w2_layers_ms": w2_sum,
        "layers_w2_over_fp": w2_sum / fp_sum, "layers_share": share,
        "ceiling": 1 - share + share * w2_sum / fp_sum, "gemm_gflops": gemm_gflops(rounds),
    })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd1.5", choices=MODELS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved calls per layer (least counts)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--ldm-channels", type=int, default=192)
    parser.add_argument("--ldm-sample-size", type=int, default=64)
    parser.add_argument("--sd-sample-size", type=int, default=64)
    parser.add_argument("--results-dir", default=None, help="default: benchmarks/results")
    args = parser.parse_args(argv)
    reason = model_available(args.model)
    if reason is not None:
        parser.error(f"{args.model}: {reason}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = measure(args.model, args.batch, args.rounds, args)
    for row in rows:
        if row["kind"] == "group":
            print(
                f"{row['op']:6s} {row['at']:8s} {row['layers']:3d} layers: FP {row['fp_ms']:9.2f} ms, "
                f"W2 {row['w2_ms']:9.2f} ms (x{row['w2_over_fp']:.3f}); GFLOP/s FP {row['fp_gflops']:6.1f}, "
                f"W2 {row['w2_gflops']:6.1f}", file=sys.stderr,
            )  # fmt: skip
    step = rows[-1]
    print(
        f"{args.model} batch {args.batch}: FP step {step['fp_step_ms']:.1f} ms, layers "
        f"{step['fp_layers_ms']:.1f} -> {step['w2_layers_ms']:.1f} ms (x{step['layers_w2_over_fp']:.3f}), "
        f"share {step['layers_share']:.2f}, ceiling x{step['ceiling']:.3f}; a 2048^2 GEMM "
        f"{step['gemm_gflops']:.1f} GFLOP/s", file=sys.stderr,
    )  # fmt: skip
    stem = f"layer_times_{args.model}_b{args.batch}_cpu"
    path = write_results(stem, rows, device=torch.device("cpu"), results_dir=args.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
