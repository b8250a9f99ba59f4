"""`avq.quantize`: calibrate, solve layer by layer, apply, checkpoint (docs/design.md, "Data flow").

The plan (`avq.planning`) says which layers are quantized with which spec; this loop collects their
statistics (`avq.calibration`), solves them (`avq.core`), swaps in `AQLinear`/`AQConv2d` and 8-bit input
quantizers, and checkpoints every finished layer (`avq.run.checkpoint`). With an LAQ budget the specs come
from `avq.run.laq` first.

Sequential calibration (`QuantizeConfig.sequential`, `--sequential`): instead of collecting every
Hessian from the FP model up front, the sampler is re-run once per top-level block (`down_blocks.i`,
`mid_block`, `up_blocks.i`, `transformer_blocks.i`, ...; `avq.calibration.block_of`) on the model as
quantized so far (A8 quantizers included), so a block's layers are fitted to the inputs they will see
after the blocks before them are quantized. Costs one sampler run per block.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from avq import distributed
from avq.calibration.activations import (
    ActQuantizer,
    RangeObserver,
    attach_input_quantizer,
    channel_dim_of,
    in_channels_of,
    shortcut_splits,
)
from avq.calibration.config import CalibrationConfig
from avq.calibration.source import CalibrationSource, SamplerSource
from avq.calibration.statistics import (
    DenoiserCalls,
    block_of,
    default_hessian_gib,
    group_by_block,
    hessian_passes,
    layer_fan_in,
)
from avq.core import baselines
from avq.core.aq import quantize_weight
from avq.core.baselines import UniformQuantizedWeight, quantize_weight_gptq, quantize_weight_rtn
from avq.core.modules import replace_module
from avq.core.qweight import QuantizedWeight, code_dtype
from avq.core.uniform_modules import quantized_module
from avq.planning.budget import choose_specs
from avq.planning.plan import LayerPlan
from avq.planning.presets import QuantizeConfig
from avq.planning.reach import cheapest_choices, layer_plans
from avq.run.checkpoint import QuantizeCheckpoint, fingerprint
from avq.run.laq import laq_plans
from avq.run.report import QuantizeReport


def _open_checkpoint(folder: Path, fp: str, resume: bool, ctx: distributed.DistContext) -> QuantizeCheckpoint:
    """The run's checkpoint; under torchrun only the main rank writes it, and every rank first reads it as
    it was (and refuses it alike) before the main rank may change it."""
    if not ctx.distributed:
        return QuantizeCheckpoint(folder, fp, resume)
    snapshot = QuantizeCheckpoint(folder, fp, resume, writable=False)
    distributed.barrier(ctx)
    ckpt = QuantizeCheckpoint(folder, fp, resume) if ctx.is_main else snapshot
    distributed.barrier(ctx)
    return ckpt


def _solve_shared(
    model: nn.Module,
    plans: list[LayerPlan],
    hessians: dict[str, tuple[torch.Tensor, int]],
    config: QuantizeConfig,
    ctx: distributed.DistContext,
) -> dict[str, QuantizedWeight | UniformQuantizedWeight]:
    """Layer `i` of the pass is solved by rank `i % world_size`; every rank then receives every result
    (its stored tensors and `relative_error`/`seconds`), so all ranks end with the same model."""
    results = {}
    for i, plan in enumerate(plans):
        if i % ctx.world_size == ctx.rank:
            results[plan.name] = _solve(model, plan, hessians[plan.name][0], config, spend=True)
            results[plan.name].info["rank"] = ctx.rank
    wire = torch.device("cuda", ctx.local_rank) if ctx.device.type == "cuda" else torch.device("cpu")
    for i, plan in enumerate(plans):
        owner = i % ctx.world_size
        mine = results.get(plan.name)
        tensors = {
            k: v.to(wire) for k, v in (_stored_tensors(mine) if mine else _empty_tensors(plan)).items()
        }
        figures = torch.tensor(
            [mine.info["relative_error"], mine.info.get("seconds", 0.0)] if mine else [0.0, 0.0],
            dtype=torch.float64,
            device=wire,
        )
        distributed.broadcast_([*tensors.values(), figures], ctx, src=owner)
        if mine is None:
            result = _rebuild(plan, {k: v.cpu() for k, v in tensors.items()})
            result.info = {"relative_error": float(figures[0]), "seconds": float(figures[1]), "rank": owner}
            results[plan.name] = result
    return results


def _empty_tensors(plan: LayerPlan) -> dict[str, torch.Tensor]:
    """Receive buffers shaped like the stored tensors of `plan`'s result."""
    out, K = plan.shape[0], math.prod(plan.shape[1:])
    if plan.spec is not None:
        s = plan.spec
        return {
            "codes": torch.zeros(out, K // s.group_size, s.num_codebooks, dtype=code_dtype(s.nbits)),
            "codebooks": torch.zeros(s.num_codebooks, s.codebook_size, s.group_size, dtype=torch.float16),
            "scales": torch.zeros(out, dtype=torch.float16),
        }
    grids = baselines.grid_shape(out, K, plan.group_size)
    return {
        "codes": torch.zeros(out, K, dtype=torch.uint8),
        "scales": torch.zeros(grids, dtype=torch.float16),
        "zeros": torch.zeros(grids, dtype=torch.float16),
    }


def _stored_tensors(result: QuantizedWeight | UniformQuantizedWeight) -> dict[str, torch.Tensor]:
    return {k: getattr(result, k) for k in result._tensors}


def _rebuild(plan: LayerPlan, tensors: dict[str, torch.Tensor]) -> QuantizedWeight | UniformQuantizedWeight:
    if plan.spec is not None:
        return QuantizedWeight(spec=plan.spec, shape=plan.shape, **tensors)
    return UniformQuantizedWeight(bits=plan.bits, shape=plan.shape, group_size=plan.group_size, **tensors)


def _apply(model: nn.Module, plan: LayerPlan, result: QuantizedWeight | UniformQuantizedWeight) -> None:
    replace_module(model, plan.name, quantized_module(model.get_submodule(plan.name), result))


def as_source(calibration: Any, conditioning: torch.Tensor | None = None) -> CalibrationSource | None:
    """The statistics source of a `quantize` call: a `CalibrationConfig` runs the reference sampler
    (`SamplerSource`), a `CalibrationSource` is used as is, ready Hessians have none (None)."""
    if isinstance(calibration, CalibrationConfig):
        return SamplerSource(calibration, conditioning)
    if isinstance(calibration, CalibrationSource):
        return calibration
    if isinstance(calibration, Mapping):
        return None
    raise TypeError(
        "quantize: calibration must be a CalibrationConfig, a CalibrationSource or {layer: Hessian}, got "
        f"{type(calibration).__name__}"
    )


def _solve(
    model: nn.Module, plan: LayerPlan, hessian: torch.Tensor, config: QuantizeConfig, *, spend: bool = False
):
    """Solve one layer: AQ when its plan has a spec, else the uniform grid of `config.method` (GPTQ for an
    avq run's uniform LAQ choice); `spend=True` lets the AQ solver work in `hessian` itself."""
    weight = model.get_submodule(plan.name).weight.detach()
    if plan.spec is not None:
        return quantize_weight(
            weight, hessian, plan.spec, name=plan.name, overwrite_hessian=spend, **asdict(config.solver)
        )
    if config.method in ("avq", "gptq"):
        return quantize_weight_gptq(weight, hessian, plan.bits, group_size=plan.group_size, name=plan.name)
    return quantize_weight_rtn(weight, plan.bits, hessian, group_size=plan.group_size, name=plan.name)


def quantize(
    model: nn.Module,
    config: QuantizeConfig,
    calibration: CalibrationConfig
    | CalibrationSource
    | Mapping[str, torch.Tensor | tuple[torch.Tensor, int]],
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    conditioning: torch.Tensor | None = None,
    on_layer: Callable[[dict], None] | None = None,
    report: QuantizeReport | None = None,
    sensitivity: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Quantize `model` in place and return it (docs/design.md contract). A diffusers pipeline goes to
    `avq.quantize_pipeline` (its denoiser is quantized; the pipeline is returned).

    Pass an empty `QuantizeReport()` as `report` to receive the per-layer table and notes.

    `calibration`: a `CalibrationConfig` (run the FP reference sampler, `avq.calibration.calibrate`), a
    `CalibrationSource` (e.g. a pipeline's own sampler, `avq.quantize_pipeline`), or ready Hessians
    `{name: H [K, K]}` (or `(H, n_rows)`). Hessians are collected from the FP model before any
    layer is replaced, or with `config.sequential` block by block from the model quantized so far.
    `on_layer(row)` is called after each layer is finished (and checkpointed). See the module docstring
    for the FP-keep rule and resume.
    `sensitivity` (LAQ only): a table measured by an earlier run of the same model, calibration and
    candidates (`report.budget["sensitivity"]`, also in `avq quantize --json`): the choice under this
    budget is made from it without measuring again (budget sweeps), and only the chosen specs are solved.
    """
    from tqdm.auto import tqdm

    from avq.pipelines.quantize import is_pipeline, quantize_pipeline

    if is_pipeline(model):  # a DiffusionPipeline: its denoiser, calibrated on the pipeline itself
        if conditioning is not None or not (
            calibration is None or isinstance(calibration, CalibrationConfig)
        ):
            raise TypeError("quantize: a pipeline takes a CalibrationConfig (its own sampler and encoders)")
        options = dict(checkpoint_dir=checkpoint_dir, resume=resume, progress=progress, on_layer=on_layer)
        return quantize_pipeline(
            model, config, calibration, report=report, sensitivity=sensitivity, **options
        )

    plans = layer_plans(model, config)
    todo = [p for p in plans if p.quantized]
    if config.bits_budget is not None:  # fail before calibrating when even the cheapest choice is over
        choose_specs(
            cheapest_choices(plans, config), {p.name: math.prod(p.shape) for p in plans}, config.bits_budget
        )
    source = as_source(calibration, conditioning)
    ctx = distributed.current(next(model.parameters()).device)
    if ctx.distributed and (source is None or config.sequential or config.bits_budget is not None):
        raise ValueError(
            "quantize under torchrun shards the streaming passes: it takes a calibration (not ready "
            "Hessians) and neither sequential calibration nor an LAQ budget"
        )
    ckpt = None
    if checkpoint_dir is not None:
        identity = source.to_dict() if source is not None else calibration
        ckpt = _open_checkpoint(Path(checkpoint_dir), fingerprint(model, config, identity), resume, ctx)
    done = ckpt.done if ckpt else {}

    # Statistics: from the FP model before anything is replaced, or (sequential) per block, below.
    pending = [p.name for p in todo if p.name not in done]
    a8 = config.activation_bits < 16
    if (a8 or config.sequential) and source is None:
        raise ValueError(
            "quantize: 8-bit activations and sequential calibration need a CalibrationConfig (they run the "
            "sampler), not ready Hessians"
        )
    quantizers: dict[str, ActQuantizer] = ckpt.load_quantizers() if ckpt and a8 else {}
    # Each layer's place in the plan seeds its range observer: the same in any pass and after a resume.
    order = {p.name: i for i, p in enumerate(todo)}
    hessians: dict[str, tuple[torch.Tensor, int]] = {}
    # The passes of one run calibrate the same FP model: the first samples, the rest replay its kept calls.
    # Sequential calibration runs each block on the model quantized so far, so it samples every time.
    replay = None if config.sequential else DenoiserCalls()

    def statistics(names: list[str]) -> dict[str, tuple[torch.Tensor, int]]:
        """Hessians (and, for A8, ranges into `quantizers`) of `names`: from the checkpoint or calibrated."""
        stored = ckpt.load_hessians(names) if ckpt and names else None
        if stored is not None and (not a8 or set(names) <= set(quantizers)):
            return stored
        observers = _range_observers(model, names, config, order) if a8 else {}
        result = source.statistics(model, names, observers=observers, progress=progress, replay=replay)
        quantizers.update({n: o.quantizer(config.activation_bits) for n, o in observers.items() if o.count})
        if ckpt:
            ckpt.save_statistics(result, quantizers)
        return result

    # Streaming (the default): passes of layers whose Hessians fit the budget, each calibrated on the FP
    # model, solved and freed before the next; the solved layers are applied after the last pass. LAQ
    # measures in the same kind of passes, then the chosen specs are solved in passes of their own.
    passes: list[list[str]] = []
    budget: float | None = None
    if source is not None:
        if not config.sequential:
            budget = source.config.max_hessian_gib
            if budget is None:
                largest_k = max((layer_fan_in(model, p.name) for p in todo), default=0)
                budget = default_hessian_gib(next(model.parameters()).device, largest_k)
            # Over every layer, finished or not: a resumed run meets the same passes as the interrupted one.
            passes = hessian_passes(model, [p.name for p in todo], budget)
    else:
        hessians = {}
        for name in pending:
            if name not in calibration:
                raise ValueError(f"quantize: no Hessian given for layer {name!r}")
            value = calibration[name]
            hessians[name] = value if isinstance(value, tuple) else (value, -1)

    report = QuantizeReport() if report is None else report
    report.method, report.preset = config.method, config.preset
    solved: dict[str, QuantizedWeight] = {}
    if config.bits_budget is not None:
        plans, solved = laq_plans(
            model,
            plans,
            config,
            source,
            conditioning,
            ckpt,
            progress,
            report,
            sensitivity,
            statistics=statistics if source is not None else lambda names: {n: hessians[n] for n in names},
            passes=passes if source is not None else [pending],
        )
        todo = [p for p in plans if p.quantized]
        if passes:  # the chosen layers only (the same after a resume: the choice is checkpointed)
            passes = hessian_passes(model, [p.name for p in todo], budget)
    if passes:
        report.hessian_budget_gib, report.passes = budget, passes
    rows: dict[str, dict] = {}
    blocks = group_by_block([p.name for p in todo])
    pass_of = {name: i for i, names in enumerate(passes) for name in names}
    deferred: list[tuple[LayerPlan, QuantizedWeight | UniformQuantizedWeight]] = []

    def install(plan: LayerPlan, result: QuantizedWeight | UniformQuantizedWeight) -> None:
        """Apply a solved layer now (sequential: later blocks calibrate on it) or after the last pass."""
        if not config.sequential:
            deferred.append((plan, result))
            return
        _apply(model, plan, result)
        if a8:
            attach_input_quantizer(model.get_submodule(plan.name), quantizers[plan.name])

    bar = tqdm(todo, desc=f"quantize ({config.method})", unit="layer", disable=not progress)
    for plan in bar:
        bar.set_postfix_str(plan.name[-40:])
        if plan.name in done:
            if done[plan.name]["status"] == "quantized":
                install(plan, _rebuild(plan, ckpt.load_layer(plan.name)))
            rows[plan.name] = done[plan.name]
            continue
        if plan.name not in hessians:  # the first unfinished layer of its pass (sequential: its block)
            names = passes[pass_of[plan.name]] if passes else blocks[block_of(plan.name)]
            hessians = {}  # free the previous pass's Hessians before collecting the next
            hessians = statistics([n for n in names if n not in done])
            if ctx.distributed:  # the ranks solve the pass's layers in turn and share the results
                pass_plans = [p for p in todo if p.name in hessians and hessians[p.name][1] > 0]
                solved = _solve_shared(model, pass_plans, hessians, config, ctx)
        hessian, n_rows = hessians.pop(plan.name)  # freed once solved: a pass never holds a spent Hessian
        if n_rows == 0:
            rows[plan.name] = _kept_row(plan, "no calibration input (never called while sampling)")
            continue
        start = time.perf_counter()
        # Calibrated Hessians are the run's own; Hessians the caller passed in are not to be overwritten.
        result = solved.get(plan.name) or _solve(model, plan, hessian, config, spend=source is not None)
        del hessian
        install(plan, result)
        row = {
            "name": plan.name,
            "kind": plan.kind,
            "shape": list(plan.shape),
            "status": "quantized",
            "spec": plan.spec.name if plan.spec else baselines.uniform_name(plan.bits, plan.group_size),
            "code_bits": result.code_bits,
            "total_bits": result.total_bits,
            "relative_error": float(result.info["relative_error"]),
            "seconds": round(result.info.get("seconds", time.perf_counter() - start), 3),
            "n_rows": int(n_rows),
        }
        if ctx.distributed:
            row["rank"] = result.info["rank"]  # the process that solved it
        if report.budget is not None:
            row["sensitivity"] = (
                report.budget["sensitivity"].get(plan.name, {}).get(row["spec"], {}).get("error")
            )
        rows[plan.name] = row
        if ckpt:
            ckpt.save_layer(plan.name, row, _stored_tensors(result))
        if on_layer is not None:
            on_layer(row)
    bar.close()
    hessians = {}
    for plan, result in deferred:
        _apply(model, plan, result)
        if a8:
            attach_input_quantizer(model.get_submodule(plan.name), quantizers[plan.name])
    if len(passes) > 1:
        report.notes.append(
            f"streamed: {len(passes)} calibration passes, each within {budget:.3g} GiB of Hessian "
            "accumulators, solved and freed in turn"
        )
    if config.sequential:
        report.notes.append(
            f"sequential: calibrated block by block ({len(blocks)} blocks) on the model quantized so far"
        )
    if a8:
        quantized = [name for name, row in rows.items() if row["status"] == "quantized"]
        for name in quantized:
            rows[name]["activation_splits"] = list(quantizers[name].splits)
        n_split = sum(1 for name in quantized if quantizers[name].splits)
        report.notes.append(
            f"A{config.activation_bits}: inputs of {len(quantized)} quantized layers fake-quantized "
            f"({n_split} with split ranges at skip concatenations); FP-kept layers keep FP inputs"
        )
    if ckpt:
        ckpt.finish()
    report.rows = [rows.get(p.name) or _kept_row(p, p.reason) for p in plans]
    return model


def _range_observers(
    model: nn.Module, names: list[str], config: QuantizeConfig, order: dict[str, int]
) -> dict[str, RangeObserver]:
    """One activation-range observer per layer (seeded by its place in the plan, `order`); split at the
    skip concatenation where there is one."""
    splits = shortcut_splits(model) if config.split_shortcuts else {}
    observers = {}
    for name in names:
        layer = model.get_submodule(name)
        split = [splits[name]] if name in splits else []
        observers[name] = RangeObserver(in_channels_of(layer), split, channel_dim_of(layer), seed=order[name])
    return observers


def _kept_row(plan: LayerPlan, reason: str) -> dict:
    return {
        "name": plan.name,
        "kind": plan.kind,
        "shape": list(plan.shape),
        "status": "kept_fp",
        "spec": None,
        "code_bits": None,
        "total_bits": None,
        "relative_error": None,
        "seconds": 0.0,
        "reason": reason,
    }
