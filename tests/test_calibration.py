"""Time step-aware calibration on tiny random-config models of every supported family."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from avq.calibration.adapters import UnsupportedModelError, adapter_for
from avq.calibration.config import CalibrationConfig
from avq.calibration.statistics import calibrate, quantizable_layers

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = CalibrationConfig(num_samples=3, batch_size=2, num_steps=4, num_timesteps_kept=2, guidance_scale=2.0)


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=8,
        num_class_embeds=4,
    ).eval()


def tiny_cond_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=4,
    ).eval()


def tiny_dit(seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=5,
    ).eval()


def tiny_pixart(seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=12,
    ).eval()


# (builder, a Linear layer, a Conv2d layer or None, Linear K, Conv K)
FAMILIES = {
    "unet": (tiny_unet, "down_blocks.1.attentions.0.to_q", "down_blocks.0.resnets.0.conv1", 16, 72),
    "cond-unet": (
        tiny_cond_unet,
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "conv_in",
        16,
        36,
    ),
    "dit": (tiny_dit, "transformer_blocks.0.attn1.to_q", "pos_embed.proj", 16, 16),
    "pixart": (tiny_pixart, "caption_projection.linear_1", "pos_embed.proj", 12, 16),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    build, linear, conv, k_lin, k_conv = FAMILIES[request.param]
    model = build()
    hessians = calibrate(model, [linear, conv], TINY, progress=False)
    return request.param, build, model, linear, conv, k_lin, k_conv, hessians


def test_hessians_symmetric_psd_right_k(family):
    _, _, model, linear, conv, k_lin, k_conv, hessians = family
    for name, K in ((linear, k_lin), (conv, k_conv)):
        H, n_rows = hessians[name]
        assert H.shape == (K, K)
        assert n_rows > 0
        assert torch.allclose(H, H.T, atol=1e-6)
        assert torch.linalg.eigvalsh(H.double()).min() > -1e-5 * H.diagonal().mean()
        assert H.diagonal().mean() > 0


def test_deterministic_and_layers_per_pass(family):
    _, _, model, linear, conv, _, _, hessians = family
    again = calibrate(model, [linear, conv], TINY, progress=False)
    split = calibrate(
        model, [linear, conv], CalibrationConfig(**{**TINY.to_dict(), "layers_per_pass": 1}), progress=False
    )
    for name in (linear, conv):
        assert torch.equal(again[name][0], hessians[name][0])
        assert torch.equal(split[name][0], hessians[name][0])
        assert split[name][1] == hessians[name][1]


@pytest.mark.parametrize("replay", [True, False])
def test_later_passes_replay_the_kept_calls(family, replay):
    """With several passes only the first samples; the others replay the model calls it recorded at the
    kept steps: the same Hessians for `kept / steps` of the calls (`replay=False`: every pass samples).
    A `DenoiserCalls` handed to a second call carries the recording over."""
    from avq.calibration.statistics import DenoiserCalls

    _, _, model, linear, conv, _, _, hessians = family
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    config = CalibrationConfig(**{**TINY.to_dict(), "layers_per_pass": 1, "replay": replay})
    try:
        split = calibrate(model, [linear, conv], config, progress=False)
        sampled, kept = 2 * TINY.num_steps, 2 * TINY.num_timesteps_kept  # 2 batches
        assert len(calls) == (sampled + kept if replay else 2 * sampled)
        carried = DenoiserCalls()
        first = calibrate(model, [linear], config, progress=False, replay=carried)
        calls.clear()
        second = calibrate(model, [conv], config, progress=False, replay=carried)
        assert len(calls) == (kept if replay else sampled)
    finally:
        handle.remove()
    for name, got in ((linear, first), (conv, second), (linear, split), (conv, split)):
        assert torch.equal(got[name][0], hessians[name][0]) and got[name][1] == hessians[name][1]


def test_passes_respect_the_hessian_memory_budget():
    from avq.calibration.statistics import hessian_passes

    model = tiny_unet()
    names = quantizable_layers(model)
    sizes = {}
    for n in names:
        w = model.get_submodule(n).weight
        sizes[n] = 4 * (w.shape[1] * (w[0, 0].numel() if w.dim() == 4 else 1)) ** 2
    budget = 2 * max(sizes.values())
    chunks = hessian_passes(model, names, budget / 2**30)
    assert [n for c in chunks for n in c] == names and len(chunks) > 1
    assert all(sum(sizes[n] for n in c) <= budget for c in chunks)
    tiny = hessian_passes(model, names, 1e-9)  # every layer alone
    assert all(len(c) == 1 for c in tiny)
    with pytest.raises(ValueError, match="max_hessian_gib"):
        CalibrationConfig(max_hessian_gib=0)


def test_other_seed_differs(family):
    _, _, model, linear, _, _, _, hessians = family
    other = calibrate(model, [linear], CalibrationConfig(**{**TINY.to_dict(), "seed": 1}), progress=False)
    assert not torch.equal(other[linear][0], hessians[linear][0])


def test_row_counts_follow_kept_timesteps_and_guidance():
    model = tiny_unet()
    name = "down_blocks.1.attentions.0.to_q"  # 4x4 tokens at this level
    rows = {}
    for kept, guidance in ((2, 2.0), (3, 2.0), (2, 1.0)):
        cfg = CalibrationConfig(**{**TINY.to_dict(), "num_timesteps_kept": kept, "guidance_scale": guidance})
        rows[kept, guidance] = calibrate(model, [name], cfg, progress=False)[name][1]
    per_step = 3 * 16  # 3 samples x 16 tokens
    assert rows[2, 2.0] == 2 * 2 * per_step  # CFG: conditional and null inputs both recorded
    assert rows[3, 2.0] == 3 * 2 * per_step
    assert rows[2, 1.0] == 2 * per_step


def test_kept_step_indices_spread_over_trajectory():
    assert CalibrationConfig(num_steps=20, num_timesteps_kept=5).kept_step_indices() == [0, 5, 10, 14, 19]
    assert CalibrationConfig(num_steps=4, num_timesteps_kept=None).kept_step_indices() == [0, 1, 2, 3]
    assert CalibrationConfig(num_steps=4, num_timesteps_kept=1).kept_step_indices() == [3]


def test_only_kept_timesteps_recorded():
    """The sampler runs every step, but only the kept steps feed the statistics."""
    model = tiny_unet()
    name = "conv_in"
    acc_calls = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: acc_calls.append(1))
    cfg = CalibrationConfig(num_samples=1, batch_size=1, num_steps=5, num_timesteps_kept=2)
    _, n_rows = calibrate(model, [name], cfg, progress=False)[name]
    handle.remove()
    assert len(acc_calls) == 5  # the model ran every step ...
    assert n_rows == 2 * 2 * 64  # ... but only 2 kept steps x (cond + null) x 8x8 patches were recorded


def test_quantizable_layers_skip_grouped_and_padded_convs():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 4, 1),
        nn.Linear(4, 4),
    )
    assert quantizable_layers(model) == ["2", "3"]


def test_unsupported_model_and_bad_layer():
    with pytest.raises(UnsupportedModelError, match="Sequential is not supported"):
        adapter_for(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="no layer 'nope'"):
        calibrate(tiny_unet(), ["nope"], TINY, progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        CalibrationConfig(num_samples=0)


def test_given_prompt_embeddings_are_used():
    model = tiny_cond_unet()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # sees the prompt embeddings
    emb = torch.ones(1, 3, 16)
    cfg = CalibrationConfig(**{**TINY.to_dict(), "guidance_scale": 1.0})
    H, n = calibrate(model, [name], cfg, conditioning=emb, progress=False)[name]
    assert torch.allclose(H, torch.ones(16, 16))
    with pytest.raises(ValueError, match=r"\[N, L, 16\]"):
        calibrate(model, [name], cfg, conditioning=torch.ones(1, 3, 5), progress=False)
