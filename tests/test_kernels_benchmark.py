"""benchmarks/kernels.py: a quick run writes linear and conv rows for every method, the conv rows with the
native decode-GEMM on CPU, each kernel computing the same product as the dense one."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from avq.kernels import native

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # its neighbours (avq_bench)


def _benchmark():
    # by path: `import kernels` could find the repository's own kernels/ package
    spec = importlib.util.spec_from_file_location("kernels_benchmark", ROOT / "benchmarks" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_quick_run_times_every_method(tmp_path, one_thread) -> None:
    argv = ["--quick", "--specs", "2x8g8", "--rows", "1", "--max-seconds", "5"]
    argv += ["--results-dir", str(tmp_path)]
    assert _benchmark().main(argv) == 0
    rows = json.loads((tmp_path / "kernels_cpu_quick.json").read_text())["rows"]
    methods = {(r["op"], r["method"]) for r in rows}
    assert {("linear", m) for m in ("dense", "dequant_gemm", "fused", "auto")} <= methods
    conv = {m for op, m in methods if op == "conv"}
    assert {"dense", "dequant_conv", "implicit", "auto"} <= conv
    assert ("fused_conv" in conv) == native.available()
    # avq's own methods (aqlm's numba kernel on several threads races on its output, as documented)
    timed = [r for r in rows if "latency_ms" in r and not r["method"].startswith("aqlm")]
    assert timed and all(r["rel_err"] < 1e-3 for r in timed), [(r["method"], r["rel_err"]) for r in timed]
    assert all(r["commit"] and "dirty" in r for r in rows)
