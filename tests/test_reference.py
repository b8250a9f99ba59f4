"""The shipped reference model, its data and Hessians, results files, and the solver benchmark's smoke run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch

from avq_bench.data import load_digits_images, random_affine, split_mask
from avq_bench.reference import (
    NULL_CLASS,
    asset_path,
    collect_hessians,
    load_reference,
    reference_layers,
    sample,
)
from avq_bench.results import current_command, device_slug, git_commit, write_results

REPO = Path(__file__).resolve().parent.parent


def _benchmark_module(name: str) -> types.ModuleType:
    """`benchmarks/<name>.py` imported as a module (its `main(argv)` then runs in this process)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model():
    return load_reference("digits-unet-mini")


# ------------------------------------------------------------------------------------------ shipped model
def test_shipped_folder_loads_offline_and_runs(monkeypatch):
    from diffusers import UNet2DModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = asset_path("digits-unet-mini")
    assert (folder / "config.json").is_file()
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 8 * 2**20
    unet = UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False).eval()
    assert unet.config.num_class_embeds == NULL_CLASS + 1
    x = torch.randn(3, 1, 16, 16, dtype=unet.dtype)
    with torch.no_grad():
        out = unet(x, torch.tensor([0, 500, 999]), class_labels=torch.tensor([3, 7, NULL_CLASS])).sample
    assert out.shape == (3, 1, 16, 16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name, cls_name", [("digits-unet", "UNet2DModel"), ("digits-dit", "DiTTransformer2DModel")]
)
def test_shipped_reference_models_load_offline_with_diffusers(monkeypatch, name, cls_name):
    import diffusers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = asset_path(name)
    model = getattr(diffusers, cls_name).from_pretrained(folder, low_cpu_mem_usage=False).eval()
    params = sum(p.numel() for p in model.parameters())
    assert (5e6 if name == "digits-dit" else 8e6) <= params <= (10e6 if name == "digits-dit" else 16e6)
    training = json.loads((folder / "training.json").read_text())
    assert training["steps_done"] == training["config"]["steps"] and training["parameters"] == params
    # Sampling (DDIM, guidance) is a function of the seed: same seed, same images; other seed, others.
    labels = torch.tensor([0, 7])
    a, b = (sample(model.float(), labels, steps=3, guidance=2.0, seed=s) for s in (0, 0))
    assert torch.equal(a, b) and not torch.equal(a, sample(model.float(), labels, steps=3, seed=1))


def test_shipped_models_fit_the_package_budget():
    """digits-unet, digits-dit and the metric classifier ship as package data within 40 MB together."""
    total = sum(
        f.stat().st_size
        for name in ("digits-unet", "digits-dit", "digits-classifier")
        for f in asset_path(name).iterdir()
    )
    assert total <= 40e6, f"{total / 1e6:.1f} MB"


def test_asset_path_names_missing_models():
    with pytest.raises(FileNotFoundError, match="digits-unet-mini"):
        asset_path("no-such-model")


def test_reference_layers(model):
    names = reference_layers(model)
    modules = {name: model.get_submodule(name) for name in names}
    convs = [n for n, m in modules.items() if isinstance(m, torch.nn.Conv2d)]
    linears = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    assert convs and linears and len(convs) + len(linears) == len(names)
    assert all(modules[n].kernel_size == (3, 3) and modules[n].groups == 1 for n in convs)
    assert {n.rsplit(".", 1)[-1] for n in linears} == {"to_q", "to_k", "to_v", "0"}
    assert all(".attentions." in n for n in linears)


def test_collect_hessians_symmetric_psd(model):
    conv = "mid_block.resnets.0.conv1"
    linear = "mid_block.attentions.0.to_q"
    hessians = collect_hessians(model, [conv, linear], n_samples=12, seed=0, batch_size=8)
    for name, H in hessians.items():
        layer = model.get_submodule(name)
        K = layer.weight[0].numel()
        assert H.shape == (K, K) and H.dtype == torch.float32
        assert torch.allclose(H, H.T)
        assert torch.linalg.eigvalsh(H.double()).min() > -1e-6 * H.diagonal().max()
        assert H.diagonal().min() >= 0 and H.diagonal().sum() > 0
    assert not model.training
    assert not any(m._forward_hooks for m in model.modules())  # hooks are removed
    again = collect_hessians(model, [linear], n_samples=12, seed=0, batch_size=5)
    assert torch.allclose(again[linear], hessians[linear], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ data
def test_load_digits_images_shapes_ranges_and_split():
    train_x, train_y = load_digits_images("train")
    test_x, test_y = load_digits_images("test")
    all_x, all_y = load_digits_images("all")
    assert train_x.shape == (1438, 1, 16, 16) and test_x.shape == (359, 1, 16, 16)
    assert all_x.shape == (1797, 1, 16, 16)
    for x, y in ((train_x, train_y), (test_x, test_y)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() >= -1 and x.max() <= 1 and x.min() == -1
        assert set(y.tolist()) == set(range(10))
    # stratified: every class is ~20% test
    fractions = torch.bincount(test_y) / torch.bincount(all_y)
    assert ((fractions - 0.2).abs() < 0.01).all()
    # deterministic, disjoint, and a different seed gives a different split
    again_x, again_y = load_digits_images("test")
    assert torch.equal(again_x, test_x) and torch.equal(again_y, test_y)
    test_mask = torch.from_numpy(split_mask(all_y.numpy(), seed=0))  # a partition of "all"
    assert torch.equal(all_x[test_mask], test_x) and torch.equal(all_x[~test_mask], train_x)
    other_x, _ = load_digits_images("test", seed=1)
    assert not torch.equal(other_x, test_x)
    with pytest.raises(ValueError, match="split"):
        load_digits_images("validation")


def test_random_affine_is_deterministic_per_generator():
    x, _ = load_digits_images("test")
    x = x[:16]
    a = random_affine(x, torch.Generator().manual_seed(3))
    b = random_affine(x, torch.Generator().manual_seed(3))
    c = random_affine(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, x)
    # small transforms: the images stay close to the originals (far closer than to other digits)
    assert (a - x).abs().mean() < 0.5 * (x - x.roll(1, 0)).abs().mean()
    identity = random_affine(x, torch.Generator(), max_degrees=0, max_shift=0, scale_range=(1, 1))
    assert torch.allclose(identity, x, atol=1e-5)


# ------------------------------------------------------------------------------------------ results files
def test_write_results_schema_and_atomicity(tmp_path, monkeypatch):
    rows = [{"layer": "a", "relative_error": 0.5}, {"layer": "b", "relative_error": 0.25}]
    path = write_results("demo_results", rows, command="python x.py --flag", results_dir=tmp_path)
    assert path == tmp_path / "demo_results.json"
    data = json.loads(path.read_text())
    assert {"command", "commit", "device", "date", "torch", "rows"} <= set(data)
    assert data["command"] == "python x.py --flag"
    stamp = {"commit", "dirty", "command"}  # every row says where it came from
    assert [{k: v for k, v in r.items() if k not in stamp} for r in data["rows"]] == rows
    assert all(
        r["command"] == "python x.py --flag" and r["commit"] == data["commit"].split("+")[0]
        for r in data["rows"]
    )
    assert all(r["dirty"] == data["commit"].endswith("+dirty") for r in data["rows"])
    kept = write_results(
        "kept", [{"commit": "abc", "dirty": False, "command": "old", "x": 1}], results_dir=tmp_path
    )
    assert json.loads(kept.read_text())["rows"] == [
        {"commit": "abc", "dirty": False, "command": "old", "x": 1}
    ]
    kept.unlink()
    assert data["torch"] == torch.__version__
    assert data["date"].endswith("+00:00")
    assert data["commit"] == "unknown" or len(data["commit"].split("+")[0]) == 40
    assert data["device"]
    assert [p.name for p in tmp_path.iterdir()] == ["demo_results.json"]  # no temp file left behind

    # A failing write leaves the previous file intact and no temp file behind.
    with pytest.raises(ValueError):
        write_results("demo_results", [{"x": float("nan")}], results_dir=tmp_path)
    assert [r["layer"] for r in json.loads(path.read_text())["rows"]] == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["demo_results.json"]

    # Readers never see a partial file while writers replace it.
    seen = []
    stop = threading.Event()

    def read():
        while not stop.is_set():
            seen.append(len(json.loads(path.read_text())["rows"]))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(1, 30):
            write_results("demo_results", [{"i": i} for i in range(n)], command="c", results_dir=tmp_path)
    finally:
        stop.set()
        reader.join()
    assert seen and all(n >= 1 for n in seen)


def test_current_command_shows_python(monkeypatch):
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__spec__=None))  # a script
    script = str(REPO / "benchmarks" / "layer_solver.py")
    assert current_command([script, "--quick", "a b"]) == "python benchmarks/layer_solver.py --quick 'a b'"
    module = types.SimpleNamespace(
        __spec__=types.SimpleNamespace(name="avq_bench.demo")
    )  # python -m avq_bench.demo
    monkeypatch.setitem(sys.modules, "__main__", module)
    assert (
        current_command([str(REPO / "benchmarks" / "avq_bench" / "demo.py"), "--layer", "x"])
        == "python -m avq_bench.demo --layer x"
    )


# ------------------------------------------------------------------------------------------ benchmark
def test_layer_solver_quick_runs_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "benchmarks/layer_solver.py", "--quick", "--results-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "layer_solver_quick.json").read_text())
    assert data["command"].startswith("python benchmarks/layer_solver.py --quick")
    rows = [r for r in data["rows"] if r["layer"] != "summary"]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"synthetic-linear", "synthetic-conv", "conv3x3", "attn-linear"}
    assert {(r["method"], r["spec"]) for r in rows} == {
        ("rtn", "int2"),
        ("rtn", "int4"),
        ("gptq", "int2"),
        ("gptq", "int4"),
        ("aq", "1x8g4"),
        ("aq", "2x8g8"),
        ("aq", "2x8g4"),
    }
    for r in rows:
        assert set(r) == {
            "layer",
            "kind",
            "shape",
            "method",
            "spec",
            "code_bits",
            "total_bits",
            "relative_error",
            "seconds",
            "commit",
            "dirty",
            "command",
        }
        assert 0 <= r["relative_error"] < 1 and r["total_bits"] >= r["code_bits"] > 0 and r["seconds"] >= 0
    summary = [r for r in data["rows"] if r["layer"] == "summary"]
    assert summary and all(r["mean_ratio"] > 0 and r["median_ratio"] > 0 for r in summary)
    assert "rel.err" in result.stdout


def test_sample_drives_a_class_conditional_dit():
    # digits-dit goes through the same sampler: DiT needs a 1-D timestep and its eps half.
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=2,  # learned sigma: the sampler must keep only the eps half
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,  # digits; index 10 is the null class
        norm_num_groups=1,
    ).eval()
    with torch.no_grad():
        a = sample(dit, [0, 3, 9], steps=3, seed=5)
        b = sample(dit, [0, 3, 9], steps=3, seed=5)
    assert a.shape == (3, 1, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_load_reference_reads_the_model_class_from_config():
    model = load_reference("digits-unet-mini")
    assert type(model).__name__ == "UNet2DModel" and not model.training


def test_scale_benchmark_tiny_runs_and_resumes(tmp_path):
    """`benchmarks/scale.py --tiny`: the product's quantize path on a narrow SD 1.5-shaped UNet,
    stopped at its time limit and resumed; the results file has layer, pass and summary rows."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--tiny", "--work", str(tmp_path / "w")]
    command += ["--results-dir", str(tmp_path), "--steps", "2", "--num-samples", "1", "--blocks", "mid_block"]
    stopped = []
    for extra in (["--max-seconds", "0"], ["--max-seconds", "600", "--resume"]):
        result = subprocess.run(command + extra, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        stopped.append(json.loads((tmp_path / "scale_cpu.json").read_text())["rows"][-1]["complete"])
    assert stopped == [False, True]  # the watchdog stopped the first run at once; the resume finished
    rows = json.loads((tmp_path / "scale_cpu.json").read_text())["rows"]
    summary = rows[-1]
    assert summary["kind"] == "summary" and summary["complete"] and summary["runs"] >= 1
    layers = [r for r in rows if r["kind"] == "layer"]
    assert len(layers) == summary["layers_done"] > 1 and all(r["seconds_per_mweight"] > 0 for r in layers)
    assert summary["peak_rss_gib"] > 0 and summary["projected_whole_model_solve_seconds"] > 0
    # LAQ timing mode: measure in a work folder of its own, compare each layer with the plain solves.
    result = subprocess.run(
        command + ["--bits-budget", "16"], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "scale_cpu.json").read_text())["rows"]
    assert [r["kind"] for r in rows].count("summary") == 1  # the plain rows are kept beside LAQ's
    laq = rows[-1]
    assert laq["kind"] == "laq_summary" and laq["measuring_complete"]
    assert laq["layers_measured"] == laq["layers_total"] == laq["layers_compared"] == summary["layers_solved"]
    assert laq["laq_measure_rounds"] == 0 and not laq["laq_probe_all"] and laq["ratio_compared"] > 0
    measured = [r for r in rows if r["kind"] == "laq_layer"]
    assert all(len(r["probed"]) == 1 and r["ratio"] > 0 for r in measured)


def test_solver_devices_quick_and_results_stamps(tmp_path, monkeypatch):
    """`benchmarks/solver_devices.py --quick` writes its rows (CPU only here); a tree copied to another
    machine stamps the commit named in `AVQ_SOURCE_COMMIT`, and results carry the triton version."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AVQ_SOURCE_COMMIT": "0123abc+dirty"}
    command = [sys.executable, str(REPO / "benchmarks" / "solver_devices.py"), "--quick"]
    result = subprocess.run(
        command + ["--results-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stem = "solver_devices_quick" + ("" if not torch.cuda.is_available() else "_" + device_slug("cuda"))
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    assert data["commit"] == "0123abc+dirty" and data["rows"][0]["dirty"] and "triton" in data
    layers = [r for r in data["rows"] if r["layer"] != "host"]
    assert [r["layer"] for r in layers] == ["synthetic-linear", "synthetic-conv"]
    assert all(0 <= r["cpu_error"] < 1 and r["seed"] == 0 for r in layers)
    assert device_slug("cpu") == "cpu"
    monkeypatch.delenv("AVQ_SOURCE_COMMIT", raising=False)
    assert git_commit() != "0123abc+dirty"


def test_scale_benchmark_sd3_goes_through_its_pipeline(tmp_path):
    """`benchmarks/scale.py --model sd3 --tiny`: an SD3-shaped transformer quantized through a
    `StableDiffusion3Pipeline` (flow matching, stand-in encoders of the transformer's widths), written to a
    results file of its own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AVQ_SOURCE_COMMIT": "a" * 40}
    command = [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--model", "sd3", "--tiny"]
    command += ["--work", str(tmp_path / "w"), "--results-dir", str(tmp_path), "--steps", "2"]
    result = subprocess.run(
        command + ["--num-samples", "1"], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "scale_cpu.json").exists()  # SD 1.5's file is left alone
    rows = json.loads((tmp_path / "scale_sd3_cpu.json").read_text())["rows"]
    summary = rows[-1]
    assert summary["model"] == "sd3-tiny" and summary["complete"]
    assert "StableDiffusion3Pipeline" in summary["calibration"]["source"]
    layers = {r["layer"] for r in rows if r["kind"] == "layer"}
    assert "context_embedder" in layers and "transformer_blocks.0.attn.add_q_proj" in layers
    assert not any(name.startswith("transformer_blocks.1.") for name in layers)  # outside --blocks: FP
    config = json.loads((tmp_path / "w" / "sd3-tiny" / "config.json").read_text())
    assert config["_class_name"] == "SD3Transformer2DModel" and config["num_layers"] == 3
    # Rows keep the commit of the run that computed them: an LAQ run from another tree adds its own rows
    # and leaves the plain run's stamps alone.
    assert {r["commit"] for r in rows} == {"a" * 40}
    env["AVQ_SOURCE_COMMIT"] = "b" * 40
    command += ["--num-samples", "1", "--bits-budget", "16"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "scale_sd3_cpu.json").read_text())["rows"]
    stamps = {r["kind"]: r["commit"] for r in rows}
    assert stamps == {"layer": "a" * 40, "pass": "a" * 40, "summary": "a" * 40, "laq_layer": "b" * 40,
                      "laq_summary": "b" * 40}  # fmt: skip


def test_v_step_ablation_benchmark_runs(tmp_path, one_thread):
    """`benchmarks/v_step_ablation.py` on a quickly quantized mini UNet: a row per (mode, seed) and a summary
    per mode; P only changes no code. Both run in this process (two interpreters' imports are a third of
    the test's time)."""
    from avq.cli import main as avq_main

    saved = tmp_path / "q"
    quantize = ["quantize", "--model", "digits-unet-mini", "--preset", "w2a8", "--out", str(saved), "--quiet"]
    quantize += ["--num-samples", "4", "--steps", "4", "--timesteps-kept", "2"]
    quantize += ["--solver-rounds", "1"]  # a draft solve: the benchmark, not the solver, is under test
    assert avq_main(quantize) == 0
    ablation = _benchmark_module("v_step_ablation")
    argv = ["--quantized", str(saved), "--model", "digits-unet-mini", "--steps", "2", "--trajectories", "4"]
    argv += ["--heldout", "4", "--seeds", "0", "1", "--modes", "metric", "p-only"]
    argv += ["--results-dir", str(tmp_path)]
    assert ablation.main(argv) == 0
    rows = json.loads((tmp_path / "v_step_ablation.json").read_text())["rows"]
    runs = [r for r in rows if not r.get("summary")]
    assert [(r["mode"], r["seed"]) for r in runs] == [
        ("metric", 0),
        ("metric", 1),
        ("p-only", 0),
        ("p-only", 1),
    ]
    assert all(r["codes_changed_total"] == 0 for r in runs if r["mode"] == "p-only")
    assert {r["heldout_trajectories"] for r in runs} == {4}
    assert len({r["heldout_loss_before"] for r in runs}) == 1  # one held-out set, scored once before
    summaries = [r for r in rows if r.get("summary")]
    assert [s["mode"] for s in summaries] == ["metric", "p-only"] and all(
        s["heldout_loss_sd"] >= 0 for s in summaries
    )
