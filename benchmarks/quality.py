"""The quality table: FP, RTN, GPTQ and AVQ at W4A8 to W1A8 on the reference models -> quality.json.

    python benchmarks/quality.py                                   # the whole table: both models, 1,000
                                                                   # samples per row, layer-wise then PV
    python benchmarks/quality.py --models digits-unet --n 500 --configs avq:w2a8 gptq:w2a8
    python benchmarks/quality.py --plot-only                       # redraw the Pareto plot from the JSON
    python benchmarks/quality.py --collect                         # results JSON + plot from the rows done

Each row quantizes a fresh copy of the FP model with `avq.quantize` (layer-wise; the default
`CalibrationConfig`: 64 samples along the DDIM-20 guided trajectory, 10 timesteps kept), samples `--n`
class-balanced images with the FP model's noise (seed 0, DDIM 20 steps, guidance 2) and evaluates them
against the real test split and against the FP samples on identical noise (PSNR, SSIM, FID to FP). Every
row carries the FID floor at the same N: FP samples of seed 0 vs FP samples of seed 1. Bits: `code_bits`
per quantized weight, `total_bits` over all Linear/Conv2d weights with codebooks, scales and FP-kept
layers (16 bits) counted. `quantize_minutes` is the whole `avq.quantize` call (calibration included),
wall clock; `cpu_minutes` its process CPU time (load-independent; about the wall time of a 1-thread run
on an idle core).
`gptq-g128` / `gptq-g64` / `rtn-g64` rows: uniform grids per group of 128 / 64 inputs instead of per
output channel (an fp16 scale and zero per group, counted: +0.25 / +0.5 total bits), the strong uniform
baseline at low bits.
`avq-laq` rows give AVQ the total bits that GPTQ spends at the same preset (`--bits-budget`, LAQ): the
equal-total-bits comparison; `avq-laq+0.5` rows half a bit more (the allowance of issue #4's acceptance:
codebooks cost bits that a uniform grid does not). `avq-laq-u` rows get the total bits of the best uniform
row of the preset (★) with uniform grids (`int2g64`, `int4`, `int4g128`) among LAQ's candidates and no
layer under the preset's code bits (`QuantizeConfig.laq_floor`): each layer gets the AQ spec, the grid or
FP that serves it best, and the ★ plan itself is one of LAQ's choices. Every LAQ row keeps the timestep
and conditioning layers at the preset's code bits at least (`avq.planning.presets.CONDITIONING_LAYERS`).
`avq-seq` rows calibrate sequentially (block by block on the model quantized so far; `--configs
avq-seq:w2a8`). GPTQ/RTN layers are packed uniform modules
(`avq.core.uniform_modules`); rows computed before they existed carry `simulated: true` (dense weights,
the same outputs).
`avq-pv*` rows (after the `avq:` row of the preset, whose model is kept in `runs/quality/`) fine-tune
that model with SeMI-PV (`avq.finetune`; `quantize_minutes` is then the fine-tuning time), and
`avq-pv-none` / `avq-pv-all` are the SeMI ablation (no reset / reset everything on any code change).
`avq-laq-u-pv` fine-tunes the `avq-laq-u` row's model the same way (its AQ layers and FP parameters, the
FP-kept layers' included; the uniform grids stay).

`digits-t2i` (the text-to-image pipeline, `avq_bench.t2i`) gets the same configs through the pipeline
(`avq.quantize_pipeline`, calibrated on its training phrasings with its DDIM 20 steps at guidance 2), samples
of held-out phrasings (sample `i`: digit `i % 10`) and `prompt_alignment` (= `class_accuracy`: the
classifier reads the prompted digit); of the fine-tuning rows only `avq-pv` (on the FP pipeline's own
trajectories, `avq.finetune.finetune_pipeline`), and `avq-rand:w2a8`: its bare UNet calibrated on random
prompt embeddings, beside the real-prompt `avq:w2a8` row (same N, same noise).

Rows are appended to `runs/quality/<name>.partial.json` as they finish, so an interrupted run continues
where it stopped (`--fresh` to start over); `benchmarks/results/<name>.json` and the Pareto plot
(`<name>.png`: total bits vs FID, one panel per model) are written at the end.

Traceability: each row is stamped when it is computed with the commit (and whether the tree was dirty), the
command, the calibration seed and the whole config (`quantize_config` / `finetune_config`). A row of
another commit than the current one, or of a dirty tree, is stale: a continued run computes it again
instead of reusing it, and the results file (`--collect` included) is refused while it holds one, so the
published table is of one commit; `--allow-stale` writes them anyway, marked `"stale": true` (and in the
README table). The whole table takes about 14 hours on 2 CPU cores, longer than a working session, so it
can be pinned to one commit: run it in a worktree of that commit (`git worktree add ../avq-quality C`, its
`runs/` linked to this one's), continue it there after an interruption, and publish from the current
tree with `--collect --at C`: the rows must all be of C, and the results file names C and the files under
`RESULT_PATHS` changed since (none: the current code computes the same table). `benchmarks/quality_pinned.sh`
does all of it (`start C`, `save`, `pause`, `resume`, `status`): a new checkout holds only what git holds, so
the rows done so far, the FP sample sets and the LAQ tables are committed (`benchmarks/results/progress/<C>/`,
restored by `start`), and an `avq:<preset>` row whose layer-wise model is gone while fine-tuning rows of its
preset still wait has its model made again: the row stands where the model's weights are identical to the
ones it recorded (`layerwise_sha256`), else it is computed again, so that those rows start from the
published row's model.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from make_tables import best_uniform
from sample_sets import REPO, get_samples, set_folder

import avq
from avq.calibration.config import CalibrationConfig
from avq.core.spec import UniformSpec
from avq.planning.presets import default_laq_floor, preset_code_bits, preset_config
from avq.run.quantize import quantize
from avq.run.report import QuantizeReport
from avq.storage.atomic import write_atomic, write_json_atomic
from avq_bench import t2i
from avq_bench.data import load_digits_images
from avq_bench.metrics import evaluate
from avq_bench.reference import load_reference
from avq_bench.results import STARTED_AT, default_results_dir, run_stamp, write_results

MODELS = ("digits-unet", "digits-dit", t2i.NAME)
CONFIGS = (
    "rtn:w4a8",
    "gptq:w4a8",
    "gptq-g128:w4a8",
    "avq:w4a8",
    "rtn:w2a8",
    "gptq:w2a8",
    "rtn-g64:w2a8",
    "gptq-g128:w2a8",
    "gptq-g64:w2a8",
    "avq:w2a8",
    "avq-laq:w2a8",
    "avq-laq+0.5:w2a8",
    "avq-laq-u:w4a8",
    "avq-laq-u:w2a8",
    "avq:w1.5a8",
    "avq-laq:w1.5a8",
    "avq:w1a8",
    "avq-laq:w1a8",
)
# Below 2 bits there is no uniform row to take a budget from: LAQ gets the preset's nominal bits, or the
# least the model can reach where its FP-kept layers put them out of reach (`bits_budget_nominal` then).
NOMINAL_BITS = {"w1.5a8": 1.5, "w1a8": 1.0}
# LAQ rows: budget = the per-channel GPTQ row's total bits + this many; `avq-laq-u` rows (BEST_UNIFORM_BUDGET)
# the best uniform row's (★, `make_tables.best_uniform`) instead, so that its plan is among LAQ's choices.
LAQ_EXTRA_BITS = {"avq-laq": 0.0, "avq-laq+0.5": 0.5, "avq-laq-u": 0.0}
BEST_UNIFORM_BUDGET = ("avq-laq-u",)
UNIFORM = ("rtn", "gptq")  # the uniform methods, per channel or grouped (`gptq-g128`)
# `avq-laq-u`: LAQ may also give a layer a uniform GPTQ grid (at its total bits) instead of AQ or FP, and
# gives no layer fewer code bits than the preset: it chooses each layer's representation (AQ, grid, FP).
LAQ_UNIFORM = {"avq-laq-u": (UniformSpec(2, 64), UniformSpec(4), UniformSpec(4, 128))}
# Layer-wise AVQ with sequential calibration (`QuantizeConfig.sequential`: each block calibrated on the
# outputs of the blocks already quantized): does it help?
EXTRA_CONFIGS = ("avq-seq:w2a8", "avq-seq:w4a8")
# `digits-t2i` only: layer-wise AVQ calibrated on random prompt embeddings (the bare UNet, as avq
# calibrated text-conditioned models before pipelines), beside the `avq` row calibrated on real prompts.
T2I_CONFIGS = ("avq-rand:w2a8",)
# SeMI-PV on top of the layer-wise AVQ model of the same preset (`avq-pv`), and the SeMI ablation: the
# same fine-tuning with no optimizer-state reset (`avq-pv-none`) and a reset of everything (`avq-pv-all`).
# `avq-p-only`: the same fine-tuning with the V step off (codes fixed): what the V step adds. The W2A8
# ablation rows are repeated with fine-tuning seeds 1 and 2 (`-s1`, `-s2`) for a mean and spread.
ABLATION = ("avq-pv", "avq-pv-none", "avq-pv-all", "avq-p-only")
PV_CONFIGS = (
    "avq-pv:w4a8",
    "avq-laq-u-pv:w4a8",
    *(f"{m}{s}:w2a8" for m in ABLATION for s in ("", "-s1", "-s2")),
    "avq-pv:w1.5a8",
    "avq-pv:w1a8",
)
SEMI = {
    "avq-pv": "selective",
    "avq-pv-none": "none",
    "avq-pv-all": "all",
    "avq-p-only": "selective",
    "avq-laq-u-pv": "selective",
}
# The row whose model a fine-tuning row starts from (kept in `runs/quality/`): the layer-wise AVQ model of
# the preset, or for `avq-laq-u-pv` the `avq-laq-u` model (SeMI-PV trains its AQ layers and every FP
# parameter, the FP-kept layers' included; its uniform grids stay as GPTQ left them).
PV_BASE = {**dict.fromkeys(ABLATION, "avq"), "avq-laq-u-pv": "avq-laq-u"}
LAYERWISE = tuple(dict.fromkeys(PV_BASE.values()))  # the methods whose models are kept


def pv_method(method: str) -> tuple[str, int]:
    """`avq-pv-none-s2` -> ("avq-pv-none", 2): a fine-tuning row's method and seed (0 without a suffix)."""
    base, _, seed = method.rpartition("-s")
    return (base, int(seed)) if base in SEMI and seed.isdigit() else (method, 0)


FIGURES = (
    "fid",
    "sfid",
    "is",
    "precision",
    "recall",
    "class_accuracy",
    "psnr",
    "ssim",
    "fid_to_fp",
    "fid_floor",
    "sfid_floor",
)


def model_configs(model_name: str, configs: list[str]) -> list[str]:
    """The requested configs that apply to `model_name`: `T2I_CONFIGS` to `digits-t2i` only, and of the
    fine-tuning rows only `avq-pv` (seed 0) to `digits-t2i` (the SeMI ablation is the class models')."""
    if model_name != t2i.NAME:
        return [c for c in configs if c not in T2I_CONFIGS]
    methods = [(c, pv_method(c.split(":")[0])) for c in configs]
    return [c for c, (base, seed) in methods if base not in SEMI or (base, seed) == ("avq-pv", 0)]


def _load_fp(model_name: str):
    """The FP model of a row: a shipped model, or the `digits-t2i` pipeline (its UNet is the denoiser)."""
    return t2i.load_pipeline() if model_name == t2i.NAME else load_reference(model_name).eval()


def _quantized(
    model_name: str,
    method: str,
    preset: str,
    budget: float | None,
    seed: int,
    sensitivity: dict | None = None,
):
    """A fresh FP model quantized for one row (the `digits-t2i` pipeline through `quantize_pipeline`,
    calibrated on its training phrasings; `avq-rand`: its bare UNet on random prompt embeddings)."""
    from avq.pipelines.quantize import quantize_pipeline

    model = _load_fp(model_name)
    base, group_size = _uniform_groups(method)
    base = "avq" if base in LAQ_EXTRA_BITS or base in RANDOM_EMBEDDINGS else base.removesuffix("-seq")
    config = preset_config(
        preset,
        base,
        bits_budget=budget,
        sequential=method.endswith("-seq"),
        group_size=group_size,
        **_laq_options(method, preset),
    )
    report = QuantizeReport()
    options = dict(report=report, progress=True, sensitivity=sensitivity)
    start, cpu = time.perf_counter(), time.process_time()
    if model_name != t2i.NAME:
        calibration = CalibrationConfig(seed=seed)
        quantize(model, config, calibration, **options)
        model = model.eval()
    elif method in RANDOM_EMBEDDINGS:
        calibration = t2i.calibration_config(seed, random_embeddings=True)
        quantize(model.unet, config, calibration, **options)
    else:
        calibration = t2i.calibration_config(seed)
        quantize_pipeline(model, config, calibration, **options)
    minutes, cpu_minutes = (time.perf_counter() - start) / 60, (time.process_time() - cpu) / 60
    configs = {"quantize_config": config.to_dict(), "calibration_config": calibration.to_dict()}
    return model, report, minutes, cpu_minutes, configs


RANDOM_EMBEDDINGS = ("avq-rand",)  # methods calibrated on random prompt embeddings


def _laq_options(method: str, preset: str) -> dict:
    """A LAQ row's candidates and floor beyond the preset's (`avq-laq-u`: the uniform grids, and no layer
    under the preset's code bits); {} for every other row."""
    if method not in LAQ_UNIFORM:
        return {}
    floor = (*default_laq_floor(preset), ("*", preset_code_bits(preset)))
    return {"laq_uniform": LAQ_UNIFORM[method], "laq_floor": floor}


def _least_budget(model_name: str, method: str, preset: str, budget: float) -> float:
    """The fewest total bits LAQ can reach on the model with the row's candidates (its FP-kept layers stay
    at 16 bits), rounded up to 1/1000 of a bit."""
    from avq.planning.reach import minimum_total_bits

    model = _load_fp(model_name)
    denoiser = model.unet if model_name == t2i.NAME else model
    config = preset_config(preset, "avq", bits_budget=budget, **_laq_options(method, preset))
    return math.ceil(minimum_total_bits(denoiser, config) * 1000) / 1000


def _uniform_groups(method: str) -> tuple[str, int | None]:
    """`gptq-g128` -> ("gptq", 128); any other method -> (method, None)."""
    base, _, group = method.partition("-g")
    return (base, int(group)) if group.isdigit() else (method, None)


def _artifacts(name: str) -> Path:
    """Where a run keeps what its rows share (layer-wise models, LAQ tables), outside git: `runs/quality/`
    for the table itself, a folder of its own for any other `--name`, so that a side run (a smoke test)
    never hands its models or tables to the table's rows."""
    root = REPO / "runs" / "quality"
    return root if name == "quality" else root / name


def laq_table(name: str, model_name: str, seed: int, method: str, preset: str) -> tuple[Path, dict | None]:
    """Where a LAQ row's sensitivity table is kept, and the table if one was measured at this very commit
    (the table is part of what a row computes), else None: measure, then save it there."""
    path = _sensitivity_path(name, model_name, seed, method, preset)
    saved = json.loads(path.read_text()) if path.is_file() else {}
    return path, saved.get("sensitivity") if saved.get("commit") == STARTED_AT else None


def _sensitivity_path(
    name: str, model_name: str, seed: int, method: str = "avq-laq", preset: str = "w2a8"
) -> Path:
    """The LAQ sensitivity table of a model (the same for every budget and preset: LAQ's candidates and the
    calibration do not depend on them), kept so that the other LAQ rows choose from it without measuring."""
    # a table per candidate set: uniform grids added, or the sub-2-bit presets' specs
    candidates = ("-u" if method in LAQ_UNIFORM else "") + ("-low" if preset in NOMINAL_BITS else "")
    return _artifacts(name) / f"{model_name}-laq{candidates}-seed{seed}.sensitivity.json"


def _layerwise_folder(name: str, model_name: str, preset: str, base: str = "avq") -> Path:
    """Where the model of a preset's `base` row (`LAYERWISE`) is kept for the PV rows (outside git): an avq
    save, or for `digits-t2i` a quantized pipeline folder (`avq.pipelines.save_pipeline`)."""
    return _artifacts(name) / f"{model_name}-{base}-{preset}"


def _layerwise_lost(name: str, rows: list[dict], model_name: str, entry: str, entries: list[str]) -> bool:
    """Whether the done `avq:<preset>` (or other `LAYERWISE`) row `entry` must be computed again because
    the fine-tuning rows starting from it still wait for its model and the model is gone (a new checkout
    keeps the rows, committed, but not `runs/`): the model is made again, and the row with it unless the
    model is identical to the row's (`_layerwise_digest`), so every PV row starts from the model of the
    published row."""
    method, preset = entry.split(":")
    if method not in LAYERWISE or _has_layerwise(name, model_name, preset, method):
        return False
    return any(  # a fine-tuning row starting from this one, not done yet
        PV_BASE.get(pv_method(e.split(":")[0])[0]) == method
        and e.endswith(f":{preset}")
        and not _done(rows, model_name, e)
        for e in entries
    )


def _layerwise_digest(name: str, model_name: str, preset: str, base: str = "avq") -> str:
    """sha256 of the saved layer-wise model's own weight files (codes, codebooks, scales, FP-kept layers;
    not the pipeline components linked from the FP pipeline), by relative path: an `avq` row records it,
    so that the model, made again after a new checkout lost it, is known to be the row's own."""
    folder, digest = _layerwise_folder(name, model_name, preset, base), hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        if not path.is_symlink():
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _has_layerwise(name: str, model_name: str, preset: str, base: str = "avq") -> bool:
    index = "model_index.json" if model_name == t2i.NAME else "config.json"
    return (_layerwise_folder(name, model_name, preset, base) / index).is_file()


def _save_layerwise(name: str, model, model_name: str, preset: str, base: str = "avq") -> None:
    from avq.pipelines.folders import save_pipeline

    folder, extra = _layerwise_folder(name, model_name, preset, base), {"model": model_name}
    if model_name == t2i.NAME:
        save_pipeline(model, folder, source=t2i.pipeline_folder(), extra_config=extra)
    else:
        avq.save_quantized(model, folder, extra_config=extra)


def _finetuned(name: str, model_name: str, method: str, preset: str, steps: int | None):
    """The saved model of the row's `PV_BASE` fine-tuned with SeMI-PV (mode from `method`); minutes of
    tuning."""
    from avq.finetune import FinetuneConfig, finetune, finetune_pipeline
    from avq.pipelines.folders import load_pipeline_folder

    base, seed = pv_method(method)
    v_off = {"v_every": 0} if base == "avq-p-only" else {}
    config = FinetuneConfig(semi=SEMI[base], seed=seed, **v_off, **({"steps": steps} if steps else {}))
    start, cpu = time.perf_counter(), time.process_time()
    folder = _layerwise_folder(name, model_name, preset, PV_BASE[base])
    if model_name == t2i.NAME:  # on the FP pipeline's own trajectories of the training phrasings
        student = load_pipeline_folder(folder)
        sampling = t2i.calibration_config(seed)
        teacher = _load_fp(model_name)
        _, history = finetune_pipeline(student, teacher, config, sampling=sampling, progress=True)
    else:
        student = avq.load_quantized(folder)
        student, history = finetune(student, _load_fp(model_name), config, progress=True)
        student = student.eval()
    extra = {
        "cpu_minutes": round((time.process_time() - cpu) / 60, 2),
        "pv_steps": config.steps,
        "codes_changed_total": sum(h.get("codes_changed", 0.0) for h in history),
        "finetune_config": config.to_dict(),
    }
    return student, (time.perf_counter() - start) / 60, extra


def _done(rows: list[dict], model: str, config: str) -> dict | None:
    return next((r for r in rows if r["model"] == model and r["config"] == config), None)


def _partial_path(name: str) -> Path:
    """Where the rows of an unfinished (or side-by-side) run are kept, outside git."""
    return REPO / "runs" / "quality" / f"{name}.partial.json"


def run(args: argparse.Namespace) -> list[dict]:
    partial = _partial_path(args.name)
    partial.parent.mkdir(parents=True, exist_ok=True)
    settings = {"n": args.n, "guidance": args.guidance, "batch_size": args.batch_size}
    rows: list[dict] = []
    if partial.exists() and not args.fresh:
        saved = json.loads(partial.read_text())
        if saved["settings"] == settings:
            rows = saved["rows"]
            stale = stale_rows(rows, STARTED_AT)
            if stale and not args.allow_stale:  # computed again at this commit (and replaced in the file)
                print(f"{len(stale)} rows of {partial} are of another commit or a dirty tree: recomputing")
                rows = [r for r in rows if r not in stale]
            print(f"continuing {partial}: {len(rows)} rows done")
    computed: list[dict] = []  # rows this process computed (the only ones it writes)

    def keep(row: dict) -> None:
        """Stamp `row` (commit, dirty tree, command, seed) and add it to the partial file, merged under a
        lock with the rows that other runs of the script (other configs, side by side) wrote meanwhile;
        rows removed from the file by hand stay removed."""
        row = {**row, **run_stamp(), "seed": args.seed}  # the tree this process started from
        computed.append(row)
        mine = {(r["model"], r["config"]) for r in computed}
        with open(partial.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            saved = json.loads(partial.read_text()) if partial.exists() else {"settings": settings}
            others = saved.get("rows", []) if saved["settings"] == settings and not args.fresh else []
            if not args.allow_stale:  # a stale row still in the file must not count as done
                others = [r for r in others if r not in stale_rows(others, STARTED_AT)]
            rows[:] = [r for r in others if (r["model"], r["config"]) not in mine] + computed
            write_json_atomic(partial, {"settings": settings, "rows": rows}, indent=1)

    test = load_digits_images("test")
    for model_name in args.models:
        _model_rows(model_name, args, rows, keep, test)
    return rows


def _model_rows(model_name: str, args: argparse.Namespace, rows: list[dict], keep, test) -> None:
    """The FP row and every requested config of one model (rows already in `rows` are skipped)."""
    kw = dict(guidance=args.guidance, batch_size=args.batch_size)
    if model_name == t2i.NAME:  # sample i: a held-out phrasing of digit i % 10 through the pipeline
        kw["sample_batch"] = partial(t2i.sample_batch, guidance=args.guidance, steps=t2i.STEPS)
    fp_model = _load_fp(model_name)
    fp, labels, _ = get_samples(fp_model, f"{model_name}-fp", args.n, seed=0, **kw)
    floor, _, _ = get_samples(fp_model, f"{model_name}-fp", args.n, seed=1, **kw)

    def evaluated(model, entry: str, bits: dict, minutes: float, extra: dict) -> dict:
        """The quality row of one compressed model: sample on the FP noise, score, print."""
        method, preset = entry.split(":")
        tag = f"{model_name}-{method}-{preset}"
        shutil.rmtree(set_folder(tag, 0, args.guidance, 20, args.batch_size), ignore_errors=True)  # stale
        samples, _, _ = get_samples(model, tag, args.n, seed=0, **kw)
        figures = evaluate(samples, labels, reference=test, fp_samples=fp, floor_samples=floor)
        row = {
            "model": model_name,
            "config": entry,
            "method": method,
            "preset": preset,
            **bits,
            "quantize_minutes": round(minutes, 2),
            "threads": torch.get_num_threads(),  # of the process that quantized / fine-tuned
            "n": args.n,
            **extra,
            **_figures(model_name, figures),
        }
        print(
            f"   FID {row['fid']:.3f} (floor {row['fid_floor']:.3f})  "
            f"class acc {row['class_accuracy']:.4f}"
            f"  PSNR {row['psnr']:.2f}  total bits {row['total_bits']:.3f}  {minutes:.1f} min"
        )
        return row

    if not _done(rows, model_name, "fp"):
        figures = evaluate(fp, labels, reference=test, floor_samples=floor)
        keep(
            {
                "model": model_name,
                "config": "fp",
                "method": "fp",
                "preset": "w16a16",
                "code_bits": 16.0,
                "total_bits": 16.0,
                "quantize_minutes": 0.0,
                "n": args.n,
                **_figures(model_name, figures),
            }
        )
    entries = model_configs(model_name, args.configs)
    for entry in entries:
        method, preset = entry.split(":")
        done = _done(rows, model_name, entry)
        if done and not _layerwise_lost(args.name, rows, model_name, entry, entries):
            continue
        budget = sensitivity = nominal = None
        if pv_method(method)[0] in SEMI:
            start = PV_BASE[pv_method(method)[0]]
            if not _has_layerwise(args.name, model_name, preset, start):
                print(f"skip {entry}: needs the {start}:{preset} row first (its model is fine-tuned)")
                continue
            print(f"== {model_name} {entry} (SeMI-PV, semi={SEMI[pv_method(method)[0]]}, from {start})")
            model, minutes, extra = _finetuned(args.name, model_name, method, preset, args.pv_steps)
            base = _done(rows, model_name, f"{start}:{preset}")
            bits = {k: base[k] for k in ("code_bits", "total_bits", "layers_quantized", "layers")}
            keep(evaluated(model, entry, bits, minutes, extra))
            continue
        if method in LAQ_EXTRA_BITS and preset in NOMINAL_BITS:
            budget = NOMINAL_BITS[preset] + LAQ_EXTRA_BITS[method]
            # FP-kept layers can put the nominal bits out of reach: then the least the model can reach.
            least = _least_budget(model_name, method, preset, budget)
            if least > budget:
                print(f"{entry}: {budget:g} total bits is out of reach, the least reachable is {least:.3f}")
                budget, nominal = least, budget
        elif method in LAQ_EXTRA_BITS:
            base = _budget_row(rows, model_name, method, preset)
            if base is None:
                print(f"skip {entry}: needs the uniform rows of {preset} for its budget")
                continue
            budget = base["total_bits"] + LAQ_EXTRA_BITS[method]
        if method in LAQ_EXTRA_BITS:  # every LAQ row, below 2 bits too
            table_path, sensitivity = laq_table(args.name, model_name, args.seed, method, preset)
        print(f"== {model_name} {entry}" + (f" (budget {budget:.3f} total bits)" if budget else ""))
        model, report, minutes, cpu_minutes, configs = _quantized(
            model_name, method, preset, budget, args.seed, sensitivity
        )
        if budget is not None and sensitivity is None:
            table = {"commit": STARTED_AT, "sensitivity": report.budget["sensitivity"]}
            write_json_atomic(table_path, table)
        layerwise = {}
        if method in LAYERWISE:  # kept for the PV rows
            _save_layerwise(args.name, model, model_name, preset, method)
            layerwise["layerwise_sha256"] = _layerwise_digest(args.name, model_name, preset, method)
            if done and done.get("layerwise_sha256") == layerwise["layerwise_sha256"]:
                print(f"{entry}: its layer-wise model made again, identical to the row's: the row stands")
                continue
        summary = report.summary()
        bits = {
            "code_bits": summary["code_bits"],
            "total_bits": summary["total_bits_all"],
            "layers_quantized": summary["quantized"],
            "layers": summary["layers"],
        }
        extra = {"cpu_minutes": round(cpu_minutes, 2), **configs, **layerwise}
        if budget is not None:  # minutes of a row with a reused table leave out measuring it
            extra.update(bits_budget=budget, laq_sensitivity="reused" if sensitivity else "measured")
            if nominal is not None:
                extra.update(bits_budget_nominal=nominal)
        keep(evaluated(model, entry, bits, minutes, extra))
        del model


def _budget_row(rows: list[dict], model_name: str, method: str, preset: str) -> dict | None:
    """The row whose total bits a LAQ row's budget starts from: per-channel GPTQ's of the preset, or for
    `BEST_UNIFORM_BUDGET` the best uniform row's once every uniform row of the preset is done; None before."""
    if method not in BEST_UNIFORM_BUDGET:
        return _done(rows, model_name, f"gptq:{preset}")
    uniform = [
        c for c in CONFIGS if c.endswith(f":{preset}") and _uniform_groups(c.split(":")[0])[0] in UNIFORM
    ]
    done = [_done(rows, model_name, c) for c in uniform]
    if not uniform or None in done:
        return None
    return best_uniform(done)[(model_name, preset)]


def _figures(model_name: str, figures: dict) -> dict:
    """The row's figures; `digits-t2i` rows add `prompt_alignment` (the classifier reads the prompted
    digit: `class_accuracy` of samples whose label is their prompt's digit) on held-out phrasings."""
    row = {k: figures[k] for k in FIGURES if k in figures}
    if model_name == t2i.NAME:
        row.update(prompts="held_out", prompt_alignment=figures["class_accuracy"])
    return row


def stale_rows(rows: list[dict], head: str) -> list[dict]:
    """The rows not computed at `head` (`STARTED_AT`: a commit, `+dirty` if the tree had changes) on a
    clean tree: any row of another commit, of a dirty tree, or with no commit at all."""
    current = head.removesuffix("+dirty")
    return [r for r in rows if r.get("commit") != current or r.get("dirty", True)]


# What the table's figures depend on: rows of a pinned commit are compared with HEAD on these paths.
RESULT_PATHS = ("avq", "kernels", "finetune", "benchmarks/quality.py", "benchmarks/sample_sets.py",
                "benchmarks/avq_bench")  # fmt: skip


def changed_since(commit: str) -> list[str]:
    """The files under `RESULT_PATHS` that differ between `commit` and the working tree (tracked files)."""
    out = subprocess.run(
        ["git", "diff", "--name-only", commit, "--", *RESULT_PATHS],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return sorted(out.stdout.split())


def checked_rows(rows: list[dict], head: str, allow_stale: bool, at: str | None = None) -> list[dict]:
    """`rows` for the results file: refused (`SystemExit`, naming them) while any is stale, unless
    `allow_stale`, which marks them `"stale": true` instead. `at`: the commit the table was pinned to (a
    recompute run in a worktree of that commit, e.g. across sessions), which the rows must be of instead
    of `head`."""
    stale = stale_rows(rows, at or head)
    if stale and not allow_stale:
        names = ", ".join(f"{r['model']} {r['config']} ({str(r.get('commit'))[:12]})" for r in stale[:8])
        raise SystemExit(
            f"quality: {len(stale)} rows are not of the current commit {head[:12]} on a clean tree: {names}"
            f"{' ...' if len(stale) > 8 else ''}. Commit, then compute them again (the run skips only "
            "current rows), or pass --allow-stale to publish them marked stale."
        )
    return [{**r, "stale": True} if r in stale else r for r in rows]


def _full_commit(rev: str) -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"quality: --at {rev!r} is not a commit of this repository")
    return out.stdout.strip()


def plot(rows: list[dict], path: Path) -> None:
    """Total bits vs FID per model (log x), the FP row's floor band shaded, each preset's best uniform row
    ringed (`make_tables.best_uniform`)."""
    import matplotlib
    from make_tables import best_uniform

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    markers = {
        "fp": "*",
        "rtn": "x",
        "gptq": "s",
        "gptq-g128": "<",
        "gptq-g64": ">",
        "rtn-g64": "1",
        "avq": "o",
        "avq-seq": "v",
        "avq-laq": "D",
        "avq-laq+0.5": "P",
        "avq-laq-u": "X",
        "avq-rand": "d",
        "avq-pv": "^",
    }
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        for method in markers:
            pts = sorted((r["total_bits"], r["fid"], r["preset"]) for r in mine if r["method"] == method)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[method], label=method)
                for x, y, preset in pts:
                    ax.annotate(preset, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        best = [r for (m, _), r in best_uniform(rows).items() if m == model]
        if best:
            ax.scatter([r["total_bits"] for r in best], [r["fid"] for r in best], s=220, facecolors="none",
                       edgecolors="black", label="best uniform")  # fmt: skip
        fp = next((r for r in mine if r["method"] == "fp"), None)
        if fp is not None:
            ax.axhspan(fp["fid"], fp["fid"] + fp["fid_floor"], color="grey", alpha=0.2, label="FP + floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("total bits per weight (all Linear/Conv2d weights)")
        ax.set_ylabel(f"FID to test split (N={mine[0]['n']})")
        ax.set_title(model)
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda handle: fig.savefig(handle, dpi=120, format="png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=[*MODELS, "digits-unet-mini"])
    choices = [*CONFIGS, *EXTRA_CONFIGS, *T2I_CONFIGS, *PV_CONFIGS]
    parser.add_argument(
        "--configs", nargs="+", default=[*CONFIGS, *T2I_CONFIGS, *PV_CONFIGS], choices=choices
    )
    parser.add_argument(
        "--pv-steps", type=int, default=None, help="SeMI-PV steps (default: FinetuneConfig's)"
    )
    parser.add_argument("--n", type=int, default=1000, help="samples per row (default %(default)s)")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0, help="calibration seed")
    parser.add_argument("--name", default="quality")
    parser.add_argument("--fresh", action="store_true", help="ignore the rows of an interrupted run")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the results JSON")
    parser.add_argument(
        "--collect",
        action="store_true",
        help="write the results JSON and plot from the rows in the partial file (rows computed side by side "
        "by several runs), computing nothing",
    )
    parser.add_argument(
        "--allow-stale",
        action="store_true",
        help="reuse and publish rows of another commit or a dirty tree, marked stale",
    )
    parser.add_argument(
        "--at",
        metavar="COMMIT",
        default=None,
        help="with --collect: the rows are of this commit (a recompute pinned to it, run in a worktree of "
        "it) rather than the current one; the results file names it and the files changed since",
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.at and not args.collect:
        parser.error("--at goes with --collect (a run computes rows at the commit it runs from)")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = default_results_dir()
    if args.plot_only:
        rows = json.loads((results / f"{args.name}.json").read_text())["rows"]
    else:
        if args.collect:
            partial = _partial_path(args.name)
            if not partial.is_file():
                parser.error(f"--collect: no rows yet ({partial} does not exist)")
            rows = json.loads(partial.read_text())["rows"]
        else:
            rows = run(args)
        order = ["fp", *CONFIGS, *EXTRA_CONFIGS, *T2I_CONFIGS, *PV_CONFIGS]
        rank = {m: i for i, m in enumerate([*MODELS, "digits-unet-mini"])}
        rows = sorted(rows, key=lambda r: (rank[r["model"]], order.index(r["config"])))
        at = _full_commit(args.at) if args.at else None
        rows = checked_rows(rows, STARTED_AT, args.allow_stale, at)
        path = write_results(args.name, rows)
        if at is not None:  # the file says which commit its rows are of, and what changed since
            data = json.loads(path.read_text())
            data.update(rows_commit=at, changed_since_rows_commit=changed_since(at))
            write_json_atomic(path, data)
        print(f"wrote {path}")
    plot(rows, results / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
