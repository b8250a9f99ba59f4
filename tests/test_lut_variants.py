"""`benchmarks/lut_variants.py` on a small layer: every part runs, computes the product it times, and the
results file records what the README table reads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_small_run_writes_every_part(tmp_path):
    pytest.importorskip("numba")
    spec = importlib.util.spec_from_file_location("lut_variants", ROOT / "benchmarks" / "lut_variants.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--size", "256", "--blocks", "8", "--no-unrolled", "--rounds", "2", "--repeats", "2"]
    assert bench.main([*argv, "--dequant-block-mib", "0.25", "--results-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "lut_variants_cpu.json").read_text())["rows"]
    parts = {r["part"] for r in rows}
    assert parts == {"dense", "lut_build", "gather_sum", "lut_matmul_codes", "embedding_bag", "decode",
                     "dequant_matmul", "lut_over_dense"}  # fmt: skip
    assert all(r["size"] == 256 for r in rows if "size" in r)
    assert all(r["rel_err"] < 1e-5 for r in rows if r.get("rel_err") is not None)
    assert {(r["J"], r["threads"]) for r in rows if r["part"] == "gather_sum"} >= {(8, 1)}
    ratio = next(r for r in rows if r["part"] == "lut_over_dense")
    assert ratio["rounds"] == 2 and ratio["ratio_min"] <= ratio["ratio"] <= ratio["ratio_max"]
