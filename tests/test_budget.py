"""LAQ: the integer program against brute force, whole-model sensitivity, and the pipeline's budget mode."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch
from test_calibration import TINY, tiny_unet

import avq
from avq.calibration.config import CalibrationConfig
from avq.calibration.statistics import calibrate
from avq.core.bits import total_bits
from avq.core.modules import AQModule
from avq.core.spec import UniformSpec
from avq.core.uniform_modules import UniformModule
from avq.planning.budget import BudgetError, brute_force_choice, choose_specs
from avq.planning.presets import preset_config
from avq.planning.sensitivity import FP, Probe, make_probe, measure_sensitivity
from avq.run.quantize import quantize
from avq.run.report import QuantizeReport

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = avq.SolverOptions(max_rounds=1, kmeans_iters=3)
PROBE = CalibrationConfig(num_samples=2, batch_size=2, num_steps=4, num_timesteps_kept=2, seed=7)

# {layer: {option: (error, total_bits)}}: a cheap option is always worse, the optimum is not greedy.
TABLE = {
    "a": {"2x8g4": (0.010, 4.5), "1x8g4": (0.040, 2.5), "1x4g2": (0.090, 2.2), FP: (0.0, 16.0)},
    "b": {"2x8g4": (0.002, 4.1), "1x8g4": (0.030, 2.1), FP: (0.0, 16.0)},
    "c": {"1x8g4": (0.200, 3.0), FP: (0.0, 16.0)},
    "d": {"2x8g4": (0.050, 4.8), "1x8g4": (0.060, 2.8), "1x4g2": (0.300, 2.4), FP: (0.0, 16.0)},
}
SIZES = {"a": 4096, "b": 16384, "c": 256, "d": 2048}


def _bits(choice: dict[str, str]) -> float:
    return sum(TABLE[n][o][1] * SIZES[n] for n, o in choice.items()) / sum(SIZES.values())


@pytest.mark.parametrize("budget", [2.25, 2.4, 2.6, 3.0, 3.5, 4.2, 5.0, 16.0])
def test_milp_matches_brute_force(budget):
    expected = brute_force_choice(TABLE, SIZES, budget)
    got = choose_specs(TABLE, SIZES, budget)
    assert _bits(got.choice) <= budget + 1e-9
    assert got.total_bits == pytest.approx(_bits(got.choice))
    err = lambda c: sum(TABLE[n][o][0] for n, o in c.items())  # noqa: E731
    assert got.predicted_error == pytest.approx(err(expected), abs=1e-12)
    assert err(got.choice) == pytest.approx(err(expected), abs=1e-12)
    assert set(got.choice) == set(TABLE)


def test_milp_random_tables_vs_brute_force():
    g = torch.Generator().manual_seed(0)
    for trial in range(10):
        table, sizes = {}, {}
        for layer in range(4):
            opts = {}
            for k in range(3):
                opts[f"s{k}"] = (
                    float(torch.rand(1, generator=g)),
                    1.5 + 4 * float(torch.rand(1, generator=g)),
                )
            opts[FP] = (0.0, 16.0)
            table[f"l{layer}"] = opts
            sizes[f"l{layer}"] = int(torch.randint(100, 10000, (1,), generator=g))
        budget = 2.0 + 2.0 * trial / 9
        expected = brute_force_choice(table, sizes, budget)
        if expected is None:
            with pytest.raises(BudgetError):
                choose_specs(table, sizes, budget)
            continue
        got = choose_specs(table, sizes, budget).choice
        total = lambda c, table=table: sum(table[n][o][0] for n, o in c.items())  # noqa: E731
        assert total(got) == pytest.approx(total(expected), abs=1e-9)


def test_infeasible_budget_names_minimum():
    minimum = (2.2 * 4096 + 2.1 * 16384 + 3.0 * 256 + 2.4 * 2048) / sum(SIZES.values())
    with pytest.raises(BudgetError, match=r"minimum achievable budget is 2\.1") as info:
        choose_specs(TABLE, SIZES, 2.0)
    assert f"{minimum:.4f}" in str(info.value)
    assert choose_specs(TABLE, SIZES, math.ceil(minimum * 1000) / 1000).total_bits <= minimum + 1e-3


def test_choice_prints(capsys):
    choose_specs(TABLE, SIZES, 3.0, verbose=True)
    out = capsys.readouterr().out
    assert "LAQ: budget 3 total bits/weight" in out and "a" in out


@pytest.fixture(scope="module")
def sensitivity():
    model = tiny_unet()
    names = ["down_blocks.0.resnets.0.conv1", "down_blocks.1.attentions.0.to_q"]
    hessians = calibrate(model, names, TINY, progress=False)
    candidates = {
        names[0]: [avq.QuantSpec(1, 4, 8), avq.QuantSpec(2, 8, 4), FP],
        names[1]: [avq.QuantSpec(1, 4, 8), avq.QuantSpec(2, 8, 4), FP],
    }
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = make_probe(model, PROBE)
    table = measure_sensitivity(model, names, candidates, probe, hessians, solver=FAST)
    return model, names, table, before, probe


def test_sensitivity_orders_specs_and_fp_is_zero(sensitivity):
    model, names, table, _, _ = sensitivity
    for name in names:
        errors = table.errors[name]
        assert errors[FP] == 0.0 and table.bits[name][FP] == 16
        assert errors["1x4g8"] > errors["2x8g4"] > 0, errors
        assert table.bits[name]["1x4g8"] < table.bits[name]["2x8g4"]
        assert set(table.results[name]) == {"1x4g8", "2x8g4"}  # solved weights kept for reuse
        assert table.sizes[name] == model.get_submodule(name).weight.numel()


def test_sensitivity_leaves_model_untouched(sensitivity):
    model, _, _, before, probe = sensitivity
    assert not any(isinstance(m, AQModule) for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert probe.error(model) == 0.0


def test_one_probe_per_layer_scales_the_others_by_layer_error(sensitivity, monkeypatch):
    """By default only each layer's cheapest candidate is probed; the others' errors are its probed error
    scaled by the solver's layer errors. `probe_all` probes each: the same probed value, and the scaled
    estimates land near the whole-model measure (the same order of magnitude on this tiny model)."""
    model, names, table, _, probe = sensitivity
    for name in names:
        assert table.probed[name] == ["1x4g8"]  # the fewest total bits
        layer = table.layer_errors[name]
        assert table.errors[name]["2x8g4"] == pytest.approx(
            table.errors[name]["1x4g8"] * layer["2x8g4"] / layer["1x4g8"]
        )
        row = table.to_dict()[name]
        assert row["1x4g8"]["probed"] and not row["2x8g4"]["probed"] and "layer_error" in row["2x8g4"]
    calls = []
    error = Probe.error
    monkeypatch.setattr(Probe, "error", lambda self, m: calls.append(1) or error(self, m))
    candidates = {n: [avq.QuantSpec(1, 4, 8), avq.QuantSpec(2, 8, 4), FP] for n in names}
    hessians = calibrate(model, names, TINY, progress=False)
    full = measure_sensitivity(model, names, candidates, probe, hessians, solver=FAST, probe_all=True)
    assert len(calls) == 2 * len(names)
    for name in names:
        assert full.probed[name] == ["1x4g8", "2x8g4"]
        assert full.errors[name]["1x4g8"] == table.errors[name]["1x4g8"]
        ratio = table.errors[name]["2x8g4"] / full.errors[name]["2x8g4"]
        assert 0.1 < ratio < 10, (name, ratio)


def test_measuring_can_spend_the_hessians(sensitivity):
    """`spend_hessians`: the last candidate of a layer solves in its Hessian (no copy); the table is the
    same as measuring on copies, and without it the Hessians are left as given."""
    model, names, table, _, probe = sensitivity
    candidates = {n: [avq.QuantSpec(1, 4, 8), avq.QuantSpec(2, 8, 4), FP] for n in names}
    hessians = calibrate(model, names, TINY, progress=False)
    kept = {n: h.clone() for n, (h, _) in hessians.items()}
    again = measure_sensitivity(model, names, candidates, probe, hessians, solver=FAST)
    assert all(torch.equal(hessians[n][0], kept[n]) for n in names)
    spent = measure_sensitivity(model, names, candidates, probe, hessians, solver=FAST, spend_hessians=True)
    assert spent.errors == again.errors == table.errors
    assert any(not torch.equal(hessians[n][0], kept[n]) for n in names)  # worked in place


def test_probe_spans_timesteps_with_guidance(sensitivity):
    _, _, _, _, probe = sensitivity
    assert len(probe.inputs) == 2 and probe.guided
    steps = [int(t) for _, t, _ in probe.inputs]
    assert steps[0] > steps[1]  # first and last kept step of the trajectory
    x, _, kwargs = probe.inputs[0]
    assert x.shape[0] == 2 * PROBE.num_samples and kwargs["class_labels"].shape == (4,)


@pytest.fixture(scope="module")
def run_at_6() -> tuple[dict, dict]:
    """The tiny UNet quantized under 6 total bits (checked), once: its LAQ report and state dict."""
    return _quantize_with_budget_6()


@pytest.fixture(scope="module")
def table_at_6(run_at_6) -> dict:
    """The sensitivity table of `run_at_6`."""
    return run_at_6[0]["sensitivity"]


def test_quantize_with_bits_budget(table_at_6):
    assert table_at_6


def _quantize_with_budget_6() -> tuple[dict, dict]:
    """Quantize the tiny UNet under 6 total bits, check the report; return its budget and state dict."""
    config = preset_config("w2a16", solver=FAST, bits_budget=6.0)
    report = QuantizeReport()
    model = quantize(tiny_unet(), config, TINY, progress=False, report=report)
    budget = report.budget
    assert budget is not None and budget["budget_total_bits"] == 6.0
    summary = report.summary()
    assert summary["total_bits_all"] == pytest.approx(budget["total_bits"], rel=1e-9)
    assert summary["total_bits_all"] <= 6.0
    rows = {r["name"]: r for r in report.rows}
    assert rows["conv_in"]["status"] == "kept_fp" and "first layer" in rows["conv_in"]["reason"]
    assert budget["choice"]["conv_in"] == FP
    for name, key in budget["choice"].items():
        row = rows[name]
        if key == FP:
            assert row["status"] == "kept_fp"
        else:
            assert row["status"] == "quantized" and row["spec"] == key
            assert isinstance(model.get_submodule(name), AQModule)
            assert row["sensitivity"] == budget["sensitivity"][name][key]["error"]
    # the layers rule 4 used to keep (codebook overhead) are candidates now, with FP as an option
    assert set(budget["sensitivity"]["down_blocks.1.attentions.0.to_q"]) >= {"1x8g4", "2x4g2", FP}
    assert any("LAQ: budget 6" in n for n in report.notes)
    return budget, model.state_dict()


def test_bits_budget_reuses_a_given_sensitivity_table(table_at_6, monkeypatch):
    """A budget sweep: the table of an earlier run is reused, nothing is measured again, and the choice is
    the integer program's answer on that table under the new budget. A table of other layers or options is
    refused before anything is solved."""
    table = table_at_6
    monkeypatch.setattr("avq.run.laq.measure_sensitivity", lambda *a, **k: pytest.fail("measured again"))
    report = QuantizeReport()
    config = preset_config("w2a16", solver=FAST, bits_budget=3.0)
    quantize(tiny_unet(), config, TINY, progress=False, report=report, sensitivity=table)
    entries = {n: {o: (v["error"], v["total_bits"]) for o, v in opts.items()} for n, opts in table.items()}
    sizes = {r["name"]: math.prod(r["shape"]) for r in report.rows}
    assert report.budget["choice"] == choose_specs(entries, sizes, 3.0).choice
    assert report.summary()["total_bits_all"] <= 3.0
    assert any("sensitivity table given" in n for n in report.notes)

    name = next(n for n, opts in table.items() if len(opts) > 1)
    broken = {**table, name: {FP: table[name][FP]}}
    with pytest.raises(ValueError, match=f"layer '{name}'.*expected options"):
        quantize(tiny_unet(), config, TINY, progress=False, sensitivity=broken)
    with pytest.raises(ValueError, match="layers this model does not quantize"):
        quantize(tiny_unet(), config, TINY, progress=False, sensitivity={**table, "nope": {FP: {}}})


def test_quantize_bits_budget_infeasible(monkeypatch):
    monkeypatch.setattr(
        "avq.calibration.source.calibrate", lambda *a, **k: pytest.fail("calibrated before the check")
    )
    with pytest.raises(BudgetError, match="minimum achievable budget"):
        quantize(tiny_unet(), preset_config("w2a16", solver=FAST, bits_budget=1.0), TINY, progress=False)


def test_minimum_total_bits_is_where_the_budget_check_draws_the_line(monkeypatch):
    """`minimum_total_bits`: a budget just below it is refused before calibrating, one at it is not."""
    from avq.planning.reach import minimum_total_bits

    config = preset_config("w2a16", solver=FAST, bits_budget=1.0)
    least = minimum_total_bits(tiny_unet(), config)
    assert 1.0 < least < 16.0
    calibrated = []

    def stop(*a, **k):
        calibrated.append(1)
        raise RuntimeError("calibration reached")

    monkeypatch.setattr("avq.calibration.source.calibrate", stop)
    with pytest.raises(BudgetError, match="minimum achievable budget"):
        quantize(tiny_unet(), replace(config, bits_budget=least - 1e-3), TINY, progress=False)
    with pytest.raises(RuntimeError, match="calibration reached"):
        quantize(tiny_unet(), replace(config, bits_budget=least + 1e-6), TINY, progress=False)
    assert calibrated == [1]


def test_budget_candidates_span_presets():
    """With a budget the candidates are the same at every preset: both 2-bit and two 4-bit specs, so a W2
    budget above 2 bits can buy 4 bits where it matters; without one, the preset's own specs."""
    names = {"1x8g4", "1x4g2", "2x8g4", "2x4g2"}
    for preset in ("w2a8", "w4a16"):
        config = preset_config(preset, bits_budget=2.5)
        assert {s.name for s in config.linear_specs} == {s.name for s in config.conv_specs} == names
    assert [s.name for s in preset_config("w2a8").conv_specs] == ["1x8g4", "1x4g2"]
    assert preset_config("w2a8", bits_budget=2.5).activation_bits == 8


def test_bits_budget_config_validation():
    with pytest.raises(avq.planning.PresetError, match="bits_budget"):
        preset_config("w2a16", "gptq", bits_budget=3.0)
    with pytest.raises(avq.planning.PresetError, match="bits_budget"):
        preset_config("w2a16", bits_budget=0)
    with pytest.raises(avq.planning.PresetError, match="laq_measure_rounds"):
        preset_config("w2a16", bits_budget=3.0, laq_measure_rounds=-1)


def test_brute_force_helper_is_exhaustive():
    # sanity of the reference itself: it agrees with a direct enumeration at one budget
    best = min(
        (c for c in itertools.product(*TABLE.values()) if _bits(dict(zip(TABLE, c, strict=True))) <= 3.0),
        key=lambda c: sum(TABLE[n][o][0] for n, o in zip(TABLE, c, strict=True)),
    )
    assert brute_force_choice(TABLE, SIZES, 3.0) == dict(zip(TABLE, best, strict=True))


@pytest.mark.parametrize("measure_rounds", [1, None])
def test_laq_measures_with_a_short_solve_then_solves_the_choice(monkeypatch, measure_rounds):
    """Candidates are measured with `laq_measure_rounds` solver rounds; the chosen specs are then solved with
    the full solver. With None the measured (full) results are reused and nothing is solved twice."""
    import avq.run.laq
    import avq.run.quantize

    seen, kept, solved = [], [], []
    measure, solve = avq.run.laq.measure_sensitivity, avq.run.quantize._solve
    monkeypatch.setattr(
        avq.run.laq,
        "measure_sensitivity",
        lambda *a, **k: seen.append(k["solver"]) or kept.append(k["keep_results"]) or measure(*a, **k),
    )
    monkeypatch.setattr(
        avq.run.quantize, "_solve", lambda *a, **k: solved.append(a[1].name) or solve(*a, **k)
    )
    solver = avq.SolverOptions(max_rounds=2, kmeans_iters=3)
    config = preset_config("w2a16", solver=solver, bits_budget=6.0, laq_measure_rounds=measure_rounds)
    report = QuantizeReport()
    quantize(tiny_unet(), config, TINY, progress=False, report=report)
    assert seen and {s.max_rounds for s in seen} == {1 if measure_rounds else 2}  # one call per layer
    assert set(kept) == {measure_rounds is None}  # short solves are redone, so not held in memory
    quantized = [r["name"] for r in report.rows if r["status"] == "quantized"]
    assert quantized and solved == (quantized if measure_rounds else [])


def test_laq_streams_and_resumes_its_measuring(run_at_6, tmp_path, monkeypatch):
    """LAQ measures pass by pass (at most 8 layers' Hessians at a time here) and gets the one-pass answer
    (`run_at_6`); a run stopped after its first measured pass resumes measuring only the rest, and saves the
    same model."""
    import dataclasses

    import avq.run.laq

    config = preset_config("w2a16", solver=FAST, bits_budget=6.0)
    whole_budget, reference = run_at_6
    streamed = dataclasses.replace(TINY, layers_per_pass=8)  # passes of <= 8 layers, each calibrating anew
    calls: list[list[str]] = []
    measure = avq.run.laq.measure_sensitivity

    def stop_after_first(model, names, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(list(names))
        return measure(model, names, *args, **kwargs)

    monkeypatch.setattr(avq.run.laq, "measure_sensitivity", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_unet(), config, streamed, progress=False, checkpoint_dir=tmp_path / "ck")
    assert len(calls) == 1 and 1 <= len(calls[0]) <= 8  # one pass measured, then stopped

    resumed_calls: list[list[str]] = []
    monkeypatch.setattr(
        avq.run.laq,
        "measure_sensitivity",
        lambda model, names, *a, **k: resumed_calls.append(list(names)) or measure(model, names, *a, **k),
    )
    report = QuantizeReport()
    folder = tmp_path / "ck"
    model = quantize(
        tiny_unet(), config, streamed, progress=False, report=report, checkpoint_dir=folder, resume=True
    )
    measured = [n for names in resumed_calls for n in names]
    assert not set(calls[0]) & set(measured) and len(resumed_calls) > 1
    assert report.budget["choice"] == whole_budget["choice"]
    strip = lambda table: {n: {o: v["error"] for o, v in opts.items()} for n, opts in table.items()}  # noqa: E731
    assert strip(report.budget["sensitivity"]) == strip(whole_budget["sensitivity"])
    assert report.budget["measure_seconds"] > 0
    a, b = reference, model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_laq_drops_small_codebooks_where_large_ones_cost_nothing():
    """On a large layer `1x4g2`/`2x4g2` (16-entry codebooks) are not measured: `1x8g4`/`2x8g4` have the same
    code bits for < DOMINATED_BITS more total bits. On a small layer every fitting spec stays a candidate."""
    from avq.planning.plan import LayerPlan
    from avq.run.laq import DOMINATED_BITS, laq_candidates

    config = preset_config("w2a16", bits_budget=3.0)
    big = LayerPlan("big", "conv2d", (1280, 2560, 3, 3), avq.QuantSpec(1, 8, 4))
    small = LayerPlan("small", "conv2d", (32, 32, 3, 3), avq.QuantSpec(1, 8, 4))
    assert [s.name for s in laq_candidates(big, config)] == ["1x8g4", "2x8g4"]
    assert {s.name for s in laq_candidates(small, config)} == {"1x8g4", "1x4g2", "2x8g4", "2x4g2"}
    assert 0 < DOMINATED_BITS < 0.1


def test_laq_may_choose_uniform_grids(tmp_path):
    """`laq_uniform`: GPTQ grids are LAQ candidates at their true total bits; a chosen one is solved by GPTQ
    into a packed uniform layer, and the model saves and loads as it ran."""
    grids = (UniformSpec(4), UniformSpec(4, 16))
    config = preset_config("w4a16", solver=FAST, bits_budget=4.6, laq_uniform=grids)
    report = QuantizeReport()
    model = quantize(tiny_unet(), config, TINY, progress=False, report=report)
    budget, rows = report.budget, {r["name"]: r for r in report.rows}
    for name, options in budget["sensitivity"].items():
        if set(options) != {FP}:
            assert {"int4", "int4g16"} <= set(options), name
            shape = rows[name]["shape"]
            assert options["int4g16"]["total_bits"] == pytest.approx(total_bits(shape, UniformSpec(4, 16)))
    chosen = {name: key for name, key in budget["choice"].items() if key.startswith("int")}
    assert chosen, "the tiny UNet's small layers are cheaper as 4-bit grids than as AQ under 4.6 bits"
    assert any(not key.startswith("int") and key != FP for key in budget["choice"].values())  # AQ too
    for name, key in chosen.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, UniformModule) and layer.name == key and rows[name]["spec"] == key
    assert report.summary()["total_bits_all"] <= 4.6
    expected = {n: model.get_submodule(n).qweight.codes.clone() for n in chosen}
    loaded = avq.load_quantized(avq.save_quantized(model, tmp_path / "q"))
    assert all(torch.equal(loaded.get_submodule(n).qweight.codes, codes) for n, codes in expected.items())
    with pytest.raises(avq.planning.PresetError, match="laq_uniform are LAQ candidates"):
        preset_config("w4a16", laq_uniform=grids)


def test_laq_floor_keeps_conditioning_layers_at_the_preset_bits(table_at_6, monkeypatch):
    """With a budget the timestep/conditioning layers get no fewer code bits than the preset, even where the
    table predicts their 2-bit options harmless (without the floor LAQ takes them); `("*", 4)` floors every
    layer, and the least reachable budget rises with it. Every candidate is still in the table."""
    from avq.planning.plan import laq_floor_bits
    from avq.planning.presets import CONDITIONING_LAYERS, default_laq_floor
    from avq.planning.reach import minimum_total_bits

    table = table_at_6
    conditioning = [n for n in table if set(table[n]) != {FP} and ("time_emb" in n or "class_emb" in n)]
    assert {"time_embedding.linear_1", "time_embedding.linear_2"} <= set(conditioning)
    assert any(n.endswith("time_emb_proj") for n in conditioning)
    cheap = {  # 2 code bits predicted as good as FP on the conditioning layers
        n: {o: {**v, "error": 0.0} if o in ("1x8g4", "1x4g2") else v for o, v in opts.items()}
        if n in conditioning
        else opts
        for n, opts in table.items()
    }
    monkeypatch.setattr("avq.run.laq.measure_sensitivity", lambda *a, **k: pytest.fail("measured again"))

    def choice(**overrides) -> dict:
        report = QuantizeReport()
        config = preset_config("w4a16", solver=FAST, bits_budget=5.0, **overrides)
        quantize(tiny_unet(), config, TINY, progress=False, report=report, sensitivity=cheap)
        return report.budget

    floored = choice()
    assert floored["floor_bits"] == {n: 4.0 for n in conditioning}
    assert all(floored["choice"][n] in ("2x8g4", "2x4g2", FP) for n in conditioning), floored["choice"]
    assert set(floored["sensitivity"]["time_embedding.linear_1"]) >= {"1x8g4", "2x8g4", FP}  # all measured
    free = choice(laq_floor=())
    assert any(free["choice"][n] in ("1x8g4", "1x4g2") for n in conditioning), free["choice"]

    config = preset_config("w4a16", bits_budget=5.0)
    assert config.laq_floor == default_laq_floor("w4a16")
    assert len(config.laq_floor) == len(CONDITIONING_LAYERS)
    everywhere = replace(config, laq_floor=(*config.laq_floor, ("*", 4)))
    assert laq_floor_bits("down_blocks.0.resnets.0.conv1", config) == 0.0
    assert laq_floor_bits("down_blocks.0.resnets.0.time_emb_proj", config) == 4.0
    assert laq_floor_bits("down_blocks.0.resnets.0.conv1", everywhere) == 4.0
    assert minimum_total_bits(tiny_unet(), everywhere) > minimum_total_bits(tiny_unet(), config) + 1
    low = preset_config("w1.5a8", bits_budget=1.5)
    assert laq_floor_bits("transformer_blocks.0.norm1.emb.timestep_embedder.linear_1", low) == 1.5
    with pytest.raises(avq.planning.PresetError, match="laq_floor constrains"):
        preset_config("w4a16", laq_floor=(("*", 4),))
    with pytest.raises(avq.planning.PresetError, match="laq_floor must be"):
        preset_config("w4a16", bits_budget=5.0, laq_floor=(("*", 0),))
