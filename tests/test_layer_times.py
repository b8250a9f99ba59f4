"""benchmarks/layer_times.py: every AQ layer timed against its FP twin on its own step input, summed right."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports e2e_step as its neighbour

layer_times = pytest.importorskip("layer_times")


def test_layer_times_of_the_mini_unet(tmp_path, one_thread) -> None:
    argv = ["--model", "digits-unet-mini", "--rounds", "1", "--results-dir", str(tmp_path)]
    assert layer_times.main(argv) == 0
    rows = json.loads((tmp_path / "layer_times_digits-unet-mini_b1_cpu.json").read_text())["rows"]
    layers = [r for r in rows if r["kind"] == "layer"]
    groups = [r for r in rows if r["kind"] == "group"]
    (step,) = [r for r in rows if r["kind"] == "step"]
    assert layers and all(r["fp_ms"] > 0 and r["w2_ms"] > 0 and r["kernel"] for r in layers)
    assert {r["op"] for r in layers} <= {"conv", "linear"}
    assert sum(g["layers"] for g in groups) == len(layers)
    assert sum(g["fp_ms"] for g in groups) == pytest.approx(step["fp_layers_ms"])
    assert sum(g["w2_ms"] for g in groups) == pytest.approx(step["w2_layers_ms"])
    share, ratio = step["layers_share"], step["w2_layers_ms"] / step["fp_layers_ms"]
    assert 0 < share <= 1 and step["ceiling"] == pytest.approx(1 - share + share * ratio)
    assert all(r["commit"] and "dirty" in r for r in rows)
    for row in [*layers, *groups]:  # GFLOP/s from the multiply-adds: 2 * macs / time
        assert row["macs"] > 0 and row["fp_gflops"] == pytest.approx(2 * row["macs"] / (row["fp_ms"] * 1e6))
    assert sum(g["macs"] for g in groups) == sum(r["macs"] for r in layers) and step["gemm_gflops"] > 0
