"""The README's result tables are generated from the committed results files, never edited by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_match_results_files():
    spec = importlib.util.spec_from_file_location("make_tables", ROOT / "benchmarks" / "make_tables.py")
    make_tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tables)
    readme = (ROOT / "README.md").read_text()
    assert make_tables.render(readme) == readme, "run: python benchmarks/make_tables.py"
    assert "<!-- table:layer_solver -->\n|" in readme  # the table is there, not just its markers
