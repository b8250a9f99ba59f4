"""The tiny offline pipelines of tests/tiny_pipelines.py: each family builds, saves as a diffusers pipeline
folder, loads back with `DiffusionPipeline.from_pretrained` and generates an image end to end."""

import numpy as np
import pytest
import torch
from tiny_pipelines import FAMILIES, IMAGE_SIZE, build_pipeline, call_kwargs, save_pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

PIPELINE_CLASSES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "pixart": "PixArtAlphaPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "dit": "DiTPipeline",
    "ldm": "LDMPipeline",
}


def _generate(pipe, family: str, seed: int = 0) -> np.ndarray:
    with torch.no_grad():
        return pipe(**call_kwargs(family), generator=torch.Generator().manual_seed(seed)).images


def _check_image(images) -> None:
    assert isinstance(images, np.ndarray)
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0.01  # an image, not a constant


def _parameters(pipe) -> dict[str, int]:
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_family_round_trips_and_generates(family, tmp_path, one_thread):
    pipe = build_pipeline(family, seed=0)
    assert type(pipe).__name__ == PIPELINE_CLASSES[family]
    sizes = _parameters(pipe)
    assert all(1_000 <= n <= 500_000 for n in sizes.values()), sizes
    assert all(
        p.dtype == torch.float32
        for m in pipe.components.values()
        if isinstance(m, torch.nn.Module)
        for p in m.parameters()
    )

    folder = save_pipeline(family, tmp_path / family, seed=0)
    assert folder == tmp_path / family and (folder / "model_index.json").is_file()
    loaded = diffusers.DiffusionPipeline.from_pretrained(folder)
    assert type(loaded) is type(pipe)
    assert _parameters(loaded) == sizes
    for name, module in pipe.components.items():  # same seed, same weights; save/load keeps them
        if isinstance(module, torch.nn.Module):
            other = loaded.components[name].state_dict()
            assert all(torch.equal(t, other[k]) for k, t in module.state_dict().items()), name

    loaded.set_progress_bar_config(disable=True)
    images = _generate(loaded, family)
    _check_image(images)
    np.testing.assert_allclose(_generate(pipe, family), images, atol=1e-5)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_seed_changes_the_weights(family):
    a, b = build_pipeline(family, seed=0), build_pipeline(family, seed=1)
    denoiser = "unet" if family == "sd" else "transformer"
    wa, wb = next(getattr(a, denoiser).parameters()), next(getattr(b, denoiser).parameters())
    assert not torch.equal(wa, wb)


def test_tokenizers_round_trip(tmp_path):
    from transformers import AutoTokenizer

    pipe = build_pipeline("sd3")
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, name)
        tokenizer.save_pretrained(tmp_path / name)
        loaded = AutoTokenizer.from_pretrained(tmp_path / name)
        encoding = tokenizer("a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length)
        assert (
            loaded("a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length)
            == encoding
        )
        assert (
            max(encoding.input_ids)
            < getattr(pipe, name.replace("tokenizer", "text_encoder")).config.vocab_size
        )
        assert tokenizer.decode(encoding.input_ids, skip_special_tokens=True) == "a photo of a cat"
    clip = pipe.tokenizer(
        "a photo of a cat", padding="max_length", max_length=pipe.tokenizer.model_max_length
    )
    assert pipe.tokenizer.model_max_length == 77 and len(clip.input_ids) == 77
    assert pipe.tokenizer.convert_ids_to_tokens(clip.input_ids[:7]) == [
        "<|startoftext|>",
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "cat</w>",
        "<|endoftext|>",
    ]


def test_pixart_sample_size_128_uses_resolution_conditioning(tmp_path, one_thread):
    pipe = build_pipeline("pixart", sample_size=128)
    assert pipe.transformer.config.sample_size == 128
    assert pipe.transformer.use_additional_conditions
    folder = save_pipeline("pixart", tmp_path / "pixart128", sample_size=128)
    loaded = diffusers.DiffusionPipeline.from_pretrained(folder)
    assert loaded.transformer.use_additional_conditions
    loaded.set_progress_bar_config(disable=True)
    _check_image(_generate(loaded, "pixart"))


def test_unknown_family_and_option():
    with pytest.raises(ValueError, match="unknown family"):
        build_pipeline("sd4")
    with pytest.raises(ValueError, match="unknown family"):
        call_kwargs("sd4")
    with pytest.raises(TypeError):
        build_pipeline("sd", sample_size=128)
