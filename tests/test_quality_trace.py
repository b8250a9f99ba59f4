"""The quality table's traceability: rows stamped per commit, stale rows refused or visibly marked."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))  # quality.py imports its sibling sample_sets
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


ROW = {"model": "digits-unet", "config": "avq:w2a8", "method": "avq", "preset": "w2a8", "code_bits": 2.0,
       "total_bits": 2.1, "fid": 1.0, "fid_floor": 0.5, "sfid": 1.0, "is": 9.0, "class_accuracy": 0.99,
       "quantize_minutes": 1.0, "n": 10}  # fmt: skip


def test_stale_rows_are_refused_or_marked():
    quality = _load("quality")
    head = "a" * 40
    current = {**ROW, "commit": head, "dirty": False}
    older = {**ROW, "config": "gptq:w2a8", "commit": "b" * 40, "dirty": False}
    dirty = {**ROW, "config": "rtn:w2a8", "commit": head, "dirty": True}
    unstamped = {**ROW, "config": "avq:w4a8"}
    rows = [current, older, dirty, unstamped]
    assert quality.stale_rows(rows, head) == [older, dirty, unstamped]
    assert quality.stale_rows(rows, head + "+dirty") == [older, dirty, unstamped]
    assert quality.checked_rows([current], head, allow_stale=False) == [current]
    with pytest.raises(SystemExit, match="3 rows are not of the current commit") as refused:
        quality.checked_rows(rows, head, allow_stale=False)
    assert "gptq:w2a8 (bbbbbbbbbbbb)" in str(refused.value)
    marked = quality.checked_rows(rows, head, allow_stale=True)
    assert [r.get("stale", False) for r in marked] == [False, True, True, True]
    # ... and the README table shows which rows are stale, and of which commit.
    make_tables = _load("make_tables")
    data = {"command": "python benchmarks/quality.py", "commit": head, "device": "cpu", "date": "today",
            "rows": marked[:2]}  # fmt: skip
    table = make_tables.quality_table(data)
    assert "| avq:w2a8 |" in table and "gptq:w2a8 ‡ `bbbbbbb`" in table and "‡ stale" in table
    assert "‡" not in make_tables.quality_table({**data, "rows": [current]})


def test_a_table_pinned_to_one_commit_names_it_and_what_changed_since():
    """`--collect --at C`: rows of C are accepted (others refused); the source line names C and whether the
    code that computes the rows changed since (a real diff of this repository)."""
    import subprocess

    quality = _load("quality")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    first = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split()[0]  # fmt: skip
    pinned = {**ROW, "commit": first, "dirty": False}
    assert quality.checked_rows([pinned], "c" * 40, allow_stale=False, at=first) == [pinned]
    with pytest.raises(SystemExit, match="not of the current commit"):
        quality.checked_rows([{**ROW, "commit": head, "dirty": False}], head, allow_stale=False, at=first)
    changed = quality.changed_since(first)
    assert changed and all(p.startswith(quality.RESULT_PATHS) for p in changed)
    make_tables = _load("make_tables")
    data = {"command": "python benchmarks/quality.py --collect --at X", "commit": head, "device": "cpu",
            "date": "today", "rows": [pinned], "rows_commit": first}  # fmt: skip
    moved = make_tables.quality_table({**data, "changed_since_rows_commit": changed})
    assert f"computed at commit `{first[:12]}`" in moved and "has changed since" in moved
    same = make_tables.quality_table({**data, "changed_since_rows_commit": []})
    assert "unchanged since" in same


def test_grouped_uniform_configs_parse():
    quality = _load("quality")
    assert quality._uniform_groups("gptq-g128") == ("gptq", 128)
    assert quality._uniform_groups("rtn-g64") == ("rtn", 64)
    assert quality._uniform_groups("avq-laq+0.5") == ("avq-laq+0.5", None)
    assert quality._uniform_groups("avq-seq") == ("avq-seq", None)
    assert {"gptq-g128:w2a8", "gptq-g64:w2a8", "rtn-g64:w2a8"} <= set(quality.CONFIGS)


def test_fine_tuning_ablation_is_shown_over_seeds():
    make_tables, quality = _load("make_tables"), _load("quality")
    assert quality.pv_method("avq-pv-none-s2") == ("avq-pv-none", 2)
    assert quality.pv_method("avq-p-only") == ("avq-p-only", 0) and quality.pv_method("avq") == ("avq", 0)
    assert {"avq-p-only:w2a8", "avq-p-only-s2:w2a8", "avq-pv-all-s1:w2a8"} <= set(quality.PV_CONFIGS)
    assert make_tables.ABLATION == quality.ABLATION
    rows = [
        {**ROW, "config": f"{m}:w2a8", "method": m, "psnr": p, "codes_changed_total": c}
        for m, p, c in (("avq-pv", 40.0, 0.1), ("avq-pv-s1", 41.0, 0.2), ("avq-p-only", 38.0, 0.0))
    ]
    assert make_tables.ablation_lines(rows[:1]) == []  # one seed: nothing to average yet
    table = "\n".join(make_tables.ablation_lines(rows))
    assert "| digits-unet | avq-pv | 2 | 40.50 ± 0.71 |" in table
    assert "| digits-unet | avq-p-only | 1 | 38.00 ± nan |" in table


def test_best_uniform_row_is_marked_and_compared():
    make_tables = _load("make_tables")

    def row(config: str, bits: float, psnr: float, fid_to_fp: float) -> dict:
        method = config.split(":")[0]
        return {
            **ROW,
            "config": config,
            "method": method,
            "total_bits": bits,
            "psnr": psnr,
            "fid_to_fp": fid_to_fp,
        }

    rows = [
        row("gptq:w2a8", 2.04, 28.0, 0.3),
        row("gptq-g64:w2a8", 2.54, 31.0, 0.2),
        row("avq-laq:w2a8", 2.03, 34.0, 0.1),
        row("avq-pv:w2a8", 2.6, 40.0, 0.05),  # more bits than the best uniform row: not compared
    ]
    assert make_tables.best_uniform(rows)[("digits-unet", "w2a8")] is rows[1]  # grouped GPTQ is strongest
    (line,) = [x for x in make_tables.against_best_uniform(rows) if x.startswith("- ")]
    assert "`avq-laq:w2a8`" in line and "★ `gptq-g64:w2a8`" in line and "AVQ ahead" in line
    meta = {"command": "c", "commit": "a" * 40, "device": "d", "date": "t"}
    assert "| gptq-g64:w2a8 ★ |" in make_tables.quality_table({"rows": rows, **meta})


def test_text_to_image_rows_apply_and_compare_prompt_alignment():
    """digits-t2i gets the random-embedding row and plain PV only; the class models never get the random-
    embedding row; against the best uniform row, AVQ must also lead on prompt alignment."""
    quality = _load("quality")
    everything = [*quality.CONFIGS, *quality.T2I_CONFIGS, *quality.PV_CONFIGS]
    t2i_configs = quality.model_configs("digits-t2i", everything)
    assert "avq-rand:w2a8" in t2i_configs and "avq-pv:w2a8" in t2i_configs and "avq-laq:w2a8" in t2i_configs
    assert not any(c.startswith(("avq-pv-", "avq-p-only")) for c in t2i_configs)
    unet_configs = quality.model_configs("digits-unet", everything)
    assert "avq-rand:w2a8" not in unet_configs and "avq-pv-none-s2:w2a8" in unet_configs
    make_tables = _load("make_tables")
    t2i = {**ROW, "model": "digits-t2i", "fid_to_fp": 1.0}
    uniform = {**t2i, "config": "gptq-g64:w2a8", "method": "gptq-g64", "total_bits": 2.5, "psnr": 20.0,
               "prompt_alignment": 0.95}  # fmt: skip
    avq = {**t2i, "total_bits": 2.4, "psnr": 22.0, "fid_to_fp": 0.5, "prompt_alignment": 0.93}
    line = make_tables.against_best_uniform([uniform, avq])[-1]
    assert "prompt alignment 0.9300 vs 0.9500" in line and "not ahead" in line
    assert "AVQ ahead" in make_tables.against_best_uniform([uniform, {**avq, "prompt_alignment": 0.97}])[-1]
    real = {**avq, "config": "avq:w2a8", "method": "avq", "n": 10}
    rand = {**real, "config": "avq-rand:w2a8", "method": "avq-rand", "psnr": 21.0, "prompt_alignment": 0.9}
    lines = make_tables.calibration_lines([uniform, real, rand])
    assert "PSNR to FP 22.00 vs 21.00 dB" in lines[-1] and "prompt alignment 0.9300 vs 0.9000" in lines[-1]
    assert make_tables.calibration_lines([uniform, real]) == []


def test_laq_budgets_start_from_per_channel_gptq_or_the_best_uniform_row():
    """`avq-laq` rows: per-channel GPTQ's total bits; `avq-laq-u`: the best uniform row's (★), only once
    every uniform row of the preset is done, with every layer floored at the preset's code bits."""
    quality = _load("quality")

    def row(config: str, bits: float, psnr: float) -> dict:
        method, preset = config.split(":")
        return {"model": "m", "config": config, "method": method, "preset": preset, "total_bits": bits,
                "psnr": psnr, "fid": 4.0}  # fmt: skip

    rows = [row("rtn:w4a8", 4.48, 34.6), row("gptq:w4a8", 4.48, 41.6), row("gptq-g128:w4a8", 4.67, 42.7)]
    assert quality._budget_row(rows, "m", "avq-laq", "w4a8")["total_bits"] == 4.48
    assert quality._budget_row(rows, "m", "avq-laq-u", "w4a8")["config"] == "gptq-g128:w4a8"
    assert quality._budget_row(rows[:2], "m", "avq-laq-u", "w4a8") is None  # gptq-g128 not done yet
    assert quality._budget_row(rows, "m", "avq-laq-u", "w2a8") is None
    options = quality._laq_options("avq-laq-u", "w4a8")
    assert ("*", 4.0) in options["laq_floor"] and options["laq_uniform"]
    assert quality._laq_options("avq-laq", "w4a8") == {}


def test_side_runs_keep_their_models_and_tables_apart():
    """A run under another `--name` (a smoke test) never shares layer-wise models or LAQ tables with the
    table's own rows."""
    quality = _load("quality")
    table, smoke = quality._artifacts("quality"), quality._artifacts("smoke")
    assert table == ROOT / "runs" / "quality" and smoke == table / "smoke"
    assert quality._layerwise_folder("smoke", "digits-t2i", "w2a8").parent == smoke
    assert quality._sensitivity_path("quality", "digits-unet", 0).parent == table
    assert quality._sensitivity_path("smoke", "digits-unet", 0) != quality._sensitivity_path(
        "quality", "digits-unet", 0
    )


def test_every_laq_row_has_its_sensitivity_table(tmp_path, monkeypatch):
    """Below 2 bits too (the pinned recompute at 43e5ee0 crashed there: the table's path was only set on
    the 2-bit branch): one table per candidate set, reused only when measured at this commit."""
    quality = _load("quality")
    monkeypatch.setattr(quality, "_artifacts", lambda name: tmp_path / name)
    low = [quality.laq_table("q", "digits-unet", 0, "avq-laq", p) for p in ("w1.5a8", "w1a8")]
    low_path = low[0][0]
    assert low[0] == low[1] and low[0][1] is None
    assert low_path.name.endswith("-laq-low-seed0.sensitivity.json")
    assert quality.laq_table("q", "digits-unet", 0, "avq-laq", "w2a8")[0] != low_path
    low_path.parent.mkdir(parents=True)
    low_path.write_text(json.dumps({"commit": "0" * 40, "sensitivity": {"a": 1}}))
    assert quality.laq_table("q", "digits-unet", 0, "avq-laq", "w1a8")[1] is None  # another commit's
    low_path.write_text(json.dumps({"commit": quality.STARTED_AT, "sensitivity": {"a": 1}}))
    assert quality.laq_table("q", "digits-unet", 0, "avq-laq", "w1a8")[1] == {"a": 1}


def test_a_done_row_whose_model_is_gone_is_computed_again_while_its_fine_tuning_rows_wait(
    tmp_path, monkeypatch
):
    """A new checkout keeps the committed rows but not `runs/`: the `avq:<preset>` row is computed again
    (model and row) only while fine-tuning rows of that preset still need its model."""
    quality = _load("quality")
    monkeypatch.setattr(quality, "_artifacts", lambda name: tmp_path / name)
    entries = ["avq:w2a8", "avq:w4a8", "avq-pv:w2a8", "avq-p-only-s1:w2a8"]
    done = [{**ROW, "config": c} for c in ("avq:w2a8", "avq:w4a8")]
    lost = [e for e in entries if quality._layerwise_lost("q", done, "digits-unet", e, entries)]
    assert lost == ["avq:w2a8"]  # w4a8 has no pending fine-tuning row; PV rows themselves never count
    done += [{**ROW, "config": c} for c in ("avq-pv:w2a8", "avq-p-only-s1:w2a8")]
    assert not quality._layerwise_lost("q", done, "digits-unet", "avq:w2a8", entries)
    folder = quality._layerwise_folder("q", "digits-unet", "w2a8")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert not quality._layerwise_lost("q", done[:2], "digits-unet", "avq:w2a8", entries)  # model still here
    # `avq-laq-u-pv` starts from the `avq-laq-u` row's model, kept in a folder of its own
    entries = ["avq:w4a8", "avq-laq-u:w4a8", "avq-pv:w4a8", "avq-laq-u-pv:w4a8"]
    done = [{**ROW, "config": c} for c in ("avq:w4a8", "avq-laq-u:w4a8", "avq-pv:w4a8")]
    lost = [e for e in entries if quality._layerwise_lost("q", done, "digits-unet", e, entries)]
    assert lost == ["avq-laq-u:w4a8"]
    assert (
        quality._layerwise_folder("q", "digits-unet", "w4a8", "avq-laq-u").name
        == "digits-unet-avq-laq-u-w4a8"
    )
    assert quality.PV_BASE["avq-laq-u-pv"] == "avq-laq-u"
    assert quality.pv_method("avq-laq-u-pv") == ("avq-laq-u-pv", 0)


def test_the_layerwise_digest_covers_the_model_own_weights_only(tmp_path, monkeypatch):
    """The digest an `avq` row records: the saved model's own safetensors (by path and bytes), not the
    components a quantized pipeline folder links from the FP pipeline, nor its JSON files."""
    quality = _load("quality")
    monkeypatch.setattr(quality, "_artifacts", lambda name: tmp_path / name)
    folder = quality._layerwise_folder("q", "digits-t2i", "w2a8")
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "model.safetensors").write_bytes(b"codes")
    (folder / "model_index.json").write_text("{}")
    linked = tmp_path / "encoder.safetensors"
    linked.write_bytes(b"encoder")
    (folder / "text_encoder").mkdir()
    (folder / "text_encoder" / "model.safetensors").symlink_to(linked)
    first = quality._layerwise_digest("q", "digits-t2i", "w2a8")
    linked.write_bytes(b"another encoder")
    (folder / "model_index.json").write_text('{"path": "elsewhere"}')
    assert quality._layerwise_digest("q", "digits-t2i", "w2a8") == first
    (folder / "unet" / "model.safetensors").write_bytes(b"other codes")
    assert quality._layerwise_digest("q", "digits-t2i", "w2a8") != first


def test_pinned_progress_is_saved_per_commit_with_the_fp_sample_sets(tmp_path):
    """`quality_pinned.sh save`: the rows and the FP sample sets (not a row's own samples) go to
    `benchmarks/results/progress/<commit>/`, and the progress of an earlier pin is dropped."""
    import os
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "quality_pinned.sh", repo / "benchmarks")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    laq = {**ROW, "model": "digits-dit", "config": "avq-laq:w2a8", "method": "avq-laq",
           "commit": "abcdef0123456789", "dirty": False, "laq_sensitivity": "measured",
           "command": "python benchmarks/quality.py --models digits-dit"}  # fmt: skip
    rows = {
        "settings": {"n": 10},
        "rows": [ROW, {**ROW, "config": "rtn:w4a8", "commit": "abcdef0123456789", "dirty": False}, laq],
    }
    (repo / "runs" / "quality").mkdir(parents=True)
    (repo / "runs" / "quality" / "quality.partial.json").write_text(json.dumps(rows))
    (repo / "runs" / "quality" / "PINNED").write_text("abcdef0123456789\n")
    for tag in ("digits-unet-fp-s0-g2-t20-b250", "digits-unet-avq-w2a8-s0-g2-t20-b250"):
        (repo / "runs" / "samples" / tag / "batch00000").mkdir(parents=True)
        (repo / "runs" / "samples" / tag / "batch00000" / "samples.npz").write_bytes(b"npz")
    table = {"commit": "abcdef0123456789", "sensitivity": {"conv1": {}}}  # measured by the `laq` row
    (repo / "runs" / "quality" / "digits-dit-laq-seed0.sensitivity.json").write_text(json.dumps(table))
    running = {**table, "sensitivity": {"x": {}}}  # its `laq-low` row is not done: no command to stamp yet
    (repo / "runs" / "quality" / "digits-dit-laq-low-seed0.sensitivity.json").write_text(json.dumps(running))
    stale = {"commit": "2222222", "sensitivity": {}}  # of an earlier pin: not this commit's progress
    (repo / "runs" / "quality" / "digits-unet-laq-u-seed0.sensitivity.json").write_text(json.dumps(stale))
    old = repo / "benchmarks" / "results" / "progress" / "1111111"
    old.mkdir(parents=True)
    script = repo / "benchmarks" / "quality_pinned.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(script), "save"], check=True, capture_output=True, env=env)
    progress = repo / "benchmarks" / "results" / "progress" / "abcdef0"
    assert json.loads((progress / "quality.partial.json").read_text()) == rows
    assert [p.name for p in (progress / "samples").iterdir()] == ["digits-unet-fp-s0-g2-t20-b250"]
    assert (progress / "samples" / "digits-unet-fp-s0-g2-t20-b250" / "batch00000" / "samples.npz").is_file()
    assert (progress / "digits-dit-laq-seed0.sensitivity.json").is_file() and not old.exists()
    saved = json.loads((progress / "digits-dit-laq-seed0.sensitivity.json").read_text())
    assert {k: saved[k] for k in ("commit", "sensitivity", "command", "dirty")} == {
        **table, "command": laq["command"], "dirty": False}  # fmt: skip
    assert saved["device"] and not (progress / "digits-unet-laq-u-seed0.sensitivity.json").exists()
    assert not (progress / "digits-dit-laq-low-seed0.sensitivity.json").exists()
    run = dict(check=True, capture_output=True, text=True, env=env)
    status = subprocess.run(["bash", str(script), "status"], **run)
    assert "digits-unet" in status.stdout and "1 rows" in status.stdout
    # with the pinned commit's worktree (here: this checkout's code), the rows done of that commit's plan
    (tmp_path / "avq-quality-abcdef0").symlink_to(ROOT)
    status = subprocess.run(["bash", str(script), "status"], **run).stdout
    quality = _load("quality")
    planned = 1 + len(quality.model_configs("digits-unet", [*quality.CONFIGS, *quality.PV_CONFIGS]))
    assert f"digits-unet  1/{planned} done, next fp" in status  # the row of no commit is not done
    assert "digits-t2i   0/" in status


def test_the_table_checks_what_it_has_to_show_from_its_rows():
    """`check_lines`: each claim with its figures and a verdict, `open` while the rows it needs are not
    computed, and a failing claim said to fail."""
    make_tables = _load("make_tables")

    def row(config: str, psnr: float | None = None, **figures) -> dict:
        method, preset = config.split(":") if ":" in config else (config, "fp")
        extra = {"psnr": psnr, "fid_to_fp": 0.1} if psnr is not None else {}
        return {**ROW, "config": config, "method": method, "preset": preset, **extra, **figures}

    rows = [
        row("fp", fid=3.0, fid_floor=0.25),
        row("gptq-g64:w2a8", 30.0, total_bits=2.5, fid_to_fp=0.3),
        row("avq-laq:w2a8", 34.0, total_bits=2.4, fid=3.2),
        *(row(f"avq-pv{s}:w2a8", p, total_bits=2.6) for s, p in (("", 40.0), ("-s1", 40.2), ("-s2", 39.8))),
        *(
            row(f"avq-p-only{s}:w2a8", p, total_bits=2.6)
            for s, p in (("", 39.9), ("-s1", 40.1), ("-s2", 39.6))
        ),
        row("gptq:w4a8", 44.0, total_bits=4.04),
        row("avq:w4a8", 44.5, total_bits=4.18),  # more bits than the uniform row: not compared
    ]
    checks = "\n".join(make_tables.check_lines(rows))
    assert "`avq-laq:w2a8` 34.00 vs `gptq-g64:w2a8` 30.00 dB, FID to FP 0.100 vs 0.300 - holds" in checks
    assert "3.200 vs 3.000 + 0.250 + 0.3 = 3.550 - holds" in checks
    assert "no AVQ row at <= 4.040 total bits - **fails**" in checks
    assert "40.00 ± 0.20 vs 39.87 ± 0.25 dB - **fails**" in checks  # P+V ahead, but inside the seed spread
    assert (
        "w1.5a8: AVQ+PV class accuracy >= 97 % and FID <= 1.5x FP's: rows not computed yet - open" in checks
    )
    rows.append(row("avq-pv:w1.5a8", 35.0, total_bits=1.6, fid=4.6, class_accuracy=0.98))
    assert "98.0%, FID 4.600 vs 1.5 x 3.000 - **fails**" in "\n".join(make_tables.check_lines(rows))
    assert make_tables.check_lines([]) == []
