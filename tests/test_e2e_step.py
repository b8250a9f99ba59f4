"""benchmarks/e2e_step.py: results schema, exact memory accounting, quantized forward = dequant path."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from avq import AQLinear, QuantSpec
from avq.kernels import compiled

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("e2e_step", ROOT / "benchmarks" / "e2e_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["e2e_step"] = module
    spec.loader.exec_module(module)
    return module


e2e = _load()


def test_memory_accounting_hand_built():
    """One AQLinear 1x4g2 [64, 128] (uint8 codes holding 4 bits) next to a dense Linear [16, 64]."""
    gen = torch.Generator().manual_seed(0)
    qw = e2e.random_qweight((64, 128), QuantSpec(1, 4, 2), gen)
    model = nn.Sequential(AQLinear(qw, bias=torch.zeros(64)), nn.Linear(64, 16))
    mem = e2e.weight_memory(model)
    codes = 64 * (128 // 2) * 1  # one code per group of 2
    extra = (16 * 2 + 64) * 2  # codebook [1, 16, 2] + scales [64], fp16
    fp = 16 * 64 * 2
    assert mem["quantized_layers"] == 1 and mem["fp_layers"] == 1
    assert mem["layer_dense_fp16_bytes"] == 64 * 128 * 2 + fp
    assert mem["layer_stored_bytes"] == codes * 1 + extra + fp  # uint8 per code, as stored
    assert mem["layer_stored_packed_bytes"] == codes * 4 // 8 + extra + fp  # 4 bits per code
    biases = (64 + 16) * 2
    assert mem["model_fp16_bytes"] == mem["layer_dense_fp16_bytes"] + biases
    assert mem["model_stored_bytes"] == mem["layer_stored_bytes"] + biases
    assert mem["layer_ratio"] == pytest.approx(mem["layer_stored_bytes"] / mem["layer_dense_fp16_bytes"])


def test_quantize_random_follows_plan_and_matches_dequant(one_thread, monkeypatch):
    """Quantized layers = what plan_model picks (conv_in/conv_out kept FP); auto dispatch = dequant path."""
    from avq.planning.plan import plan_model
    from avq.planning.presets import preset_config

    model = e2e.build_model("digits-unet-mini", torch.float32, torch.device("cpu"), None)
    planned = {p.name: p.spec for p in plan_model(model, preset_config("w2a16")) if p.quantized}
    plans = e2e.quantize_random(model)
    assert {p.name: p.spec for p in plans} == planned
    assert isinstance(model.conv_in, nn.Conv2d) and isinstance(model.conv_out, nn.Conv2d)
    for name, spec in planned.items():
        assert model.get_submodule(name).spec == spec
    kwargs = e2e.model_inputs(model, 2, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        monkeypatch.delenv("AVQ_KERNEL", raising=False)
        y = model(**kwargs).sample
        monkeypatch.setenv("AVQ_KERNEL", "dequant")
        ref = model(**kwargs).sample
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_quick_writes_schema(tmp_path, monkeypatch):
    """`--quick --in-process` on digits-unet-mini (the subprocess path is the same `measure`); its kernel
    choices are measured in a cache of the run, and the user's cache is neither read nor written."""
    user_cache = tmp_path / "user-cache"
    monkeypatch.setenv("AVQ_CACHE_DIR", str(user_cache))
    assert e2e.main(["--quick", "--in-process", "--batches", "1,2", "--results-dir", str(tmp_path)]) == 0
    assert os.environ["AVQ_CACHE_DIR"] == str(user_cache) and not user_cache.exists()
    data = json.loads((tmp_path / "e2e_step_cpu_quick.json").read_text())
    assert {"command", "commit", "device", "date", "torch", "rows"} <= set(data)
    memory = [r for r in data["rows"] if r["kind"] == "memory"]
    steps = [r for r in data["rows"] if r["kind"] == "step"]
    assert len(memory) == 1 and memory[0]["model"] == "digits-unet-mini"
    assert 0 < memory[0]["layer_ratio_packed"] <= memory[0]["layer_ratio"] < 1
    assert {(r["variant"], r["batch"]) for r in steps} == {(v, b) for v in e2e.VARIANTS for b in (1, 2)}
    for r in steps:
        assert r["latency_ms"] > 0 and r["peak_mib"] > 0 and r["params"] == memory[0]["params"]
        assert "memory_method" in r
        assert r.get("cpu_kernels") == (None if r["variant"] == "fp" else compiled.backend())
    auto = [r for r in steps if r["variant"] == "auto"]
    assert auto[-1]["rel_err_vs_dequant"] < 1e-4
    for r in auto:  # every AQ layer's kernel at that batch, counted (none left without a prepared forward)
        assert sum(r["kernels"].values()) == memory[0]["quantized_layers"] and "none" not in r["kernels"]
    for r in auto:  # the FP and W2 steps timed in interleaved rounds in one process
        paired = r["side_by_side"]
        assert paired["fp_ms"] > 0 and paired["auto_ms"] > 0
        assert paired["rounds"] >= e2e.SIDE_BY_SIDE_MIN_ROUNDS
        assert 0 < paired["ratio_min"] <= paired["ratio"] <= paired["ratio_max"]


def test_load_memory_benchmark_writes_its_row(tmp_path):
    """`benchmarks/load_memory.py` on a narrow LDM-4-shaped UNet: the W2 folder is written, loaded in a
    fresh process, and the row holds the model's sizes and the load's memory and time."""
    spec = importlib.util.spec_from_file_location("load_memory", ROOT / "benchmarks" / "load_memory.py")
    load_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_memory)
    threads = torch.get_num_threads()
    try:
        argv = ["--ldm-channels", "32", "--ldm-sample-size", "8", "--repeats", "1"]
        assert load_memory.main([*argv, "--work", str(tmp_path / "w"), "--results-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    (row,) = json.loads((tmp_path / "load_memory_cpu.json").read_text())["rows"]
    assert row["ldm_channels"] == 32 and row["quantized_layers"] > 0 and len(row["loads"]) == 1
    assert 0 < row["stored_mib"] < row["dense_fp32_mib"]
    load = row["loads"][0]
    assert load["load_seconds"] > 0 and load["peak_delta_mib"] >= load["rss_delta_mib"] > 0
    assert 0 < load["tensors_mib"] < row["dense_fp32_mib"]
