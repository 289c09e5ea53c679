"""Sample previews with the real pipeline at the deployed setting: a prompts x seeds PNG grid."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from dopsd.adapters import load_lora_if_any
from dopsd.config import comma_separated
from dopsd.models import load_model
from dopsd.sampling import image_grid
from dopsd.words import words_attached


def parse_seeds(text: str) -> list[int]:
    """'0-7' -> 0..7, '0,3,5' -> [0, 3, 5]."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                low, high = part.split("-", 1)
                seeds.extend(range(int(low), int(high) + 1))
            elif part.strip():
                seeds.append(int(part))
    except ValueError:
        raise ValueError(f"seeds {text!r}: expected e.g. 0-7 or 0,3,5") from None
    if not seeds:
        raise ValueError(f"seeds {text!r}: no seed given")
    return seeds


def pipeline_images(
    pipeline, prompts: Sequence[str], seeds: Sequence[int], steps: int, resolution: int, extra: dict
) -> list[Image.Image]:
    """One image per (prompt, seed), prompt-major; each seed's noise is its own generator's, as users sample."""
    images: list[Image.Image] = []
    for prompt in prompts:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        out = pipeline(
            prompt=[prompt] * len(seeds),
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            generator=generators,
            **extra,
        )
        images.extend(out.images)
    return images


def sample_grid(
    model_path: str,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    resolution: int,
    guidance: float = 0.0,
    adapter: str | None = None,
    family: str = "auto",
    text_encoder_layers: str = "",
) -> Image.Image:
    layers = tuple(int(x) for x in comma_separated(text_encoder_layers))
    model = load_model(model_path, family, text_encoder_layers=layers, with_teacher_encoder=False)
    model.check_resolution(resolution, resolution)
    if adapter:
        load_lora_if_any(model.pipeline, adapter)
    extra = {**model.pipeline_kwargs(), "guidance_scale": guidance}
    with words_attached(model.pipeline, adapter):
        images = pipeline_images(model.pipeline, prompts, seeds, steps, resolution, extra)
    return image_grid(images, columns=len(seeds))
