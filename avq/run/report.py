"""`QuantizeReport`: the per-layer table of a quantize run, its notes and bit summary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from avq.core.bits import FP16_BITS


@dataclass
class QuantizeReport:
    """Per-layer rows plus notes. Rows: name, kind, shape, status ("quantized" | "kept_fp"), spec,
    code_bits, total_bits, relative_error (H-weighted, against the calibration Hessian), seconds,
    n_rows (calibration rows), reason (kept_fp only)."""

    method: str = ""
    preset: str | None = None
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    budget: dict | None = None  # LAQ: `BudgetChoice.to_dict()` + "sensitivity" table; None without
    # Streaming: the Hessian memory budget of a pass (GiB) and the passes' layer names; None when not streamed
    hessian_budget_gib: float | None = None
    passes: list[list[str]] | None = None

    def summary(self) -> dict:
        """Weight-weighted code/total bits over quantized layers and over all layers (FP counted as 16)."""
        q = [r for r in self.rows if r["status"] == "quantized"]
        n = lambda r: math.prod(r["shape"])  # noqa: E731
        nq, nall = sum(n(r) for r in q), sum(n(r) for r in self.rows)
        return {
            "layers": len(self.rows),
            "quantized": len(q),
            "kept_fp": len(self.rows) - len(q),
            "code_bits": sum(n(r) * r["code_bits"] for r in q) / nq if nq else None,
            "total_bits_quantized": sum(n(r) * r["total_bits"] for r in q) / nq if nq else None,
            "total_bits_all": (
                sum(n(r) * (r["total_bits"] if r["status"] == "quantized" else FP16_BITS) for r in self.rows)
                / nall
                if nall
                else None
            ),
        }

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "preset": self.preset,
            "summary": self.summary(),
            "notes": self.notes,
            "rows": self.rows,
            **({"budget": self.budget} if self.budget is not None else {}),
        }

    def table(self) -> str:
        """A plain-text table, one line per layer."""
        header = (
            f"{'layer':<48} {'kind':<6} {'shape':<14} {'spec':<7} {'code':>5} {'total':>6} "
            f"{'rel.err':>9} {'s':>6}"
        )
        lines = [header, "-" * len(header)]
        for r in self.rows:
            shape = "x".join(map(str, r["shape"]))
            kind = "conv" if r["kind"] == "conv2d" else "linear"
            if r["status"] == "quantized":
                lines.append(
                    f"{r['name']:<48} {kind:<6} {shape:<14} {r['spec']:<7} {r['code_bits']:>5.3g} "
                    f"{r['total_bits']:>6.3f} {r['relative_error']:>9.3g} {r['seconds']:>6.2f}"
                )
            else:
                lines.append(f"{r['name']:<48} {kind:<6} {shape:<14} FP      ({r['reason']})")
        s = self.summary()
        if s["quantized"]:
            lines.append(
                f"{s['quantized']} of {s['layers']} layers quantized: {s['code_bits']:.3g} code bits, "
                f"{s['total_bits_quantized']:.3f} total bits per quantized weight, "
                f"{s['total_bits_all']:.3f} over all Linear/Conv2d weights (FP at 16)"
            )
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)
