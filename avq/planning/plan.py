"""The plan of a model: which layers are quantized with which spec, and why the others stay in FP.

FP-keep rule (each kept layer's reason is in its report row). A layer stays in full precision when:

1. it is the model's first or last layer (`conv_in`, `conv_out`, the patch embedding `pos_embed.proj`,
   the final projections `proj_out*` of DiT/PixArt; `QuantizeConfig.keep_fp`): few weights, but every
   error there reaches the output unfiltered (keeping just `conv_in`/`conv_out` in FP cut a 2-bit GPTQ
   model's output error 3.4x, docs/design.md);
2. it is a grouped conv or has a non-zero padding mode (the quantized modules cannot represent it);
3. no candidate spec fits it: `K` is not divisible by any candidate group size (e.g. `conv_in` of a
   1-channel model, `K = 9`);
4. every candidate that fits costs more than `code_bits + max_overhead_bits` total bits per weight:
   codebooks and scales are stored in fp16, and on a small layer they outweigh the codes (docs/design.md:
   budget by total bits);
5. it saw no input during calibration (a branch the sampler never calls).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch.nn as nn

from avq.core.bits import total_bits
from avq.core.spec import QuantSpec
from avq.planning.presets import QuantizeConfig


@dataclass(frozen=True)
class LayerPlan:
    name: str
    kind: str  # "linear" | "conv2d"
    shape: tuple[int, ...]
    spec: QuantSpec | None = None  # avq
    bits: int | None = None  # gptq / rtn
    reason: str | None = None  # set when kept in FP
    group_size: int | None = None  # gptq / rtn: inputs per grid (None: one per row)

    @property
    def quantized(self) -> bool:
        return self.reason is None


def plan_layer(name: str, layer: nn.Module, config: QuantizeConfig) -> LayerPlan:
    """Apply the FP-keep rule to one layer and pick its spec (or bits)."""
    kind = "conv2d" if isinstance(layer, nn.Conv2d) else "linear"
    shape = tuple(layer.weight.shape)
    kept = lambda reason: LayerPlan(name, kind, shape, reason=reason)  # noqa: E731
    for pattern, reason in config.keep_fp:
        if fnmatch.fnmatchcase(name, pattern):
            return kept(reason)
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            return kept(f"grouped conv (groups={layer.groups})")
        if layer.padding_mode != "zeros":
            return kept(f"padding_mode={layer.padding_mode!r}")
    limit = math.inf if config.max_overhead_bits is None else config.max_overhead_bits
    if config.method != "avq":
        total = total_bits(shape, config.bits, config.group_size)
        if total > config.bits + limit:
            return kept(
                f"overhead: int{config.bits} would cost {total:.2f} total bits (> {config.bits} + {limit})"
            )
        return LayerPlan(name, kind, shape, bits=config.bits, group_size=config.group_size)
    candidates, fitting = fitting_specs(kind, shape, config)
    K = math.prod(shape[1:])
    if not fitting:
        sizes = ", ".join(str(s.group_size) for s in candidates)
        return kept(f"K={K} not divisible by any candidate group size ({sizes})")
    best = None
    for spec in fitting:
        total = total_bits(shape, spec)
        if total <= spec.code_bits + limit:
            return LayerPlan(name, kind, shape, spec=spec)
        if best is None or total - spec.code_bits < best[1] - best[0].code_bits:
            best = (spec, total)
    spec, total = best
    return kept(
        f"codebook overhead: {spec.name} would cost {total:.2f} total bits for {spec.code_bits:g} code bits "
        f"(limit +{limit:g})"
    )


def fitting_specs(
    kind: str, shape: tuple[int, ...], config: QuantizeConfig
) -> tuple[tuple[QuantSpec, ...], list[QuantSpec]]:
    """(the config's candidates for this layer kind, those whose group size fits the layer)."""
    K = math.prod(shape[1:])
    is_1x1 = kind == "linear" or shape[2] * shape[3] == 1
    candidates = config.linear_specs if is_1x1 else config.conv_specs
    fitting = [
        s
        for s in candidates
        if K % s.group_size == 0 and (s.conv_grouping == "k" or s.group_size == K // shape[1])
    ]
    return candidates, fitting


def laq_floor_bits(name: str, config: QuantizeConfig) -> float:
    """The fewest code bits LAQ may give layer `name`: the highest floor of `QuantizeConfig.laq_floor` whose
    pattern matches it (0: none)."""
    return max((float(b) for p, b in config.laq_floor if fnmatch.fnmatchcase(name, p)), default=0.0)


def above_floor(name: str, options: Iterable, config: QuantizeConfig) -> list:
    """The LAQ options (specs, uniform grids, or FP as a string) LAQ may choose for `name`: none with fewer
    code bits than its floor; FP always."""
    floor = laq_floor_bits(name, config)
    return [o for o in options if isinstance(o, str) or o.code_bits >= floor - 1e-9]


def plan_model(model: nn.Module, config: QuantizeConfig) -> list[LayerPlan]:
    """The plan of every Linear/Conv2d of `model`, in module order."""
    plans = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name:
            plans.append(plan_layer(name, module, config))
    return plans
