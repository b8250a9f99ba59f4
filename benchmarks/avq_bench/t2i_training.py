"""Resumable trainer of `digits-t2i` (`avq_bench.t2i`): a latent text-to-image diffusion model saved as a
stock diffusers `StableDiffusionPipeline` folder.

Two stages, one after the other, on the 16x16 digits train split with random affine augmentation
(`avq_bench.data`), both with AdamW, linear warm-up and cosine decay (`avq_bench.training.lr_factor`),
gradient clipping and an EMA of the weights (the EMA is what ships, and the EMA VAE is what the UNet
stage encodes with):

1. VAE: a small `AutoencoderKL` (2 levels: 1x16x16 images <-> 4x8x8 latents), MSE reconstruction plus
   `kl_weight` x the KL per latent element. Then `scaling_factor` = 1 / std of the train images' latents.
2. UNet: a `UNet2DConditionModel` on the scaled latents, cross-attention to the MiniLM caption embeddings
   at 8x8 and 4x4 (and the 4x4 mid block); epsilon prediction, MSE over uniform timesteps of the
   1000-step linear-beta DDPM schedule of the other reference models (`make_scheduler`). Captions are
   drawn uniformly from the digit's TRAIN phrasings and replaced by the empty caption with probability
   `caption_dropout` (classifier-free guidance). The few distinct captions are encoded once
   (`encode_captions`, identical to the pipeline's `encode_prompt`).

The pipeline ships a DDIM scheduler of the same betas with `clip_sample=False` (latents are not in
[-1, 1], unlike the pixel-space reference models); the protocol is DDIM 20 steps with guidance.

Determinism and resume: each stage initialises after `torch.manual_seed(seed + stage index)` and draws
every batch, augmentation, caption, posterior sample, noise and timestep from its own generator seeded
the same way. Checkpoints (`avq_bench.training.pack_training_state`, `avq.storage.checkpoint`) go to
`<checkpoint_dir>/vae` and `<checkpoint_dir>/unet`; a resumed run ends with the same weights as an
uninterrupted one, and a checkpoint of another configuration is refused.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from avq.storage.atomic import write_folder_atomic, write_json_atomic
from avq.storage.checkpoint import CheckpointFolder
from avq_bench.data import load_digits_images, random_affine
from avq_bench.reference import NUM_TRAIN_TIMESTEPS, make_scheduler
from avq_bench.t2i import (
    ENCODER_WEIGHTS,
    MAX_TOKENS,
    NULL_CAPTION,
    TRAIN_TEMPLATES,
    caption,
    encode_captions,
    load_text_encoder,
    load_tokenizer,
    pipeline_folder,
)
from avq_bench.training import (
    CHECKPOINT_FORMAT,
    CheckpointMismatchError,
    lr_factor,
    model_stats,
    pack_training_state,
    restore_training_state,
)

STAGES = ("vae", "unet")

VAE_CONFIG: dict[str, Any] = dict(
    in_channels=1,
    out_channels=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),  # 2 levels: vae_scale_factor 2
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=16,
)
# 4.64 M parameters (9.3 MB in fp16), ~0.4 s/step at batch 64 on one free core (torch 2.13 CPU).
# `attention_head_dim` is the number of heads in UNet2DConditionModel (a diffusers naming quirk): 4 heads
# of 16 and 32 channels.
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 128),
    layers_per_block=1,
    cross_attention_dim=384,  # MiniLM's hidden size
    attention_head_dim=4,
    norm_num_groups=32,
)


@dataclass(frozen=True)
class T2IConfig:
    """Everything that determines the trained weights (a checkpoint of another config is refused).
    `vae_config` / `unet_config` override entries of VAE_CONFIG / UNET_CONFIG (tests use tiny ones)."""

    vae_steps: int = 1500
    unet_steps: int = 7000
    seed: int = 0
    batch_size: int = 64
    vae_lr: float = 1e-3
    unet_lr: float = 1e-3
    warmup: int = 200
    min_lr_fraction: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    kl_weight: float = 1e-3
    caption_dropout: float = 0.1
    max_tokens: int = MAX_TOKENS
    vae_config: tuple[tuple[str, Any], ...] = ()
    unet_config: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        for name in ("vae_steps", "unet_steps", "batch_size", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"T2IConfig.{name} must be an int >= 1, got {value!r}")
        if not 0.0 <= self.caption_dropout < 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("T2IConfig.caption_dropout and ema_decay must lie in [0, 1)")

    def model_config(self, stage: str) -> dict[str, Any]:
        base, overrides = (VAE_CONFIG, self.vae_config) if stage == "vae" else (UNET_CONFIG, self.unet_config)
        return {**base, **dict(overrides)}

    def to_json(self) -> dict[str, Any]:
        raw = {
            **asdict(self),
            "vae_config": self.model_config("vae"),
            "unet_config": self.model_config("unet"),
        }
        return json.loads(json.dumps(raw))


@dataclass(frozen=True)
class _Schedule:
    """The fields `lr_factor` reads, for one stage."""

    steps: int
    warmup: int
    min_lr_fraction: float


def build(config: T2IConfig, stage: str) -> nn.Module:
    """A fresh model of `stage`, initialised after `torch.manual_seed(seed + stage index)`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(config.seed + STAGES.index(stage))
    cls = AutoencoderKL if stage == "vae" else UNet2DConditionModel
    return cls(**config.model_config(stage))


def caption_table(config: T2IConfig, tokenizer=None, text_encoder=None) -> torch.Tensor:
    """Embeddings [1 + 10 * T, max_tokens, 384] of the null caption (row 0) and of digit `d`'s TRAIN
    phrasing `j` (row `1 + d * T + j`, T = len(TRAIN_TEMPLATES))."""
    tokenizer = tokenizer or load_tokenizer(config.max_tokens)
    text_encoder = text_encoder or load_text_encoder()
    captions = [NULL_CAPTION] + [caption(t, d) for d in range(10) for t in TRAIN_TEMPLATES]
    return encode_captions(tokenizer, text_encoder, captions)


@torch.no_grad()
def latent_scaling_factor(vae: nn.Module, images: torch.Tensor, seed: int) -> float:
    """1 / std of posterior samples of `images` (rounded to 5 significant digits, as it is stored)."""
    generator = torch.Generator().manual_seed(seed)
    latents = vae.encode(images).latent_dist.sample(generator)
    return float(f"{1.0 / latents.std().item():.5g}")


# ---------------------------------------------------------------------------------------------- stages
def _vae_loss(config: T2IConfig, vae: nn.Module, x0: torch.Tensor, generator: torch.Generator):
    posterior = vae.encode(x0).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
    return F.mse_loss(recon, x0) + config.kl_weight * kl


def _unet_loss(config, unet, x0, labels, generator, *, vae, scaling, table, scheduler):
    n = len(x0)
    with torch.no_grad():
        latents = vae.encode(x0).latent_dist.sample(generator) * scaling
    rows = 1 + labels * len(TRAIN_TEMPLATES) + torch.randint(len(TRAIN_TEMPLATES), (n,), generator=generator)
    rows[torch.rand(n, generator=generator) < config.caption_dropout] = 0
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(NUM_TRAIN_TIMESTEPS, (n,), generator=generator)
    xt = scheduler.add_noise(latents, noise, t)
    return F.mse_loss(unet(xt, t, encoder_hidden_states=table[rows]).sample, noise)


def _load_stage(ckpt: CheckpointFolder, config: T2IConfig, stage: str):
    meta, tensors = ckpt.load_snapshot(format=CHECKPOINT_FORMAT, error=CheckpointMismatchError)
    if meta.get("stage") != stage or meta.get("config") != config.to_json():
        raise CheckpointMismatchError(
            f"{ckpt.meta_path} was written by another digits-t2i configuration or stage; refusing to resume. "
            "Use another --checkpoint-dir, or drop --resume to start over."
        )
    return meta, tensors


def run_stage(
    config: T2IConfig,
    stage: str,
    loss_fn,
    *,
    ckpt_dir: Path | None,
    checkpoint_every: int,
    resume: bool,
    stop_at: int | None,
    progress: bool,
) -> dict[str, Any]:
    """Train one stage up to its step `stop_at` (None: to its end). `loss_fn(model, x0, labels, gen)`
    is the loss of one batch. Returns `{model, ema, steps_done, running_loss, seconds}`."""
    from tqdm.auto import tqdm

    steps = config.vae_steps if stage == "vae" else config.unet_steps
    lr = config.vae_lr if stage == "vae" else config.unet_lr
    schedule = _Schedule(steps, config.warmup, config.min_lr_fraction)
    model = build(config, stage).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed + STAGES.index(stage))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    images, labels = load_digits_images("train", size=16, seed=0)
    ckpt = CheckpointFolder(ckpt_dir / stage) if ckpt_dir is not None else None
    start, running, previous = 0, None, 0.0
    if resume and ckpt is not None and ckpt.exists():
        meta, tensors = _load_stage(ckpt, config, stage)
        restore_training_state(meta, tensors, model=model, ema=ema, optimizer=optimizer, generator=generator)
        start, running, previous = meta["step"], meta["running_loss"], meta["seconds"]
    end = steps if stop_at is None else max(start, min(steps, stop_at))
    began = time.perf_counter()

    def save(step: int) -> None:
        if ckpt is None:
            return
        ckpt.folder.mkdir(parents=True, exist_ok=True)
        tensors, optim_meta = pack_training_state(
            model=model, ema=ema, optimizer=optimizer, generator=generator
        )
        seconds = previous + time.perf_counter() - began
        meta = {"format": CHECKPOINT_FORMAT, "stage": stage, "config": config.to_json(), **optim_meta}
        meta.update(running_loss=running, seconds=seconds, torch=torch.__version__)
        ckpt.save_snapshot(step, tensors, meta)

    bar = tqdm(range(start, end), initial=start, total=steps, desc=f"train {stage}", disable=not progress)
    for step in bar:
        idx = torch.randint(len(images), (config.batch_size,), generator=generator)
        x0 = random_affine(images[idx], generator)
        loss = loss_fn(model, x0, labels[idx], generator)
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(schedule, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < end:
            save(step + 1)
    bar.close()
    if end > start:
        save(end)
    seconds = previous + time.perf_counter() - began
    return {"model": model, "ema": ema, "steps_done": end, "running_loss": running, "seconds": seconds}


# ---------------------------------------------------------------------------------------------- train
def train(
    config: T2IConfig,
    out_dir: str | Path | None,
    *,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 500,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train both stages (module docstring) and, once all steps are done, save the pipeline to `out_dir`
    (None: skip). `stop_after` ends the run after that many steps in all (VAE steps count first), with a
    checkpoint, as an interruption would. Returns the info of `training.json` plus the modules
    (`vae`, `unet`: EMA; `unet_model`: the raw UNet)."""
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and ckpt is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    common = dict(ckpt_dir=ckpt, checkpoint_every=checkpoint_every, resume=resume, progress=progress)
    vae_loss = lambda m, x, _y, g: _vae_loss(config, m, x, g)  # noqa: E731
    vae_run = run_stage(config, "vae", vae_loss, stop_at=stop_after, **common)
    info: dict[str, Any] = {"config": config.to_json(), "vae_steps_done": vae_run["steps_done"]}
    vae = vae_run["ema"]
    images, _ = load_digits_images("train", size=16, seed=0)
    test_images, _ = load_digits_images("test", size=16, seed=0)
    scaling = latent_scaling_factor(vae, images, config.seed)
    vae.register_to_config(scaling_factor=scaling)
    with torch.no_grad():
        recon = vae.decode(vae.encode(test_images).latent_dist.mode()).sample
    info.update(vae_test_mse=F.mse_loss(recon, test_images).item(), scaling_factor=scaling)
    info.update(vae_loss_ema=vae_run["running_loss"], vae_seconds=round(vae_run["seconds"], 1))
    if progress:
        print(f"VAE: test MSE {info['vae_test_mse']:.5f}, latent scaling factor {scaling}", flush=True)
    unet_run: dict[str, Any] = dict(model=None, ema=None, steps_done=0, running_loss=None, seconds=0.0)
    unet_stop = None if stop_after is None else stop_after - config.vae_steps
    if vae_run["steps_done"] == config.vae_steps and (unet_stop is None or unet_stop > 0):
        tokenizer, encoder = load_tokenizer(config.max_tokens), load_text_encoder()
        table = caption_table(config, tokenizer, encoder)
        extra = dict(vae=vae, scaling=scaling, table=table, scheduler=make_scheduler())
        loss = lambda m, x, y, g: _unet_loss(config, m, x, y, g, **extra)  # noqa: E731
        unet_run = run_stage(config, "unet", loss, stop_at=unet_stop, **common)
    info.update(
        unet_steps_done=unet_run["steps_done"],
        unet_loss_ema=unet_run["running_loss"],
        unet_seconds=round(unet_run["seconds"], 1),
        train_seconds=round(vae_run["seconds"] + unet_run["seconds"], 1),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    if unet_run["ema"] is not None:
        info.update(vae_parameters=model_stats(vae)["parameters"], **model_stats(unet_run["ema"]))
    if out_dir is not None and unet_run["steps_done"] == config.unet_steps:
        from avq_bench.results import run_stamp

        info.update(run_stamp())
        save_pipeline(Path(out_dir), vae=vae, unet=unet_run["ema"], tokenizer=tokenizer, info=info)
    return {**info, "vae": vae, "unet": unet_run["ema"], "unet_model": unet_run["model"]}


def make_pipeline_scheduler():
    """DDIM on the training betas; no clipping of the predicted x0 (it is a latent, not an image);
    `steps_offset=1`, which `StableDiffusionPipeline` would otherwise impose with a deprecation warning."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(make_scheduler().config, clip_sample=False, steps_offset=1)


def save_pipeline(out_dir: Path, *, vae: nn.Module, unet: nn.Module, tokenizer, info: dict[str, Any]) -> Path:
    """Save the `StableDiffusionPipeline` folder (fp16 VAE and UNet, the short tokenizer, the text
    encoder's config.json but not its weights) + `training.json`, atomically; check that it loads."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    def fill(tmp: Path) -> None:
        pipe = StableDiffusionPipeline(
            vae=copy.deepcopy(vae).half(),
            text_encoder=load_text_encoder(),
            tokenizer=tokenizer,
            unet=copy.deepcopy(unet).half(),
            scheduler=make_pipeline_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "text_encoder" / ENCODER_WEIGHTS).unlink()  # not package data: linked by pipeline_folder()
        write_json_atomic(tmp / "training.json", info)
        for path in tmp.rglob("*"):  # diffusers writes weights 0600 (temporary files): package data is 0644
            if path.is_file():
                path.chmod(0o644)

    write_folder_atomic(out_dir, fill)
    DiffusionPipeline.from_pretrained(pipeline_folder(out_dir))  # fail here, not later
    return out_dir


__all__ = [
    "STAGES",
    "UNET_CONFIG",
    "VAE_CONFIG",
    "T2IConfig",
    "build",
    "caption_table",
    "save_pipeline",
    "train",
]
