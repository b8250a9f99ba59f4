"""Whole-model quantization: presets, FP-keep rule, end to end with save/load, resume."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from test_calibration import TINY, tiny_dit, tiny_unet

import avq
from avq.calibration.config import CalibrationConfig
from avq.core.bits import total_bits
from avq.core.modules import AQModule
from avq.core.uniform_modules import UniformModule
from avq.planning.plan import plan_layer, plan_model
from avq.planning.presets import PresetError, QuantizeConfig, preset_config
from avq.run.quantize import quantize
from avq.run.report import QuantizeReport
from avq.storage.checkpoint import CheckpointError

FAST = avq.SolverOptions(max_rounds=2, kmeans_iters=5)


def interrupt_after(n: int) -> tuple[list[str], Callable[[dict], None]]:
    """An `on_layer` callback that records finished layers and interrupts after the `n`-th."""
    finished: list[str] = []

    def on_layer(row: dict) -> None:
        finished.append(row["name"])
        if len(finished) == n:
            raise KeyboardInterrupt

    return finished, on_layer


def quantize_with_report(*args, **kwargs) -> tuple[nn.Module, QuantizeReport]:
    report = QuantizeReport()
    return quantize(*args, report=report, **kwargs), report


pytestmark = pytest.mark.usefixtures("one_thread")


def w2(method: str = "avq") -> QuantizeConfig:
    return preset_config("w2a16", method, solver=FAST)


@torch.no_grad()
def outputs(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 8, 8, generator=g)
    return model(x, 500, class_labels=torch.tensor([1, 3])).sample


@pytest.fixture(scope="module")
def quantized():
    model, report = quantize_with_report(tiny_unet(), w2(), TINY, progress=False)
    return model, report


def test_presets():
    assert [s.name for s in preset_config("w2a16").conv_specs] == ["1x8g4", "1x4g2"]
    assert [s.name for s in preset_config("w4a16").linear_specs][0] == "2x8g4"
    assert preset_config("w4a16", "gptq").bits == 4
    assert preset_config("w4a8").activation_bits == 8 and preset_config("w4a16").activation_bits == 16
    assert preset_config("w2a8").conv_specs == preset_config("w2a16").conv_specs
    with pytest.raises(PresetError, match="activation_bits must be 8 or 16"):
        preset_config("w4a16", activation_bits=4)
    with pytest.raises(PresetError, match="unknown preset"):
        preset_config("w3a16")
    with pytest.raises(PresetError, match="unknown method"):
        preset_config("w2a16", "awq")


def test_end_to_end_save_load(quantized, tmp_path):
    model, report = quantized
    rows = {r["name"]: r for r in report.rows}
    assert rows["conv_in"]["status"] == "kept_fp" and "first layer" in rows["conv_in"]["reason"]
    assert rows["conv_out"]["status"] == "kept_fp" and "last layer" in rows["conv_out"]["reason"]
    assert "codebook overhead" in rows["down_blocks.1.attentions.0.to_q"]["reason"]
    q = [r for r in report.rows if r["status"] == "quantized"]
    assert q, "some layers must be quantized"
    for r in q:
        module = model.get_submodule(r["name"])
        assert isinstance(module, AQModule) and module.spec.name == r["spec"]
        assert r["code_bits"] == 2 and r["code_bits"] < r["total_bits"] <= 3
        assert 0 <= r["relative_error"] < 1 and r["n_rows"] > 0
    assert isinstance(model.conv_in, nn.Conv2d)
    summary = report.summary()
    assert summary["quantized"] == len(q) and summary["layers"] == len(report.rows)
    assert "quantized" in report.table() and "first layer" in report.table()
    json.dumps(report.to_dict())  # JSON-safe

    folder = avq.save_quantized(model, tmp_path / "q")
    loaded = avq.load_quantized(folder)
    assert torch.equal(outputs(loaded), outputs(model))
    fp = outputs(tiny_unet())
    assert not torch.equal(outputs(model), fp)


def test_predicted_total_bits_match_stored(quantized):
    model, report = quantized
    for r in report.rows:
        if r["status"] == "quantized":
            module = model.get_submodule(r["name"])
            assert total_bits(tuple(r["shape"]), module.spec) == pytest.approx(module.total_bits)


def test_keep_rule_cases():
    config = QuantizeConfig(
        keep_fp=(), max_overhead_bits=None, linear_specs=preset_config("w2a16").linear_specs
    )
    assert "K=7 not divisible" in plan_layer("a", nn.Linear(7, 4), config).reason
    assert "grouped conv" in plan_layer("b", nn.Conv2d(4, 4, 3, groups=2), config).reason
    assert (
        "padding_mode='reflect'" in plan_layer("c", nn.Conv2d(4, 4, 3, padding_mode="reflect"), config).reason
    )
    assert plan_layer("d", nn.Linear(8, 4), config).spec.name == "1x8g4"  # no overhead limit: first fits
    strict = QuantizeConfig(keep_fp=(), max_overhead_bits=1.0)
    assert plan_layer("e", nn.Linear(512, 512), strict).spec.name == "2x8g4"
    assert plan_layer("f", nn.Linear(64, 64), strict).spec.name == "2x4g2"  # fallback on a small layer
    assert "codebook overhead" in plan_layer("g", nn.Linear(8, 4), strict).reason


def test_dit_first_and_last_layers_kept():
    plans = {p.name: p for p in plan_model(tiny_dit(), preset_config("w4a16"))}
    for name in ("pos_embed.proj", "proj_out_1", "proj_out_2"):
        assert not plans[name].quantized, name


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_baselines_are_packed_modules(method):
    model, report = quantize_with_report(tiny_unet(), w2(method), TINY, progress=False)
    q = [r for r in report.rows if r["status"] == "quantized"]
    assert q and all(r["spec"] == "int2" for r in q)
    assert not any(isinstance(m, AQModule) for m in model.modules())
    layer = model.get_submodule(q[0]["name"])
    assert isinstance(layer, UniformModule) and layer.packed.dtype == torch.uint8
    assert len(torch.unique(layer._weight().reshape(layer.shape[0], -1)[0])) <= 4  # int2 grid per row


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_baselines_with_groups(method):
    """`group_size`: a grid per group of inputs, named and counted in the report's total bits."""
    config = preset_config("w2a16", method, group_size=8, max_overhead_bits=None)  # tiny layers
    model, report = quantize_with_report(tiny_unet(), config, TINY, progress=False)
    q = [r for r in report.rows if r["status"] == "quantized"]
    assert q and all(r["spec"] == "int2g8" and r["total_bits"] == pytest.approx(2 + 32 / 8) for r in q)
    wide = next(r for r in q if math.prod(r["shape"][1:]) >= 32)  # several groups per row
    weight = model.get_submodule(wide["name"])._weight().reshape(wide["shape"][0], -1)  # [out, K]
    assert len(torch.unique(weight[0, :8])) <= 4 < len(torch.unique(weight[0]))  # int2 grids per group
    per_row = quantize_with_report(tiny_unet(), replace(config, group_size=None), TINY, progress=False)[1]
    assert report.summary()["total_bits_all"] > per_row.summary()["total_bits_all"]
    with pytest.raises(avq.planning.PresetError, match="group_size is for the uniform methods"):
        preset_config("w2a16", group_size=8)


def test_given_hessians():
    model = tiny_unet()
    names = [p.name for p in plan_model(model, w2()) if p.quantized]
    hessians = avq.calibrate(model, names, TINY, progress=False)
    _, report = quantize_with_report(
        tiny_unet(), w2(), {n: h for n, (h, _) in hessians.items()}, progress=False
    )
    _, reference = quantize_with_report(tiny_unet(), w2(), TINY, progress=False)
    assert [r["relative_error"] for r in report.rows] == [r["relative_error"] for r in reference.rows]
    with pytest.raises(ValueError, match="no Hessian given"):
        quantize(tiny_unet(), w2(), {}, progress=False)


def test_resume_after_interruption(quantized, tmp_path):
    reference_model, reference = quantized
    ckpt = tmp_path / "ckpt"
    finished, interrupt = interrupt_after(2)

    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_unet(), w2(), TINY, checkpoint_dir=ckpt, progress=False, on_layer=interrupt)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert list(manifest["rows"]) == finished and not manifest["complete"]

    with pytest.raises(CheckpointError, match="unfinished run"):
        quantize(tiny_unet(), w2(), TINY, checkpoint_dir=ckpt, progress=False)
    with pytest.raises(CheckpointError, match="another model or configuration"):
        quantize(
            tiny_unet(),
            preset_config("w4a16", solver=FAST),
            TINY,
            checkpoint_dir=ckpt,
            resume=True,
            progress=False,
        )
    with pytest.raises(CheckpointError, match="another model or configuration"):
        quantize(tiny_unet(seed=1), w2(), TINY, checkpoint_dir=ckpt, resume=True, progress=False)

    solved = []
    model, report = quantize_with_report(
        tiny_unet(),
        w2(),
        TINY,
        checkpoint_dir=ckpt,
        resume=True,
        progress=False,
        on_layer=lambda r: solved.append(r["name"]),
    )
    assert not set(solved) & set(finished)  # finished layers are not solved again
    assert [r["relative_error"] for r in report.rows] == [r["relative_error"] for r in reference.rows]
    assert torch.equal(outputs(model), outputs(reference_model))
    assert json.loads((ckpt / "manifest.json").read_text())["complete"]


def test_streaming_passes_match_one_pass(quantized):
    """Passes of a few layers (calibrated on the FP model, solved, freed) give the same model as one pass."""
    reference_model, reference = quantized
    budget = 3 * 4 * max(math.prod(w.shape[1:]) ** 2 for w in _weights(tiny_unet())) / 2**30
    small = CalibrationConfig(**{**TINY.to_dict(), "max_hessian_gib": budget})
    model, report = quantize_with_report(tiny_unet(), w2(), small, progress=False)
    assert any(note.startswith("streamed:") for note in report.notes)
    assert [r["relative_error"] for r in report.rows] == [r["relative_error"] for r in reference.rows]
    assert torch.equal(outputs(model), outputs(reference_model))


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def test_kill_9_in_the_middle_of_a_pass_then_resume(tmp_path):
    """`avq quantize` killed (SIGKILL) while a pass is half solved, then `--resume`: the saved model is the
    uninterrupted run's, bit for bit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from avq.cli import main

    folder = tmp_path / "tiny-unet"
    tiny_unet().save_pretrained(folder)
    budget = 4 * 4 * max(math.prod(w.shape[1:]) ** 2 for w in _weights(tiny_unet())) / 2**30
    args = ["quantize", "--model", str(folder), "--preset", "w4a8", "--max-hessian-gib", f"{budget:.9f}"]
    args += ["--num-samples", "3", "--batch-size", "2", "--steps", "4", "--timesteps-kept", "2", "--quiet"]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "avq", *args, "--out", str(killed)], env=env, stderr=subprocess.PIPE
    )
    manifest_path = tmp_path / "killed.partial" / "manifest.json"
    deadline, mid_pass = time.time() + 300, False
    while process.poll() is None and time.time() < deadline and not mid_pass:
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())  # replaced atomically: always whole
            in_pass, finished = set(manifest["n_rows"]), set(manifest["rows"])
            mid_pass = bool(in_pass & finished) and bool(in_pass - finished)
        time.sleep(0.002)
    assert process.poll() is None, f"the run ended before it was killed: {process.stderr.read()[-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    process.stderr.close()
    assert not killed.exists()
    assert main([*args, "--out", str(killed), "--resume"]) == 0
    assert main([*args, "--out", str(straight)]) == 0
    a, b = avq.load_quantized(killed).state_dict(), avq.load_quantized(straight).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_processes_quantize_like_one(tmp_path):
    """`torchrun --nproc_per_node=2 -m avq quantize`: the ranks solve alternate layers of each pass (gloo on
    CPU) and gather them; the saved model is the 1-process run's, bit for bit, and only rank 0 writes."""
    import os
    import subprocess
    import sys

    from avq.cli import main

    folder = tmp_path / "tiny-unet"
    tiny_unet().save_pretrained(folder)
    budget = 4 * 4 * max(math.prod(w.shape[1:]) ** 2 for w in _weights(tiny_unet())) / 2**30
    args = ["quantize", "--model", str(folder), "--preset", "w4a8", "--max-hessian-gib", f"{budget:.9f}"]
    args += ["--num-samples", "3", "--batch-size", "2", "--steps", "4", "--timesteps-kept", "2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert main([*args, "--out", str(tmp_path / "one"), "--json", str(tmp_path / "one.json")]) == 0
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "avq",
    ]
    command += [*args, "--out", str(tmp_path / "two"), "--json", str(tmp_path / "two.json")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    a = avq.load_quantized(tmp_path / "one").state_dict()
    b = avq.load_quantized(tmp_path / "two").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert [r["relative_error"] for r in one["rows"]] == [r["relative_error"] for r in two["rows"]]
    assert any(note.startswith("streamed:") for note in two["notes"])
    assert {r["rank"] for r in two["rows"] if r["status"] == "quantized"} == {0, 1}  # both ranks solved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "one.json", "tiny-unet", "two", "two.json"]


def test_fingerprint_is_the_same_in_every_process():
    """A resume happens in another process: the run's fingerprint must not depend on Python's hash seed
    (diffusers lists `_use_default_values` in set order)."""
    import os
    import subprocess
    import sys

    code = "\n".join(
        [
            "import torch, avq",
            "from diffusers import UNet2DModel",
            "from avq.run.checkpoint import fingerprint",
            "torch.manual_seed(0)",
            "config = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16))",
            "config.update(norm_num_groups=4, down_block_types=('DownBlock2D',) * 2)",
            "config.update(up_block_types=('UpBlock2D',) * 2)",
            "m = UNet2DModel.from_config(config)",
            "fp = fingerprint(m, avq.preset_config('w4a16'), avq.CalibrationConfig())",
            "print(len(m.config._use_default_values), fp)",
        ]
    )
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.add(result.stdout.strip().splitlines()[-1])
    defaults = int(next(iter(outputs)).split()[0])
    assert defaults >= 2 and len(outputs) == 1, outputs


@pytest.mark.parametrize("preset, code_bits", [("w1a16", 1.0), ("w1.5a8", 1.5)])
def test_presets_below_two_bits(preset, code_bits):
    """The sub-2-bit presets quantize at their code bits (and refuse the uniform methods, which stop at 2)."""
    model, report = quantize_with_report(
        tiny_unet(), preset_config(preset, solver=FAST), TINY, progress=False
    )
    q = [r for r in report.rows if r["status"] == "quantized"]
    assert q and all(r["code_bits"] == code_bits for r in q)
    assert all(isinstance(model.get_submodule(r["name"]), AQModule) for r in q)
    with pytest.raises(PresetError, match="uniform methods store 2 bits at least"):
        preset_config(preset, "gptq")
    laq = preset_config(preset, bits_budget=1.5)
    assert {s.code_bits for s in laq.linear_specs} == {1.0, 1.5, 2.0}
