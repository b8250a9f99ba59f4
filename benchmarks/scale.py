"""Quantizing real-size denoisers through the product's own path: time per layer shape, passes, memory.

    python benchmarks/scale.py --max-seconds 1800            # -> benchmarks/results/scale_<cpu|gpu>.json
    python benchmarks/scale.py --max-seconds 1800 --resume   # continue a run stopped at its time limit
    python benchmarks/scale.py --model sd1.5 --blocks all    # the whole UNet (hours on a CPU)

Models (`--model`; the published configs, `avq_bench.real_configs`, written to the work folder; random
weights, seeded), quantized at W2A8 by `avq.quantize` itself, with its streaming passes
(`--max-hessian-gib`, default: a quarter of the device's free memory), its checkpoint and its default
solver:
  sd1.5  SD 1.5's `UNet2DConditionModel`, calibrated by the reference sampler (DDIM). Default blocks: the
         first down block, the mid block and the up block whose convs have `K = 23,040`.
  sd3    SD3-medium's `SD3Transformer2DModel` (2.0 B weights), calibrated through a
         `StableDiffusion3Pipeline` - its own flow-matching scheduler, guidance and `encode_prompt` - whose
         text encoders and VAE are random stand-ins of the real output widths (CLIP-L 768 and CLIP-G 1280
         pooled, T5-XXL 4096; `avq_bench.stand_ins`): the denoiser sees inputs of the real shapes, and
         avq never quantizes the encoders. Default blocks: the context embedder and the first, middle and
         last joint blocks (the last is context-pre-only).
Layers outside `--blocks` are kept in FP through the config's FP-keep list, so a time-limited run on 2 CPU
cores reaches the largest layers. The calibration is smaller than the default to fit a CPU
(`--num-samples`, `--steps`, `--sample-size`: the latent size; recorded).

Figures: per solved layer its shape, `K`, seconds and seconds per million weights; per pass its wall
time (calibration + solves); peak RSS of the process (and peak GPU memory on CUDA); the total; and the
whole-model time **projected** from the measured seconds per million weights of each layer kind and `K`
(labelled as a projection whenever the run did not quantize every layer). The same script runs on a GPU.
"""

from __future__ import annotations

import _thread
import argparse
import json
import math
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import avq
from avq.calibration.statistics import (
    block_of,
    default_hessian_gib,
    hessian_passes,
    layer_fan_in,
    quantizable_layers,
)
from avq.planning.presets import DEFAULT_KEEP_FP
from avq.run.laq import DOMINATED_BITS
from avq.storage.atomic import write_json_atomic
from avq_bench import stand_ins
from avq_bench.real_configs import SD3_MEDIUM_TRANSFORMER, SD15_UNET
from avq_bench.results import default_results_dir, device_name, device_slug, run_stamp, write_results

MODELS = {
    "sd1.5": ("UNet2DConditionModel", SD15_UNET),
    "sd3": ("SD3Transformer2DModel", SD3_MEDIUM_TRANSFORMER),
}
DEFAULT_BLOCKS = {
    "sd1.5": ("down_blocks.0", "mid_block", "up_blocks.0"),
    "sd3": ("context_embedder", "transformer_blocks.0", "transformer_blocks.12", "transformer_blocks.23"),
}
TINY = {  # --tiny: the same architectures, narrow and shallow (a smoke test of the script)
    "sd1.5": {"block_out_channels": (32, 32, 64, 64), "cross_attention_dim": 64},
    "sd3": {
        "num_layers": 3,
        "num_attention_heads": 2,
        "attention_head_dim": 32,
        "caption_projection_dim": 64,
        "joint_attention_dim": 128,
        "pooled_projection_dim": 64,
    },
}


class TimeLimit(KeyboardInterrupt):
    """Raised from the per-layer callback when `--max-seconds` is over: the checkpoint keeps the layers."""


class MeasuringDone(Exception):
    """Raised from the per-layer callback of an LAQ run at its first solved layer: measuring is over."""


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # ru_maxrss is KiB on Linux


def build(name: str, sample_size: int, device: torch.device, work: Path) -> tuple[nn.Module, Any]:
    """The denoiser (random weights, seed 0; its config written to `work`), and for `sd3` the pipeline
    around it that calibrates it (None for `sd1.5`, which the reference sampler calibrates)."""
    import diffusers

    class_name, config = MODELS[name]
    if name == "sd1.5":
        config = {**config, "sample_size": sample_size}
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps({"_class_name": class_name, **config}, indent=2) + "\n")
    torch.manual_seed(0)
    model = getattr(diffusers, class_name)(**config).to(device).eval()
    if name == "sd1.5":
        return model, None
    return model, sd3_pipeline(model, config, device)


def sd3_pipeline(transformer: nn.Module, config: dict, device: torch.device) -> Any:
    """A `StableDiffusion3Pipeline` around `transformer` with random stand-in encoders whose outputs have
    the widths the transformer reads: two CLIPs whose projections concatenate to `pooled_projection_dim`
    (768 + 1280 for SD3) and whose hidden states are zero-padded to a T5 of `joint_attention_dim`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pooled = config["pooled_projection_dim"]
    clip_l, clip_g = (768, 1280) if pooled == 2048 else (pooled // 2, pooled - pooled // 2)
    tokenizer, tokenizer_2 = stand_ins.clip_tokenizer(), stand_ins.clip_tokenizer(pad_token="!")
    tokenizer_3 = stand_ins.t5_tokenizer()
    small = {"intermediate_size": 64}  # encoders are not what this benchmark measures
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3-medium's scheduler config
        vae=stand_ins.vae(3, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=stand_ins.clip_text_encoder(tokenizer, 1, clip_l, projection_dim=clip_l, **small),
        tokenizer=tokenizer,
        text_encoder_2=stand_ins.clip_text_encoder(tokenizer_2, 2, clip_g, projection_dim=clip_g, **small),
        tokenizer_2=tokenizer_2,
        text_encoder_3=stand_ins.t5_text_encoder(
            tokenizer_3, 4, config["joint_attention_dim"], d_ff=64, d_kv=16
        ),
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="sd1.5", choices=sorted(MODELS))
    parser.add_argument(
        "--blocks", nargs="+", default=None, help="top-level blocks, or all (default: per model)"
    )
    parser.add_argument("--preset", default="w2a8")
    parser.add_argument("--max-seconds", type=float, default=1800, help="stop after this (resumable)")
    parser.add_argument("--max-hessian-gib", type=float, default=None, help="default: half of free memory")
    parser.add_argument("--num-samples", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timesteps-kept", type=int, default=2)
    parser.add_argument("--sample-size", type=int, default=32, help="latent size (64 for 512 px)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=Path("runs/scale"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="narrow and shallow: a smoke test of the script")
    parser.add_argument(
        "--bits-budget",
        type=float,
        default=None,
        help="LAQ: measure the sensitivities (in a work folder of their own), stop when measuring is done, "
        "and compare each layer's measuring with the plain run's solve of it",
    )
    parser.add_argument(
        "--laq-probe", choices=("block", "model"), default="model", help="with --bits-budget: LAQ's probe"
    )
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    args.blocks = args.blocks or list(DEFAULT_BLOCKS[args.model])
    device = torch.device(args.device)
    name = args.model + ("-tiny" if args.tiny else "")
    plain_work, laq_work = args.work / name, args.work / f"{name}-laq"
    laq = args.bits_budget is not None
    work = laq_work if laq else plain_work
    if args.tiny:
        MODELS[args.model] = (MODELS[args.model][0], {**MODELS[args.model][1], **TINY[args.model]})
    started = time.perf_counter()
    model, pipe = build(args.model, args.sample_size, device, work)
    names = quantizable_layers(model)
    wanted = set(names) if args.blocks == ["all"] else {n for n in names if block_of(n) in args.blocks}
    keep = DEFAULT_KEEP_FP + tuple((n, "not in the measured blocks") for n in names if n not in wanted)
    config = avq.preset_config(
        args.preset, keep_fp=keep, bits_budget=args.bits_budget, laq_probe=args.laq_probe
    )
    calibration = avq.CalibrationConfig(
        num_samples=args.num_samples,
        batch_size=args.num_samples,
        num_steps=args.steps,
        num_timesteps_kept=args.timesteps_kept,
        max_hessian_gib=args.max_hessian_gib,
        # the pipeline's image size in pixels (its VAE stand-in halves it): latent `--sample-size`
        **({} if pipe is None else {"height": 2 * args.sample_size, "width": 2 * args.sample_size}),
    )
    plans = {n: avq.planning.plan_layer(n, model.get_submodule(n), config) for n in names}
    todo = [n for n in names if n in wanted and plans[n].quantized]
    layers = {n: (plans[n].kind, math.prod(plans[n].shape[1:]), math.prod(plans[n].shape)) for n in names}
    # The passes `avq.quantize` will make (its default budget, unless given), to label the events; the
    # budget it actually used is read back from its report.
    largest_k = max((layer_fan_in(model, n) for n in todo), default=0)
    budget = args.max_hessian_gib or default_hessian_gib(device, largest_k)
    passes = hessian_passes(model, todo, budget)
    pass_of = {n: i for i, p in enumerate(passes) for n in p}
    # Layers solved by earlier runs of a resumed benchmark, then this run's, kept as they finish.
    log = work / "events.json"
    events: list[dict] = json.loads(log.read_text()) if args.resume and log.is_file() else []
    run = 1 + max((e["run"] for e in events), default=-1)
    deadline = started + args.max_seconds

    def on_layer(row: dict) -> None:
        if laq:  # the first chosen layer is solved: measuring is over, which is what this run times
            raise MeasuringDone
        events.append(
            {**row, "t": time.perf_counter() - started, "pass": pass_of.get(row["name"]), "run": run}
            | run_stamp()  # each layer keeps the commit and command of the run that solved it
        )
        write_json_atomic(log, events)
        if time.perf_counter() > deadline:
            raise TimeLimit

    report = avq.QuantizeReport()
    build_seconds = time.perf_counter() - started
    complete = True
    # A layer of K = 23,040 takes many minutes on a CPU: the deadline also interrupts one mid-solve (the
    # checkpoint keeps every finished layer, and LAQ's measured rows, for --resume).
    # A background job started by a non-interactive shell ignores SIGINT, and `interrupt_main` then does
    # nothing: restore Python's handler first.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    watchdog = threading.Timer(max(deadline - time.perf_counter(), 0.0), _thread.interrupt_main)
    watchdog.daemon = True
    try:
        watchdog.start()  # inside: with --max-seconds 0 it may fire before the call below starts
        avq.quantize(
            model if pipe is None else pipe,  # a pipeline: its denoiser, calibrated by its own __call__
            config,
            calibration,
            checkpoint_dir=work / "checkpoint",
            resume=args.resume,
            on_layer=on_layer,
            report=report,
        )
    except MeasuringDone:
        pass
    except KeyboardInterrupt:  # TimeLimit, or the watchdog
        complete = False
    finally:
        watchdog.cancel()
    seconds = time.perf_counter() - started
    if laq:
        shapes = {n: plans[n].shape for n in names}
        summary = _laq_summary(work, plain_work, todo, layers, shapes, complete, seconds, args)
    else:
        if report.hessian_budget_gib is not None:
            budget, passes = report.hessian_budget_gib, report.passes
        rows = _layer_rows(events) + _pass_rows([e for e in events if e["run"] == run], build_seconds)
        summary = _summary(layers, events, rows, complete, seconds, budget, len(passes), args, device)
        summary["pass_rows"] = [r for r in rows if r["kind"] == "pass"]
    previous = _previous_summary(work, summary["kind"], results_name(args.model, device), args.results_dir)
    summary["peak_rss_gib"] = max(summary["peak_rss_gib"], previous.get("peak_rss_gib", 0.0))  # over runs
    write_json_atomic(work / "summary.json", summary)
    rows = _assemble(plain_work, laq_work, args)
    out = write_results(results_name(args.model, device), rows, device=device, results_dir=args.results_dir)
    print(json.dumps(summary, indent=1))
    print(out)
    return 0


def results_name(model: str, device: torch.device) -> str:
    """`scale_<device>` for SD 1.5 (the first model, whose files keep their names), else
    `scale_<model>_<device>`."""
    return f"scale_{device_slug(device)}" if model == "sd1.5" else f"scale_{model}_{device_slug(device)}"


def _previous_summary(work: Path, kind: str, stem: str, results_dir) -> dict:
    """The summary of earlier runs of this work folder (or, before it kept one, the results file's)."""
    if (work / "summary.json").is_file():
        return json.loads((work / "summary.json").read_text())
    results = Path(results_dir or default_results_dir()) / f"{stem}.json"
    if results.is_file():
        rows = json.loads(results.read_text()).get("rows", [])
        return next((r for r in rows if r.get("kind") == kind and r.get("model") == work.name), {})
    return {}


def _assemble(plain_work: Path, laq_work: Path, args) -> list[dict]:
    """The results file: the plain run's layer, pass and summary rows, then LAQ's (whichever exist)."""
    rows: list[dict] = []
    if (plain_work / "summary.json").is_file():
        summary = json.loads((plain_work / "summary.json").read_text())
        log = plain_work / "events.json"  # none yet when a run stops before its first layer
        events = json.loads(log.read_text()) if log.is_file() else []
        rows += _layer_rows(events) + summary.pop("pass_rows") + [summary]
    if (laq_work / "summary.json").is_file():
        summary = json.loads((laq_work / "summary.json").read_text())
        rows += summary.pop("layer_rows") + [summary]
    return rows


def _laq_summary(work: Path, plain_work: Path, todo, layers, shapes, complete, seconds, args) -> dict:
    """LAQ's measuring per layer (its candidates' short solves and probes) against the plain run's solve of
    the same layer, from the two checkpoints; and in all."""
    manifest_path = work / "checkpoint" / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    measured = manifest.get("laq_measured", {})
    plain_events = plain_work / "events.json"
    plain = [e for e in json.loads(plain_events.read_text()) if e.get("status") == "quantized"] if (
        plain_events.is_file()
    ) else []  # fmt: skip
    # The plain run's fastest solve of a layer of the same shape: some of its solves ran beside other
    # work on the 2 cores and took up to 3.5x longer; the fastest is the uncontended cost.
    fastest: dict[tuple, float] = {}
    for e in plain:
        shape = tuple(e["shape"])
        fastest[shape] = min(fastest.get(shape, math.inf), e["seconds"])
    plain_seconds = {e["name"]: e["seconds"] for e in plain}
    layer_rows = []
    for name, options in measured.items():
        cost = sum(v.get("seconds", 0.0) for v in options.values())
        solve = fastest.get(tuple(shapes[name])) if name in plain_seconds else None
        layer_rows.append(
            {
                **run_stamp(),
                "kind": "laq_layer",
                "layer": name,
                "K": layers[name][1],
                "options": sorted(o for o in options if o != "fp"),
                "probed": sorted(o for o, v in options.items() if v.get("probed")),
                "measure_seconds": cost,
                "plain_solve_seconds": plain_seconds.get(name),
                "plain_fastest_same_shape_seconds": solve,
                "ratio": cost / solve if solve else None,
            }
        )
    both = [r for r in layer_rows if r["ratio"] is not None]
    measure_same = sum(r["measure_seconds"] for r in both)
    plain_same = sum(r["plain_fastest_same_shape_seconds"] for r in both)
    return {
        **run_stamp(),
        "kind": "laq_summary",
        "model": args.model + ("-tiny" if args.tiny else ""),
        "bits_budget": args.bits_budget,
        "measuring_complete": complete and len(measured) == len(todo),
        "layers_measured": len(measured),
        "layers_total": len(todo),
        "measure_seconds_total": manifest.get("laq_measure_seconds"),
        "layers_compared": len(both),
        "measure_seconds_compared": measure_same,
        "plain_solve_seconds_compared": plain_same,
        "ratio_compared": measure_same / plain_same if plain_same else None,
        "ratio_note": "short solves + probes of each measured layer over the plain run's fastest full solve "
        "of a layer of the same shape (calibration passes excluded on both sides)",
        "dominated_bits": DOMINATED_BITS,
        "laq_measure_rounds": avq.preset_config(args.preset).laq_measure_rounds,
        "laq_probe_all": avq.preset_config(args.preset).laq_probe_all,
        "laq_probe": args.laq_probe,
        "seconds_this_run": seconds,
        "peak_rss_gib": peak_rss_gib(),
        "layer_rows": layer_rows,
        "seed": 0,
    }


def _layer_rows(events: list[dict]) -> list[dict]:
    rows = []
    for e in events:
        if e.get("status") != "quantized":
            continue
        weights = math.prod(e["shape"])
        rows.append(
            {
                **{k: e[k] for k in ("commit", "dirty", "command") if k in e},  # the run that solved it
                "kind": "layer",
                "layer": e["name"],
                "shape": e["shape"],
                "K": math.prod(e["shape"][1:]),
                "spec": e["spec"],
                "seconds": e["seconds"],
                "seconds_per_mweight": e["seconds"] / (weights / 1e6),
                "relative_error": e["relative_error"],
                "pass": e["pass"],
            }
        )
    return rows


def _pass_rows(events: list[dict], build_seconds: float) -> list[dict]:
    """Each pass's wall time in this run: from the end of the previous pass's last layer (or the model
    build) to the end of its own last layer, so calibration and solves both count."""
    rows, last_t = [], build_seconds
    for index in sorted({e["pass"] for e in events if e["pass"] is not None}):
        mine = [e for e in events if e["pass"] == index]
        seconds = mine[-1]["t"] - last_t
        rows.append({**run_stamp(), "kind": "pass", "pass": index, "layers": len(mine), "seconds": seconds})
        last_t = mine[-1]["t"]
    return rows


def _summary(layers, events, rows, complete, seconds, budget, n_passes, args, device) -> dict:
    """Totals, memory, and the whole-model time projected from seconds per million weights by (kind, K)."""
    rate: dict[tuple[str, int], float] = {}
    for r in rows:
        if r["kind"] == "layer":
            rate.setdefault(("conv" if len(r["shape"]) == 4 else "linear", r["K"]), r["seconds_per_mweight"])
    projected = 0.0
    for kind, K, weights in layers.values():
        kind = "conv" if kind == "conv2d" else "linear"
        same = [(k, s) for (c, k), s in rate.items() if c == kind] or [(k, s) for (_, k), s in rate.items()]
        if same:  # the nearest measured K of the same kind, scaled by K (the solve's cost per weight ~ K)
            k, s = min(same, key=lambda ks: abs(math.log(ks[0] / K)))
            projected += s * K / k * weights / 1e6
    return {
        **run_stamp(),
        "kind": "summary",
        "model": args.model + ("-tiny" if args.tiny else ""),
        "device": device_name(device),
        "complete": complete,
        "layers_solved": sum(1 for r in rows if r["kind"] == "layer"),
        "layers_done": len(events),
        "runs": 1 + max((e["run"] for e in events), default=0),
        "blocks": args.blocks,
        "seconds_total": seconds,
        "passes": n_passes,
        "hessian_budget_gib": budget,
        "peak_rss_gib": peak_rss_gib(),
        "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "max_K_solved": max((r["K"] for r in rows if r["kind"] == "layer"), default=None),
        "projected_whole_model_solve_seconds": projected,
        "projection": "measured seconds per million weights of the nearest K of the same layer kind, x K "
        "ratio, over every quantizable layer (solves only: calibration passes not included)",
        "calibration": {
            "source": "reference sampler (DDIM)"
            if args.model == "sd1.5"
            else "StableDiffusion3Pipeline, "
            "its flow-matching scheduler and guidance, stand-in text encoders of the real widths",
            "num_samples": args.num_samples,
            "steps": args.steps,
            "timesteps_kept": args.timesteps_kept,
            "sample_size": args.sample_size,
        },
        "config": {"preset": args.preset, "solver": "defaults"},
        "seed": 0,
    }


if __name__ == "__main__":
    sys.exit(main())
