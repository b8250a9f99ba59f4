"""LAQ inside the quantize run: candidates per layer, measuring (or a given table), the choice.

LAQ (`QuantizeConfig.bits_budget`, `--bits-budget B`): instead of the first fitting spec, each layer that
passes rules 1-3 and 5 gets every fitting candidate spec (rule 4's overhead limit is dropped: the budget
counts total bits itself) plus FP. With a budget, `preset_config` offers the same candidates at every
preset, `LAQ_SPECS` (2-bit `1x8g4`, `1x4g2`; 4-bit `2x8g4`, `2x4g2`): the budget, not the preset, sets
the weight bits, so a W2 budget a little above 2 bits can buy 4 bits for the few layers that matter;
`avq.planning` measures each option's effect on the model output and an integer program picks one per layer
so that the total bits per weight over *all* Linear/Conv2d weights (FP-kept ones at 16, as
`QuantizeReport.summary()["total_bits_all"]`) stay within `B`. The choice and the sensitivity table are
in `QuantizeReport.budget`. Candidates are measured with a short solve (`laq_measure_rounds`), the chosen
specs then solved in full.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn

from avq.calibration.source import CalibrationSource
from avq.core.bits import FP16_BITS
from avq.core.qweight import QuantizedWeight
from avq.core.spec import QuantSpec
from avq.planning.budget import choose_specs
from avq.planning.plan import LayerPlan, fitting_specs
from avq.planning.presets import QuantizeConfig
from avq.planning.sensitivity import FP, SensitivityTable, make_probe, measure_sensitivity
from avq.run.checkpoint import QuantizeCheckpoint
from avq.run.report import QuantizeReport


def laq_plans(
    model: nn.Module,
    plans: list[LayerPlan],
    hessians: dict[str, tuple[torch.Tensor, int]],
    config: QuantizeConfig,
    source: CalibrationSource | None,
    conditioning: torch.Tensor | None,
    ckpt: QuantizeCheckpoint | None,
    progress: bool,
    report: QuantizeReport,
    sensitivity: Mapping[str, Any] | None = None,
) -> tuple[list[LayerPlan], dict[str, QuantizedWeight]]:
    """Replace each quantizable plan's spec by the LAQ choice (`avq.planning`); return the new plans and the
    already solved weights of the chosen specs. A resumed run reuses the choice stored in the checkpoint
    (the finished layers were solved with it)."""
    candidates: dict[str, list] = {}
    forced: dict[str, str] = {}  # layers kept in FP whatever the budget: they count 16 bits in it
    for p in plans:
        if not p.quantized or hessians.get(p.name, (None, 1))[1] == 0:
            forced[p.name] = p.reason or "no calibration input (never called while sampling)"
            candidates[p.name] = [FP]
        else:
            candidates[p.name] = [*fitting_specs(p.kind, p.shape, config)[1], FP]
    solved: dict[str, QuantizedWeight] = {}
    if ckpt is not None and "laq" in ckpt.manifest:
        report.budget = ckpt.manifest["laq"]
    else:
        sizes = {p.name: math.prod(p.shape) for p in plans}
        if sensitivity is not None:
            table = SensitivityTable.from_dict(sensitivity, candidates, sizes)
            report.notes.append("LAQ: sensitivity table given (reused, not measured)")
        else:
            table = measure_laq(model, candidates, hessians, config, source, conditioning, progress)
            for name in [n for n, opts in candidates.items() if opts == [FP]]:  # forced FP: fixed cost only
                table.errors[name], table.bits[name] = {FP: 0.0}, {FP: float(FP16_BITS)}
                table.sizes[name] = sizes[name]
        choice = choose_specs(table, table.sizes, config.bits_budget, verbose=progress)
        report.budget = {**choice.to_dict(), "sensitivity": table.to_dict()}
        solved = {  # only kept when measured with the full solver; otherwise solved again below
            name: table.results[name][key]
            for name, key in choice.choice.items()
            if key in table.results.get(name, {})
        }
        if ckpt is not None:
            ckpt.save_laq(report.budget)
    choice = report.budget["choice"]
    specs = {s.name: s for opts in candidates.values() for s in opts if isinstance(s, QuantSpec)}
    new_plans = []
    for p in plans:
        key = choice.get(p.name, FP)
        if p.name in forced:
            new_plans.append(replace(p, spec=None, reason=forced[p.name]))
        elif key == FP:
            new_plans.append(replace(p, spec=None, reason="LAQ: FP chosen under the bit budget"))
        else:
            new_plans.append(replace(p, spec=specs[key], reason=None))
    report.notes.append(
        f"LAQ: budget {report.budget['budget_total_bits']:g} total bits per weight over all Linear/Conv2d "
        f"weights, chosen {report.budget['total_bits']:.3f} (predicted output error "
        f"{report.budget['predicted_error']:.3g})"
    )
    return new_plans, solved


def measure_laq(
    model: nn.Module,
    candidates: dict[str, list],
    hessians: dict[str, tuple[torch.Tensor, int]],
    config: QuantizeConfig,
    source: CalibrationSource | None,
    conditioning: torch.Tensor | None,
    progress: bool,
):
    """The LAQ sensitivity table of the layers with a choice, on a small probe of FP sampler inputs."""
    # Ready Hessians come without a sampler: the probe then runs the reference sampler's default probe.
    probe = source.probe(model) if source is not None else make_probe(model, None, conditioning=conditioning)
    measured = [n for n, opts in candidates.items() if opts != [FP]]
    return measure_sensitivity(
        model,
        measured,
        candidates,
        probe,
        hessians,
        solver=config.laq_solver,
        progress=progress,
        keep_results=config.laq_solver == config.solver,  # short solves are redone: don't hold all
    )
