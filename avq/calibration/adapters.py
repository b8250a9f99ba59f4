"""Model adapters: how the sampler calls one family of denoisers (latent shape, conditioning, output).

`adapter_for(model)` picks the adapter by class. Each adapter makes the conditional and the null (CFG)
inputs for `n` samples and turns a forward into the epsilon prediction `[n, C, H, W]`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn


class UnsupportedModelError(ValueError):
    """The model's class (or configuration) is not one that avq knows how to sample."""


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
    null_class: int | None = None  # class-conditional models: the null label (= number of real classes)


def _hw(sample_size) -> tuple[int, int]:
    if isinstance(sample_size, int):
        return (sample_size, sample_size)
    h, w = sample_size
    return (int(h), int(w))


def cat_kwargs(*parts: dict) -> dict:
    """Stack kwargs dicts along the batch (tensors concatenated, anything else taken from the first)."""
    out = {}
    for key, value in parts[0].items():
        out[key] = torch.cat([p[key] for p in parts]) if isinstance(value, torch.Tensor) else value
    return out


def to_device(kwargs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Tensors of `kwargs` moved to `device`; floating-point ones cast to `dtype` too."""
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

        null = None if n_classes is None else n_classes - 1
        return ModelAdapter("unet2d", shape, conditions, forward, null)

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

        return ModelAdapter("dit", shape, conditions, forward, null)

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
