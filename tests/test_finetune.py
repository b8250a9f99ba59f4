"""SeMI-PV fine-tuning (avq.finetune): optimizer, V step, SeMI, the loop, checkpoints, CLI, torchrun."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
from test_calibration import TINY, tiny_dit, tiny_unet
from test_pipeline import FAST

import avq
from avq.cli import load_model, main
from avq.core.modules import AQModule
from avq.core.qweight import decode
from avq.finetune import (
    FinetuneCheckpointError,
    FinetuneConfig,
    FinetuneError,
    SlotAdamW,
    distillation_loss,
    finetune,
    finetune_folder,
    heldout_pool,
    make_shadows,
    metric_beam_search,
    normalised_metric,
    recording_metrics,
    semi_reset,
    straight_through,
    v_step,
)
from avq.finetune.pv import p_step_parameters, shadow_name
from avq.planning.presets import preset_config
from avq.run.quantize import quantize

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiny everything: 4 trajectories x 4 DDIM steps per epoch, 4 points per step.
SMALL = dict(
    batch_size=4,
    trajectories_per_epoch=4,
    sampling_steps=4,
    sampling_batch=2,
    warmup=2,
    lr_codebooks=1e-3,
    lr_scales=1e-4,
    lr_fp=1e-4,
    lr_shadow=3e-2,
    max_code_change=0.05,
    trust_ratio=0.05,
)


def small(**overrides) -> FinetuneConfig:
    return FinetuneConfig(**{**SMALL, **overrides})


def run(student: nn.Module, teacher: nn.Module, config: FinetuneConfig, **options):
    """`finetune` on the CPU (deterministic, also where CUDA exists), without a progress bar."""
    return finetune(student, teacher, config, progress=False, device="cpu", **options)


def quantized_copy(model: nn.Module, preset: str = "w2a8") -> nn.Module:
    return quantize(copy.deepcopy(model), preset_config(preset, solver=FAST), TINY, progress=False)


@pytest.fixture(scope="module")
def pair():
    """(FP teacher, W2A8 student) of the tiny UNet."""
    teacher = tiny_unet()
    return teacher, quantized_copy(teacher)


def fresh(pair) -> tuple[nn.Module, nn.Module]:
    teacher, student = pair
    return copy.deepcopy(teacher), copy.deepcopy(student)


def aq_layer(out: int = 32, K: int = 64, spec: str = "2x4g4", seed: int = 0) -> avq.AQLinear:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, K, generator=g) * 0.05
    q = avq.quantize_weight(weight, torch.eye(K), avq.QuantSpec.parse(spec), max_rounds=1, kmeans_iters=2)
    return avq.AQLinear(q, torch.zeros(out), dtype=torch.float32)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = aq_layer(seed=0)
        self.b = aq_layer(32, 32, "1x4g2", seed=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def optimizer_for(model: nn.Module, shadows) -> SlotAdamW:
    params = p_step_parameters(model) + [(shadow_name(s.name), "shadow", s.delta, 2) for s in shadows]
    return SlotAdamW(params, {"codebooks": 1e-3, "scales": 1e-3, "fp": 1e-3, "shadow": 1e-3})


def drift(shadows, scale: float = 0.5, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in shadows:
            s.delta.copy_(torch.randn(s.delta.shape, generator=g) * scale)


def target_of(shadow) -> torch.Tensor:
    """W~ = W + scales * delta `[out, G, g]`."""
    scales = shadow.module.scales.detach()[:, None, None]
    return decoded(shadow.module).detach() + scales * shadow.delta.detach()


def decoded(module: AQModule) -> torch.Tensor:
    return decode(module.codes, module.codebooks, module.scales).reshape(module.codes.shape[:2] + (-1,))


# ============================================================================ config and optimizer
def test_config_checks_and_schedule():
    config = FinetuneConfig(steps=100, warmup=10, min_lr_fraction=0.1)
    assert config.lr_factor(0) == pytest.approx(0.1) and config.lr_factor(9) == pytest.approx(1.0)
    assert config.lr_factor(99) == pytest.approx(0.1, abs=1e-3)
    assert FinetuneConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="semi"):
        FinetuneConfig(semi="some")
    with pytest.raises(ValueError, match="max_code_change"):
        FinetuneConfig(max_code_change=1.5)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        FinetuneConfig(batch_size=64, trajectories_per_epoch=2, sampling_steps=4)


def test_slot_adamw_is_adamw_and_a_reset_slot_restarts():
    torch.manual_seed(0)
    p = torch.randn(3, 4, requires_grad=True)
    ref = p.detach().clone().requires_grad_(True)
    ours = SlotAdamW([("p", "g", p, 1)], {"g": 1e-2}, weight_decay=0.1)
    torch_adamw = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    grads = [torch.randn(3, 4) for _ in range(5)]
    for grad in grads:
        p.grad, ref.grad = grad.clone(), grad.clone()
        ours.step()
        torch_adamw.step()
    assert torch.allclose(p, ref, atol=1e-6)
    # Reset row 1: its next update is a fresh AdamW's first one (lr * g / (|g| + eps)); rows 0, 2 go on.
    ours.reset("p", (torch.tensor([1]),))
    e = ours.entry("p")
    assert e.step.tolist() == [5, 0, 5] and not e.exp_avg[1].any() and e.exp_avg[0].all()
    before = p.detach().clone()
    g = torch.randn(3, 4)
    p.grad = g.clone()
    ours.step()
    expected = before[1] * (1 - 1e-2 * 0.1) - 1e-2 * g[1] / (g[1].abs() + 1e-8)
    assert torch.allclose(p[1], expected, atol=1e-6)
    # state round trip
    again = SlotAdamW([("p", "g", p, 1)], {"g": 1e-2})
    again.load_state_tensors(ours.state_tensors())
    assert all(
        torch.equal(a, b)
        for a, b in zip(again.state_tensors().values(), ours.state_tensors().values(), strict=True)
    )


# ============================================================================ straight-through and V step
def test_straight_through_sends_the_weight_gradient_to_the_shadow():
    model = TwoLayers()
    shadows = make_shadows(model)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    plain = model(x)
    with straight_through(shadows):
        y = model(x)
        assert torch.equal(y, plain)  # forward values unchanged
        y.square().sum().backward()
    assert "_weight" not in model.a.__dict__  # uninstalled
    # reference: the same loss with the dense weights as leaves
    wa = model.a._weight().detach().requires_grad_(True)
    wb = model.b._weight().detach().requires_grad_(True)
    h = torch.relu(nn.functional.linear(x, wa, model.a.bias))
    nn.functional.linear(h, wb, model.b.bias).square().sum().backward()
    # the shadows live in codebook units: their gradient is the row's scale times the weight gradient
    for shadow, w in ((shadows[0], wa), (shadows[1], wb)):
        scales = shadow.module.scales.detach()[:, None]
        assert torch.allclose(shadow.delta.grad.reshape(w.shape), scales * w.grad, atol=1e-6)
    assert model.a.codebooks.grad is not None and model.a.scales.grad is not None


@pytest.mark.parametrize("metric", ["l2", "hessian"])
@pytest.mark.parametrize("spec, width", [("2x4g4", 16), ("1x4g2", 1)])
def test_metric_beam_search_is_exact_with_a_full_beam(spec, width, metric):
    layer = aq_layer(spec=spec)
    books = layer.codebooks.detach().float()
    M, C, g = books.shape
    n = 20
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(n, g, generator=gen) * 0.05
    scales = layer.scales.detach().float()[:n]
    current = layer.codes.reshape(-1, M)[:n]
    H = None
    if metric == "hessian":  # a strongly anisotropic metric per row: the L2 choice is not the best
        X = torch.randn(n, 4 * g, g, generator=gen) * torch.logspace(0, 2, g)
        H = X.transpose(1, 2) @ X / (4 * g)  # [n, g, g]
    codes, change = metric_beam_search(target, current, books, scales, beam_width=width, metric=H)
    grids = torch.meshgrid(*[torch.arange(C)] * M, indexing="ij")
    every = torch.stack([gr.reshape(-1) for gr in grids], 1)  # [C^M, M]
    sums = books[torch.arange(M)[None], every].sum(1)  # [C^M, g]
    e_all = target[:, None] - scales[:, None, None] * sums[None]  # [n, C^M, g]
    e = target - scales[:, None] * books[torch.arange(M)[None], codes].sum(1)  # [n, g]
    if H is None:
        err, found = e_all.pow(2).sum(-1), e.pow(2).sum(-1)
    else:
        err, found = torch.einsum("nci,nij,ncj->nc", e_all, H, e_all), torch.einsum("ni,nij,nj->n", e, H, e)
        l2_best = e_all.pow(2).sum(-1).argmin(1)
        assert (err.argmin(1) != l2_best).any()  # the metric matters in this case
    assert torch.allclose(found, err.min(1).values, rtol=1e-4, atol=1e-9)
    unscaled_old = books[torch.arange(M)[None], current.long()].sum(1)
    assert torch.allclose(unscaled_old + change, books[torch.arange(M)[None], codes].sum(1), atol=1e-6)


def test_v_step_respects_max_fraction_and_keeps_the_target():
    model = TwoLayers()
    shadows = make_shadows(model)
    drift(shadows)
    targets = [target_of(s) for s in shadows]
    codes_before = [s.module.codes.clone() for s in shadows]
    changes = v_step(shadows, max_code_change=0.1, trust_ratio=None, beam_width=4)
    for s, change, before, target in zip(shadows, changes, codes_before, targets, strict=True):
        groups = s.num_groups
        assert 0 < change.groups.numel() <= int(0.1 * groups)
        changed_codes = int((s.module.codes != before).sum())
        assert changed_codes == change.codes_changed and changed_codes <= 0.1 * s.num_codes
        # exactly the reported groups changed, and the target W + delta did not move
        moved = (s.module.codes != before).any(-1).reshape(-1).nonzero().squeeze(1)
        assert torch.equal(moved.sort().values, change.groups.sort().values)
        assert torch.allclose(target_of(s), target, atol=1e-6)
        assert change.trust_rejected == 0 and change.relative_change > 0


@pytest.mark.parametrize("ratio", [0.0, 0.02])
def test_v_step_respects_the_trust_ratio(ratio):
    model = TwoLayers()
    shadows = make_shadows(model)
    drift(shadows)
    before = [decoded(s.module).detach().clone() for s in shadows]
    changes = v_step(shadows, max_code_change=0.5, trust_ratio=ratio, beam_width=4)
    for s, change, w_old in zip(shadows, changes, before, strict=True):
        delta_w = (decoded(s.module).detach() - w_old).norm()
        assert delta_w <= ratio * w_old.norm() * (1 + 1e-5)
        assert change.relative_change == pytest.approx(float(delta_w / w_old.norm()), abs=1e-6)
        assert change.trust_rejected > 0  # the limit did bind
    if ratio == 0.0:
        assert all(c.groups.numel() == 0 for c in changes)


# ============================================================================ SeMI
def _fill_state(optimizer: SlotAdamW) -> None:
    for e in optimizer.entries.values():
        e.exp_avg.fill_(1.0)
        e.exp_avg_sq.fill_(2.0)
        e.step.fill_(7.0)


def _assignment_sets(codes: torch.Tensor, m: int, C: int) -> list[set[int]]:
    flat = codes.reshape(-1, codes.shape[-1])[:, m].long()
    return [set((flat == c).nonzero().squeeze(1).tolist()) for c in range(C)]


@pytest.mark.parametrize("mode", ["selective", "none", "all"])
def test_semi_resets_exactly_what_it_names(mode):
    model = TwoLayers()
    shadows = make_shadows(model)
    optimizer = optimizer_for(model, shadows)
    _fill_state(optimizer)
    drift(shadows)
    codes_before = {s.name: s.module.codes.clone() for s in shadows}
    changes = v_step(shadows, max_code_change=0.1, trust_ratio=None, beam_width=4)
    assert sum(c.codes_changed for c in changes) > 0
    counts = semi_reset(mode, optimizer, shadows, changes)
    for name, e in optimizer.entries.items():
        zero = torch.zeros(e.step.shape, dtype=torch.bool)  # which slots must have been reset
        if mode == "all":
            zero[...] = True
        elif mode == "selective" and name.startswith("shadow:"):
            s = next(s for s in shadows if shadow_name(s.name) == name)
            zero = (s.module.codes != codes_before[s.name]).any(-1)  # [out, G]: groups with new codes
        elif mode == "selective" and name.endswith(".codebooks"):
            s = next(s for s in shadows if f"{s.name}.codebooks" == name)
            M, C = e.step.shape
            for m in range(M):  # independent check: codewords whose set of groups changed
                old = _assignment_sets(codes_before[s.name], m, C)
                new = _assignment_sets(s.module.codes, m, C)
                zero[m] = torch.tensor([a != b for a, b in zip(old, new, strict=True)])
        slots = e.broadcast(zero).expand_as(e.exp_avg)
        assert torch.equal(e.step == 0, zero), name
        assert (e.exp_avg[slots] == 0).all() and (e.exp_avg[~slots] == 1).all(), name
        assert (e.exp_avg_sq[slots] == 0).all() and (e.exp_avg_sq[~slots] == 2).all(), name
    if mode == "selective":
        assert (
            counts["reset_groups"] == sum(c.groups.numel() for c in changes) and counts["reset_codewords"] > 0
        )
    assert counts["reset_all"] == (mode == "all")


# ============================================================================ the loop
def test_finetune_lowers_the_distillation_loss(pair):
    teacher, student = fresh(pair)
    config = small(steps=30)
    ranges = {k: v.clone() for k, v in student.state_dict().items() if "input_quantizer" in k}
    assert ranges  # W2A8: 8-bit input quantizers are attached
    pool = heldout_pool(teacher, config, trajectories=8)  # sampled once, scored twice
    before = distillation_loss(student, teacher, config, pool=pool)
    assert before == distillation_loss(student, teacher, config, trajectories=8)  # the same trajectories
    student, history = run(student, teacher, config)
    after = distillation_loss(student, teacher, config, pool=pool)
    assert after < 0.8 * before, (before, after)
    assert len(history) == 30 and [h["step"] for h in history] == list(range(1, 31))
    assert sum(h["codes_changed"] for h in history) > 0
    assert all(h["codes_changed"] <= config.max_code_change for h in history)
    assert {"lr/codebooks", "lr/scales", "lr/fp", "lr/shadow", "reset_groups"} <= set(history[0])
    state = student.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ranges.items())  # activation ranges stay fixed
    assert not any("_weight" in m.__dict__ for m in student.modules())


@pytest.mark.parametrize("mode", ["none", "all"])
def test_semi_ablations_run(pair, mode):
    teacher, student = fresh(pair)
    _, history = run(student, teacher, small(steps=16, semi=mode))
    changed = [h for h in history if h["codes_changed"] > 0]
    assert changed
    if mode == "none":
        assert all(h["reset_groups"] == h["reset_codewords"] == h["reset_all"] == 0 for h in history)
    else:
        assert all(h["reset_all"] == 1 for h in changed)


def test_resume_is_bit_identical(pair, tmp_path):
    config = small(steps=8, checkpoint_every=3, block_loss_weight=0.1, timestep_sampling="stratified")
    teacher, student = fresh(pair)
    full, full_history = run(student, teacher, config)

    ckpt = tmp_path / "ckpt"
    teacher, student = fresh(pair)
    _, first = run(student, teacher, config, checkpoint_dir=ckpt, stop_after=5)
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    assert len(first) == 5 and meta["step"] == 5 and len(list(ckpt.glob("state-*.safetensors"))) == 1
    assert not list(ckpt.glob(".*tmp"))
    teacher, student = fresh(pair)  # a new process: the initial model again
    resumed, history = run(student, teacher, config, checkpoint_dir=ckpt, resume=True)
    assert history == full_history
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoint_of_another_run_is_refused(pair, tmp_path):
    ckpt = tmp_path / "ckpt"
    config = small(steps=4)
    teacher, student = fresh(pair)
    run(student, teacher, config, checkpoint_dir=ckpt, stop_after=2)

    def resume(student, teacher, config=config):
        run(student, teacher, config, checkpoint_dir=ckpt, resume=True)

    teacher, student = fresh(pair)
    with pytest.raises(FinetuneCheckpointError, match="another fine-tuning configuration.*lr_fp"):
        resume(student, teacher, small(steps=4, lr_fp=3e-4))
    resume(*reversed(fresh(pair)), small(steps=4, checkpoint_every=1))  # run-only fields may differ
    with pytest.raises(FinetuneCheckpointError, match="another quantization of this model"):
        resume(quantized_copy(pair[0], "w4a8"), copy.deepcopy(pair[0]))
    teacher, student = fresh(pair)
    with torch.no_grad():
        next(m for m in student.modules() if isinstance(m, AQModule)).codebooks.mul_(1.01)
    with pytest.raises(FinetuneCheckpointError, match="other starting weights"):
        resume(student, teacher)
    with pytest.raises(FinetuneCheckpointError, match="another teacher"):
        resume(copy.deepcopy(pair[1]), tiny_unet(seed=1))
    dit = tiny_dit()
    with pytest.raises(FinetuneCheckpointError, match="checkpoint of another model"):
        resume(quantized_copy(dit), dit)
    with pytest.raises(FinetuneError, match="teacher is a DiTTransformer2DModel"):
        run(copy.deepcopy(pair[1]), dit, config)


def test_finetune_a_dit(one_thread):
    teacher = tiny_dit()
    student = quantized_copy(teacher)
    _, history = run(student, teacher, small(steps=3))
    assert len(history) == 3 and all(h["loss"] > 0 for h in history)


# ============================================================================ CLI and torchrun
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny FP folder and its W2A8 avq save recording it as the source model."""
    root = tmp_path_factory.mktemp("finetune")
    fp = root / "fp"
    tiny_unet().save_pretrained(fp)
    q = root / "q"
    avq.save_quantized(
        quantized_copy(load_model(str(fp))), q, extra_config={"model": str(fp), "preset": "w2a8"}
    )
    return fp, q


# The P-step rates are pinned (not the defaults): Adam turns float-rounding differences of near-zero
# gradients (DDP's all-reduce sums in another order) into whole `lr`-sized steps, so the 1- vs 2-process
# comparison below is only as tight as the rates are small (at 10x these rates one start point, quantized
# from float32-summed Hessians, was 1.5e-3 apart after the first step; at these, 1e-7).
CLI_SMALL = [
    "--batch-size", "4", "--trajectories", "4", "--sampling-steps", "4", "--warmup", "2",
    "--lr-codebooks", "1e-5", "--lr-scales", "1e-6", "--lr-fp", "1e-6",
    "--lr-shadow", "0.1", "--max-code-change", "0.05", "--trust-ratio", "0.05",
    "--device", "cpu", "--quiet",
]  # fmt: skip


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path / "wandb-dir"


def test_cli_finetune_end_to_end(saved, tmp_path, capsys, offline_wandb):
    fp, q = saved
    out, figures = tmp_path / "ft", tmp_path / "ft.json"
    args = ["finetune", "--quantized", str(q), "--out", str(out), "--steps", "4", *CLI_SMALL]
    code = main(
        [
            *args,
            "--checkpoint-every",
            "2",
            "--json",
            str(figures),
            "--tracker",
            "wandb",
            "--sample-every",
            "2",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "fine-tuned 4 steps" in printed and f"saved {out}" in printed
    model = avq.load_quantized(out)
    assert any(isinstance(m, AQModule) for m in model.modules())
    extra = json.loads((out / "config.json").read_text())["quantization_config"]["extra"]
    assert extra["model"] == str(fp) and extra["finetune"]["steps_done"] == 4
    data = json.loads(figures.read_text())
    assert len(data["history"]) == 4 and data["command"].startswith("avq finetune")
    assert not (tmp_path / "ft.partial").exists()  # checkpoints removed after the final save
    (run,) = (offline_wandb / "wandb").glob("offline-run-*")
    log = next(run.glob("run-*.wandb")).read_bytes()
    assert b"codes_changed" in log and b"lr/shadow" in log and list(run.rglob("samples*.png"))

    # user errors: exit 2 with one line
    missing = ["finetune", "--quantized", str(q), "--out", str(tmp_path / "x"), "--steps", "4", "--resume"]
    assert main([*missing, *CLI_SMALL]) == 2
    assert "no fine-tuning checkpoint to resume" in capsys.readouterr().err
    assert main(["finetune", "--quantized", str(q), "--out", str(q), "--steps", "1", "--quiet"]) == 2
    assert "is the input folder" in capsys.readouterr().err
    # a checkpoint of another quantization (w4a8 of the same FP model) is refused clearly
    other = tmp_path / "q4"
    avq.save_quantized(quantized_copy(load_model(str(fp)), "w4a8"), other, extra_config={"model": str(fp)})
    target = tmp_path / "y"
    finetune_folder(other, target, small(steps=4), stop_after=2, progress=False, device="cpu")
    assert (tmp_path / "y.partial" / "checkpoint.json").is_file() and not target.exists()
    resume = [
        "finetune",
        "--quantized",
        str(q),
        "--out",
        str(target),
        "--steps",
        "4",
        "--resume",
        "--teacher",
    ]
    assert main([*resume, str(fp), *CLI_SMALL]) == 2
    assert "another quantization" in capsys.readouterr().err


def test_torchrun_two_gloo_processes_match_one(saved, tmp_path):
    fp, q = saved
    args = ["finetune", "--quantized", str(q), "--steps", "8", *CLI_SMALL]
    assert main([*args, "--out", str(tmp_path / "one"), "--json", str(tmp_path / "one.json")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "avq", *args, "--out", str(tmp_path / "two"), "--json", str(tmp_path / "two.json")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["codes_changed_total"] > 0  # the V step and SeMI ran, on both
    for a, b in zip(one["history"], two["history"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-7)
    sa = avq.load_quantized(tmp_path / "one").state_dict()
    sb = avq.load_quantized(tmp_path / "two").state_dict()
    for key in sa:
        if key.endswith(".codes"):
            assert (sa[key] == sb[key]).float().mean() >= 0.99, key
        elif sa[key].is_floating_point():
            assert torch.allclose(sa[key].float(), sb[key].float(), rtol=1e-3, atol=1e-5), key


def test_kill_9_then_resume_matches_an_uninterrupted_run(saved, tmp_path):
    fp, q = saved
    args = ["finetune", "--quantized", str(q), "--steps", "30", *CLI_SMALL, "--checkpoint-every", "1"]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "avq", *args, "--out", str(killed)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    meta = tmp_path / "killed.partial" / "checkpoint.json"
    deadline, step = time.time() + 120, 0
    while process.poll() is None and time.time() < deadline and step < 3:
        if meta.is_file():
            step = json.loads(meta.read_text())["step"]  # always whole: it is replaced atomically
        time.sleep(0.01)
    assert process.poll() is None, f"the run ended before it was killed: {process.stderr.read()[-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    process.stderr.close()
    saved_step = json.loads(meta.read_text())["step"]
    assert 3 <= saved_step < 30 and not killed.exists()
    assert main([*args, "--out", str(killed), "--resume", "--json", str(tmp_path / "killed.json")]) == 0
    assert main([*args, "--out", str(straight), "--json", str(tmp_path / "straight.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["history"] for n in ("killed", "straight"))
    assert a == b and sum(h["codes_changed"] for h in a) > 0
    sa, sb = avq.load_quantized(killed).state_dict(), avq.load_quantized(straight).state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_recording_metrics_are_the_input_gram_blocks():
    """`recording_metrics`: per layer, `[G, g, g]` sums of `x_J x_J^T` over the rows the weight multiplies
    (a conv's unfolded patches), for Linear and Conv2d layers alike; hooks gone afterwards."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2)
    W = conv.weight.data
    H = torch.eye(36) + 0.1
    module = AQModule.from_layer(conv, avq.quantize_weight(W, H, avq.QuantSpec(1, 4, 4), max_rounds=1))
    shadows = make_shadows(nn.Sequential(module))
    x = torch.randn(3, 4, 7, 7)
    with recording_metrics(shadows):
        module(x)
        module(x[:1])
    rows = torch.nn.functional.unfold(torch.cat([x, x[:1]]), 3, padding=1, stride=2)  # [4, 36, L]
    rows = rows.transpose(1, 2).reshape(-1, 9, 4)  # [N, G, g]
    expected = torch.einsum("ngi,ngj->gij", rows, rows)
    assert torch.allclose(shadows[0].metric, expected, rtol=1e-4, atol=1e-4)
    assert not module._forward_pre_hooks
    normal = normalised_metric(shadows[0].metric)
    assert normal.diagonal(dim1=1, dim2=2).mean() == pytest.approx(1.0)
    assert normalised_metric(torch.zeros(2, 3, 3)) is None


def test_p_only_changes_no_code(pair):
    """`v_every=0`: the P-only ablation (AdamW on codebooks, scales and FP parameters; no code update)."""
    teacher, student = fresh(pair)
    codes = {n: b.clone() for n, b in student.named_buffers() if n.endswith("codes")}
    _, history = run(student, teacher, small(v_every=0, steps=30))
    assert all(r["codes_changed"] == 0 for r in history) and history[-1]["loss"] < history[0]["loss"] * 2
    assert all(torch.equal(b, codes[n]) for n, b in student.named_buffers() if n.endswith("codes"))
    assert not small(v_every=0).is_v_step(0) and small(v_every=2).is_v_step(1)
    with pytest.raises(ValueError, match="v_metric must be one of"):
        small(v_metric="cosine")


def test_v_step_in_the_input_metric_moves_codes(pair):
    """The default V step (input metric) changes codes within a few steps where the L2 one barely does."""
    runs = {}
    for metric in ("hessian", "l2"):
        teacher, student = fresh(pair)
        history = run(student, teacher, small(v_metric=metric, steps=30))[1]
        runs[metric] = sum(r["codes_changed"] for r in history)
    assert runs["hessian"] > 0 and runs["hessian"] > runs["l2"]


def test_finetune_a_model_with_uniform_layers(tmp_path):
    """An LAQ model with uniform grids beside AQ layers (`avq-laq-u`'s): SeMI-PV trains the AQ layers and
    the FP parameters, leaves every grid as GPTQ packed it, and the result saves and loads as it ran."""
    from avq.core.spec import UniformSpec
    from avq.core.uniform_modules import UniformModule

    teacher = tiny_unet()
    grids = (UniformSpec(4), UniformSpec(4, 16))
    config = preset_config("w4a16", solver=FAST, bits_budget=4.6, laq_uniform=grids)
    student = quantize(copy.deepcopy(teacher), config, TINY, progress=False)
    uniform = {n: m for n, m in student.named_modules() if isinstance(m, UniformModule)}
    aq = {n: m for n, m in student.named_modules() if isinstance(m, AQModule)}
    assert uniform and aq
    grids_before = {n: (m.packed.clone(), m.scales.clone(), m.zeros.clone()) for n, m in uniform.items()}
    books_before = {n: m.codebooks.detach().clone() for n, m in aq.items()}
    student, history = run(student, teacher, small(steps=4))
    assert len(history) == 4
    for name, (packed, scales, zeros) in grids_before.items():
        layer = student.get_submodule(name)
        assert torch.equal(layer.packed, packed) and torch.equal(layer.scales, scales)
        assert torch.equal(layer.zeros, zeros)
    assert any(not torch.equal(student.get_submodule(n).codebooks, b) for n, b in books_before.items())
    x = torch.randn(2, 1, 8, 8)
    t, label = torch.tensor([10, 500]), torch.tensor([1, 3])
    with torch.no_grad():
        expected = student(x, t, class_labels=label).sample
        loaded = avq.load_quantized(avq.save_quantized(student, tmp_path / "pv"))
        # tuned codebooks and scales are stored in the save's dtype: outputs agree to its rounding
        torch.testing.assert_close(loaded(x, t, class_labels=label).sample, expected, rtol=1e-3, atol=1e-4)
