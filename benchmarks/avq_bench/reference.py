"""The project's own small reference diffusion models, trained locally and shipped as package data.

`digits-unet-mini` is a class-conditional diffusers `UNet2DModel` (~1.2M parameters) trained on 16x16
digits (`avq_bench.data`) with epsilon prediction and a 1000-step DDPM noise schedule. It exists so that the
layer-solver benchmark and the demo can work on real trained 3x3 convs and attention projections with no
network; the full reference models (`digits-unet`, `digits-dit`, docs/design.md) come later.

Class labels 0..9 are the digits; label `NULL_CLASS` (10) is the unconditional class that classifier-free
guidance needs (labels are dropped to it with probability 0.1 in training).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from avq.calibration.hessian import HessianAccumulator
from avq.evaluation.samples import sample_classes
from avq_bench.data import load_digits_images

ASSETS = Path(__file__).resolve().parent / "assets"
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the classifier-free-guidance "no label" class
NUM_TRAIN_TIMESTEPS = 1000

MINI_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    attention_head_dim=32,
    norm_num_groups=8,
    num_class_embeds=NUM_CLASSES + 1,
)


def asset_path(name: str) -> Path:
    """Folder of a shipped reference model, e.g. `asset_path("digits-unet-mini")`."""
    path = ASSETS / name
    if not (path / "config.json").is_file():
        available = sorted(p.name for p in ASSETS.iterdir() if p.is_dir()) if ASSETS.is_dir() else []
        raise FileNotFoundError(
            f"no shipped model {name!r} under {ASSETS} (available: {available}); "
            "the mini UNet is made by `python benchmarks/train_mini_unet.py`"
        )
    return path


def load_reference(name: str = "digits-unet-mini", *, dtype: torch.dtype = torch.float32):
    """Load a shipped reference model offline, in `dtype` (weights are stored in fp16), in eval mode."""

    import diffusers

    folder = asset_path(name)
    class_name = json.loads((folder / "config.json").read_text()).get("_class_name", "UNet2DModel")
    model_class = getattr(diffusers, class_name, None)
    if model_class is None:
        raise ValueError(f"{folder}/config.json names an unknown diffusers class {class_name!r}")
    model = model_class.from_pretrained(folder, torch_dtype=dtype, low_cpu_mem_usage=False)
    return model.eval()


def make_scheduler():
    """The DDPM noise schedule the reference models are trained with (1000 steps, linear betas)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS)


# ---------------------------------------------------------------------------------------------- training
def train_mini_unet(
    out_dir: str | Path,
    *,
    steps: int,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 2e-3,
    warmup: int = 100,
    ema_decay: float = 0.999,
    label_dropout: float = 0.1,
    progress: bool = True,
) -> Path:
    """Train `digits-unet-mini` from scratch on the train split and save it to `out_dir` (fp16).

    The shared reference trainer (`avq_bench.training.train`: epsilon prediction, random affine augmentation,
    label dropout to `NULL_CLASS`, AdamW with warm-up and cosine decay, EMA weights), with the settings the
    shipped model was trained with; deterministic for a given `seed` (and thread count). Writes
    `config.json` + `diffusion_pytorch_model.safetensors`, `scheduler_config.json` and `training.json`.
    """
    from avq_bench.training import TrainConfig, train

    config = TrainConfig(
        "digits-unet-mini",
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        lr=lr,
        warmup=warmup,
        ema_decay=ema_decay,
        label_dropout=label_dropout,
    )
    train(config, Path(out_dir), progress=progress)
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------- sampling
def sample(
    model,
    labels: Sequence[int] | torch.Tensor,
    *,
    steps: int = 20,
    guidance: float = 2.0,
    seed: int = 0,
) -> torch.Tensor:
    """DDIM samples (`steps` steps, eta 0) with classifier-free guidance `guidance`, in [-1, 1]: the
    library's `avq.evaluation.samples.sample_classes` on the schedule the reference models are trained with.

    `eps = eps_null + guidance * (eps_label - eps_null)`; guidance 1 is plain conditional sampling.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(make_scheduler().config)
    return sample_classes(model, labels, steps=steps, guidance=guidance, seed=seed, scheduler=scheduler)


# ---------------------------------------------------------------------------------------------- layers
def reference_layers(model: nn.Module) -> list[str]:
    """Names of the 3x3 convolutions (groups == 1) and attention projections (`to_q`, `to_k`, `to_v`,
    `to_out.0` Linears) of `model`, in module order. These are the layers the solver benchmark measures.
    """
    from diffusers.models.attention_processor import Attention

    names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and module.groups == 1:
            names.append(name)
        elif isinstance(module, Attention):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                if isinstance(module.get_submodule(proj), nn.Linear):
                    names.append(f"{name}.{proj}")
    return names


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    layer_names: Iterable[str],
    *,
    n_samples: int,
    seed: int = 0,
    batch_size: int = 64,
    null_fraction: float = 0.5,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Input Hessians `H = E[x x^T]` ([K, K], float32) of the named Linear/Conv2d layers of a reference
    model (docs/design.md, "Hessian").

    The model runs on `n_samples` noised training images `x_t = add_noise(x0, eps, t)` with `t` spread
    uniformly (stratified) over the 1000 training steps, and random digit labels, a `null_fraction` of
    them replaced by the unconditional class (guided sampling evaluates both equally often). This only
    *approximates* the inputs the layers see along the sampling trajectory: the real, time step-aware
    calibration that runs the FP sampler (docs/design.md, "Data flow") is a later issue.
    """
    from tqdm.auto import tqdm

    names = list(layer_names)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    accumulators = {name: HessianAccumulator(model.get_submodule(name)) for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(acc.hook) for name, acc in accumulators.items()
    ]
    generator = torch.Generator().manual_seed(seed)
    images, _ = load_digits_images("train", size=16, seed=0)
    order = torch.cat(
        [torch.randperm(len(images), generator=generator) for _ in range(-(-n_samples // len(images)))]
    )[:n_samples]
    jitter = torch.rand(n_samples, generator=generator, dtype=torch.float64)
    timesteps = ((torch.arange(n_samples) + jitter) * NUM_TRAIN_TIMESTEPS / n_samples).long()
    timesteps = timesteps.clamp_(0, NUM_TRAIN_TIMESTEPS - 1)
    labels = torch.randint(NUM_CLASSES, (n_samples,), generator=generator)
    labels[torch.rand(n_samples, generator=generator) < null_fraction] = NULL_CLASS
    noise = torch.randn((n_samples, *images.shape[1:]), generator=generator)
    scheduler = make_scheduler()
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        for lo in tqdm(range(0, n_samples, batch_size), desc="hessians", disable=not progress):
            sl = slice(lo, min(n_samples, lo + batch_size))
            xt = scheduler.add_noise(images[order[sl]], noise[sl], timesteps[sl])
            model(
                xt.to(param.device, param.dtype),
                timesteps[sl].to(param.device),
                class_labels=labels[sl].to(param.device),
            )
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: acc.hessian for name, acc in accumulators.items()}
