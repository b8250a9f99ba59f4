"""Tracking: NullTracker is inert; WandbTracker writes an offline run with config, table, metrics, image."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from avq.tracking import NullTracker, Tracker, WandbTracker, default_wandb_mode, image_grid, make_tracker


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def test_null_tracker_is_a_tracker():
    t = make_tracker("none")
    assert isinstance(t, NullTracker) and isinstance(t, Tracker)
    t.log_config({"a": 1})
    t.log_layers([{"name": "x"}])
    t.log_metrics({"m": 1.0})
    t.log_images("s", torch.zeros(2, 1, 4, 4))
    t.finish()
    with pytest.raises(ValueError, match="unknown tracker"):
        make_tracker("mlflow")


def test_default_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert default_wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert default_wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert default_wandb_mode() is None


def test_image_grid():
    x = torch.linspace(-1, 1, 5 * 4 * 4).reshape(5, 1, 4, 4)
    grid = image_grid(x)
    assert grid.shape == (2 * 5 - 1, 3 * 5 - 1) and grid.dtype == np.uint8  # 3 columns, 2 rows, gutters
    assert grid[0, 0] == 0 and grid[-1, -1] == 0  # first pixel is -1; the sixth cell is empty
    assert image_grid(torch.zeros(4, 3, 2, 2)).shape == (5, 5, 3)


def test_wandb_offline_run_written(offline):
    tracker = make_tracker("wandb", {"preset": "w2a16"}, dir=offline)
    assert isinstance(tracker, WandbTracker) and isinstance(tracker, Tracker)
    tracker.log_config({"bits_budget": 3.0})
    rows = [
        {"name": "conv1", "shape": [8, 8, 3, 3], "status": "quantized", "total_bits": 2.5},
        {"name": "conv_in", "shape": [8, 1, 3, 3], "status": "kept_fp", "reason": "first layer"},
    ]
    tracker.log_layers(rows)
    tracker.log_metrics({"seconds": 1.5, "summary": {"total_bits_all": 3.2, "code_bits": None}})
    tracker.log_images("samples", torch.rand(4, 1, 8, 8) * 2 - 1, caption="FP")
    run_dir = tracker.run_dir
    tracker.finish()

    assert run_dir.name.startswith("offline-run-") and run_dir.parent == offline / "wandb"
    (log,) = run_dir.glob("run-*.wandb")  # offline: config, history, summary live in this record log
    needles = (b"w2a16", b"bits_budget", b"summary/total_bits_all", b"seconds", b"samples")
    # wandb's service process writes this log; on a loaded machine `finish()` has returned while it held only
    # its header, so give the writer a bounded time to flush.
    deadline = time.monotonic() + 30
    while not all(n in log.read_bytes() for n in needles) and time.monotonic() < deadline:
        time.sleep(0.5)
    data = log.read_bytes()  # protobuf records: string keys and JSON values appear verbatim
    for needle in needles:
        assert needle in data, needle
    files = run_dir / "files"
    table = json.loads(next(files.rglob("layers*.table.json")).read_text())
    assert table["columns"] == ["name", "shape", "status", "total_bits", "reason"]
    assert table["data"][1][0] == "conv_in" and table["data"][0][1] == "[8, 8, 3, 3]"
    assert table["data"][1][4] == "first layer" and table["data"][0][4] is None
    assert list(files.rglob("samples*.png"))


def test_cli_bits_budget_with_wandb(offline, tmp_path, capsys, monkeypatch):
    from test_calibration import tiny_unet

    import avq.planning.presets
    from avq.cli import main

    preset = avq.planning.presets.preset_config
    fast = avq.SolverOptions(max_rounds=1, kmeans_iters=3)
    monkeypatch.setattr(avq.planning.presets, "preset_config", lambda *a, **k: preset(*a, solver=fast, **k))

    tiny = ["--num-samples", "2", "--batch-size", "2", "--steps", "3", "--timesteps-kept", "2", "--quiet"]
    folder = tmp_path / "tiny-unet"
    tiny_unet().save_pretrained(folder)
    base = ["quantize", "--model", str(folder), "--preset", "w2a16"]

    code = main([*base, "--out", str(tmp_path / "x"), "--bits-budget", "0.5", *tiny])
    assert code == 2 and "minimum achievable budget" in capsys.readouterr().err

    figures = tmp_path / "figures.json"
    out = tmp_path / "q"
    args = ["--out", str(out), "--bits-budget", "8", "--tracker", "wandb", "--json", str(figures), *tiny]
    assert main([*base, *args]) == 0
    printed = capsys.readouterr().out
    assert "LAQ: budget 8" in printed
    data = json.loads(figures.read_text())
    assert data["summary"]["total_bits_all"] <= 8 and set(data["budget"]["choice"]) == {
        r["name"] for r in data["rows"]
    }
    assert json.loads((out / "config.json").read_text())["quantization_config"]
    (run,) = (offline / "wandb").glob("offline-run-*")
    assert b"budget/predicted_error" in next(run.glob("run-*.wandb")).read_bytes()
    assert list(run.rglob("layers*.table.json"))

    # a budget sweep from those figures: the table is reused, nothing measured again
    monkeypatch.setattr("avq.run.laq.measure_sensitivity", lambda *a, **k: pytest.fail("measured again"))
    swept = tmp_path / "swept.json"
    again = ["--out", str(tmp_path / "q6"), "--bits-budget", "6", "--sensitivity", str(figures)]
    assert main([*base, *again, "--json", str(swept), *tiny]) == 0
    assert "LAQ: sensitivity table given" in capsys.readouterr().out
    assert json.loads(swept.read_text())["budget"]["sensitivity"] == data["budget"]["sensitivity"]
    assert json.loads(swept.read_text())["summary"]["total_bits_all"] <= 6
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"conv_in": {"fp": {"error": 0, "total_bits": 16}}}))
    cases = ((bad, "does not match this model"), (folder / "config.json", "no LAQ sensitivity"))
    for i, (table, message) in enumerate(cases):
        out_i = str(tmp_path / f"bad{i}")
        code = main([*base, "--out", out_i, "--bits-budget", "6", "--sensitivity", str(table), *tiny])
        assert code == 2 and message in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "q8"), "--sensitivity", str(figures), *tiny]) == 2
    assert "needs --bits-budget" in capsys.readouterr().err
