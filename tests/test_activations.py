"""8-bit activations: fake quantizer, range calibration, shortcut splitting, A8 through the pipeline."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from test_calibration import TINY, tiny_dit, tiny_unet
from test_pipeline import FAST, interrupt_after, outputs

import avq
from avq.calibration.activations import (
    ActQuantizer,
    RangeObserver,
    attach_input_quantizer,
    input_quantizers,
    shortcut_splits,
)
from avq.core.modules import AQModule
from avq.core.uniform_modules import UniformModule
from avq.planning.presets import preset_config
from avq.run.quantize import quantize
from avq.run.report import QuantizeReport

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quantizer_grid_error_and_straight_through():
    q = ActQuantizer(channels=6, bits=8, splits=(2,), channel_dim=1)
    q.set_ranges(torch.tensor([-1.0, -10.0]), torch.tensor([1.0, 10.0]))
    x = torch.randn(3, 6, 4, 4, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    x[:, 2:] *= 10
    x.requires_grad_(True)
    y = q(x)
    step = torch.tensor([2 / 255] * 2 + [20 / 255] * 4)[None, :, None, None]
    err = (y - x).abs()
    assert (err <= step / 2 + 1e-6).all()  # inside the range: at most half a step
    assert (err[:, 2:].amax() > 2 / 255) and (err[:, :2].amax() <= 1 / 255 + 1e-6)  # per-segment steps
    assert len(torch.unique(torch.round((y[:, :2] + 1) / (2 / 255)))) <= 256
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through
    clipped = q(torch.full((1, 6, 1, 1), 100.0))
    assert torch.allclose(clipped[0, :2, 0, 0], torch.ones(2), atol=1e-2)  # saturates at hi
    with pytest.raises(ValueError, match="input has 5 channels"):
        q(torch.zeros(1, 5, 2, 2))
    with pytest.raises(ValueError, match="splits"):
        ActQuantizer(channels=4, splits=(4,))


@pytest.mark.parametrize("splits, channel_dim, shape", [((), -1, (5, 3, 8)), ((3,), 1, (2, 8, 4, 4))])
def test_quantizer_matches_the_affine_grid_with_and_without_grad(splits, channel_dim, shape):
    """The in-place fast path equals `(clamp(round(x/s) + z, 0, qmax) - z) * s`, also for a range that
    excludes 0, leaves its input alone, and is the same under no_grad."""
    q = ActQuantizer(channels=8, bits=4, splits=splits, channel_dim=channel_dim)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2
    for lo, hi in ((-1.5, 2.5), (0.4, 3.0)):  # the second range excludes 0: zero point < 0
        S = len(splits) + 1
        q.set_ranges(torch.full((S,), lo) * torch.arange(1, S + 1), torch.full((S,), hi))
        scale = q._per_channel((q.hi - q.lo) / 15, x.ndim)
        zero = torch.round(-q._per_channel(q.lo, x.ndim) / scale)
        want = (torch.clamp(torch.round(x / scale) + zero, 0, 15) - zero) * scale
        before = x.clone()
        with torch.no_grad():
            got = q(x)
        assert torch.allclose(got, want, atol=1e-6) and torch.equal(x, before)
        assert torch.allclose(q(x.clone().requires_grad_(True)), want, atol=1e-6)


def test_observer_clips_heavy_tails_when_that_lowers_error():
    laplace = torch.distributions.Laplace(0.0, 1.0)
    torch.manual_seed(0)
    obs = RangeObserver(channels=8)
    for _ in range(5):  # heavy tails: the extreme values are rare, clipping them buys finer steps
        obs.observe(laplace.sample((512, 8)))
    lo, hi = obs.ranges(bits=4)
    assert hi.item() < obs.maxs[0] and lo.item() > obs.mins[0]
    fresh = laplace.sample((4096, 8))

    def mse(lo_: float, hi_: float) -> torch.Tensor:
        q = ActQuantizer(channels=8, bits=4)
        q.set_ranges(torch.tensor([lo_]), torch.tensor([hi_]))
        return (q(fresh) - fresh).pow(2).mean()

    assert mse(lo.item(), hi.item()) < 0.8 * mse(obs.mins[0], obs.maxs[0])
    with pytest.raises(ValueError, match="no input observed"):
        RangeObserver(channels=2).ranges()


def test_shortcut_splits_match_the_runtime_concatenation():
    model = tiny_unet()
    splits = shortcut_splits(model)
    seen: dict[str, tuple[int, int]] = {}

    def record(j):
        def hook(block, args, kwargs):
            hidden, skips = (
                args[0] if args else kwargs["hidden_states"],
                kwargs.get("res_hidden_states_tuple"),
            )
            skips = skips if skips is not None else args[1]
            for i in range(len(block.resnets)):
                h = hidden.shape[1] if i == 0 else block.resnets[i - 1].out_channels
                seen[f"up_blocks.{j}.resnets.{i}"] = (h, skips[-1 - i].shape[1])

        return hook

    for j, block in enumerate(model.up_blocks):
        block.register_forward_pre_hook(record(j), with_kwargs=True)
    with torch.no_grad():
        outputs(model)
    for prefix, (h, skip) in seen.items():
        resnet = model.get_submodule(prefix)
        assert splits[f"{prefix}.conv1"] == h and resnet.conv1.in_channels == h + skip
        if resnet.conv_shortcut is not None:
            assert splits[f"{prefix}.conv_shortcut"] == h
    assert len(seen) == 4 and all(name.startswith("up_blocks.") for name in splits)
    assert shortcut_splits(tiny_dit()) == {}


@pytest.fixture(scope="module")
def a8_model():
    report = QuantizeReport()
    model = quantize(tiny_unet(), preset_config("w2a8", solver=FAST), TINY, progress=False, report=report)
    return model, report


def test_a8_pipeline_attaches_split_quantizers(a8_model):
    model, report = a8_model
    quantizers = input_quantizers(model)
    quantized = [r["name"] for r in report.rows if r["status"] == "quantized"]
    assert sorted(quantizers) == sorted(quantized)
    assert all(isinstance(model.get_submodule(n), AQModule) for n in quantizers)
    splits = shortcut_splits(tiny_unet())
    split_layers = [n for n in quantized if n in splits]
    assert split_layers and all(quantizers[n].splits == (splits[n],) for n in split_layers)
    assert any("A8" in note for note in report.notes)
    # The quantizers act: removing them changes the output, a little.
    a8 = outputs(model)
    for name in quantizers:
        model.get_submodule(name).input_quantizer.set_ranges(
            torch.tensor([-1e4] * len(quantizers[name].lo)), torch.tensor([1e4] * len(quantizers[name].lo))
        )
    coarse = outputs(model)
    assert not torch.allclose(a8, coarse)


def test_a8_save_load_and_resume(tmp_path):
    config = preset_config("w2a8", solver=FAST)
    model = quantize(tiny_unet(), config, TINY, progress=False)
    expected = outputs(model)
    avq.save_quantized(model, tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["activation_bits"] == 8 and sorted(qc["activations"]) == sorted(input_quantizers(model))
    loaded = avq.load_quantized(tmp_path / "q")
    assert torch.equal(outputs(loaded), expected)

    ckpt, (_, interrupt) = tmp_path / "ckpt", interrupt_after(2)

    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_unet(), config, TINY, checkpoint_dir=ckpt, progress=False, on_layer=interrupt)
    resumed = quantize(tiny_unet(), config, TINY, checkpoint_dir=ckpt, resume=True, progress=False)
    assert torch.equal(outputs(resumed), expected)


def test_a8_on_packed_uniform_baselines(tmp_path):
    model = quantize(tiny_unet(), preset_config("w2a8", "rtn"), TINY, progress=False)
    quantizers = input_quantizers(model)
    assert quantizers and all(isinstance(model.get_submodule(n), UniformModule) for n in quantizers)
    expected = outputs(model)
    avq.save_quantized(model, tmp_path / "q")
    assert torch.equal(outputs(avq.load_quantized(tmp_path / "q")), expected)


def test_a8_needs_the_sampler_and_rejects_bad_channel_counts():
    with pytest.raises(ValueError, match="need a CalibrationConfig"):
        quantize(tiny_unet(), preset_config("w2a8"), {"x": torch.eye(2)}, progress=False)
    with pytest.raises(ValueError, match="quantizer for 3 channels"):
        attach_input_quantizer(nn.Linear(4, 2), ActQuantizer(channels=3))


def test_sequential_calibration_sees_the_quantized_blocks(tmp_path):
    fp_first = quantize(tiny_unet(), preset_config("w2a8", solver=FAST), TINY, progress=False)
    report = QuantizeReport()
    config = preset_config("w2a8", solver=FAST, sequential=True)
    sequential = quantize(tiny_unet(), config, TINY, progress=False, report=report)
    assert any("sequential" in note for note in report.notes)
    assert sorted(input_quantizers(sequential)) == sorted(input_quantizers(fp_first))
    first = [r["name"] for r in report.rows if r["status"] == "quantized"]
    assert first
    # The first block sees the FP model either way; later blocks see quantized inputs, so they differ.
    ranges = lambda m, n: m.get_submodule(n).input_quantizer.hi  # noqa: E731
    assert torch.equal(ranges(sequential, first[0]), ranges(fp_first, first[0]))
    assert not all(torch.equal(ranges(sequential, n), ranges(fp_first, n)) for n in first)
    with pytest.raises(avq.planning.PresetError, match="sequential"):
        preset_config("w2a16", sequential=True, bits_budget=3.0)

    ckpt, (_, interrupt) = tmp_path / "ckpt", interrupt_after(3)

    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_unet(), config, TINY, checkpoint_dir=ckpt, progress=False, on_layer=interrupt)
    resumed = quantize(tiny_unet(), config, TINY, checkpoint_dir=ckpt, resume=True, progress=False)
    torch.testing.assert_close(outputs(resumed), outputs(sequential))
