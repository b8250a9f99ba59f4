"""`avq quantize`: parses, calls the API, prints the table, saves; user errors exit 2 with one line."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from test_calibration import tiny_unet

import avq
from avq.cli import main
from avq.core.uniform_modules import UniformModule

TINY_ARGS = ["--num-samples", "2", "--batch-size", "2", "--steps", "3", "--timesteps-kept", "2", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-unet"
    tiny_unet().save_pretrained(folder)
    return folder


def test_quantize_folder_saves_loadable_model(tiny_folder, tmp_path, capsys):
    out = tmp_path / "q"
    figures = tmp_path / "figures.json"
    code = main(
        [
            "quantize",
            "--model",
            str(tiny_folder),
            "--preset",
            "w2a16",
            "--out",
            str(out),
            "--json",
            str(figures),
            *TINY_ARGS,
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "conv_in" in printed and "first layer" in printed and f"saved {out}" in printed
    data = json.loads(figures.read_text())
    assert data["preset"] == "w2a16" and data["summary"]["quantized"] > 0
    assert len(data["rows"]) == data["summary"]["layers"]
    model = avq.load_quantized(out)
    assert any(isinstance(m, avq.AQConv2d) for m in model.modules())
    saved = json.loads((out / "config.json").read_text())
    assert saved["quantization_config"]["extra"]["preset"] == "w2a16"
    assert not (tmp_path / "q.partial").exists()  # checkpoint removed after success


def test_quantize_shipped_model_rtn(tmp_path, capsys):
    figures = tmp_path / "f.json"
    out = tmp_path / "q"
    code = main(
        [
            "quantize",
            "--model",
            "digits-unet-mini",
            "--preset",
            "w4a16",
            "--method",
            "rtn",
            "--out",
            str(out),
            "--json",
            str(figures),
            *TINY_ARGS,
        ]
    )
    assert code == 0
    assert f"saved {out}" in capsys.readouterr().out
    data = json.loads(figures.read_text())
    rows = [r for r in data["rows"] if r["status"] == "quantized"]
    assert data["method"] == "rtn" and rows and all(r["spec"] == "int4" for r in rows)
    # stored packed: 4 bits a weight plus a scale and zero per row, as the report counts
    layers = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    assert set(layers) == {r["name"] for r in rows}
    entries = [(e["method"], e["bits"], e["group_size"]) for e in layers.values()]
    assert set(entries) == {("uniform", 4, None)}
    loaded = avq.load_quantized(out)
    for r in rows:
        layer = loaded.get_submodule(r["name"])
        assert isinstance(layer, UniformModule) and layer.total_bits == pytest.approx(r["total_bits"])
        assert layer.packed.numel() == r["shape"][0] * -(-math.prod(r["shape"][1:]) * 4 // 8)


@pytest.mark.parametrize(
    "model, preset, message",
    [
        ("no-such-model", "w2a16", "unknown model 'no-such-model'"),
        ("FOLDER_EMPTY", "w2a16", "neither a diffusers pipeline folder"),
        ("FOLDER_NOCLASS", "w2a16", "no _class_name"),
        ("PIPELINE", "w2a16", "names no unet or transformer"),
    ],
)
def test_user_errors_exit_2(model, preset, message, tmp_path, tiny_folder, capsys):
    if model == "FOLDER_EMPTY":
        model = str(tmp_path)
    elif model == "FOLDER_NOCLASS":
        (tmp_path / "config.json").write_text('{"in_channels": 3}')
        model = str(tmp_path)
    elif model == "PIPELINE":  # a pipeline folder without unet/ or transformer/
        (tmp_path / "model_index.json").write_text("{}")
        model = str(tmp_path)
    code = main(["quantize", "--model", model, "--preset", preset, "--out", str(tmp_path / "q"), *TINY_ARGS])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1


def test_interrupted_run_needs_resume(tiny_folder, tmp_path, capsys):
    (tmp_path / "q.partial").mkdir()
    code = main(
        [
            "quantize",
            "--model",
            str(tiny_folder),
            "--preset",
            "w2a16",
            "--out",
            str(tmp_path / "q"),
            *TINY_ARGS,
        ]
    )
    assert code == 2 and "--resume" in capsys.readouterr().err


def test_python_dash_m_help():
    result = subprocess.run(
        [sys.executable, "-m", "avq", "quantize", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--preset" in result.stdout


def test_bench_times_every_kernel_path(tmp_path, capsys):
    figures = tmp_path / "bench.json"
    args = ["bench", "--shape", "64", "128", "--spec", "1x8g4", "--rows", "1", "8", "--repeats", "2"]
    assert main(args + ["--device", "cpu", "--json", str(figures)]) == 0
    data = json.loads(figures.read_text())
    assert data["spec"] == "1x8g4" and [r["rows"] for r in data["rows"]] == [1, 8]
    for row in data["rows"]:
        assert all(row[k] > 0 for k in ("dense", "lut", "dequant", "auto")) and row["auto_kernel"] in (
            "lut",
            "dequant",
        )
    assert "auto picks" in capsys.readouterr().out
    assert main(["bench", "--shape", "64", "100", "--spec", "1x8g8"]) == 2  # K not divisible by g


def test_laq_and_solver_options_are_parsed_and_checked(tmp_path, capsys):
    args = ["quantize", "--model", "digits-unet-mini", "--preset", "w4a16", "--out", str(tmp_path / "q")]
    with pytest.raises(SystemExit) as bad:  # argparse: a usage error, exit 2
        main([*args, "--laq-uniform", "int9", *TINY_ARGS])
    assert bad.value.code == 2 and "bits must be an int from 2 to 8" in capsys.readouterr().err
    assert main([*args, "--laq-uniform", "int4", *TINY_ARGS]) == 2
    assert "laq_uniform are LAQ candidates: they need a bits_budget" in capsys.readouterr().err
    assert main([*args, "--laq-min-bits", "4", *TINY_ARGS]) == 2
    assert "laq_floor constrains LAQ's choice: it needs a bits_budget" in capsys.readouterr().err
    assert main([*args, "--method", "gptq", "--solver-rounds", "1", *TINY_ARGS]) == 2
    assert "--solver-rounds tunes the AQ solver; --method gptq has none" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: rounds are >= 1
        main([*args, "--solver-rounds", "0", *TINY_ARGS])
