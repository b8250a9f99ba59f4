"""LAQ inside the quantize run: candidates per layer, measuring (or a given table), the choice.

LAQ (`QuantizeConfig.bits_budget`, `--bits-budget B`): instead of the first fitting spec, each layer that
passes rules 1-3 and 5 gets every fitting candidate spec (rule 4's overhead limit is dropped: the budget
counts total bits itself) plus FP. With a budget, `preset_config` offers the same candidates at every
preset, `LAQ_SPECS` (2-bit `1x8g4`, `1x4g2`; 4-bit `2x8g4`, `2x4g2`): the budget, not the preset, sets
the weight bits, so a W2 budget a little above 2 bits can buy 4 bits for the few layers that matter;
`avq.planning` measures each option's effect on the model output and an integer program picks one per layer
so that the total bits per weight over *all* Linear/Conv2d weights (FP-kept ones at 16, as
`QuantizeReport.summary()["total_bits_all"]`) stay within `B`. The choice and the sensitivity table are
in `QuantizeReport.budget`. Candidates are measured with a short solve (`laq_measure_rounds`, default the
initialisation alone) and one probe of the model output per layer (`laq_probe_all` for one per candidate),
the chosen specs then solved in full. `QuantizeConfig.laq_floor` constrains the choice, not the measuring:
every candidate is measured, and a layer under a floor (the conditioning layers, at the preset's code
bits, by default) is not given an option of fewer code bits.

At scale (hundreds of layers, Hessians that do not fit at once) measuring streams in the run's passes and
checkpoints its rows per pass, and a candidate dominated on a layer of that size (`laq_candidates`) is not
measured at all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn

from avq.calibration.source import CalibrationSource
from avq.core.bits import FP16_BITS, total_bits
from avq.core.qweight import QuantizedWeight
from avq.core.spec import QuantSpec, UniformSpec
from avq.planning.block_probe import BlockProbe
from avq.planning.budget import choose_specs
from avq.planning.plan import LayerPlan, above_floor, fitting_specs, laq_floor_bits
from avq.planning.presets import QuantizeConfig
from avq.planning.replay_probe import ReplayProbe
from avq.planning.sensitivity import FP, SensitivityTable, make_probe, measure_sensitivity, option_name
from avq.run.checkpoint import QuantizeCheckpoint
from avq.run.report import QuantizeReport

Statistics = Callable[[list[str]], dict[str, tuple[torch.Tensor, int]]]
# A candidate is not measured on a layer where another of the same code bits has larger codebooks for less
# than this many more total bits per weight: the larger codebook wins there (measured below), so measuring
# the smaller one only costs time (at SD 1.5 sizes it halves the candidates of every large layer).
DOMINATED_BITS = 0.02


def laq_plans(
    model: nn.Module,
    plans: list[LayerPlan],
    config: QuantizeConfig,
    source: CalibrationSource | None,
    conditioning: torch.Tensor | None,
    ckpt: QuantizeCheckpoint | None,
    progress: bool,
    report: QuantizeReport,
    sensitivity: Mapping[str, Any] | None = None,
    *,
    statistics: Statistics,
    passes: list[list[str]],
) -> tuple[list[LayerPlan], dict[str, QuantizedWeight]]:
    """Replace each quantizable plan's spec by the LAQ choice (`avq.planning`); return the new plans and the
    already solved weights of the chosen specs. A resumed run reuses the choice stored in the checkpoint
    (the finished layers were solved with it).

    Measuring streams like the solve: `passes` of layers are calibrated in turn (`statistics(names)`),
    their candidates solved and probed, their Hessians freed; the measured rows are checkpointed after each
    pass, so a resumed run measures only the rest. The chosen specs are then solved in the run's own
    streaming passes, which calibrate again."""
    quantized = [p for p in plans if p.quantized]
    candidates: dict[str, list] = {p.name: [FP] for p in plans}
    forced: dict[str, str] = {p.name: p.reason or "" for p in plans if not p.quantized}
    for p in quantized:
        candidates[p.name] = [*laq_candidates(p, config), FP]
    solved: dict[str, QuantizedWeight] = {}
    if ckpt is not None and "laq" in ckpt.manifest:
        report.budget = ckpt.manifest["laq"]
        forced.update(report.budget.get("forced_fp", {}))
    else:
        sizes = {p.name: math.prod(p.shape) for p in plans}
        if sensitivity is not None:
            for p in quantized:  # layers the earlier run found uncalled: FP-only rows marked "forced"
                if _forced_row(sensitivity.get(p.name)):
                    candidates[p.name], forced[p.name] = [FP], sensitivity[p.name][FP]["forced"]
            table = SensitivityTable.from_dict(sensitivity, candidates, sizes)
            report.notes.append("LAQ: sensitivity table given (reused, not measured)")
        else:
            table, seconds = _measure_streamed(
                model, quantized, candidates, forced, config, (source, conditioning), ckpt, progress,
                statistics, passes,
            )  # fmt: skip
            for name in [n for n, opts in candidates.items() if opts == [FP]]:  # forced FP: fixed cost only
                table.errors[name], table.bits[name] = {FP: 0.0}, {FP: float(FP16_BITS)}
                table.sizes[name] = sizes[name]
        allowed = {n: [option_name(o) for o in above_floor(n, candidates[n], config)] for n in table.errors}
        choice = choose_specs(table.restricted(allowed), table.sizes, config.bits_budget, verbose=progress)
        no_input = {n: r for n, r in forced.items() if r == NO_INPUT}
        rows = table.to_dict()
        for name, reason in no_input.items():
            rows[name][FP]["forced"] = reason
        floors = {n: laq_floor_bits(n, config) for n in table.errors if laq_floor_bits(n, config) > 0}
        report.budget = {**choice.to_dict(), "sensitivity": rows, "forced_fp": no_input, "floor_bits": floors}
        if sensitivity is None:  # wall time of measuring (calibration passes, short solves, probes)
            report.budget["measure_seconds"] = round(seconds, 3)
            report.budget["measured_with"] = {
                "rounds": config.laq_measure_rounds,
                "probe": "every candidate" if config.laq_probe_all else "cheapest candidate per layer",
                "probed_on": "the layer's block (one whole-model probe per block)"
                if config.laq_probe == "block"
                else "the whole model (replayed from the layer's block where the blocks form a chain)",
            }
        solved = {  # only kept when measured with the full solver; otherwise solved again below
            name: table.results[name][key]
            for name, key in choice.choice.items()
            if key in table.results.get(name, {})
        }
        if ckpt is not None:
            ckpt.save_laq(report.budget)
    choice = report.budget["choice"]
    specs = {s.name: s for opts in candidates.values() for s in opts if not isinstance(s, str)}
    new_plans = []
    for p in plans:
        key = choice.get(p.name, FP)
        if p.name in forced:
            new_plans.append(replace(p, spec=None, reason=forced[p.name] or p.reason))
        elif key == FP:
            new_plans.append(replace(p, spec=None, reason="LAQ: FP chosen under the bit budget"))
        elif isinstance(specs[key], UniformSpec):  # a GPTQ grid (`_solve` picks the solver by plan)
            grid = specs[key]
            new_plans.append(replace(p, spec=None, bits=grid.bits, group_size=grid.group_size, reason=None))
        else:
            new_plans.append(replace(p, spec=specs[key], reason=None))
    report.notes.append(
        f"LAQ: budget {report.budget['budget_total_bits']:g} total bits per weight over all Linear/Conv2d "
        f"weights, chosen {report.budget['total_bits']:.3f} (predicted output error "
        f"{report.budget['predicted_error']:.3g})"
    )
    return new_plans, solved


NO_INPUT = "no calibration input (never called while sampling)"


def _measure_streamed(
    model: nn.Module,
    quantized: list[LayerPlan],
    candidates: dict[str, list],
    forced: dict[str, str],
    config: QuantizeConfig,
    sampler: tuple[CalibrationSource | None, torch.Tensor | None],
    ckpt: QuantizeCheckpoint | None,
    progress: bool,
    statistics: Statistics,
    passes: list[list[str]],
) -> tuple[SensitivityTable, float]:
    """The sensitivity table of every quantizable layer, pass by pass (rows restored from the checkpoint
    are not measured again), and the wall seconds measuring took (over resumes). `sampler`: the
    calibration source and conditioning the probe comes from."""
    source, conditioning = sampler
    sizes = {p.name: math.prod(p.shape) for p in quantized}
    measured: dict[str, Any] = dict(ckpt.manifest.get("laq_measured", {})) if ckpt is not None else {}
    for name in measured:
        if _forced_row(measured[name]):
            candidates[name], forced[name] = [FP], NO_INPUT
    table = SensitivityTable.from_dict(measured, {n: candidates[n] for n in measured}, sizes)
    seconds = float(ckpt.manifest.get("laq_measure_seconds", 0.0)) if ckpt is not None else 0.0
    probe = None
    gains = dict(ckpt.manifest.get("laq_block_gains", {})) if ckpt is not None else {}
    wanted = {p.name for p in quantized}
    for names in passes:
        names = [n for n in names if n in wanted and n not in measured]
        if not names:
            continue
        start = time.perf_counter()
        hessians = statistics(names)
        if probe is None and source is not None:
            probe = source.probe(model)
        elif probe is None:  # ready Hessians come without a sampler: the reference sampler's default probe
            probe = make_probe(model, None, conditioning=conditioning)
        if config.laq_probe == "block" and not isinstance(probe, BlockProbe):
            probe = BlockProbe(probe, gains=gains)  # a resume goes on with the gains measured before
        elif config.laq_probe == "model" and not isinstance(probe, ReplayProbe):
            probe = ReplayProbe(probe)  # the same errors, each forward from the layer's block where it can
        for name in names:  # a layer at a time, each checkpointed: large layers take minutes each
            if hessians[name][1] == 0:
                candidates[name], forced[name] = [FP], NO_INPUT
                measured[name] = {FP: {"error": 0.0, "total_bits": float(FP16_BITS), "forced": NO_INPUT}}
            else:
                part = measure_sensitivity(
                    model,
                    [name],
                    candidates,
                    probe,
                    {name: hessians.pop(name)},
                    solver=config.laq_solver,
                    progress=progress,
                    keep_results=config.laq_solver == config.solver,  # short solves are redone
                    probe_all=config.laq_probe_all,
                    spend_hessians=True,  # popped from this pass: the last candidate solves in it
                )
                table.merge(part)
                measured[name] = part.to_dict()[name]
            seconds += time.perf_counter() - start
            start = time.perf_counter()
            if ckpt is not None:
                ckpt.save_laq_measured(measured, seconds, getattr(probe, "gains", None))
        del hessians
    return table, seconds


def _forced_row(row: Mapping[str, Any] | None) -> bool:
    """A table row of a layer kept in FP because it saw no calibration input (not a measured choice)."""
    return bool(row) and set(row) == {FP} and bool(row[FP].get("forced"))


def laq_candidates(plan: LayerPlan, config: QuantizeConfig) -> list[QuantSpec | UniformSpec]:
    """The config's uniform candidates (`laq_uniform`, first: the last AQ candidate may solve in the
    Hessian itself), then the layer's fitting LAQ specs, less those dominated on a layer this size: a spec
    whose codebooks are smaller than another's of the same code bits, where the larger codebooks cost less
    than `DOMINATED_BITS` more total bits per weight (see `DOMINATED_BITS`)."""
    fitting = fitting_specs(plan.kind, plan.shape, config)[1]
    kept = []
    for spec in fitting:
        bits = total_bits(plan.shape, spec)
        dominated = any(
            other.code_bits == spec.code_bits
            and other.codebook_size > spec.codebook_size
            and total_bits(plan.shape, other) - bits < DOMINATED_BITS
            for other in fitting
        )
        if not dominated:
            kept.append(spec)
    return [*config.laq_uniform, *kept]
