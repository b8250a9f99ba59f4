"""Regenerate the README's result tables from `benchmarks/results/*.json` (never typed by hand).

Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` markers in README.md.
Usage: python benchmarks/make_tables.py [--check]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

from avq.storage.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _fmt(value, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def layer_solver_table(data: dict) -> str:
    """Synthetic layers row by row, then the real-model summary (GPTQ error / AQ error per layer)."""
    rows = data["rows"]
    lines = [
        "| layer | shape | method | spec | code bits | total bits | rel. H-error | seconds |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("kind", "").startswith("synthetic"):
            shape = "x".join(str(d) for d in r["shape"])
            lines.append(
                f"| {r['kind']} | {shape} | {r['method']} | {r['spec']} | {_fmt(r['code_bits'])}"
                f" | {_fmt(r['total_bits'])} | {_fmt(r['relative_error'])} | {_fmt(r['seconds'], 3)} |"
            )
    summary = [r for r in rows if r.get("layer") == "summary"]
    if summary:
        lines += [
            "",
            "Real layers of `digits-unet-mini`: GPTQ error / AQ error per layer at equal code bits",
            "(> 1: AQ better; layers where AQ's codebooks can hold every group verbatim are excluded):",
            "",
            "| layers | GPTQ / AQ spec | layers | median ratio | geomean ratio | min | max"
            " | total bits GPTQ / AQ |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in summary:
            bits = " / ".join(_fmt(b, 3) for b in r["mean_total_bits"])
            lines.append(
                f"| {r['kind']} | {r['spec']} | {r['n_layers']} | {_fmt(r['median_ratio'], 3)}"
                f" | {_fmt(r['geomean_ratio'], 3)} | {_fmt(r['min_ratio'], 3)} | {_fmt(r['max_ratio'], 3)}"
                f" | {bits} |"
            )
    lines.append("")
    lines.append(
        f"From `{data['command']}` at commit `{data['commit'][:12]}` on {data['device']}, {data['date']}."
    )
    return "\n".join(lines)


AQLM_COLUMNS = {
    "aqlm_numba_1thread": "aqlm numba, 1 thread",
    "aqlm_triton": "aqlm Triton",
    "aqlm_cuda": "aqlm CUDA",
}


def lut_variants_table(data: dict) -> str:
    """The CPU LUT path's parts on one host: the shipped kernels, the fastest gather-sum variants, the
    decode alone and in blocks, and the LUT path over dense in interleaved rounds."""
    rows = data["rows"]

    def label(r: dict) -> str:
        extra = {k: r[k] for k in ("variant", "J", "threads", "block_mib") if k in r}
        return r["part"] + (" (" + ", ".join(f"{k} {v}" for k, v in extra.items()) + ")" if extra else "")

    size = rows[0].get("size", 4096)  # rows from before `--size` are of the acceptance shape
    gathers = sorted((r for r in rows if r["part"] == "gather_sum"), key=lambda r: r["ms"])
    shown = [r for r in rows if r["part"] not in ("gather_sum", "lut_over_dense")]
    shipped = [r for r in gathers if r["variant"] == "loop" and r["J"] == 8]
    best = [r for r in gathers[:3] if r not in shipped]
    lines = ["| part | ms | relative error |", "|---|---:|---:|"]
    for r in shown[:2] + shipped + best + shown[2:]:
        err = "—" if r.get("rel_err") is None else f"{r['rel_err']:.1e}"
        lines.append(f"| {label(r)} | {r['ms']:.3g} | {err} |")
    for r in rows:
        if r["part"] == "lut_over_dense":
            lines.append(
                f"| LUT path / dense (J {r['J']}), {r['rounds']} interleaved rounds | {r['ratio']:.2f}x"
                f" ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | |"
            )
    lines.append("")
    lines.append(
        f"`[{size}, {size}]` `2x8g8`, one row; {len(gathers)} gather-sum variants timed: the shipped kernel"
        f" (`loop`, J 8) on one and two threads, and the fastest others. From `{data['command']}` at commit"
        f" `{data['commit'][:12]}` on {data['device']}, {data['date']}."
    )
    return "\n".join(lines)


def kernels_table(data: dict, spec: str = "2x8g8") -> str:
    """Linear layers at one spec: latency of each method per shape and row count, and weight memory."""
    rows = [r for r in data["rows"] if r.get("op") == "linear"]
    dense = {(r["N"], r["K"], r["rows"]): r for r in rows if r["method"] == "dense"}
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r.get("spec") == spec:
            by_key.setdefault((r["family"], r["N"], r["K"], r["rows"]), {})[r["method"]] = r

    def ms(r: dict | None) -> str:
        if r is None:
            return "—"
        return f"{r['latency_ms']:.3g}" if "latency_ms" in r else "skipped"

    # aqlm's kernels that ran on this device: its numba kernel on CPU, its Triton and CUDA kernels on GPUs
    present = {r["method"] for r in rows}
    aqlm = [m for m in AQLM_COLUMNS if m in present] or ["aqlm_numba_1thread"]
    lines = [
        "| model | N×K | rows | dense | dequant + GEMM | fused | auto (kernel) | "
        + " | ".join(AQLM_COLUMNS[m] for m in aqlm)
        + f" | weight MB ({spec}) / fp16 MB |",
        "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(aqlm) + "---|",
    ]
    for (family, N, K, R), methods in by_key.items():
        auto = methods.get("auto")
        chosen = f" ({auto['kernel']})" if auto else ""
        quant = next(iter(methods.values()))
        memory = f"{quant['weight_bytes'] / 1e6:.3g} / {quant['dense_fp16_bytes'] / 1e6:.3g}"
        lines.append(
            f"| {family} | {N}×{K} | {R} | {ms(dense.get((N, K, R)))} | {ms(methods.get('dequant_gemm'))}"
            f" | {ms(methods.get('fused'))} | {ms(auto)}{chosen} | "
            + " | ".join(ms(methods.get(m)) for m in aqlm)
            + f" | {memory} |"
        )
    lines.append("")
    lines.append(
        f"Milliseconds, median of repeats. From `{data['command']}` at commit `{data['commit'][:12]}` on"
        f" {data['device']}, {data['date']}."
    )
    return "\n".join(lines)


def _ms(value: float) -> str:
    """Milliseconds with 4 significant digits, without an exponent."""
    return f"{value:.4g}" if value < 1e4 else f"{value:.0f}"


def _paired(side: dict | None) -> str:
    """The side-by-side W2/FP ratio: the median of its rounds, with their range where recorded."""
    if side is None:
        return "—"
    if "ratio_min" not in side:  # rows from before the per-round ratios
        return f"{side['ratio']:.3f}x"
    return f"{side['ratio']:.3f}x ({side['ratio_min']:.2f}-{side['ratio_max']:.2f}, {side['rounds']} rounds)"


def e2e_table(data: dict) -> str:
    """Per model: stored weight bytes vs fp16, and one denoising step FP vs W2 (latency, peak memory)."""
    rows = data["rows"]
    memory = {r["model"]: r for r in rows if r.get("kind") == "memory"}
    steps = {
        (r["model"], r["variant"], r["batch"]): r for r in rows if r.get("kind") == "step" and "variant" in r
    }
    lines = [
        "| model | params | W2 layer weights / fp16 | batch | FP ms | W2 ms (auto) | W2 / FP"
        " | W2 / FP side by side | W2 ms (decode + GEMM) | FP peak MiB | W2 peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, mem in memory.items():
        for batch in sorted({b for (m, v, b) in steps if m == model}):
            fp, q = steps.get((model, "fp", batch)), steps.get((model, "auto", batch))
            if fp is None or q is None:
                continue
            dq = steps.get((model, "dequant", batch))
            decode = _ms(dq["latency_ms"]) if dq is not None else "—"
            ratio = q["latency_ms"] / fp["latency_ms"]
            paired = _paired(q.get("side_by_side"))
            lines.append(
                f"| {model} | {mem['params'] / 1e6:.1f} M | {mem['layer_ratio']:.3f} | {batch}"
                f" | {_ms(fp['latency_ms'])} | {_ms(q['latency_ms'])} | {ratio:.2f}x | {paired} | {decode}"
                f" | {fp['peak_mib']:.0f} | {q['peak_mib']:.0f} |"
            )
    lines.append("")
    lines.append(
        f"From `{data['command']}` at commit `{data['commit'][:12]}` on {data['device']}, {data['date']}."
    )
    return "\n".join(lines)


def _source(data: dict) -> str:
    text = f"From `{data['command']}` at commit `{data['commit'][:12]}` on {data['device']}, {data['date']}."
    if "rows_commit" in data:  # a recompute pinned to one commit (`quality.py --collect --at`)
        changed = data["changed_since_rows_commit"]
        text += f" Every row was computed at commit `{data['rows_commit'][:12]}`; " + (
            f"**the code that computes them has changed since**: {', '.join(f'`{p}`' for p in changed)}."
            if changed
            else "the code that computes them is unchanged since."
        )
    return text


def reference_fp_table(data: dict) -> str:
    """FP reference models with their floors, then the sanity rows (real vs real, broken models)."""
    lines = [
        "| model | params | N | FID (floor) | sFID (floor) | IS | precision | recall | class acc | s/image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        if r["kind"] == "model":
            lines.append(
                f"| {r['model']} | {r['parameters'] / 1e6:.1f} M | {r['n_samples']} | {r['fid']:.3f}"
                f" ({r['fid_floor']:.3f}) | {r['sfid']:.2f} ({r['sfid_floor']:.2f}) | {r['is']:.2f}"
                f" | {r['precision']:.3f} | {r['recall']:.3f} | {r['class_accuracy']:.4f}"
                f" | {r['seconds_per_image']:.3f} |"
            )
        else:
            lines.append(
                f"| *{r['model']}* | | {r['n_samples']} | {r['fid']:.3f} | {r['sfid']:.2f} | {r['is']:.2f}"
                f" | {r['precision']:.3f} | {r['recall']:.3f} | {r['class_accuracy']:.4f} | |"
            )
    timed = next((r for r in data["rows"] if "timed_images" in r), None)
    timing = (
        f" s/image: one timed batch of {timed['timed_images']} images (DDIM 20, guidance), "
        f"{timed['threads']} torch threads."
        if timed
        else ""
    )
    lines += ["", "FID/sFID against the real test split (359 images)." + timing + " " + _source(data)]
    return "\n".join(lines)


def quality_table(data: dict) -> str:
    """One row per (model, config): bits, fidelity to the data and to the FP model, time."""
    lines = [
        "| model | config | code bits | total bits | FID (floor) | sFID | IS | class acc | PSNR to FP"
        " | SSIM to FP | minutes: wall / CPU (threads) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    best = best_uniform(data["rows"])
    for r in data["rows"]:
        psnr = f"{r['psnr']:.2f}" if "psnr" in r else "—"
        ssim = f"{r['ssim']:.3f}" if "ssim" in r else "—"
        lines.append(
            f"| {r['model']} | {r['config']}{' ★' if best.get((r['model'], r['preset'])) is r else ''}"
            f"{' †' if r.get('simulated') else ''}"
            + (f" ‡ `{r['commit'][:7]}`{'+dirty' if r.get('dirty') else ''}" if r.get("stale") else "")
            + f" | {r['code_bits']:.3g} | {r['total_bits']:.3f}"
            f" | {r['fid']:.3f} ({r['fid_floor']:.3f}) | {r['sfid']:.2f} | {r['is']:.2f}"
            f" | {r['class_accuracy']:.4f} | {psnr} | {ssim} | {r['quantize_minutes']:.1f}"
            + (f" / {r['cpu_minutes']:.1f}" if "cpu_minutes" in r else "")
            + (f" ({r['threads']})" if "threads" in r else "")
            + " |"
        )
    n = data["rows"][0]["n"] if data["rows"] else 0
    lines += [
        "",
        f"N = {n} samples per row, identical noise for every row of a model. Minutes: the whole quantization "
        "(calibration included; wall minutes also count any time the run was paused, e.g. while timing "
        "benchmarks ran on the same cores: CPU minutes are the load-independent figure); for `avq-pv*` rows, "
        "the SeMI-PV fine-tuning on top of the `avq` row of the "
        "preset (`-none` / `-all`: the SeMI ablation). `avq-laq`: AVQ with LAQ budgets at the total bits of "
        "the GPTQ row of the preset (equal total bits); `avq-laq+0.5`: half a bit more (LAQ may spend it on "
        "4-bit specs or FP for the layers that matter most); `avq-laq-u`: at the total bits of the best "
        "uniform row (★), with uniform grids among the candidates and no layer under the preset's code "
        "bits; `avq-laq-u-pv`: SeMI-PV on that model. A model's second LAQ row reuses the sensitivity "
        "table its first one measured (`laq_sensitivity` in the JSON; its minutes leave measuring out; here "
        "the `avq-laq` rows). "
        + (
            "`digits-t2i` (text-to-image): samples of held-out phrasings through the pipeline, calibrated "
            "on the training phrasings; its class acc is the prompt alignment (the classifier reads the "
            "prompted digit); `avq-rand`: calibrated on random prompt embeddings (the bare UNet) instead. "
            if any(r["model"] == "digits-t2i" for r in data["rows"])
            else ""
        )
        + (
            "† simulated: computed before the packed uniform modules, with dense dequantized weights (the "
            "same outputs, no memory saving). "
            if any(r.get("simulated") for r in data["rows"])
            else ""
        )
        + (
            "‡ stale: computed at another commit (shown) or on a dirty tree, published with `--allow-stale`. "
            if any(r.get("stale") for r in data["rows"])
            else ""
        )
        + _source(data),
    ]
    rows = data["rows"]
    return "\n".join(
        lines
        + against_best_uniform(rows)
        + calibration_lines(rows)
        + ablation_lines(rows)
        + check_lines(rows)
    )


def best_uniform(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (model, preset) the uniform row (RTN or GPTQ, per channel or grouped) closest to FP: highest
    PSNR to FP, then lowest FID."""
    best: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r["method"].split("-")[0] in ("rtn", "gptq") and "psnr" in r:
            key = (r["model"], r["preset"])
            if key not in best or (r["psnr"], -r["fid"]) > (best[key]["psnr"], -best[key]["fid"]):
                best[key] = r
    return best


def best_avq(rows: list[dict], model: str, preset: str, max_bits: float = math.inf) -> dict | None:
    """The AVQ row (layer-wise, LAQ or PV) of (model, preset) closest to FP (highest PSNR to FP) at no more
    than `max_bits` total bits."""
    rivals = [
        r
        for r in rows
        if (r["model"], r["preset"]) == (model, preset)
        and r["method"].startswith("avq")
        and "psnr" in r
        and r["total_bits"] <= max_bits + 1e-9
    ]
    return max(rivals, key=lambda r: r["psnr"]) if rivals else None


def against_best_uniform(rows: list[dict]) -> list[str]:
    """Each preset's best AVQ row at no more total bits than the best uniform row (★), and whether it
    beats that row on PSNR and on FID to FP."""
    lines = []
    for (model, preset), uniform in best_uniform(rows).items():
        avq = best_avq(rows, model, preset, uniform["total_bits"])
        if avq is None:
            lines.append(f"- {model} {preset}: no AVQ row at <= {uniform['total_bits']:.3f} total bits.")
            continue
        fid = "fid_to_fp" in avq and "fid_to_fp" in uniform
        align = "prompt_alignment" in avq and "prompt_alignment" in uniform  # text-to-image rows
        wins = (
            avq["psnr"] > uniform["psnr"]
            and (not fid or avq["fid_to_fp"] < uniform["fid_to_fp"])
            and (not align or avq["prompt_alignment"] > uniform["prompt_alignment"])
        )
        lines.append(
            f"- {model} {preset}: `{avq['config']}` ({avq['total_bits']:.3f} bits) against ★ "
            f"`{uniform['config']}` ({uniform['total_bits']:.3f} bits): PSNR to FP {avq['psnr']:.2f} vs "
            f"{uniform['psnr']:.2f} dB"
            + (f", FID to FP {avq['fid_to_fp']:.3f} vs {uniform['fid_to_fp']:.3f}" if fid else "")
            + (
                f", prompt alignment {avq['prompt_alignment']:.4f} vs {uniform['prompt_alignment']:.4f}"
                if align
                else ""
            )
            + (" - **AVQ ahead**" if wins else " - **not ahead**")
        )
    if lines:
        lines = [
            "",
            "★ the best uniform row of each preset; the best AVQ row at no more total bits:",
            "",
            *lines,
        ]
    return lines


def calibration_lines(rows: list[dict]) -> list[str]:
    """Text-to-image: each preset's `avq` row (calibrated through the pipeline on real prompts) against its
    `avq-rand` row (random prompt embeddings, the bare UNet), same N and noise: what real prompts are
    worth."""
    lines = []
    for rand in (r for r in rows if r["method"] == "avq-rand"):
        real = next(
            (r for r in rows if (r["model"], r["config"]) == (rand["model"], f"avq:{rand['preset']}")), None
        )
        if real is None:
            continue
        lines.append(
            f"- {rand['model']} {rand['preset']}: real prompts `{real['config']}` against random embeddings "
            f"`{rand['config']}`: PSNR to FP {real['psnr']:.2f} vs {rand['psnr']:.2f} dB, FID to FP "
            f"{real['fid_to_fp']:.3f} vs {rand['fid_to_fp']:.3f}, prompt alignment "
            f"{real['prompt_alignment']:.4f} vs {rand['prompt_alignment']:.4f} (N = {real['n']} each)"
        )
    return ["", "Calibration of the text-to-image model, same noise:", "", *lines] if lines else []


ABLATION = ("avq-pv", "avq-pv-none", "avq-pv-all", "avq-p-only")  # benchmarks/quality.py's


def ablation_lines(rows: list[dict]) -> list[str]:
    """The W2A8 fine-tuning ablation over its seeds (`<method>`, `<method>-s1`, ...): mean ± sd of PSNR to
    FP and FID per model and method; nothing until some method has rows of two seeds or more."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        base = _base_method(r["method"])
        if r["preset"] == "w2a8" and base in ABLATION:
            groups.setdefault((r["model"], base), []).append(r)
    if not any(len(g) >= 2 for g in groups.values()):
        return []

    def spread(values: list[float], digits: int) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"

    lines = [
        "",
        "W2A8 fine-tuning ablation, mean ± sd over fine-tuning seeds (`avq-p-only`: V step off):",
        "",
        "| model | fine-tuning | seeds | PSNR to FP (dB) | FID | codes changed |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (model, base), group in groups.items():
        changed = [r.get("codes_changed_total", 0.0) for r in group]
        lines.append(
            f"| {model} | {base} | {len(group)} | {spread([r['psnr'] for r in group], 2)}"
            f" | {spread([r['fid'] for r in group], 3)} | {spread(changed, 4)} |"
        )
    return lines


def _row(rows: list[dict], model: str, config: str) -> dict | None:
    return next((r for r in rows if (r["model"], r["config"]) == (model, config)), None)


def _base_method(method: str) -> str:
    """`avq-pv-none-s2` -> `avq-pv-none`: a fine-tuning row's method without its seed suffix."""
    base, _, seed = method.rpartition("-s")
    return base if seed.isdigit() else method


def _seeds(rows: list[dict], model: str, method: str) -> list[float]:
    """PSNR to FP of a W2A8 fine-tuning method's rows over its seeds (`<method>`, `<method>-s1`, ...)."""
    return [
        r["psnr"]
        for r in rows
        if (r["model"], r["preset"]) == (model, "w2a8") and _base_method(r["method"]) == method
    ]


def _missing(uniform: dict | None) -> tuple[bool | None, str]:
    """A comparison with the best uniform row that has no AVQ side: open while the uniform rows are not
    computed; failed where they are and no AVQ row stays within their total bits."""
    if uniform is None:
        return None, "no uniform row computed yet"
    return False, f"no AVQ row at <= {uniform['total_bits']:.3f} total bits"


def _t2i_checks(rows: list[dict], uniform: dict | None) -> list[tuple[str, bool | None, str]]:
    """`digits-t2i`: FP's prompt alignment, W2A8 AVQ(+PV) against the best uniform row, and the
    real-prompt and random-embedding calibration rows side by side."""
    checks: list[tuple[str, bool | None, str]] = []
    fp = _row(rows, "digits-t2i", "fp")
    claim = "digits-t2i: FP prompt alignment >= 90 % on held-out phrasings"
    if fp is None:
        checks.append((claim, None, "rows not computed yet"))
    else:
        checks.append((claim, fp["prompt_alignment"] >= 0.9, f"{fp['prompt_alignment']:.1%}"))
    claim = (
        "digits-t2i w2a8: AVQ(+PV) beats the best uniform row at no more bits on prompt alignment and PSNR"
    )
    avq = best_avq(rows, "digits-t2i", "w2a8", uniform["total_bits"]) if uniform else None
    if uniform is None or avq is None:
        checks.append((claim, *_missing(uniform)))
    else:
        holds = avq["psnr"] > uniform["psnr"] and avq["prompt_alignment"] > uniform["prompt_alignment"]
        figures = (
            f"`{avq['config']}` {avq['prompt_alignment']:.1%}, {avq['psnr']:.2f} dB vs `{uniform['config']}` "
            f"{uniform['prompt_alignment']:.1%}, {uniform['psnr']:.2f} dB"
        )
        checks.append((claim, holds, figures))
    real, rand = _row(rows, "digits-t2i", "avq:w2a8"), _row(rows, "digits-t2i", "avq-rand:w2a8")
    claim = "digits-t2i w2a8: real-prompt and random-embedding calibration rows, same N and noise"
    if real is None or rand is None:
        checks.append((claim, None, "rows not computed yet"))
    else:
        checks.append((claim, real["n"] == rand["n"], f"N = {real['n']} and {rand['n']}"))
    return checks


def check_lines(rows: list[dict]) -> list[str]:
    """What the table has to show (the quality and text-to-image issues' acceptance), each check with the
    figures it compares and whether it holds: `open` while the rows it needs are not all computed."""
    checks: list[tuple[str, bool | None, str]] = []  # (claim, holds (None: rows missing), figures)
    best = best_uniform(rows)
    for model in sorted({r["model"] for r in rows} - {"digits-t2i", "digits-unet-mini"}):
        fp = _row(rows, model, "fp")
        for preset, claim in (
            ("w2a8", "the best AVQ row beats the best uniform row at no more bits on PSNR and FID to FP"),
            ("w4a8", "the best AVQ row is at least level with the best uniform row at no more bits on PSNR"),
        ):
            uniform = best.get((model, preset))
            avq = best_avq(rows, model, preset, uniform["total_bits"]) if uniform else None
            if uniform is None or avq is None:
                checks.append((f"{model} {preset}: {claim}", *_missing(uniform)))
                continue
            holds = avq["psnr"] >= uniform["psnr"]
            figures = f"`{avq['config']}` {avq['psnr']:.2f} vs `{uniform['config']}` {uniform['psnr']:.2f} dB"
            if preset == "w2a8":
                holds = avq["psnr"] > uniform["psnr"] and avq["fid_to_fp"] < uniform["fid_to_fp"]
                figures += f", FID to FP {avq['fid_to_fp']:.3f} vs {uniform['fid_to_fp']:.3f}"
            checks.append((f"{model} {preset}: {claim}", holds, figures))
            if preset == "w2a8" and fp is not None:
                limit = fp["fid"] + fp["fid_floor"] + 0.3
                checks.append(
                    (
                        f"{model} w2a8: that AVQ row's FID is within FP's FID + its floor + 0.3",
                        avq["fid"] <= limit,
                        f"{avq['fid']:.3f} vs {fp['fid']:.3f} + {fp['fid_floor']:.3f} + 0.3 = {limit:.3f}",
                    )
                )
        pv, p_only = _seeds(rows, model, "avq-pv"), _seeds(rows, model, "avq-p-only")
        claim = f"{model} w2a8: P+V beats P only on PSNR to FP by more than the seed spread (mean ± sd apart)"
        if len(pv) < 3 or len(p_only) < 3:
            checks.append((claim, None, f"seeds computed: {len(pv)} P+V, {len(p_only)} P only (3 each)"))
        else:
            (m_pv, sd_pv), (m_p, sd_p) = [(statistics.mean(v), statistics.stdev(v)) for v in (pv, p_only)]
            figures = f"{m_pv:.2f} ± {sd_pv:.2f} vs {m_p:.2f} ± {sd_p:.2f} dB"
            checks.append((claim, m_pv - sd_pv > m_p + sd_p, figures))
    unet_fp, low = _row(rows, "digits-unet", "fp"), _row(rows, "digits-unet", "avq-pv:w1.5a8")
    claim = "digits-unet w1.5a8: AVQ+PV class accuracy >= 97 % and FID <= 1.5x FP's"
    if unet_fp and low:
        figures = f"{low['class_accuracy']:.1%}, FID {low['fid']:.3f} vs 1.5 x {unet_fp['fid']:.3f}"
        checks.append((claim, low["class_accuracy"] >= 0.97 and low["fid"] <= 1.5 * unet_fp["fid"], figures))
    elif "digits-unet" in {r["model"] for r in rows}:
        checks.append((claim, None, "rows not computed yet"))
    if any(r["model"] == "digits-t2i" for r in rows):
        checks += _t2i_checks(rows, best.get(("digits-t2i", "w2a8")))
    if not checks:
        return []
    verdict = {True: "holds", False: "**fails**", None: "open"}
    return [
        "",
        "What the table has to show, checked from its rows:",
        "",
        *(f"- {claim}: {figures} - {verdict[holds]}" for claim, holds, figures in checks),
    ]


def calibration_rss_table(data: dict) -> str:
    rows = data["rows"]
    lines = [
        "| block | layers | passes | seconds | peak RSS GiB | largest K |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['block']} | {r['layers']} | {r['passes']} | {r['seconds']:.0f} | {r['peak_rss_gib']:.2f}"
            f" | {r['largest_K']} |"
        )
    if rows:
        lines += [
            "",
            f"{rows[0]['parameters'] / 1e6:.0f} M parameters, {rows[0]['samples']} samples. " + _source(data),
        ]
    return "\n".join(lines)


def pv_resume_table(data: dict) -> str:
    """`kill -9` during fine-tuning, then `--resume`, against an uninterrupted run."""
    lines = [
        "| model | steps | checkpoint at kill | codes changed before the kill (SeMI resets)"
        " | histories identical | models bit-identical | held-out loss straight / resumed |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for r in data["rows"]:
        before = (
            f"{r['codes_changed_before_kill']:.3%} ({r['resets_before_kill']})"
            if "codes_changed_before_kill" in r
            else "not recorded"
        )
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['checkpoint_step_at_kill']} | {before}"
            f" | {r['histories_identical']} | {r['models_bit_identical']}"
            f" | {r['heldout_loss_straight']:.6g} / {r['heldout_loss_resumed']:.6g} |"
        )
    return "\n".join([*lines, "", _source(data)])


def v_step_ablation_table(data: dict) -> str:
    """`benchmarks/v_step_ablation.py`: held-out loss after fine-tuning per V-step mode, over seeds."""
    rows = data["rows"]
    runs = [r for r in rows if not r.get("summary")]
    lines = [
        "| model | V step | seeds | held-out loss after (mean ± sd) | per seed | codes changed (mean) |",
        "|---|---|---:|---:|---|---:|",
    ]
    for s in (r for r in rows if r.get("summary")):
        mine = [r for r in runs if r["mode"] == s["mode"] and r["model"] == s["model"]]
        sd = f"{s['heldout_loss_sd']:.3g}" if s["heldout_loss_sd"] is not None else "—"
        per_seed = ", ".join(f"{r['heldout_loss_after']:.4g}" for r in mine)
        changed = statistics.mean(r["codes_changed_total"] for r in mine)
        lines.append(
            f"| {s['model']} | {s['mode']} | {len(mine)} | {s['heldout_loss_mean']:.4g} ± {sd} | {per_seed}"
            f" | {changed:.3%} |"
        )
    before = runs[0]["heldout_loss_before"] if runs else float("nan")
    note = f"Held-out loss of the layer-wise model before fine-tuning: {before:.4g}. "
    return "\n".join([*lines, "", note + _source(data)])


def hessian_memory_table(data: dict) -> str:
    """Calibration memory of real denoisers, from their configs (`benchmarks/hessian_memory.py`)."""
    lines = [
        "| denoiser | parameters | quantizable layers | largest K | all Hessians, fp32 | fp64 accumulators"
        " | largest layer, fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['model']} ({r['class']}) | {r['parameters'] / 1e9:.2f} B | {r['quantizable_layers']}"
            f" | {r['max_K']:,} | {r['hessians_fp32_gib']} GiB | {r['accumulators_fp64_gib']} GiB"
            f" | {r['largest_fp32_gib']} GiB |"
        )
    return "\n".join([*lines, "", _source(data)])


def scale_table(data: dict) -> str:
    """`benchmarks/scale.py`: solved layers of a real-size denoiser, passes, memory, the projection."""
    rows = data["rows"]
    s = next(r for r in rows if r["kind"] == "summary")
    lines = [
        "| layer | shape | K | spec | seconds | s per M weights | rel. H-error |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        if r["kind"] == "layer":
            shape = "x".join(map(str, r["shape"]))
            lines.append(
                f"| {r['layer']} | {shape} | {r['K']:,} | {r['spec']} | {r['seconds']:.0f}"
                f" | {r['seconds_per_mweight']:.1f} | {r['relative_error']:.4g} |"
            )
    passes = ", ".join(f"{r['layers']} layers in {r['seconds']:.0f} s" for r in rows if r["kind"] == "pass")
    calib = s["calibration"]
    status = "complete" if s["complete"] else f"stopped at its time limit after {s['layers_done']} layers"
    lines += [
        "",
        f"{s['model']}, blocks {', '.join(s['blocks'])}: {status} over {s['runs']} run(s), the last "
        f"{s['seconds_total']:.0f} s; layer solves "
        f"{sum(r['seconds'] for r in rows if r['kind'] == 'layer'):.0f} s in all; passes of the last run: "
        f"{passes or 'none finished'}; Hessian budget "
        f"{s['hessian_budget_gib']:.3g} GiB; peak RSS {s['peak_rss_gib']:.2f} GiB"
        + (f", peak GPU {s['peak_gpu_gib']:.2f} GiB" if s["peak_gpu_gib"] is not None else "")
        + f". Calibration: {calib['num_samples']} samples, {calib['steps']} steps, "
        f"{calib['timesteps_kept']} kept, latent {calib['sample_size']}. "
        "**Projected** whole-model solve time: "
        f"{s['projected_whole_model_solve_seconds'] / 3600:.1f} h ({s['projection']}).",
    ]
    laq = next((r for r in rows if r["kind"] == "laq_summary"), None)
    if laq is not None:
        ratio = laq["ratio_compared"]
        lines += [
            "",
            f"LAQ measuring (`--bits-budget {laq['bits_budget']:g}`, {laq['laq_measure_rounds']} solver "
            "rounds per candidate, "
            + ("every candidate" if laq.get("laq_probe_all", True) else "one candidate per layer")
            + " probed"
            + (" on its block (one whole-model probe per block)" if laq.get("laq_probe") == "block" else "")
            + f", candidates dominated within {laq['dominated_bits']} bits dropped): "
            f"{laq['layers_measured']} of {laq['layers_total']} layers measured"
            + (" (complete)" if laq["measuring_complete"] else " (stopped at its time limit)")
            + f"; on the {laq['layers_compared']} layers both runs finished it took "
            f"{laq['measure_seconds_compared']:.0f} s against {laq['plain_solve_seconds_compared']:.0f} s "
            "for the plain run's fastest solves of the same shapes"
            + (f", **{ratio:.2f}x**" if ratio is not None else "")
            + f" ({laq['ratio_note']}).",
        ]
    lines += ["", _source(data)]
    return "\n".join(lines)


def laq_measure_table(data: dict) -> str:
    """LAQ's default measure against the whole-model one, and both against one spec for all layers."""
    lines = [
        "| model | run | probe | total bits | held-out SNR to FP (dB) | measuring (s) | specs chosen |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    notes, probes = [], {}
    for r in data["rows"]:
        if r["kind"] == "run":
            chosen = ", ".join(f"{k} {v}" for k, v in r.get("specs_chosen", {}).items()) or "—"
            seconds = f"{r['measure_seconds']:.0f}" if r["measure_seconds"] is not None else "—"
            config = r.get("config", {})
            probe = "—" if r["measure_seconds"] is None else config.get("laq_probe", "model")
            probe += ", every candidate" if config.get("laq_probe_all") and probe != "—" else ""
            probes[(r["model"], r["run"])] = probe
            lines.append(
                f"| {r['model']} | {r['run']} | {probe} | {r['total_bits']:.4f} | {r['held_out_snr_db']:.2f}"
                f" | {seconds} | {chosen} |"
            )
        else:
            against = r.get("against", "laq-default")
            notes.append(
                f"{r['model']}, {against} ({probes.get((r['model'], against), '?')} probe): "
                f"Spearman {r['spearman']:.3f} over {r['pairs']} (layer, candidate) errors; "
                f"scaled estimates within a median factor {r['median_factor_scaled_vs_probed']:.2f} (largest "
                f"{r['max_factor_scaled_vs_probed']:.1f}) of the whole-model table's probes; "
                f"{r['same_choice']:.0%} of layers given the same choice; measuring "
                f"{r['measure_seconds_ratio']:.2f}x the time."
            )
    return "\n".join([*lines, "", " ".join(notes), "", _source(data)])


def calibration_replay_table(data: dict) -> str:
    """Calibration passes: sampling every pass against replaying the first pass's kept calls."""
    lines = [
        "| model | passes | replay | model calls | seconds | recorded (MiB) | Hessians identical |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['model']} | {r['passes']} | {'yes' if r['replay'] else 'no'} | {r['model_calls']}"
            f" | {r['seconds']:.1f}"
            + (f" ({r['seconds_ratio']:.2f}x)" if "seconds_ratio" in r else "")
            + f" | {r['recorded_mib']:.1f} | {'yes' if r['hessians_identical'] else '**no**'} |"
        )
    return "\n".join([*lines, "", _source(data)])


def solver_devices_table(data: dict) -> str:
    """`benchmarks/solver_devices.py`: the same layers solved on the CPU and on CUDA at one seed."""
    lines = [
        "| layer | shape | spec | CPU error | CUDA error | CUDA / CPU | codes differing | CPU s | CUDA s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    host = next((r for r in data["rows"] if r["layer"] == "host"), {})
    for r in data["rows"]:
        if r["layer"] == "host":
            continue
        lines.append(
            f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | {r['spec']} | {r['cpu_error']:.4f}"
            f" | {r['cuda_error']:.4f} | {r['error_ratio_cuda_over_cpu']:.4f} | {r['codes_differing']:.1%}"
            f" | {r['cpu_seconds']:.1f} | {r['cuda_seconds']:.1f} |"
        )
    cpu = f"CPU: {host['cpu']}. " if host else ""
    return "\n".join([*lines, "", cpu + _source(data)])


def t2i_fp_table(data: dict) -> str:
    """`digits-t2i` in FP: prompt alignment and FID per split and guidance (`benchmarks/t2i_fp.py`)."""
    lines = [
        "| split | guidance | N | prompt alignment | FID (floor) | sFID | IS | precision | recall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['split']} | {r['guidance']:g} | {r['n_samples']} | {r['prompt_alignment']:.1%}"
            f" | {r['fid']:.3f} ({r['fid_floor']:.3f}) | {r['sfid']:.2f} | {r['is']:.2f}"
            f" | {r['precision']:.3f} | {r['recall']:.3f} |"
        )
    return "\n".join([*lines, "", _source(data)])


def t2i_grids_table(data: dict) -> str:
    """`benchmarks/t2i_grids.py`: the commands behind the README's FP and W2A8 `digits-t2i` grids."""
    r = data["rows"][0]
    q = r["quantize"]
    lines = [
        "```",
        *(r["commands"][k] for k in ("quantize", "fp", "w2a8")),
        "```",
        "",
        f"W2A8: {q['quantized']} of {q['layers']} layers, {q['code_bits']:g} code bits, "
        f"{q['total_bits_all']:.3f} total bits, quantized in {q['seconds'] / 60:.1f} min. Prompt alignment "
        f"of these {len(r['digits'])} samples: FP {r['prompt_alignment_fp']:.1%}, W2A8 "
        f"{r['prompt_alignment_w2a8']:.1%}.",
    ]
    return "\n".join([*lines, "", _source(data)])


TABLES = {
    "t2i_fp": t2i_fp_table,
    "t2i_grids": t2i_grids_table,
    "scale_cpu": scale_table,
    "scale_h200": scale_table,
    "scale_sd3_cpu": scale_table,
    "solver_devices_h200": solver_devices_table,
    "calibration_replay": calibration_replay_table,
    "laq_measure": laq_measure_table,
    "hessian_memory": hessian_memory_table,
    "layer_solver": layer_solver_table,
    "kernels_cpu": kernels_table,
    "kernels_cpu_quick": kernels_table,
    "kernels_cpu_quick_intel": kernels_table,
    "kernels_h200_quick": kernels_table,
    "lut_variants_cpu": lut_variants_table,
    "lut_variants_cpu_intel": lut_variants_table,
    "e2e_step_cpu": e2e_table,
    "reference_fp": reference_fp_table,
    "quality": quality_table,
    "calibration_rss_cpu": calibration_rss_table,
    "pv_resume": pv_resume_table,
    "v_step_ablation": v_step_ablation_table,
}


def render(readme: str) -> str:
    for name, make in TABLES.items():
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        body = make(json.loads(path.read_text()))
        pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
        readme = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), readme)
    return readme


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md is out of date")
    args = parser.parse_args()
    readme_path = ROOT / "README.md"
    current = readme_path.read_text()
    updated = render(current)
    if args.check:
        if updated != current:
            print("README.md tables are out of date: run python benchmarks/make_tables.py", file=sys.stderr)
            return 1
        return 0
    write_text_atomic(readme_path, updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
