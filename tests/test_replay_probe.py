"""LAQ's whole-model probe replayed from the layer's block: the same errors, the blocks before it not run, and
the whole model probed where the blocks do not form a chain."""

from __future__ import annotations

import copy

import pytest
import torch
from test_calibration import tiny_unet

import avq
from avq.pipelines.calibration import RecordedProbe
from avq.planning.replay_probe import ReplayProbe, predecessors
from avq.planning.sensitivity import make_probe
from avq.run.quantize import quantize
from avq.run.report import QuantizeReport

pytestmark = pytest.mark.usefixtures("one_thread")

PROBE = avq.CalibrationConfig(num_samples=2, batch_size=2, num_steps=4, num_timesteps_kept=2, seed=7)


def _dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4,
        sample_size=8, patch_size=2, num_embeds_ada_norm=5,
    ).eval()  # fmt: skip
    return model, make_probe(model, PROBE), "transformer_blocks.2.attn1.to_q"


def _sd3():
    """SD3's joint blocks return (encoder states, image states) tuples; the last block only image states."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=8,
    ).eval()  # fmt: skip
    probe = RecordedProbe()
    with torch.no_grad():
        for t in (900.0, 300.0):
            kwargs = {
                "hidden_states": torch.randn(2, 4, 8, 8),
                "encoder_hidden_states": torch.randn(2, 5, 16),
                "pooled_projections": torch.randn(2, 8),
                "timestep": torch.full((2,), t),
            }
            probe.calls.append(((), kwargs))
            probe.reference.append(model(**kwargs).sample.float())
    return model, probe, "transformer_blocks.2.attn.to_q"


def _perturbed(model, name: str) -> torch.nn.Module:
    layer = copy.deepcopy(model.get_submodule(name))
    with torch.no_grad():
        layer.weight.add_(0.05 * torch.randn_like(layer.weight))
    return layer


@pytest.mark.parametrize("build", [_dit, _sd3], ids=["dit", "sd3"])
def test_replay_gives_the_whole_model_error_without_the_blocks_before(build):
    model, probe, name = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    replay = ReplayProbe(probe)
    runs = {"first": 0, "last": 0}
    inner = name.split(".", 2)[2]  # the probed layer's path within its block: runs iff the block does
    for key, block in (("first", model.transformer_blocks[0]), ("last", model.transformer_blocks[-1])):
        hook = lambda *a, key=key: runs.__setitem__(key, runs[key] + 1)  # noqa: E731
        block.get_submodule(inner).register_forward_pre_hook(hook)
    module = _perturbed(model, name)

    error = replay.layer_error(model, name, module)  # prepares: records block 1's outputs, checks a replay
    assert replay.replayed == ["transformer_blocks.2"] and replay.whole == []
    assert error > 0 and error == pytest.approx(probe.layer_error(model, name, module), rel=1e-6, abs=0)
    runs.update(first=0, last=0)
    assert replay.layer_error(model, name, _perturbed(model, name)) > 0
    assert runs == {"first": 0, "last": probe.num_inputs}  # block 0 skipped, the blocks after it run

    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all("forward" not in block.__dict__ for block in model.transformer_blocks)  # stubs removed
    assert probe.error(model) == 0.0


def test_blocks_that_do_not_chain_are_probed_on_the_whole_model():
    """A UNet's down blocks each feed skip connections: replaying `down_blocks.2` would hand block 0's
    skips block 1's, so the check refuses it and the whole model is probed; `down_blocks.1` (one block
    before it, its own output) and the up blocks chain and are replayed."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4,
        attention_head_dim=8, num_class_embeds=4,
    ).eval()  # fmt: skip
    probe = make_probe(model, PROBE)
    replay = ReplayProbe(probe)
    for block in ("down_blocks.1", "down_blocks.2", "up_blocks.1"):
        name = f"{block}.resnets.0.conv1"
        module = _perturbed(model, name)
        assert replay.layer_error(model, name, module) == pytest.approx(
            probe.layer_error(model, name, module), rel=1e-6, abs=0
        )
    assert replay.replayed == ["down_blocks.1", "up_blocks.1"] and replay.whole == ["down_blocks.2"]
    assert all("forward" not in block.__dict__ for block in model.down_blocks)
    assert probe.error(model) == 0.0


def test_layers_outside_lists_and_first_blocks_have_nothing_to_skip():
    model = tiny_unet()
    assert predecessors(model, "conv_in") == [] and predecessors(model, "mid_block") == []
    assert predecessors(model, "down_blocks.0") == []
    assert predecessors(model, "up_blocks.1") == ["up_blocks.0"]


def test_quantize_probes_the_whole_model_by_replay():
    solver = avq.SolverOptions(max_rounds=1, kmeans_iters=3)
    config = avq.preset_config("w2a16", solver=solver, bits_budget=6.0)
    report = QuantizeReport()
    quantize(tiny_unet(), config, PROBE, progress=False, report=report)
    assert "replayed" in report.budget["measured_with"]["probed_on"]
