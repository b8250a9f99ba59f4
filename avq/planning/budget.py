"""LAQ, part 2: one option per layer under a global budget on total bits per weight.

Errors of different layers (`avq.planning.sensitivity`) are treated as additive, and an integer program
(`scipy.optimize.milp`) picks one option per layer minimising the summed sensitivity subject to a budget
on TOTAL bits per weight (codes + codebooks + scales, FP at 16): on small layers the codebook overhead
decides (docs/design.md: budget by total bits).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from avq.planning.sensitivity import SensitivityTable


class BudgetError(ValueError):
    """The bit budget cannot be met, even with the cheapest option of every layer."""


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
