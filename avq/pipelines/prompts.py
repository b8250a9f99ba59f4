"""Calibration prompts: a built-in set of varied captions, or a user's file (one prompt a line).

Text-conditioned models are calibrated on their own text encoders' embeddings of real captions (the
cross-attention inputs they see in use); these 64 cover people, animals, objects, scenes, styles,
lighting and text rendering, short and long, so that no one kind of prompt sets the ranges.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_PROMPTS: tuple[str, ...] = (
    "a photograph of an astronaut riding a horse on the moon",
    "a red fox sitting in fresh snow, morning light",
    "portrait of an old fisherman with a weathered face, dramatic lighting",
    "a bowl of ramen with a soft-boiled egg, top-down food photography",
    "a futuristic city skyline at night with flying cars and neon signs",
    "watercolor painting of a lighthouse on a rocky coast",
    "a cozy living room with a fireplace and a sleeping cat",
    "an oil painting of a sunflower field under a stormy sky",
    "a close-up of a hummingbird drinking from a red flower",
    "a medieval castle on a hill surrounded by fog",
    "a golden retriever puppy playing with a tennis ball on grass",
    "a minimalist logo of a mountain inside a circle, flat vector",
    "a street market in Marrakech full of colorful spices",
    "a cyberpunk samurai standing in the rain",
    "a steaming cup of coffee on a wooden table next to an open book",
    "an underwater coral reef with tropical fish and sunlight rays",
    "a snow-covered pine forest under the northern lights",
    "a child flying a kite on a windy beach",
    "a vintage red sports car parked in front of a diner",
    "a detailed pencil sketch of a human hand",
    "a bustling train station in Tokyo during rush hour",
    "a bowl of fresh fruit, still life in the style of Cezanne",
    "a majestic elephant walking across the savanna at sunset",
    "an isometric illustration of a tiny island with a house and a tree",
    "a wooden sign that says OPEN in white letters",
    "a macro photograph of a dew drop on a spider web",
    "a knight in shining armor fighting a dragon",
    "a modern kitchen with white marble countertops",
    "a panda eating bamboo in a misty forest",
    "a hot air balloon festival over green hills",
    "an abstract painting with bold geometric shapes in primary colors",
    "a portrait of a woman with freckles and curly red hair, studio lighting",
    "a rusty robot sitting alone in an abandoned factory",
    "a glass of red wine on a balcony overlooking Paris",
    "a lone tree in a wheat field, wide angle",
    "a cartoon frog wearing a tiny crown",
    "the interior of a gothic cathedral with stained glass windows",
    "a plate of sushi on a black slate board",
    "a mountain lake reflecting snowy peaks at dawn",
    "a group of friends laughing around a campfire",
    "a blueprint drawing of a steam locomotive",
    "a colorful parrot perched on a branch in the jungle",
    "a dark alley lit by a single street lamp, film noir",
    "a bicycle leaning against a brick wall covered in ivy",
    "a ceramic vase with blue floral patterns on a white background",
    "an aerial view of a winding river through autumn forest",
    "a chef tossing vegetables in a flaming wok",
    "a 3d render of a cute monster made of clay",
    "a lighthouse keeper reading by candlelight",
    "a desert highway with a vintage gas station",
    "a bouquet of tulips in a glass jar by a window",
    "a tiger resting in tall grass, wildlife photography",
    "a page of handwritten notes with doodles",
    "a spaceship landing on an alien planet with two moons",
    "a rainy city street reflected in puddles, impressionist painting",
    "a stack of pancakes with maple syrup and blueberries",
    "a black and white photo of a jazz musician playing saxophone",
    "a small wooden boat on a calm lake",
    "a poster with the words HELLO WORLD in bold letters",
    "a snowy owl flying over a frozen lake",
    "an ancient library with towering bookshelves and ladders",
    "a pixel art scene of a village at night",
    "a baby elephant splashing in a river",
    "",  # the empty prompt: unconditional inputs are part of what the model sees
)


class PromptsError(ValueError):
    """A prompts file that cannot be used (missing, unreadable, empty)."""


def read_prompts(path: str | os.PathLike) -> tuple[str, ...]:
    """The prompts of a text file, one a line (blank lines skipped); `PromptsError` if there are none."""
    path = Path(path)
    if not path.is_file():
        raise PromptsError(f"prompts file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise PromptsError(f"prompts file {path} is not UTF-8 text ({error})") from None
    prompts = tuple(line.strip() for line in lines if line.strip())
    if not prompts:
        raise PromptsError(f"prompts file {path} is empty: give one prompt a line")
    return prompts
