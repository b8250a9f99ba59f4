"""LAQ: per-layer specs chosen under a global bit budget, from each layer's effect on the model output.

Why on the model output and not the per-layer H-weighted error: whole-model error is dominated by a few
small layers (design.md, "What is already known"), and the mean per-layer error misleads. So the
sensitivity of a (layer, option) pair is the relative MSE of the model's epsilon prediction against the
FP model when that layer *alone* is quantized with that option, measured over a small fixed probe set:
latents of the FP DDIM sampler at timesteps spread over the trajectory, with conditioning (and the
classifier-free-guided combination the sampler uses). Errors of different layers are then treated as
additive, and an integer program (`scipy.optimize.milp`) picks one option per layer minimising the summed
sensitivity subject to a budget on TOTAL bits per weight (codes + codebooks + scales, FP at 16): on small
layers the codebook overhead decides (design.md: budget by total bits).

Every candidate `QuantizedWeight` solved while measuring is kept in the table, so the pipeline applies
the chosen one without solving the layer again.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from .aq import SolverOptions, quantize_weight
from .calibration import CalibrationConfig, _cat_kwargs, _to, adapter_for, make_ddim_scheduler
from .modules import AQModule, replace_module
from .qweight import QuantizedWeight
from .spec import QuantSpec

FP = "fp"
FP16_BITS = 16
Option = QuantSpec | str  # a QuantSpec, or FP ("fp": keep the layer in full precision)


class BudgetError(ValueError):
    """The bit budget cannot be met, even with the cheapest option of every layer."""


class SensitivityTableError(ValueError):
    """A given sensitivity table is not of this model and candidate set."""


def option_name(option: Option) -> str:
    if isinstance(option, QuantSpec):
        return option.name
    if option != FP:
        raise ValueError(f"an option is a QuantSpec or {FP!r}, got {option!r}")
    return FP


# ============================================================================ probe
@dataclass
class Probe:
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
        """Relative MSE of `model`'s outputs against the FP reference: sum |e - e_fp|^2 / sum |e_fp|^2."""
        num = den = 0.0
        for eps, ref in zip(self.outputs(model), self.reference, strict=True):
            num += float((eps - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
        return num / den if den > 0 else num


@torch.no_grad()
def make_probe(
    model: nn.Module,
    config: CalibrationConfig | None = None,
    *,
    conditioning: torch.Tensor | None = None,
) -> Probe:
    """Run the FP DDIM sampler (as `calibrate` does) and keep its inputs at `config.kept_step_indices()`.

    Default: 8 samples, 20 steps, 5 kept timesteps, seed 1234 (not the calibration seed, so the probe is
    not the data the Hessians were fitted on).
    """
    config = config or CalibrationConfig(
        num_samples=8, batch_size=8, num_steps=20, num_timesteps_kept=5, seed=1234
    )
    adapter = adapter_for(model, conditioning=conditioning, prompt_tokens=config.prompt_tokens)
    scheduler = make_ddim_scheduler()
    scheduler.set_timesteps(config.num_steps)
    kept = set(config.kept_step_indices())
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    generator = torch.Generator().manual_seed(config.seed)
    n = config.num_samples  # one batch: the probe is small by design
    x = torch.randn((n, *adapter.latent_shape), generator=generator)
    cond, null = adapter.make_conditions(n, generator)
    guided = null is not None and config.guidance_scale != 1
    kwargs = _to(_cat_kwargs(cond, null) if guided else cond, device, dtype)
    x = x.to(device, dtype)
    probe = Probe(adapter, [], guided, float(config.guidance_scale))
    was_training = model.training
    model.eval()
    try:
        for i, t in enumerate(scheduler.timesteps):
            x_in = torch.cat([x, x]) if guided else x  # [n or 2n, C, H, W]
            t_in = t.to(device)
            eps = Probe(adapter, [(x_in, t_in, kwargs)], guided, probe.guidance_scale).outputs(model)[0]
            if i in kept:
                probe.inputs.append((x_in.clone(), t_in, kwargs))
                probe.reference.append(eps)
            x = scheduler.step(eps.to(dtype), t, x).prev_sample
    finally:
        model.train(was_training)
    return probe


# ============================================================================ sensitivity
@dataclass
class SensitivityTable:
    """`errors[layer][option]`: whole-model relative output MSE with only that layer quantized;
    `bits[layer][option]`: total bits per weight; `sizes[layer]`: number of weights;
    `options[layer][option]`: the option object; `results[layer][option]`: its solved `QuantizedWeight`."""

    errors: dict[str, dict[str, float]] = field(default_factory=dict)
    bits: dict[str, dict[str, float]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    options: dict[str, dict[str, Option]] = field(default_factory=dict)
    results: dict[str, dict[str, QuantizedWeight]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            name: {
                o: {"error": self.errors[name][o], "total_bits": self.bits[name][o]}
                for o in self.errors[name]
            }
            for name in self.errors
        }

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
    probe: Probe,
    hessians: Mapping[str, torch.Tensor | tuple[torch.Tensor, int]],
    *,
    solver: SolverOptions | None = None,
    progress: bool = False,
    keep_results: bool = True,
) -> SensitivityTable:
    """For each layer and each of its candidate options, the model's output error with that layer alone
    quantized (solved with `quantize_weight` against the layer's Hessian, swapped in, probed, swapped back).

    FP costs no probe: its error is 0 by definition. The model is left exactly as it was given. With
    `keep_results=False` the solved weights are dropped after probing (they will be solved again anyway).
    """
    from dataclasses import asdict

    from tqdm.auto import tqdm

    solver = solver or SolverOptions()
    table = SensitivityTable()
    work = [(name, option) for name in layer_names for option in candidates[name]]
    bar = tqdm(work, desc="LAQ sensitivity", unit="option", disable=not progress)
    for name, option in bar:
        key = option_name(option)
        layer = model.get_submodule(name)
        n = layer.weight.numel()
        table.sizes[name] = n
        table.options.setdefault(name, {})[key] = option
        if key == FP:
            table.errors.setdefault(name, {})[key] = 0.0
            table.bits.setdefault(name, {})[key] = float(FP16_BITS)
            continue
        bar.set_postfix_str(f"{name[-32:]} {key}")
        H = hessians[name]
        H = H[0] if isinstance(H, tuple) else H
        result = quantize_weight(layer.weight.detach(), H, option, name=name, **asdict(solver))
        replace_module(model, name, AQModule.from_layer(layer, result))
        try:
            error = probe.error(model)
        finally:
            replace_module(model, name, layer)
        table.errors.setdefault(name, {})[key] = error
        table.bits.setdefault(name, {})[key] = float(result.total_bits)
        if keep_results:
            table.results.setdefault(name, {})[key] = result
    bar.close()
    return table


# ============================================================================ choice
@dataclass
class BudgetChoice:
    """The MILP's answer: `choice[layer]` an option name; the budget, the bits it reaches (weight-weighted
    total bits per weight over the table's layers, FP at 16) and the predicted summed sensitivity."""

    choice: dict[str, str]
    budget: float
    total_bits: float
    predicted_error: float
    min_total_bits: float

    def to_dict(self) -> dict:
        return {
            "budget_total_bits": self.budget,
            "total_bits": self.total_bits,
            "min_total_bits": self.min_total_bits,
            "predicted_error": self.predicted_error,
            "choice": dict(self.choice),
        }

    def format(self, table: SensitivityTable | None = None) -> str:
        lines = [
            f"LAQ: budget {self.budget:g} total bits/weight -> {self.total_bits:.3f} "
            f"(minimum possible {self.min_total_bits:.3f}); predicted output error {self.predicted_error:.4g}"
        ]
        for name, key in self.choice.items():
            extra = ""
            if table is not None:
                extra = f"  err {table.errors[name][key]:.3g}  {table.bits[name][key]:.3f} bits"
            lines.append(f"  {name:<48} {key:<7}{extra}")
        return "\n".join(lines)


def _as_entries(table) -> dict[str, dict[str, tuple[float, float]]]:
    """`{layer: {option: (error, total_bits)}}` from a `SensitivityTable` or such a mapping."""
    if isinstance(table, SensitivityTable):
        return {n: {o: (table.errors[n][o], table.bits[n][o]) for o in table.errors[n]} for n in table.errors}
    return {n: {o: (float(e), float(b)) for o, (e, b) in opts.items()} for n, opts in table.items()}


def choose_specs(
    table: SensitivityTable | Mapping[str, Mapping[str, tuple[float, float]]],
    sizes: Mapping[str, int],
    budget_total_bits: float,
    *,
    verbose: bool = False,
) -> BudgetChoice:
    """One option per layer minimising summed sensitivity, subject to
    `sum_l total_bits(l, option_l) * n_l <= budget_total_bits * sum_l n_l` (FP = 16 bits per weight).

    `table`: a `SensitivityTable`, or `{layer: {option_name: (error, total_bits)}}`. Solved exactly as a
    0/1 integer program (`scipy.optimize.milp`). Raises `BudgetError` naming the minimum achievable budget
    when even the cheapest option of every layer is over it.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    entries = _as_entries(table)
    names = list(entries)
    if not names:
        raise ValueError("choose_specs: empty table")
    total_n = float(sum(sizes[n] for n in names))
    pairs = [(n, o) for n in names for o in entries[n]]  # the MILP's variables, in this order
    cost = np.array([entries[n][o][0] for n, o in pairs])  # [V]
    share = np.array([entries[n][o][1] * sizes[n] / total_n for n, o in pairs])  # [V] bits/weight share
    min_bits = sum(min(b for _, b in entries[n].values()) * sizes[n] for n in names) / total_n
    if min_bits > budget_total_bits * (1 + 1e-9):
        raise BudgetError(
            f"bit budget {budget_total_bits:g} total bits per weight cannot be met: the cheapest option of "
            f"every layer already costs {min_bits:.4f}; the minimum achievable budget is "
            f"{math.ceil(min_bits * 1000) / 1000:g}"
        )
    one_each = np.zeros((len(names), len(pairs)))  # [L, V]: sum of a layer's x = 1
    row = {n: i for i, n in enumerate(names)}
    for j, (n, _) in enumerate(pairs):
        one_each[row[n], j] = 1
    scale = float(np.abs(cost).max()) or 1.0  # keep the objective O(1) for the solver's tolerances
    result = milp(
        cost / scale,
        integrality=np.ones(len(pairs)),
        bounds=Bounds(0, 1),
        constraints=[
            LinearConstraint(one_each, 1, 1),
            LinearConstraint(share[None, :], -np.inf, budget_total_bits),
        ],
        options={"mip_rel_gap": 0},
    )
    if not result.success:
        raise BudgetError(f"LAQ integer program failed: {result.message}")
    x = np.round(result.x).astype(bool)
    choice = {n: o for (n, o), chosen in zip(pairs, x, strict=True) if chosen}
    answer = BudgetChoice(
        choice=choice,
        budget=float(budget_total_bits),
        total_bits=float(share[x].sum()),
        predicted_error=float(cost[x].sum()),
        min_total_bits=float(min_bits),
    )
    if verbose:
        print(answer.format(table if isinstance(table, SensitivityTable) else None))
    return answer


def brute_force_choice(
    table: Mapping[str, Mapping[str, tuple[float, float]]], sizes: Mapping[str, int], budget_total_bits: float
) -> dict[str, str] | None:
    """Exhaustive reference for `choose_specs` on tiny tables (tests); None when infeasible."""
    entries = _as_entries(table)
    names = list(entries)
    total_n = sum(sizes[n] for n in names)
    best = None
    for combo in itertools.product(*(list(entries[n]) for n in names)):
        bits = sum(entries[n][o][1] * sizes[n] for n, o in zip(names, combo, strict=True)) / total_n
        if bits > budget_total_bits + 1e-12:
            continue
        err = sum(entries[n][o][0] for n, o in zip(names, combo, strict=True))
        if best is None or err < best[0]:
            best = (err, dict(zip(names, combo, strict=True)))
    return None if best is None else best[1]
