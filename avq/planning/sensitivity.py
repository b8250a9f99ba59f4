"""LAQ, part 1: each layer's sensitivity, measured on the model output.

Why on the model output and not the per-layer H-weighted error: whole-model error is dominated by a few
small layers (docs/design.md, "What is already known"), and the mean per-layer error misleads. So the
sensitivity of a (layer, option) pair is the relative MSE of the model's epsilon prediction against the
FP model when that layer *alone* is quantized with that option, measured over a small fixed probe set:
latents of the FP sampler at timesteps spread over the trajectory, with conditioning (and the
classifier-free-guided combination the sampler uses). `avq.planning.budget` then picks one option per
layer under a total-bits budget.

One probe per layer (the default): only the layer's cheapest candidate (fewest total bits) is swapped in
and probed; the other candidates' errors are that probe's error scaled by their Hessian-weighted layer errors
`tr(dW H dW^T) / tr(W H W^T)`, which the solver reports for free. A layer's output error reaches the model
output through the same network whatever spec caused it, so what differs between a layer's candidates is
mostly how large that error is, and that the layer error measures exactly; what differs between layers (how
much the rest of the model amplifies or absorbs a layer's error) is what the probe measures. The probe is a
few whole forward passes, and at SD 1.5 size one per layer instead of one per candidate is what keeps
measuring within the cost of the quantization itself. `probe_all=True` probes every candidate (the
whole-model measure the cheap one is validated against: `benchmarks/laq_measure.py`).

Candidates solved while measuring can be kept in the table (`keep_results`), so that the quantize run
applies the chosen one without solving the layer again.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from avq.calibration.adapters import adapter_for
from avq.calibration.config import REFERENCE_GUIDANCE, REFERENCE_STEPS, CalibrationConfig
from avq.calibration.sampler import SamplerStep, run_sampler
from avq.core.aq import SolverOptions, quantize_weight
from avq.core.baselines import UniformQuantizedWeight, quantize_weight_gptq
from avq.core.bits import FP16_BITS
from avq.core.modules import replace_module
from avq.core.qweight import QuantizedWeight
from avq.core.spec import QuantSpec, UniformSpec
from avq.core.uniform_modules import quantized_module

if TYPE_CHECKING:
    from avq.planning.block_probe import BlockProbe

FP = "fp"
# a QuantSpec (AQ), a UniformSpec (a GPTQ grid), or FP ("fp": keep the layer in full precision)
Option = QuantSpec | UniformSpec | str


class SensitivityTableError(ValueError):
    """A given sensitivity table is not of this model and candidate set."""


def option_name(option: Option) -> str:
    if isinstance(option, (QuantSpec, UniformSpec)):
        return option.name
    if option != FP:
        raise ValueError(f"an option is a QuantSpec, a UniformSpec or {FP!r}, got {option!r}")
    return FP


def solve_option(
    weight: torch.Tensor, hessian: torch.Tensor, option: QuantSpec | UniformSpec, name: str, **solver
) -> QuantizedWeight | UniformQuantizedWeight:
    """One candidate solved against the layer's Hessian: AQ (`solver`: `quantize_weight`'s options) or
    GPTQ."""
    if isinstance(option, UniformSpec):
        return quantize_weight_gptq(weight, hessian, option.bits, group_size=option.group_size, name=name)
    return quantize_weight(weight, hessian, option, name=name, **solver)


# ============================================================================ probe
class SwapProbe:
    """What a probe offers LAQ, given `error(model)` (relative output MSE against FP), `num_inputs` and
    `forward_input(model, i)` (the model run on probe input `i`: `block_probe` records block inputs so)."""

    num_inputs: int

    def error(self, model: nn.Module) -> float:
        raise NotImplementedError

    def forward_input(self, model: nn.Module, i: int) -> None:
        raise NotImplementedError

    def layer_error(self, model: nn.Module, name: str, module: nn.Module) -> float:
        """`error` with layer `name` replaced by `module` (restored after)."""
        layer = model.get_submodule(name)
        replace_module(model, name, module)
        try:
            return self.error(model)
        finally:
            replace_module(model, name, layer)


@dataclass
class Probe(SwapProbe):
    """Fixed model inputs and the FP model's outputs on them.

    `inputs`: one `(x, t, kwargs)` per kept sampler step, x `[n, C, H, W]` (`[2n, ...]` with guidance:
    conditional then null rows); `reference`: the FP epsilon `[n, C, H, W]` of each (guided if
    `guidance_scale` != 1 and the model has a null input).
    """

    adapter: object
    inputs: list[tuple[torch.Tensor, torch.Tensor, dict]]
    guided: bool
    guidance_scale: float
    reference: list[torch.Tensor] = field(default_factory=list)

    @torch.no_grad()
    def outputs(self, model: nn.Module) -> list[torch.Tensor]:
        out = []
        for x, t, kwargs in self.inputs:
            eps = self.adapter.forward(model, x, t, kwargs)
            if self.guided:
                eps_c, eps_u = eps.chunk(2)
                eps = eps_u + self.guidance_scale * (eps_c - eps_u)
            out.append(eps.float())
        return out

    def error(self, model: nn.Module) -> float:
        """Relative MSE of `model`'s outputs against the FP reference (`relative_mse`)."""
        return relative_mse(self.outputs(model), self.reference)

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @torch.no_grad()
    def forward_input(self, model: nn.Module, i: int) -> None:
        x, t, kwargs = self.inputs[i]
        self.adapter.forward(model, x, t, kwargs)


def relative_mse(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """`sum |o - r|^2 / sum |r|^2` over matching output tensors: a probe's error against FP."""
    num = den = 0.0
    for out, ref in zip(outputs, reference, strict=True):
        num += float((out - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return num / den if den > 0 else num


@torch.no_grad()
def make_probe(
    model: nn.Module,
    config: CalibrationConfig | None = None,
    *,
    conditioning: torch.Tensor | None = None,
) -> Probe:
    """Run the FP sampler (`avq.calibration.sampler`, as `calibrate` does); keep its inputs and guided
    outputs at `config.kept_step_indices()`.

    Default: 8 samples, 20 steps, 5 kept timesteps, seed 1234 (not the calibration seed, so the probe is
    not the data the Hessians were fitted on).
    """
    config = config or CalibrationConfig(num_samples=8, batch_size=8, num_timesteps_kept=5, seed=1234)
    config = config.resolved(REFERENCE_STEPS, REFERENCE_GUIDANCE)
    adapter = adapter_for(model, conditioning=conditioning, prompt_tokens=config.prompt_tokens)
    kept = set(config.kept_step_indices())
    generator = torch.Generator().manual_seed(config.seed)
    n = config.num_samples  # one batch: the probe is small by design
    x = torch.randn((n, *adapter.latent_shape), generator=generator)
    cond, null = adapter.make_conditions(n, generator)
    probe = Probe(adapter, [], null is not None and config.guidance_scale != 1, float(config.guidance_scale))

    def keep(step: SamplerStep) -> None:
        if step.index in kept:
            probe.inputs.append((step.model_input.clone(), step.t, step.kwargs))
            probe.reference.append(step.eps.float())

    was_training = model.training
    model.eval()
    try:
        run_sampler(
            model,
            adapter,
            x,
            cond,
            null,
            steps=config.num_steps,
            guidance=config.guidance_scale,
            after_step=keep,
        )
    finally:
        model.train(was_training)
    return probe


# ============================================================================ sensitivity
@dataclass
class SensitivityTable:
    """`errors[layer][option]`: whole-model relative output MSE with only that layer quantized;
    `bits[layer][option]`: total bits per weight; `sizes[layer]`: number of weights;
    `options[layer][option]`: the option object; `results[layer][option]`: its solved `QuantizedWeight`;
    `seconds[layer][option]`: what measuring it cost (solve + probe), where measured;
    `layer_errors[layer][option]`: the solver's Hessian-weighted relative error of the layer itself;
    `probed[layer]`: the options whose `errors` were probed (the others are scaled from them)."""

    errors: dict[str, dict[str, float]] = field(default_factory=dict)
    bits: dict[str, dict[str, float]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    options: dict[str, dict[str, Option]] = field(default_factory=dict)
    results: dict[str, dict[str, QuantizedWeight | UniformQuantizedWeight]] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    layer_errors: dict[str, dict[str, float]] = field(default_factory=dict)
    probed: dict[str, list[str]] = field(default_factory=dict)

    def merge(self, other: SensitivityTable) -> None:
        """Add `other`'s layers (measured in another pass) to this table."""
        for f in fields(self):  # every field is a dict keyed by layer
            getattr(self, f.name).update(getattr(other, f.name))

    def restricted(self, allowed: Mapping[str, Sequence[str]]) -> SensitivityTable:
        """A copy with only the `allowed[layer]` options of each layer in `allowed` (the others whole): the
        choice under `QuantizeConfig.laq_floor` from a table measured with every candidate."""
        table = SensitivityTable(sizes=dict(self.sizes))
        for f in fields(self):
            if f.name == "sizes":
                continue
            for name, per_option in getattr(self, f.name).items():
                keep = allowed.get(name, per_option)
                if isinstance(per_option, list):  # `probed`
                    getattr(table, f.name)[name] = [o for o in per_option if o in keep]
                else:
                    getattr(table, f.name)[name] = {o: v for o, v in per_option.items() if o in keep}
        return table

    def to_dict(self) -> dict:
        def entry(name: str, o: str) -> dict:
            row = {"error": self.errors[name][o], "total_bits": self.bits[name][o]}
            if o in self.seconds.get(name, {}):
                row["seconds"] = round(self.seconds[name][o], 3)
            if o in self.layer_errors.get(name, {}):
                row["layer_error"] = self.layer_errors[name][o]
                row["probed"] = o in self.probed.get(name, ())
            return row

        return {name: {o: entry(name, o) for o in self.errors[name]} for name in self.errors}

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Mapping[str, Mapping[str, float]]],
        candidates: Mapping[str, Sequence[Option]],
        sizes: Mapping[str, int],
    ) -> SensitivityTable:
        """A table measured earlier (`to_dict()`, e.g. `QuantizeReport.budget["sensitivity"]`), checked
        against this run's `candidates` per layer: the errors are reused, so they must be of the same layers
        and options (a table of another model or candidate set is refused). No solved weights come with it."""
        if not isinstance(data, Mapping):
            raise SensitivityTableError(
                "sensitivity table: expected {layer: {option: {error, total_bits}}}, got "
                f"{type(data).__name__}"
            )
        table = cls()
        for name, options in candidates.items():
            expected = {option_name(o) for o in options}
            given = data.get(name)
            if given is None or set(given) != expected:
                got = "missing" if given is None else f"options {sorted(given)}"
                raise SensitivityTableError(
                    f"sensitivity table does not match this model and candidate specs: layer {name!r} is "
                    f"{got}, expected options {sorted(expected)} (measure it again: run without the table)"
                )
            table.sizes[name] = int(sizes[name])
            for key, option in zip(map(option_name, options), options, strict=True):
                entry = given[key]
                table.options.setdefault(name, {})[key] = option
                table.errors.setdefault(name, {})[key] = float(entry["error"])
                table.bits.setdefault(name, {})[key] = float(entry["total_bits"])
                if "seconds" in entry:
                    table.seconds.setdefault(name, {})[key] = float(entry["seconds"])
                if "layer_error" in entry:  # how it was measured travels with the reused table
                    table.layer_errors.setdefault(name, {})[key] = float(entry["layer_error"])
                    if entry.get("probed"):
                        table.probed.setdefault(name, []).append(key)
        extra = sorted(set(data) - set(candidates))
        if extra:
            raise SensitivityTableError(
                f"sensitivity table has layers this model does not quantize: {extra[:5]}"
            )
        return table


def measure_sensitivity(
    model: nn.Module,
    layer_names: Sequence[str],
    candidates: Mapping[str, Sequence[Option]],
    probe: SwapProbe | BlockProbe,
    hessians: Mapping[str, torch.Tensor | tuple[torch.Tensor, int]],
    *,
    solver: SolverOptions | None = None,
    progress: bool = False,
    keep_results: bool = True,
    probe_all: bool = False,
    spend_hessians: bool = False,
) -> SensitivityTable:
    """For each layer and each of its candidate options, the model's output error with that layer alone
    quantized: every candidate is solved with `quantize_weight` against the layer's Hessian; the cheapest
    (or with `probe_all` each) is swapped in, probed and swapped back, and the others' errors are scaled
    from it by their layer errors (module docstring).

    FP costs no probe: its error is 0 by definition. The model is left exactly as it was given. With
    `keep_results=False` the solved weights are dropped after measuring (they will be solved again anyway).
    `spend_hessians=True` hands each float32 Hessian to the solve of its layer's last candidate, which
    works in it instead of a copy (`quantize_weight(overwrite_hessian=True)`: one `[K, K]` buffer fewer,
    2 GiB at SD 1.5's `K = 23,040`); the Hessians hold garbage afterwards.
    """
    from dataclasses import asdict

    from tqdm.auto import tqdm

    solver = solver or SolverOptions()
    table = SensitivityTable()
    bar = tqdm(total=sum(len(candidates[n]) for n in layer_names), desc="LAQ sensitivity", unit="option",
               disable=not progress)  # fmt: skip
    for name in layer_names:
        layer = model.get_submodule(name)
        table.sizes[name] = layer.weight.numel()
        H = hessians[name]
        H = H[0] if isinstance(H, tuple) else H
        solved: dict[str, QuantizedWeight | UniformQuantizedWeight] = {}  # this layer's, until probed
        last = [o for o in candidates[name] if option_name(o) != FP][-1:]  # spent if AQ (GPTQ copies)
        for option in candidates[name]:
            key = option_name(option)
            table.options.setdefault(name, {})[key] = option
            bar.set_postfix_str(f"{name[-32:]} {key}")
            bar.update()
            if key == FP:
                table.errors.setdefault(name, {})[key] = 0.0
                table.bits.setdefault(name, {})[key] = float(FP16_BITS)
                continue
            start = time.perf_counter()
            spend = spend_hessians and [option] == last
            options = {"overwrite_hessian": spend, **asdict(solver)} if isinstance(option, QuantSpec) else {}
            solved[key] = solve_option(layer.weight.detach(), H, option, name, **options)
            table.bits.setdefault(name, {})[key] = float(solved[key].total_bits)
            table.layer_errors.setdefault(name, {})[key] = float(solved[key].info["relative_error"])
            table.seconds.setdefault(name, {})[key] = time.perf_counter() - start
        if not solved:
            continue
        cheapest = min(solved, key=lambda k: (table.bits[name][k], table.layer_errors[name][k]))
        table.probed[name] = sorted(solved) if probe_all else [cheapest]
        for key in table.probed[name]:
            start = time.perf_counter()
            error = probe.layer_error(model, name, quantized_module(layer, solved[key]))
            table.errors.setdefault(name, {})[key] = error
            table.seconds[name][key] += time.perf_counter() - start
        layer_errors = table.layer_errors[name]
        # The output error per unit of layer error: how much the rest of the model amplifies this layer's.
        gain = table.errors[name][cheapest] / layer_errors[cheapest] if layer_errors[cheapest] > 0 else 0.0
        for key in solved:
            if key not in table.probed[name]:
                table.errors[name][key] = gain * layer_errors[key]
        table.errors[name] = {k: table.errors[name][k] for k in table.options[name]}  # candidate order
        if keep_results:
            table.results[name] = solved
    bar.close()
    return table
