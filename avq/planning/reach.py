"""What an LAQ budget can reach: the layer plans `quantize` works from, each layer's cheapest choice, and
the fewest total bits per weight a budget can buy on a model (`minimum_total_bits`)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch.nn as nn

from avq.calibration.statistics import quantizable_layers
from avq.core.bits import FP16_BITS, total_bits
from avq.planning.plan import LayerPlan, above_floor, fitting_specs, plan_model
from avq.planning.presets import QuantizeConfig
from avq.planning.sensitivity import FP


def layer_plans(model: nn.Module, config: QuantizeConfig) -> list[LayerPlan]:
    """The layer plans `quantize` works from; with LAQ, rule 4 (overhead) is left to the budget, so those
    layers are candidates too."""
    plans = plan_model(
        model, config if config.bits_budget is None else replace(config, max_overhead_bits=None)
    )
    quantizable = set(quantizable_layers(model))
    return [
        p if p.name in quantizable or not p.quantized else replace(p, reason="not a quantizable layer")
        for p in plans
    ]


def cheapest_choices(
    plans: list[LayerPlan], config: QuantizeConfig
) -> dict[str, dict[str, tuple[float, float]]]:
    """Each layer's cheapest LAQ choice as a one-option table `{layer: {option: (error, total bits)}}`:
    its fewest-bits candidate spec (uniform grids included) at or above its floor (`laq_floor`), or FP16
    where it is kept in FP."""
    table = {}
    for p in plans:
        if not p.quantized:
            table[p.name] = {FP: (0.0, float(FP16_BITS))}
            continue
        candidates = [*fitting_specs(p.kind, p.shape, config)[1], *config.laq_uniform]
        options = above_floor(p.name, candidates, config)
        table[p.name] = {"min": (0.0, min([total_bits(p.shape, s) for s in options] + [FP16_BITS]))}
    return table


def minimum_total_bits(model: nn.Module, config: QuantizeConfig) -> float:
    """The fewest total bits per weight an LAQ budget can reach on `model` with `config`'s candidates:
    every quantized layer at its cheapest candidate, the FP-kept layers at 16 bits. A `bits_budget` below
    it is refused (`BudgetError`) before calibrating."""
    config = replace(config, bits_budget=config.bits_budget or float(FP16_BITS))  # LAQ's plans and candidates
    plans = layer_plans(model, config)
    sizes = {p.name: math.prod(p.shape) for p in plans}
    cheapest = cheapest_choices(plans, config)
    return sum(next(iter(cheapest[n].values()))[1] * sizes[n] for n in sizes) / max(sum(sizes.values()), 1)
