"""Random-weight stand-ins for the parts of a diffusers pipeline that avq does not quantize: tokenizers made
offline with the `tokenizers` package (a character-level CLIP BPE, a small T5 Unigram), CLIP and T5 text
encoders, and a two-block `AutoencoderKL`, each of a given width and seed.

The tests' tiny pipelines (`tests/tiny_pipelines.py`) are built from them, and so is `benchmarks/scale.py`'s
SD3-shaped pipeline, whose real-size transformer needs text states of the real widths (CLIP-L 768 and
CLIP-G 1280 pooled, T5-XXL 4096) but not real text encoders. Nothing is downloaded.
"""

from __future__ import annotations

import string

import torch

CLIP_MAX_LENGTH = 77  # the CLIP pipelines pad every prompt to tokenizer.model_max_length
T5_MAX_LENGTH = 512  # the longest T5 padding any of these pipelines asks for by default (Flux)


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A character-level CLIP BPE tokenizer: every printable ASCII character (and its `</w>` end-of-word
    form), a handful of merges, and the two special tokens at the end of the vocabulary, as in CLIP."""
    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = [c for c in chars] + [c + "</w>" for c in chars]
    merges = [
        ("c", "a"),
        ("ca", "t</w>"),
        ("o", "f</w>"),
        ("p", "h"),
        ("ph", "o"),
        ("pho", "t"),
        ("phot", "o</w>"),
    ]
    tokens += ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        pad_token=pad_token,
        model_max_length=CLIP_MAX_LENGTH,
    )


def t5_tokenizer():
    """A small T5 Unigram tokenizer: `<pad>` 0, `</s>` 1, `<unk>` 2, characters with and without the `▁`
    word prefix, and a few whole words. No sentinel (`<extra_id_*>`) tokens."""
    from transformers import T5Tokenizer

    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + word, -2.0) for word in ("a", "photo", "of", "cat", "dog", "the")]
    pieces += [("▁" + c, -4.0) for c in chars] + [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def clip_text_encoder(
    tokenizer,
    seed: int,
    hidden_size: int = 32,
    projection_dim: int | None = None,
    intermediate_size: int | None = None,
):
    """`CLIPTextModel`, or `CLIPTextModelWithProjection` when `projection_dim` is given; two layers (the
    SDXL and SD3 pipelines read the penultimate hidden state)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # not 2: the pooled output reads the first eos position
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="quick_gelu",
    )
    torch.manual_seed(seed)
    cls = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return cls(config).eval()


def t5_text_encoder(
    tokenizer, seed: int, d_model: int = 32, d_ff: int | None = None, d_kv: int | None = None
):
    """`T5EncoderModel`, two layers; `d_ff` / `d_kv` default to 2 and 1/4 of `d_model` (a wide stand-in
    for T5-XXL's 4096 outputs can keep them small)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_kv or d_model // 4,
        d_ff=d_ff or 2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def vae(
    seed: int,
    latent_channels: int = 4,
    scaling_factor: float = 0.18215,
    shift_factor: float | None = None,
    sample_size: int = 32,
):
    """A two-block `AutoencoderKL` (vae_scale_factor 2). With `shift_factor` (SD3, Flux, whose pipelines
    read it): no quant convs, like their VAEs."""
    from diffusers import AutoencoderKL

    no_quant_convs = shift_factor is not None
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=not no_quant_convs,
        use_post_quant_conv=not no_quant_convs,
    ).eval()
