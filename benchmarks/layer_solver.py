"""Layer-solver benchmark: RTN, GPTQ and AQ on single layers, against their input Hessians.

    python benchmarks/layer_solver.py                 # full run -> benchmarks/results/layer_solver.json
    python benchmarks/layer_solver.py --quick         # tiny smoke run (tests) -> layer_solver_quick.json
    python benchmarks/layer_solver.py --model digits-unet --no-synthetic --out-name layer_solver_digits_unet

Layers:
  synthetic-linear  W ~ N(0,1) [512, 512]; H = X^T X / 8192 with X = Z diag(s) U^T, Z ~ N(0,1) [8192, 512],
                    U random orthogonal (QR), s_i = 1/sqrt(i): a decaying input spectrum in a random basis;
  synthetic-conv    the same kind of layer shaped like a Conv2d weight [256, 256, 3, 3] (K = 2304), for speed;
  conv3x3 / attn    every 3x3 conv and attention projection of the shipped `digits-unet-mini` (or `--model`),
                    with Hessians from `avq_bench.reference.collect_hessians` (noised training images,
                    t spread over 1000 steps).

Methods: RTN and GPTQ (act-order, clip search) at 2 and 4 bits; AQ `1x8g4`, `2x8g8` (2 code bits) and `2x8g4`
(4 code bits), default solver options. Each row holds the relative H-weighted error
`tr(dW H dW^T) / tr(W H W^T)` of the stored result (computed here, in float64, against the undamped H), code
bits, total bits (everything stored, per weight) and wall-clock seconds of the quantizer call. Summary rows
(`"layer": "summary"`) give, over the real-model layers, the mean and median (and geometric mean, min, max)
per-layer error ratio GPTQ / AQ at equal code bits, leaving out layers where AQ's codebooks can hold every
group (`conv_out`; `2x8g8` on the 64x64 attention projections) - read them next to the total bits.
AQ specs whose group size does not divide a layer's K (e.g. `conv_in`, K = 9) are skipped.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

import avq
import avq.core.aq
from avq_bench.reference import collect_hessians, load_reference, reference_layers
from avq_bench.results import write_results

BITS = (2, 4)  # RTN / GPTQ
AQ_SPECS = ("1x8g4", "2x8g8", "2x8g4")
# (baseline method, baseline spec, AQ spec) compared at equal code bits in the summary.
PAIRS = (("gptq", "int2", "1x8g4"), ("gptq", "int2", "2x8g8"), ("gptq", "int4", "2x8g4"))


@dataclass
class Case:
    layer: str
    kind: str
    weight: torch.Tensor
    hessian: torch.Tensor


def synthetic_hessian(K: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """`X^T X / n` for `X = Z diag(s) U^T`: Z ~ N(0,1) [n, K], U random orthogonal, `s_i = 1/sqrt(i)`."""
    U, R = torch.linalg.qr(torch.randn(K, K, generator=generator, dtype=torch.float64))
    U = U * torch.sign(torch.diagonal(R))  # Haar-distributed
    s = torch.arange(1, K + 1, dtype=torch.float64).rsqrt()
    X = (torch.randn(n, K, generator=generator, dtype=torch.float64) * s) @ U.T
    return (X.T @ X / n).float()


def synthetic_cases(quick: bool) -> list[Case]:
    generator = torch.Generator().manual_seed(0)
    out, K, n = (64, 64, 1024) if quick else (512, 512, 8192)
    linear = torch.randn(out, K, generator=generator)
    cases = [Case("synthetic", "synthetic-linear", linear, synthetic_hessian(K, n, generator))]
    shape = (16, 16, 3, 3) if quick else (256, 256, 3, 3)
    conv = torch.randn(*shape, generator=generator)
    K = shape[1] * shape[2] * shape[3]
    cases.append(Case("synthetic-conv", "synthetic-conv", conv, synthetic_hessian(K, n, generator)))
    return cases


def model_cases(quick: bool, n_samples: int, pattern: str | None, model_name: str) -> list[Case]:
    model = load_reference(model_name)
    names = reference_layers(model)
    if pattern:
        names = [name for name in names if re.search(pattern, name)]
    if quick:  # the first conv whose K suits every spec, and the first attention projection
        conv = next(n for n in names if "conv" in n and _fan_in(model.get_submodule(n).weight) % 8 == 0)
        attn = next(n for n in names if ".to_" in n)
        names = [conv, attn]
    hessians = collect_hessians(model, names, n_samples=n_samples, seed=0, progress=not quick)
    cases = []
    for name in names:
        module = model.get_submodule(name)
        kind = "conv3x3" if isinstance(module, torch.nn.Conv2d) else "attn-linear"
        cases.append(Case(name, kind, module.weight.detach().float().clone(), hessians[name]))
    return cases


def _fan_in(weight: torch.Tensor) -> int:
    return math.prod(weight.shape[1:])


def run_case(
    case: Case, methods: list[str], device: str, aq_options: dict, aq_specs: tuple[str, ...] = AQ_SPECS
) -> tuple[list[dict], list[str]]:
    W = case.weight.to(device)
    H = case.hessian.to(device)
    K = _fan_in(W)
    jobs = []
    if "rtn" in methods:
        jobs += [("rtn", f"int{b}", lambda b=b: avq.quantize_weight_rtn(W, b, hessian=H)) for b in BITS]
    if "gptq" in methods:
        jobs += [
            (
                "gptq",
                f"int{b}",
                lambda b=b: avq.quantize_weight_gptq(W, H, b, act_order=True, clip_search=True),
            )
            for b in BITS
        ]
    skipped = []
    if "aq" in methods:
        for text in aq_specs:
            spec = avq.QuantSpec.parse(text)
            if K % spec.group_size:
                skipped.append(f"{case.layer}: aq {text} (K = {K} not divisible by {spec.group_size})")
                continue
            jobs.append(
                ("aq", text, lambda spec=spec: avq.quantize_weight(W, H, spec, name=case.layer, **aq_options))
            )
    rows = []
    for method, spec, job in jobs:
        start = time.perf_counter()
        q = job()
        if W.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        error = avq.relative_error(W.cpu(), q.dequantize().cpu(), case.hessian)
        rows.append(
            {
                "layer": case.layer,
                "kind": case.kind,
                "shape": list(W.shape),
                "method": method,
                "spec": spec,
                "code_bits": float(q.code_bits),
                "total_bits": round(float(q.total_bits), 4),
                "relative_error": error,
                "seconds": round(seconds, 3),
            }
        )
    return rows, skipped


def is_lookup_table(row: dict) -> bool:
    """True when an AQ spec's codebooks hold at least as many codewords as the layer has groups: the layer
    is then stored verbatim (error ~0, huge total bits) and its error ratio says nothing about quality."""
    spec = avq.QuantSpec.parse(row["spec"])
    groups = row["shape"][0] * math.prod(row["shape"][1:]) // spec.group_size
    return groups <= spec.num_codebooks * spec.codebook_size


def summarize(rows: list[dict]) -> list[dict]:
    """Per-layer error ratio GPTQ / AQ at equal code bits over the real-model layers: mean, median,
    geometric mean, min and max, and the mean total bits of both sides. Layers where AQ degenerates into
    a lookup table (`is_lookup_table`, e.g. `conv_out` [1, 32, 3, 3]) are left out and counted."""
    index = {(r["layer"], r["method"], r["spec"]): r for r in rows}
    real = [r for r in rows if r["kind"] in ("conv3x3", "attn-linear")]
    summary = []
    for kinds, label in ((("conv3x3",), "conv3x3"), (("attn-linear",), "attn-linear"), (None, "all")):
        layers = sorted({r["layer"] for r in real if kinds is None or r["kind"] in kinds})
        for base_method, base_spec, aq_spec in PAIRS:
            ratios, base_bits, aq_bits, excluded = [], [], [], 0
            for layer in layers:
                base, aq = index.get((layer, base_method, base_spec)), index.get((layer, "aq", aq_spec))
                if base is None or aq is None:
                    continue
                if is_lookup_table(aq) or aq["relative_error"] <= 0:
                    excluded += 1
                    continue
                ratios.append(base["relative_error"] / aq["relative_error"])
                base_bits.append(base["total_bits"])
                aq_bits.append(aq["total_bits"])
            if not ratios:
                continue
            summary.append(
                {
                    "layer": "summary",
                    "kind": label,
                    "method": f"{base_method}/aq",
                    "spec": f"{base_spec}/{aq_spec}",
                    "code_bits": avq.QuantSpec.parse(aq_spec).code_bits,
                    "n_layers": len(ratios),
                    "n_excluded": excluded,
                    "mean_ratio": _round(statistics.fmean(ratios)),
                    "median_ratio": _round(statistics.median(ratios)),
                    "geomean_ratio": _round(math.exp(statistics.fmean(math.log(r) for r in ratios))),
                    "min_ratio": _round(min(ratios)),
                    "max_ratio": _round(max(ratios)),
                    "mean_total_bits": [
                        _round(statistics.fmean(base_bits)),
                        _round(statistics.fmean(aq_bits)),
                    ],
                }
            )
    return summary


def _round(value: float) -> float:
    return round(value, 3)


def print_table(rows: list[dict], summary: list[dict]) -> None:
    header = f"{'layer':<34} {'kind':<16} {'shape':<16} {'method':<5} {'spec':<6} {'code':>5} {'total':>7} "
    print(header + f"{'rel.err':>10} {'sec':>8}")
    for r in rows:
        shape = "x".join(str(d) for d in r["shape"])
        print(
            f"{r['layer'][-34:]:<34} {r['kind']:<16} {shape:<16} {r['method']:<5} {r['spec']:<6} "
            f"{r['code_bits']:>5.2f} {r['total_bits']:>7.3f} {r['relative_error']:>10.5f} "
            f"{r['seconds']:>8.2f}"
        )
    if summary:
        print("\nreal-model layers: error ratio GPTQ / AQ per layer at equal code bits (> 1: AQ better)")
        print(
            f"{'kind':<12} {'pair':<12} {'code':>5} {'layers':>6} {'excl':>4} {'mean':>7} {'median':>7} "
            f"{'geomean':>7} {'min':>6} {'max':>7}  total bits gptq/aq"
        )
        for s in summary:
            bits = "/".join(f"{b:.2f}" for b in s["mean_total_bits"])
            print(
                f"{s['kind']:<12} {s['spec']:<12} {s['code_bits']:>5.2f} {s['n_layers']:>6} "
                f"{s['n_excluded']:>4} "
                f"{s['mean_ratio']:>7.3f} {s['median_ratio']:>7.3f} {s['geomean_ratio']:>7.3f} "
                f"{s['min_ratio']:>6.3f} {s['max_ratio']:>7.3f}  {bits}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few solver rounds (smoke test)")
    parser.add_argument("--out-name", default=None, help="results name (default: layer_solver[_quick])")
    parser.add_argument("--results-dir", default=None, help="results folder (default: benchmarks/results)")
    parser.add_argument("--methods", default="rtn,gptq,aq", help="comma list of rtn,gptq,aq (default: all)")
    parser.add_argument("--layers", default=None, help="regex: only real-model layers whose name matches")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the synthetic layers")
    parser.add_argument("--no-model", action="store_true", help="skip the real-model layers")
    parser.add_argument(
        "--model", default="digits-unet-mini", help="shipped UNet whose layers are measured (%(default)s)"
    )
    parser.add_argument("--aq-specs", default=",".join(AQ_SPECS), help="comma list (default %(default)s)")
    parser.add_argument(
        "--aq-init",
        default=None,
        choices=avq.core.aq.SOLVER_INITS,
        help="AQ first codes (default: the solver's)",
    )
    parser.add_argument("--n-samples", type=int, default=None, help="calibration images (default 1024)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - {"rtn", "gptq", "aq"}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}")
    if ("rtn" in methods or "gptq" in methods) and not hasattr(avq, "quantize_weight_gptq"):
        parser.error("the RTN/GPTQ baselines (avq/baselines.py) are not available; use --methods aq")
    aq_options = {"max_rounds": 2, "kmeans_iters": 5} if args.quick else {}
    if args.aq_init:
        aq_options["init"] = args.aq_init
    n_samples = args.n_samples or (32 if args.quick else 1024)
    out_name = args.out_name or ("layer_solver_quick" if args.quick else "layer_solver")

    cases = [] if args.no_synthetic else synthetic_cases(args.quick)
    if not args.no_model:
        cases += model_cases(args.quick, n_samples, args.layers, args.model)
    # Untimed warm-up: the first call of each method pays one-off library initialisation.
    warm = Case("warm-up", "warm-up", torch.randn(16, 32), torch.eye(32))
    run_case(warm, methods, args.device, {"max_rounds": 1, "kmeans_iters": 1})
    rows, skipped = [], []
    start = time.perf_counter()
    bar = tqdm(cases, desc="layers", unit="layer")
    for case in bar:
        bar.set_postfix_str(case.layer)
        case_rows, case_skipped = run_case(
            case, methods, args.device, aq_options, tuple(args.aq_specs.split(","))
        )
        rows += case_rows
        skipped += case_skipped
    bar.close()
    summary = summarize(rows)
    print_table(rows, summary)
    for note in skipped:
        print(f"skipped {note}")
    path = write_results(out_name, rows + summary, device=args.device, results_dir=args.results_dir)
    print(f"{len(rows)} rows in {time.perf_counter() - start:.0f} s -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
