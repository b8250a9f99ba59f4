"""LAQ's block probe: a layer measured on its block, scaled by the block's gain from one whole-model probe."""

from __future__ import annotations

import pytest
import torch
from test_calibration import TINY, tiny_cond_unet, tiny_unet

import avq
from avq.calibration.statistics import block_of, calibrate
from avq.core.uniform_modules import quantized_module
from avq.planning.block_probe import BlockProbe
from avq.planning.presets import PresetError
from avq.planning.sensitivity import FP, make_probe, measure_sensitivity
from avq.run.quantize import quantize
from avq.run.report import QuantizeReport

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = avq.SolverOptions(max_rounds=1, kmeans_iters=3)
PROBE = avq.CalibrationConfig(num_samples=2, batch_size=2, num_steps=4, num_timesteps_kept=2, seed=7)
SPEC = avq.QuantSpec(1, 4, 8)


def _solved(model, name: str):
    """`name` replaced by a quantized module (AQ `1x4g8` on its own calibration Hessian)."""
    H, _ = calibrate(model, [name], TINY, progress=False)[name]
    layer = model.get_submodule(name)
    return quantized_module(layer, avq.quantize_weight(layer.weight.detach(), H, SPEC, **vars(FAST)))


@pytest.mark.parametrize("build", [tiny_unet, tiny_cond_unet], ids=["unet", "cond-unet"])
def test_anchor_is_exact_and_the_block_gain_carries(build):
    """The first layer of a block is measured on the whole model (exactly the whole-model probe's value);
    the next one is its block error times that gain, near the whole-model measure; the model is left as it
    was, and recording a block does not run the blocks after it."""
    model = build()
    blocks = [n for n, _ in model.named_modules() if n.startswith("down_blocks.1.") and n.endswith("to_q")]
    names = [
        n for n in avq.calibration.statistics.quantizable_layers(model) if block_of(n) == "down_blocks.1"
    ]
    first, second = names[0], names[-1]  # a resnet conv, an attention projection (or the downsampler)
    assert blocks or "attn" not in second
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = make_probe(model, PROBE)
    local = BlockProbe(probe)
    q_first, q_second = _solved(model, first), _solved(model, second)
    later: list[int] = []
    model.up_blocks[0].register_forward_pre_hook(lambda *a: later.append(1))

    assert local.layer_error(model, first, q_first) == probe.layer_error(model, first, q_first)
    assert local.anchors == {"down_blocks.1": first} and local.gains["down_blocks.1"] > 0
    runs = len(later)  # the two whole-model probes ran every block; recording ran none after its own
    assert runs == 2 * len(probe.inputs)
    estimate = local.layer_error(model, second, q_second)
    assert len(later) == runs  # no whole-model forward for the second layer
    whole = probe.layer_error(model, second, q_second)
    assert 0.2 < estimate / whole < 5, (estimate, whole)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert probe.error(model) == 0.0


def test_layers_outside_blocks_are_probed_whole():
    model = tiny_unet()
    probe = make_probe(model, PROBE)
    local = BlockProbe(probe)
    q = _solved(model, "conv_out")
    assert local.layer_error(model, "conv_out", q) == probe.layer_error(model, "conv_out", q)
    assert local.gains == {} and local._block is None  # nothing recorded


def test_measure_sensitivity_with_block_probe_keeps_the_candidate_order():
    model = tiny_unet()
    names = [
        n for n in avq.calibration.statistics.quantizable_layers(model) if block_of(n) == "down_blocks.1"
    ]
    hessians = calibrate(model, names, TINY, progress=False)
    candidates = {n: [avq.QuantSpec(1, 4, 8), avq.QuantSpec(2, 8, 4), FP] for n in names}
    table = measure_sensitivity(
        model, names, candidates, BlockProbe(make_probe(model, PROBE)), hessians, solver=FAST
    )
    for name in names:  # (equal where the layer's inputs are rank-deficient: time_emb_proj's one-hot-like)
        assert table.errors[name]["1x4g8"] >= table.errors[name]["2x8g4"] > table.errors[name][FP] == 0.0
    assert sum(table.errors[n]["1x4g8"] > table.errors[n]["2x8g4"] for n in names) >= len(names) - 1


def test_quantize_reports_the_probe_and_refuses_an_unknown_one():
    assert avq.preset_config("w2a16", bits_budget=6.0).laq_probe == "model"  # measured more accurate
    config = avq.preset_config("w2a16", solver=FAST, bits_budget=6.0, laq_probe="block")
    report = QuantizeReport()
    quantize(tiny_unet(), config, TINY, progress=False, report=report)
    assert "block" in report.budget["measured_with"]["probed_on"]
    with pytest.raises(PresetError, match="laq_probe"):
        avq.preset_config("w2a16", bits_budget=6.0, laq_probe="layer")
