"""The shared reference-model trainer: model sizes, resumable checkpoints, final save (avq_bench.training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from avq_bench.reference import NULL_CLASS
from avq_bench.training import (
    CheckpointMismatchError,
    TrainConfig,
    build_model,
    default_config,
    model_stats,
    predict_eps,
    train,
)

TINY_UNET = (
    ("block_out_channels", (8, 16)),
    ("down_block_types", ("DownBlock2D", "AttnDownBlock2D")),
    ("up_block_types", ("AttnUpBlock2D", "UpBlock2D")),
    ("attention_head_dim", 8),
    ("norm_num_groups", 4),
)
TINY_DIT = (("num_attention_heads", 2), ("attention_head_dim", 8), ("num_layers", 1))


def tiny(model: str = "digits-unet", **kw) -> TrainConfig:
    overrides = TINY_UNET if model == "digits-unet" else TINY_DIT
    return TrainConfig(model, steps=6, batch_size=4, warmup=2, model_config=overrides, **kw)


@pytest.mark.parametrize("name, low, high", [("digits-unet", 8e6, 16e6), ("digits-dit", 5e6, 10e6)])
def test_reference_model_sizes(name, low, high):
    torch.manual_seed(0)
    stats = model_stats(build_model(default_config(name)))
    assert low <= stats["parameters"] <= high
    assert stats["big_layer_fraction"] > 0.5  # most weights in layers of >= 100k weights


def test_unet_has_attention_and_null_class():
    from diffusers.models.attention_processor import Attention

    model = build_model(default_config("digits-unet"))
    assert any(isinstance(m, Attention) for m in model.modules())
    assert model.config.num_class_embeds == NULL_CLASS + 1


def test_dit_forward_through_trainer_loss(one_thread):
    torch.manual_seed(0)
    model = build_model(tiny("digits-dit")).train()
    x = torch.randn(3, 1, 16, 16)
    labels = torch.tensor([0, 9, NULL_CLASS])  # the null class is DiT's extra LabelEmbedding row
    eps = predict_eps(model, x, torch.tensor([0, 500, 999]), labels)
    assert eps.shape == x.shape
    eps.square().mean().backward()


def test_resume_matches_uninterrupted_run(tmp_path, one_thread):
    config = tiny()
    full = train(config, None, progress=False)
    ckpt = tmp_path / "ckpt"
    first = train(config, None, checkpoint_dir=ckpt, checkpoint_every=2, stop_after=3, progress=False)
    assert first["steps_done"] == 3
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    assert meta["step"] == 3 and (ckpt / meta["tensors"]).is_file()
    assert len(list(ckpt.glob("state-*.safetensors"))) == 1  # older checkpoints are removed
    resumed = train(config, None, checkpoint_dir=ckpt, resume=True, progress=False)
    assert resumed["steps_done"] == 6
    for key in ("model", "ema"):
        a, b = full[key].state_dict(), resumed[key].state_dict()
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{key}.{name} differs after resume"
    assert resumed["final_loss_ema"] == full["final_loss_ema"]


def test_mismatched_checkpoint_is_refused(tmp_path, one_thread):
    ckpt = tmp_path / "ckpt"
    train(tiny(), None, checkpoint_dir=ckpt, stop_after=1, progress=False)
    with pytest.raises(CheckpointMismatchError, match="seed"):
        train(tiny(seed=1), None, checkpoint_dir=ckpt, resume=True, progress=False)
    with pytest.raises(CheckpointMismatchError, match="DiTTransformer2DModel|digits-unet"):
        train(tiny("digits-dit"), None, checkpoint_dir=ckpt, resume=True, progress=False)
    with pytest.raises(FileNotFoundError):
        train(tiny(), None, checkpoint_dir=tmp_path / "none", resume=True, progress=False)


@pytest.mark.parametrize("name", ["digits-unet", "digits-dit"])
def test_tiny_run_saves_loadable_folder(tmp_path: Path, name, one_thread, monkeypatch):
    import diffusers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = TrainConfig(name, steps=2, batch_size=4, warmup=1, model_config=tiny(name).model_config)
    info = train(config, tmp_path / name, progress=False)
    folder = tmp_path / name
    saved = json.loads((folder / "training.json").read_text())
    assert saved["config"]["model"] == name and saved["steps_done"] == 2
    assert saved["torch"] == torch.__version__ and saved["final_loss_ema"] > 0
    cls = getattr(diffusers, info["model_class"])
    model = cls.from_pretrained(folder, torch_dtype=torch.float32, low_cpu_mem_usage=False)
    for key, value in info["ema"].state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value.half().float())
    assert (folder / "scheduler_config.json").is_file()
