"""Tiny random-weight diffusers pipelines of real architectures, built offline.

Each family is the stock diffusers pipeline class with every model shrunk to a few thousand to a few
hundred thousand parameters (two blocks, 16-64 channels, text encoders of hidden size 32-64), so a whole
pipeline builds, saves, loads back with `DiffusionPipeline.from_pretrained` and generates a 32x32 image on
CPU in about a second. Nothing is downloaded: the tokenizers are made here with the `tokenizers` package
(a character-level CLIP BPE and a small T5 Unigram; `avq_bench.stand_ins`), and every weight is random
for the given seed.

    pipe = build_pipeline("sd", seed=0)
    image = pipe(**call_kwargs("sd"), generator=torch.Generator().manual_seed(0)).images  # (1, 32, 32, 3)
    save_pipeline("flux", tmp_path / "flux")  # a standard diffusers pipeline folder

Widths are multiples of 16: every denoiser's linear layers have in_features in {16, 32, 48, 64, 80, 128,
160, 192, 256}, and its convolutions in_channels * kh * kw a multiple of 16, except conv_in (4 or 3
channels, 3x3: a multiple of kh * kw = 9), as in the real models.

Pitfalls: `call_kwargs` gives height/width where the pipeline takes them (Flux's default is 256 pixels,
not the denoiser's sample size); PixArt needs `use_resolution_binning=False` (binning snaps to 256-1024
pixel buckets); DiT and LDM have no height/width (their image is 2 * sample_size = 32 pixels).
`from_pretrained` logs that `accelerate` is missing (pass `low_cpu_mem_usage=False` to silence it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from avq_bench.stand_ins import clip_text_encoder as _clip_text_encoder
from avq_bench.stand_ins import clip_tokenizer as _clip_tokenizer
from avq_bench.stand_ins import t5_text_encoder as _t5_text_encoder
from avq_bench.stand_ins import t5_tokenizer as _t5_tokenizer
from avq_bench.stand_ins import vae as _stand_in_vae

FAMILIES = ("sd", "sdxl", "pixart", "sd3", "flux", "dit", "ldm")

# The image size that `call_kwargs` asks for. Every VAE here has two blocks (vae_scale_factor 2), so this
# is a 16x16 latent; all pipelines' constraints (multiples of 8, of vae_scale_factor * patch_size) hold.
IMAGE_SIZE = 32
_LATENT_SIZE = IMAGE_SIZE // 2
_PROMPT = "a photo of a cat"


# ----------------------------------------------------------------------------------------------------
# autoencoders (tokenizers and text encoders: `avq_bench.stand_ins`)


def _vae(seed: int, **options):
    return _stand_in_vae(seed, sample_size=IMAGE_SIZE, **options)


def _vq_model(seed: int):
    from diffusers import VQModel

    torch.manual_seed(seed)
    return VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=3,
        num_vq_embeddings=64,
        vq_embed_dim=3,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    ).eval()


# ----------------------------------------------------------------------------------------------------
# families


def _build_sd(seed: int):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = _clip_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, seed + 1)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=2,  # UNet2DConditionModel reads this as the number of heads
    ).eval()
    # SD 2.x-style: v-prediction, trailing timesteps
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,  # StableDiffusionPipeline warns about any other value
    )
    return StableDiffusionPipeline(
        vae=_vae(seed + 2),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(seed: int):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer(pad_token="!")
    text_encoder = _clip_text_encoder(tokenizer, seed + 1)
    text_encoder_2 = _clip_text_encoder(tokenizer_2, seed + 3, projection_dim=32)
    addition_time_embed_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        cross_attention_dim=32 + 32,  # both encoders' penultimate hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        # 6 time ids (original size, crop top-left, target size) + text_encoder_2's pooled projection
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + 32,
    ).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(seed + 2),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def _build_pixart(seed: int, sample_size: int = _LATENT_SIZE):
    """`sample_size=128` turns on PixArt-alpha's resolution and aspect-ratio conditioning (as in the
    1024px checkpoints); the positional embedding is recomputed for any smaller latent."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    tokenizer = _t5_tokenizer()
    text_encoder = _t5_text_encoder(tokenizer, seed + 1)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=sample_size,
        num_layers=2,
        patch_size=2,
        # inner dim 48: at sample_size 128 the timestep embedding adds [resolution (2), aspect ratio (1)]
        # embeddings of inner_dim // 3 each, so inner_dim must be a multiple of 3 (1152 in PixArt)
        attention_head_dim=16,
        num_attention_heads=3,
        in_channels=4,
        out_channels=8,  # learned sigma, as in PixArt: the pipeline keeps the first half
        caption_channels=32,  # T5's d_model
        cross_attention_dim=48,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()
    return PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_vae(seed + 2),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def _build_sd3(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = _clip_tokenizer(), _clip_tokenizer(pad_token="!"), _t5_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, seed + 1, projection_dim=32)
    text_encoder_2 = _clip_text_encoder(tokenizer_2, seed + 3, projection_dim=32)
    # the pipeline zero-pads the concatenated CLIP states (32 + 32) to T5's width: keep T5 at least as wide
    text_encoder_3 = _t5_text_encoder(tokenizer_3, seed + 4, d_model=64)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=_LATENT_SIZE,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,  # T5's d_model
        caption_projection_dim=32,  # == num_attention_heads * attention_head_dim
        pooled_projection_dim=64,  # both CLIPs' projections, concatenated
        pos_embed_max_size=32,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed + 2, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _build_flux(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, seed + 1)
    text_encoder_2 = _t5_text_encoder(tokenizer_2, seed + 3)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels, packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's d_model
        pooled_projection_dim=32,  # CLIP's pooled output
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
    ).eval()
    # FLUX.1-dev's scheduler config: the pipeline computes `mu` from the image sequence length
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(seed + 2, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _build_dit(seed: int):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        sample_size=_LATENT_SIZE,  # DiTPipeline has no height/width: the image is sample_size * 2 pixels
        num_layers=2,
        patch_size=2,
        attention_head_dim=16,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,  # learned sigma, as in DiT
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,  # DiTPipeline's null class for guidance is id 1000
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    ).eval()
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    return DiTPipeline(transformer=transformer, vae=_vae(seed + 2), scheduler=scheduler)


def _build_ldm(seed: int):
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=_LATENT_SIZE,  # LDMPipeline has no height/width: the image is sample_size * 2 pixels
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=16,
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", clip_sample=False
    )
    return LDMPipeline(vqvae=_vq_model(seed + 2), unet=unet, scheduler=scheduler)


_BUILDERS = {
    "sd": _build_sd,
    "sdxl": _build_sdxl,
    "pixart": _build_pixart,
    "sd3": _build_sd3,
    "flux": _build_flux,
    "dit": _build_dit,
    "ldm": _build_ldm,
}


def _check_family(family: str) -> None:
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


# ----------------------------------------------------------------------------------------------------
# public API


def build_pipeline(family: str, seed: int = 0, **options):
    """A tiny random-weight pipeline of `family` (one of FAMILIES): float32, on CPU, every model in eval
    mode; the same weights for the same seed. Options: `sample_size` for "pixart" (the transformer's
    configured latent size; 128 turns on the resolution/aspect-ratio conditioning)."""
    _check_family(family)
    pipe = _BUILDERS[family](seed, **options)  # models are made float32 on CPU already
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(family: str, folder: Path, seed: int = 0, **options) -> Path:
    """Build `family` and save it as a diffusers pipeline folder (`model_index.json` and a subfolder per
    component) that `DiffusionPipeline.from_pretrained(folder)` loads offline. Returns `folder`."""
    folder = Path(folder)
    build_pipeline(family, seed, **options).save_pretrained(folder)
    return folder


def call_kwargs(family: str) -> dict:
    """Keyword arguments for a quick `pipe(**call_kwargs(family), generator=...)`: two steps, a 32x32 image
    (DiT's and LDM's image size is fixed by their denoiser's `sample_size`), a numpy `images` array of
    shape (1, 32, 32, 3) in [0, 1]."""
    _check_family(family)
    common = dict(num_inference_steps=2, output_type="np")
    size = dict(height=IMAGE_SIZE, width=IMAGE_SIZE)
    if family in ("sd", "sdxl"):
        return dict(prompt=_PROMPT, guidance_scale=5.0, **size, **common)
    if family == "pixart":
        # binning would snap 32x32 to a 256/512/1024-pixel bucket (and fails for other sample sizes);
        # clean_caption needs bs4 and ftfy
        return dict(
            prompt=_PROMPT,
            guidance_scale=4.5,
            use_resolution_binning=False,
            clean_caption=False,
            **size,
            **common,
        )
    if family == "sd3":
        return dict(prompt=_PROMPT, guidance_scale=5.0, **size, **common)
    if family == "flux":
        return dict(prompt=_PROMPT, guidance_scale=3.5, **size, **common)
    if family == "dit":
        return dict(class_labels=[1], guidance_scale=4.0, **common)
    return dict(batch_size=1, **common)  # ldm: unconditional
