"""Shared, resumable trainer of the reference models `digits-unet` and `digits-dit` (docs/design.md).

Both are trained the same way as `digits-unet-mini` (`avq_bench.reference.train_mini_unet`): epsilon
prediction with MSE over uniform timesteps of the 1000-step DDPM schedule (`make_scheduler`), 16x16 digits
with random affine augmentation (`avq_bench.data`), labels dropped to the null class with probability
`label_dropout` for classifier-free guidance, AdamW with linear warm-up and cosine decay to 10 %, gradient
clipping and an EMA of the weights (the EMA is what ships).

Determinism: the initialisation follows `torch.manual_seed(seed)` and every batch, augmentation, label drop,
noise and timestep comes from one `torch.Generator` seeded with `seed`, so a run is a function of its
`TrainConfig` (and the thread count). The learning rate is a pure function of the step, so no LR scheduler
object needs saving.

Checkpoints (every `checkpoint_every` steps, and at the end; `avq.storage.checkpoint`) hold everything that
a continued run needs (model, EMA, AdamW moments, generator and global RNG state, step, running loss) in
pickle-free files: `state-<step>.safetensors` (all tensors, the optimizer state flattened to
`optim.<param>.<key>`) and `checkpoint.json` (configs, optimizer hyperparameters, step, tensor file name and
sha256). `checkpoint.json` is written last, by atomic rename, so it always names a complete tensor file: a
run killed at any moment resumes from the last committed checkpoint, and the resumed run ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from avq.storage.atomic import write_json_atomic
from avq.storage.checkpoint import CheckpointError, CheckpointFolder
from avq_bench.data import load_digits_images, random_affine
from avq_bench.reference import MINI_UNET_CONFIG, NULL_CLASS, NUM_CLASSES, NUM_TRAIN_TIMESTEPS, make_scheduler

CHECKPOINT_FORMAT = 1

# UNet: 3 levels at 16/8/4 px, self-attention at 8 and 4 px; ~13.1 M parameters, ~85 % of them in layers
# of >= 100k weights (the layers the quantizer cares about). The null class is `num_class_embeds - 1`.
DIGITS_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(128, 128, 256),
    layers_per_block=1,
    attention_head_dim=64,
    norm_num_groups=32,
    num_class_embeds=NUM_CLASSES + 1,
)

# DiT-style transformer on 2x2 patches (64 tokens), width 320 so that every attention/MLP/adaLN projection
# has >= 100k weights; 3 blocks, ~6.3 M parameters (with digits-unet and the classifier, 39.4 MB of fp16
# package data: the 40 MB budget). `num_embeds_ada_norm` = the 10 real classes: diffusers'
# `LabelEmbedding` adds one more row (index 10 = NULL_CLASS) for classifier-free guidance. No learned
# sigma (out_channels = in_channels): the DDIM sampler of the benchmark only uses epsilon.
DIGITS_DIT_CONFIG: dict[str, Any] = dict(
    num_attention_heads=5,
    attention_head_dim=64,
    in_channels=1,
    out_channels=1,
    num_layers=3,
    sample_size=16,
    patch_size=2,
    num_embeds_ada_norm=NUM_CLASSES,
    norm_num_groups=32,
)

MODEL_CLASSES = {
    "digits-unet": "UNet2DModel",
    "digits-dit": "DiTTransformer2DModel",
    "digits-unet-mini": "UNet2DModel",  # the shipped interim model (avq_bench.reference.train_mini_unet)
}
MODEL_CONFIGS = {
    "digits-unet": DIGITS_UNET_CONFIG,
    "digits-dit": DIGITS_DIT_CONFIG,
    "digits-unet-mini": MINI_UNET_CONFIG,
}

# Default steps (what the shipped models were trained with): both models trained at once on the 2-core
# box, one thread each: digits-unet ~1.5 s/step, digits-dit ~1.2 s/step -> 3000 steps in 60-75 min (alone
# on 2 threads ~0.85 s/step). Another job on the same cores makes steps 2-10x slower.
DEFAULT_STEPS = {"digits-unet": 3000, "digits-dit": 3000, "digits-unet-mini": 4000}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights (the checkpoint refuses to resume on any change).

    `model` is a key of `MODEL_CLASSES`; `model_config` overrides entries of its default diffusers config
    (tests use tiny ones). Per-model defaults of the optimisation come from `default_config`.
    """

    model: str
    steps: int
    seed: int = 0
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    model_config: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.model not in MODEL_CLASSES:
            raise ValueError(f"TrainConfig.model must be one of {sorted(MODEL_CLASSES)}, got {self.model!r}")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"TrainConfig.warmup must be an int >= 0, got {self.warmup!r}")
        if not 0.0 <= self.label_dropout < 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("TrainConfig.label_dropout and ema_decay must lie in [0, 1)")

    def full_model_config(self) -> dict[str, Any]:
        """The diffusers config the model is built from (defaults of `model` + overrides)."""
        return {**MODEL_CONFIGS[self.model], **dict(self.model_config)}

    def to_json(self) -> dict[str, Any]:
        """JSON-compatible form (tuples become lists), as stored in checkpoints and `training.json`."""
        return json.loads(json.dumps({**asdict(self), "model_config": self.full_model_config()}))


def default_config(model: str, *, steps: int | None = None, seed: int = 0) -> TrainConfig:
    """Per-model defaults: the transformer gets the smaller learning rate that transformers need."""
    optimisation = {
        "digits-unet": {"lr": 1e-3},
        "digits-dit": {"lr": 5e-4},
        "digits-unet-mini": {"lr": 2e-3, "warmup": 100},
    }
    if model in optimisation:
        steps = DEFAULT_STEPS[model] if steps is None else steps
        return TrainConfig(model, steps=steps, seed=seed, **optimisation[model])
    raise ValueError(f"unknown model {model!r}; expected one of {sorted(MODEL_CLASSES)}")


def build_model(config: TrainConfig) -> nn.Module:
    """A freshly initialised model of `config` (initialisation follows the global torch seed)."""
    import diffusers

    cls = getattr(diffusers, MODEL_CLASSES[config.model])
    return cls(**config.full_model_config())


def model_stats(model: nn.Module, big: int = 100_000) -> dict[str, float]:
    """Parameter count and the fraction of it in Linear/Conv2d weights of >= `big` elements."""
    total = sum(p.numel() for p in model.parameters())
    in_big = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.numel() >= big
    )
    return {"parameters": total, "big_layer_fraction": in_big / total}


def predict_eps(model: nn.Module, xt: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Epsilon prediction of either reference family (DiT: keyword call, eps = first `C` channels)."""
    from diffusers import DiTTransformer2DModel

    if isinstance(model, DiTTransformer2DModel):
        return model(xt, timestep=t, class_labels=labels).sample[:, : xt.shape[1]]
    return model(xt, t, class_labels=labels).sample


def disable_builtin_label_dropout(model: nn.Module) -> None:
    """Turn off diffusers' own label dropout (DiT's `LabelEmbedding`): in train mode it drops labels per
    block, independently, from the global RNG. The trainer drops them itself, once per sample, from its
    seeded generator; the null row (index `num_classes`) still exists because it is sized at init.
    """
    from diffusers.models.embeddings import LabelEmbedding

    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


def lr_factor(config: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_lr_fraction` at the last step."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    low = config.min_lr_fraction
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------- checkpoints
class CheckpointMismatchError(CheckpointError):
    """A checkpoint belongs to another model or configuration than the run asked to resume it."""


def pack_training_state(
    *, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`(tensors, meta)` of a training state, pickle-free: model and EMA weights, AdamW moments
    (`optim.<param>.<key>`), generator and global RNG state; `meta` holds the optimizer's param groups and
    non-tensor state (`restore_training_state` inverts it). Shared with `avq_bench.t2i_training`."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in (("model", model), ("ema", ema)):
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().contiguous().clone()
    optim = optimizer.state_dict()
    optim_scalars: dict[str, dict[str, Any]] = {}
    for index, state in optim["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().contiguous().clone()
            else:
                optim_scalars.setdefault(str(index), {})[key] = value
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    return tensors, {"optimizer_param_groups": optim["param_groups"], "optimizer_scalars": optim_scalars}


def save_checkpoint(
    ckpt_dir: Path,
    *,
    config: TrainConfig,
    step: int,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    running_loss: float | None,
    seconds: float,
) -> Path:
    """Write a checkpoint of the state after `step` steps (module docstring: layout and atomicity)."""
    tensors, optim_meta = pack_training_state(model=model, ema=ema, optimizer=optimizer, generator=generator)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "model_class": MODEL_CLASSES[config.model],
        "config": config.to_json(),
        **optim_meta,
        "running_loss": running_loss,
        "seconds": seconds,
        "torch": torch.__version__,
    }
    return CheckpointFolder(ckpt_dir).save_snapshot(step, tensors, meta)


def load_checkpoint(ckpt_dir: Path, config: TrainConfig) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`(meta, tensors)` of the checkpoint in `ckpt_dir`; `CheckpointMismatchError` unless it was written
    by a run of exactly `config`."""
    store = CheckpointFolder(ckpt_dir)
    path = store.meta_path
    if not store.exists():
        raise FileNotFoundError(f"no checkpoint to resume: {path} does not exist")
    meta, tensors = store.load_snapshot(format=CHECKPOINT_FORMAT, error=CheckpointMismatchError)
    wanted = config.to_json()
    saved = meta.get("config", {})
    diff = sorted(k for k in set(wanted) | set(saved) if wanted.get(k) != saved.get(k))
    if saved.get("model") != config.model or meta.get("model_class") != MODEL_CLASSES[config.model]:
        raise CheckpointMismatchError(
            f"{path} is a checkpoint of {saved.get('model')!r} ({meta.get('model_class')}), not of "
            f"{config.model!r}; refusing to resume. Use another --checkpoint-dir."
        )
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs run {wanted.get(k)!r}" for k in diff)
        raise CheckpointMismatchError(
            f"{path} was written by a {config.model!r} run of another configuration; refusing to resume. "
            f"Differences: {details}. "
            "Use another --checkpoint-dir, or drop --resume to start over."
        )
    return meta, tensors


def restore_training_state(
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> None:
    """Load a state written by `pack_training_state` into the modules, optimizer and generator (and the
    global torch RNG)."""
    for prefix, module in (("model", model), ("ema", ema)):
        head = f"{prefix}."
        module.load_state_dict({k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, scalars in meta["optimizer_scalars"].items():
        state.setdefault(int(index), {}).update(scalars)
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
        for group in meta["optimizer_param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])


# ---------------------------------------------------------------------------------------------- training
def train(
    config: TrainConfig,
    out_dir: str | Path | None,
    *,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 500,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `config`, checkpointing to `checkpoint_dir` every `checkpoint_every` steps (None: never).

    `resume` continues from the checkpoint in `checkpoint_dir` (which must come from the same config).
    `stop_after` ends the run after that many steps (with a checkpoint), as an interruption would; the
    final save only happens when all `config.steps` are done. The final save writes the EMA model in fp16
    (`save_pretrained`), the DDPM `scheduler_config.json` and `training.json` into `out_dir` (None: skip,
    for tests). Returns the info of `training.json` (plus `"ema"` / `"model"`: the modules).
    """
    from tqdm.auto import tqdm

    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and ckpt is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    images, labels = load_digits_images("train", size=16, seed=0)
    model = build_model(config).train()
    disable_builtin_label_dropout(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    scheduler = make_scheduler()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start_step, running, previous_seconds = 0, None, 0.0
    if resume:
        meta, tensors = load_checkpoint(ckpt, config)
        restore_training_state(meta, tensors, model=model, ema=ema, optimizer=optimizer, generator=generator)
        start_step, running, previous_seconds = meta["step"], meta["running_loss"], meta["seconds"]
    end_step = config.steps if stop_after is None else min(config.steps, stop_after)
    batch = config.batch_size
    started = time.perf_counter()

    def elapsed() -> float:
        return previous_seconds + time.perf_counter() - started

    def checkpoint(step: int) -> None:
        if ckpt is not None:
            save_checkpoint(
                ckpt,
                config=config,
                step=step,
                model=model,
                ema=ema,
                optimizer=optimizer,
                generator=generator,
                running_loss=running,
                seconds=elapsed(),
            )

    bar = tqdm(
        range(start_step, end_step),
        initial=start_step,
        total=config.steps,
        desc=f"train {config.model}",
        disable=not progress,
        unit="step",
    )
    for step in bar:
        idx = torch.randint(len(images), (batch,), generator=generator)
        x0 = random_affine(images[idx], generator)
        y = labels[idx].clone()
        y[torch.rand(batch, generator=generator) < config.label_dropout] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
        xt = scheduler.add_noise(x0, noise, t)
        loss = nn.functional.mse_loss(predict_eps(model, xt, t, y), noise)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(config, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        value = loss.item()
        running = value if running is None else 0.98 * running + 0.02 * value
        bar.set_postfix(loss=f"{running:.4f}")
        done = step + 1
        if checkpoint_every and done % checkpoint_every == 0 and done < end_step:
            checkpoint(done)
    bar.close()
    if end_step > start_step or not resume:
        checkpoint(end_step)

    info: dict[str, Any] = {
        "config": config.to_json(),
        "model_class": MODEL_CLASSES[config.model],
        "steps_done": end_step,
        "final_loss_ema": running,
        **model_stats(model),
        "train_seconds": round(elapsed(), 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if out_dir is not None and end_step == config.steps:
        save_final(Path(out_dir), ema, info)
    return {**info, "model": model, "ema": ema}


def save_final(out_dir: Path, ema: nn.Module, info: dict[str, Any]) -> Path:
    """`save_pretrained` of the EMA model (fp16) + scheduler config + `training.json`; checks it loads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(ema).half().save_pretrained(out_dir, safe_serialization=True)
    make_scheduler().save_pretrained(out_dir)
    write_json_atomic(out_dir / "training.json", info)
    type(ema).from_pretrained(out_dir, low_cpu_mem_usage=False)  # fail here, not later
    return out_dir


__all__ = [
    "DEFAULT_STEPS",
    "DIGITS_DIT_CONFIG",
    "DIGITS_UNET_CONFIG",
    "CheckpointMismatchError",
    "TrainConfig",
    "build_model",
    "default_config",
    "load_checkpoint",
    "lr_factor",
    "model_stats",
    "pack_training_state",
    "predict_eps",
    "restore_training_state",
    "save_checkpoint",
    "train",
]
