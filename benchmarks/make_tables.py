"""Regenerate the README's result tables from `benchmarks/results/*.json` (never typed by hand).

Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` markers in README.md.
Usage: python benchmarks/make_tables.py [--check]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _fmt(value, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def layer_solver_table(data: dict) -> str:
    """Synthetic rows in full; real-model layers summarised per method/spec (median over layers)."""
    rows = data["rows"]
    lines = [
        "| layer | method | spec | code bits | total bits | rel. H-error | seconds |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    synthetic = [r for r in rows if r.get("kind", "").startswith("synthetic")]
    for r in synthetic:
        lines.append(
            f"| {r['layer']} | {r['method']} | {r['spec']} | {_fmt(r['code_bits'])} | {_fmt(r['total_bits'])}"
            f" | {_fmt(r['relative_error'])} | {_fmt(r['seconds'], 3)} |"
        )
    real = [r for r in rows if not r.get("kind", "").startswith("synthetic")]
    if real:
        groups: dict[tuple, list[dict]] = {}
        for r in real:
            groups.setdefault((r["method"], r["spec"]), []).append(r)
        layers = len({r["layer"] for r in real})
        for (method, spec), rs in groups.items():
            med = lambda key: sorted(x[key] for x in rs)[len(rs) // 2]  # noqa: E731
            lines.append(
                f"| real model, median of {layers} layers | {method} | {spec} | {_fmt(med('code_bits'))}"
                f" | {_fmt(med('total_bits'))} | {_fmt(med('relative_error'))} | {_fmt(med('seconds'), 3)} |"
            )
    lines.append("")
    lines.append(f"From `{data['command']}` at commit `{data['commit'][:12]}` on {data['device']}, {data['date']}.")
    return "\n".join(lines)


TABLES = {"layer_solver": layer_solver_table}


def render(readme: str) -> str:
    for name, make in TABLES.items():
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        body = make(json.loads(path.read_text()))
        pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
        readme = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), readme)
    return readme


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md is out of date")
    args = parser.parse_args()
    readme_path = ROOT / "README.md"
    current = readme_path.read_text()
    updated = render(current)
    if args.check:
        if updated != current:
            print("README.md tables are out of date: run python benchmarks/make_tables.py", file=sys.stderr)
            return 1
        return 0
    tmp = readme_path.with_suffix(".md.tmp")
    tmp.write_text(updated)
    tmp.replace(readme_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
