"""Time step-aware calibration: input Hessians of a model's layers along its own FP sampling trajectory.

Why the sampler and not noised training images (`avq.reference.collect_hessians`): a diffusion model's
layers see different input distributions at different timesteps (Q-Diffusion), and at sampling time they
see the model's *own* intermediate latents, not forward-noised data. So `calibrate` runs the FP DDIM
sampler (with classifier-free guidance: the model sees the conditional and the null input, and both feed
the statistics, since both run at inference) and accumulates `H = E[x x^T]` of each requested layer at
`num_timesteps_kept` timesteps spread uniformly over the trajectory.

Streamed: hooks add each batch into a float64 `[K, K]` sum (`avq.HessianAccumulator`); activations are
never kept. Peak memory is the model's own forward plus the Hessians of the hooked layers; with
`layers_per_pass=n` only `n` layers are hooked per sampling pass and the sampler is re-run (same seed,
identical trajectory) for the next `n`, which bounds memory by those layers' Hessians at the cost of
more passes; `max_hessian_gib=x` packs consecutive layers into passes whose float64 accumulators
(`8 K^2` bytes per layer) stay within `x` GiB (a layer bigger than that gets a pass of its own).
(Caching one block's inputs and running block by block is not implemented.)

A small adapter per model family (`adapter_for`) knows the latent shape and how to condition the model.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from .hessian import HessianAccumulator

NUM_TRAIN_TIMESTEPS = 1000


class UnsupportedModelError(ValueError):
    """The model's class (or configuration) is not one that avq knows how to sample."""


# ============================================================================ config
@dataclass(frozen=True)
class CalibrationConfig:
    """How much of the FP sampler to run for statistics.

    `num_timesteps_kept` of the `num_steps` DDIM steps (spread uniformly, first and last included) feed
    the Hessians; None keeps every step. `max_rows_per_call`: each layer adds a random subset of at most
    this many input rows (tokens / conv patches) per forward (`HessianAccumulator(max_rows=...)`): with
    the defaults a layer still sees >= 40k rows, and calibrating `digits-unet` is ~4x faster than with
    all of them (None). `guidance_scale` > 1 runs classifier-free guidance (conditional
    and null inputs both recorded); 1 runs the conditional input only. `prompt_tokens` is the sequence
    length of the random prompt embeddings of text-conditioned models when none are given.
    """

    num_samples: int = 64
    batch_size: int = 16
    num_steps: int = 20
    guidance_scale: float = 2.0
    num_timesteps_kept: int | None = 10
    seed: int = 0
    layers_per_pass: int | None = None
    max_hessian_gib: float | None = None
    max_rows_per_call: int | None = 1024
    prompt_tokens: int = 8

    def __post_init__(self) -> None:
        for name in ("num_samples", "batch_size", "num_steps", "prompt_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CalibrationConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("num_timesteps_kept", "layers_per_pass", "max_rows_per_call"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"CalibrationConfig.{name} must be None or an int >= 1, got {value!r}")
        if self.max_hessian_gib is not None and not self.max_hessian_gib > 0:
            raise ValueError(f"CalibrationConfig.max_hessian_gib must be > 0, got {self.max_hessian_gib!r}")
        if not (isinstance(self.guidance_scale, (int, float)) and math.isfinite(self.guidance_scale)):
            raise ValueError(
                f"CalibrationConfig.guidance_scale must be a finite number, got {self.guidance_scale!r}"
            )

    def kept_step_indices(self) -> list[int]:
        """Indices into the sampler's step sequence where statistics are collected."""
        n = (
            self.num_steps
            if self.num_timesteps_kept is None
            else min(self.num_timesteps_kept, self.num_steps)
        )
        if n == 1:
            return [self.num_steps - 1]
        return sorted({round(i * (self.num_steps - 1) / (n - 1)) for i in range(n)})

    def to_dict(self) -> dict:
        return asdict(self)


# ============================================================================ adapters
@dataclass
class ModelAdapter:
    """How to call one model family during sampling.

    `make_conditions(n, generator)` returns (conditional kwargs, null kwargs or None) for `n` samples;
    `forward(model, x, t, kwargs)` returns epsilon `[n, C, H, W]` (learned-sigma outputs are cut to the
    first half of the channels).
    """

    family: str
    latent_shape: tuple[int, int, int]  # (C, H, W)
    make_conditions: Callable[[int, torch.Generator], tuple[dict, dict | None]]
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def _hw(sample_size) -> tuple[int, int]:
    if isinstance(sample_size, int):
        return (sample_size, sample_size)
    h, w = sample_size
    return (int(h), int(w))


def _cat_kwargs(a: dict, b: dict) -> dict:
    """Stack two kwargs dicts along the batch (tensors concatenated, anything else taken from `a`)."""
    out = {}
    for key, value in a.items():
        out[key] = torch.cat([value, b[key]]) if isinstance(value, torch.Tensor) else value
    return out


def _to(kwargs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        out[key] = value
    return out


def adapter_for(
    model: nn.Module, *, conditioning: torch.Tensor | None = None, prompt_tokens: int = 8
) -> ModelAdapter:
    """The adapter of `model`'s family, chosen by class (name, so subclasses of diffusers classes work).

    `conditioning`: class labels `[N]` for class-conditional models or prompt embeddings `[N, L, D]` for
    text-conditioned ones (samples take rows in turn, cycling); None draws random labels / random-normal
    embeddings (a stand-in until a text encoder is wired in). Null inputs: the class `num_class_embeds - 1`
    (UNet2DModel; the reference models' convention) or `num_embeds_ada_norm` (DiT); zero embeddings for
    text-conditioned models.
    """
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel, UNet2DModel

    cfg = getattr(model, "config", None)
    fixed = conditioning

    def pick_rows(n: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.randint(fixed.shape[0], (n,), generator=generator)
        return fixed[idx]

    if isinstance(model, UNet2DModel):
        shape = (cfg.in_channels, *_hw(cfg.sample_size))
        n_classes = cfg.num_class_embeds
        if cfg.class_embed_type is not None:
            raise UnsupportedModelError(
                f"UNet2DModel with class_embed_type={cfg.class_embed_type!r} is not supported "
                "(only num_class_embeds labels or unconditional)"
            )

        if n_classes is None:

            def conditions(n: int, generator: torch.Generator) -> tuple[dict, dict | None]:
                return {}, None

        else:
            conditions = _label_conditions(fixed, n_classes - 1, pick_rows)

        def forward(m: nn.Module, x: torch.Tensor, t: torch.Tensor, kw: dict) -> torch.Tensor:
            return m(x, t, **kw).sample

        return ModelAdapter("unet2d", shape, conditions, forward)

    if isinstance(model, UNet2DConditionModel):
        if cfg.class_embed_type is not None or cfg.addition_embed_type is not None or cfg.num_class_embeds:
            raise UnsupportedModelError(
                "UNet2DConditionModel with class or added embeddings (e.g. SDXL's text_time) "
                "is not supported yet"
            )
        dim = cfg.cross_attention_dim
        if not isinstance(dim, int):
            raise UnsupportedModelError(
                f"UNet2DConditionModel with cross_attention_dim={dim!r} is not supported"
            )
        shape = (cfg.in_channels, *_hw(cfg.sample_size))
        return ModelAdapter(
            "unet2d-condition", shape, _text_conditions(fixed, dim, prompt_tokens, pick_rows), _text_forward
        )

    if isinstance(model, DiTTransformer2DModel):
        shape = (cfg.in_channels, *_hw(cfg.sample_size))
        null = cfg.num_embeds_ada_norm

        conditions = _label_conditions(fixed, null, pick_rows)

        def forward(m: nn.Module, x: torch.Tensor, t: torch.Tensor, kw: dict) -> torch.Tensor:
            out = m(x, timestep=t.expand(x.shape[0]), **kw).sample
            return out[:, : x.shape[1]]  # learned sigma: [eps, variance]

        return ModelAdapter("dit", shape, conditions, forward)

    if isinstance(model, PixArtTransformer2DModel):
        dim = cfg.caption_channels or cfg.cross_attention_dim
        shape = (cfg.in_channels, *_hw(cfg.sample_size))

        def forward(m: nn.Module, x: torch.Tensor, t: torch.Tensor, kw: dict) -> torch.Tensor:
            out = m(
                x,
                timestep=t.expand(x.shape[0]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                **kw,
            ).sample
            return out[:, : x.shape[1]]  # learned sigma

        return ModelAdapter("pixart", shape, _text_conditions(fixed, dim, prompt_tokens, pick_rows), forward)

    raise UnsupportedModelError(
        f"{type(model).__name__} is not supported; avq calibrates UNet2DModel, UNet2DConditionModel, "
        "DiTTransformer2DModel and PixArtTransformer2DModel"
    )


def _label_conditions(fixed, null: int, pick_rows) -> Callable:
    """Class labels (given ones, or uniform over the real classes `0..null-1`) and the null class for CFG."""

    def conditions(n: int, generator: torch.Generator) -> tuple[dict, dict | None]:
        labels = (
            pick_rows(n, generator) if fixed is not None else torch.randint(null, (n,), generator=generator)
        )
        return {"class_labels": labels.long()}, {"class_labels": torch.full((n,), null, dtype=torch.long)}

    return conditions


def _text_conditions(fixed, dim: int, tokens: int, pick_rows) -> Callable:
    def conditions(n: int, generator: torch.Generator) -> tuple[dict, dict | None]:
        if fixed is not None:
            emb = pick_rows(n, generator).float()  # [n, L, D]
        else:
            emb = torch.randn((n, tokens, dim), generator=generator)
        if emb.ndim != 3 or emb.shape[-1] != dim:
            raise ValueError(f"prompt embeddings must be [N, L, {dim}], got {list(emb.shape)}")
        return {"encoder_hidden_states": emb}, {"encoder_hidden_states": torch.zeros_like(emb)}

    return conditions


def _text_forward(m: nn.Module, x: torch.Tensor, t: torch.Tensor, kw: dict) -> torch.Tensor:
    return m(x, t, **kw).sample


# ============================================================================ layers
def quantizable_layers(model: nn.Module) -> list[str]:
    """Every `nn.Linear` and every `nn.Conv2d` with groups == 1 and zero padding, in module order.

    These are the layers whose input Hessian `HessianAccumulator` can stream and that `AQLinear`/`AQConv2d`
    can replace; whether each one *is* quantized is the pipeline's FP-keep rule (`avq.pipeline`).
    """
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        or (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros")
    ]


def block_of(name: str) -> str:
    """The top-level block of a layer: `down_blocks.1`, `up_blocks.0`, `transformer_blocks.3`, or the
    first name component (`conv_in`, `mid_block`, `time_embedding`, ...)."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] in ("down_blocks", "up_blocks", "transformer_blocks"):
        return ".".join(parts[:2])
    return parts[0]


def group_by_block(names: Sequence[str]) -> dict[str, list[str]]:
    """Layer names grouped by `block_of`, blocks in order of first appearance."""
    blocks: dict[str, list[str]] = {}
    for name in names:
        blocks.setdefault(block_of(name), []).append(name)
    return blocks


def _passes(model: nn.Module, names: list[str], config: CalibrationConfig) -> list[list[str]]:
    """Layers hooked per sampling pass: at most `layers_per_pass`, accumulators within `max_hessian_gib`."""
    per_pass = config.layers_per_pass or max(1, len(names))
    budget = math.inf if config.max_hessian_gib is None else config.max_hessian_gib * 2**30
    chunks: list[list[str]] = [[]]
    used = 0.0
    for name in names:
        layer = model.get_submodule(name)
        K = layer.in_features if isinstance(layer, nn.Linear) else math.prod(layer.weight.shape[1:])
        size = 8.0 * K * K
        if chunks[-1] and (len(chunks[-1]) >= per_pass or used + size > budget):
            chunks.append([])
            used = 0.0
        chunks[-1].append(name)
        used += size
    return chunks


# ============================================================================ sampler
def make_ddim_scheduler(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """DDIM (eta 0) over the standard linear-beta 1000-step schedule (the reference models' schedule)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=num_train_timesteps)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    layer_names: Sequence[str],
    config: CalibrationConfig | None = None,
    *,
    conditioning: torch.Tensor | None = None,
    scheduler=None,
    progress: bool = True,
    observers: Mapping[str, Any] | None = None,
) -> dict[str, tuple[torch.Tensor, int]]:
    """Input Hessians of the named layers along the FP sampling trajectory: `{name: (H [K, K], n_rows)}`.

    `n_rows` is the number of input rows (tokens, or conv patches) averaged into `H`. Deterministic for
    `config.seed` (and thread count), and the same with any `layers_per_pass`. `scheduler`: a diffusers
    scheduler to copy the noise schedule from (default `make_ddim_scheduler()`). `observers`: `{name:
    obj}` whose `obj.observe(input)` sees the same inputs as the Hessian of layer `name` (8-bit activation
    ranges, `avq.activations.RangeObserver`); every key must be one of `layer_names`.
    """
    from diffusers import DDIMScheduler
    from tqdm.auto import tqdm

    config = config or CalibrationConfig()
    names = list(dict.fromkeys(layer_names))
    observers = dict(observers or {})
    if not set(observers) <= set(names):
        raise ValueError(
            f"calibrate: observers for layers not calibrated: {sorted(set(observers) - set(names))}"
        )
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"calibrate: {type(model).__name__} has no layer {name!r}") from error
    adapter = adapter_for(model, conditioning=conditioning, prompt_tokens=config.prompt_tokens)
    scheduler = make_ddim_scheduler() if scheduler is None else DDIMScheduler.from_config(scheduler.config)
    scheduler.set_timesteps(config.num_steps)
    kept = set(config.kept_step_indices())
    chunks = _passes(model, names, config)
    n_batches = -(-config.num_samples // config.batch_size)

    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    was_training = model.training
    model.eval()
    results: dict[str, tuple[torch.Tensor, int]] = {}
    bar = tqdm(
        total=len(chunks) * n_batches * len(scheduler.timesteps),
        desc="calibrate",
        unit="step",
        disable=not progress,
    )
    try:
        for chunk in chunks:
            accumulators = {
                name: HessianAccumulator(
                    model.get_submodule(name),
                    max_rows=config.max_rows_per_call,
                    seed=config.seed ^ zlib.crc32(name.encode()),  # per layer: any layers_per_pass agrees
                )
                for name in chunk
            }
            state = {"active": False}

            def make_hook(acc: HessianAccumulator, observer, state: dict = state):
                def hook(module: nn.Module, inputs: tuple, output) -> None:
                    if state["active"]:
                        acc.add(inputs[0])
                        if observer is not None:
                            observer.observe(inputs[0])

                return hook

            handles = [
                model.get_submodule(n).register_forward_hook(make_hook(a, observers.get(n)))
                for n, a in accumulators.items()
            ]
            try:
                # The same generator sequence every pass: identical trajectories for every chunk.
                generator = torch.Generator().manual_seed(config.seed)
                for b in range(n_batches):
                    n = min(config.batch_size, config.num_samples - b * config.batch_size)
                    x = torch.randn((n, *adapter.latent_shape), generator=generator)
                    cond, null = adapter.make_conditions(n, generator)
                    guided = null is not None and config.guidance_scale != 1
                    kwargs = _to(_cat_kwargs(cond, null) if guided else cond, device, dtype)
                    x = x.to(device, dtype)
                    for i, t in enumerate(scheduler.timesteps):
                        state["active"] = i in kept
                        t_in = t.to(device)
                        if guided:
                            eps_c, eps_u = adapter.forward(model, torch.cat([x, x]), t_in, kwargs).chunk(2)
                            eps = eps_u + config.guidance_scale * (eps_c - eps_u)
                        else:
                            eps = adapter.forward(model, x, t_in, kwargs)
                        state["active"] = False
                        x = scheduler.step(eps, t, x).prev_sample
                        bar.update(1)
            finally:
                for handle in handles:
                    handle.remove()
            for name, acc in accumulators.items():
                # A layer the sampler never calls (e.g. an unused branch) has no statistics: n_rows = 0.
                K = acc.sum.shape[0]
                results[name] = (acc.hessian if acc.count else torch.zeros(K, K), acc.count)
    finally:
        bar.close()
        model.train(was_training)
    return results
