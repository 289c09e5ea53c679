"""Few-step sampling in the project's convention: a plain Euler loop over `FewStepModel.velocity`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from dopsd.models.base import Context, FewStepModel

NOISE_SCHEME = "noise_seed(seed, prompt index)"
"""How `sample_images` draws each start: scores sampled under another scheme are not paired with these."""


def noise_seed(seed: int, index: int) -> int:
    """The generator seed of the `index`-th prompt at sampling seed `seed`: a hash, so nearby (seed, index) pairs
    give unrelated noise."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def guided_velocity(v: torch.Tensor, v_negative: torch.Tensor, guidance: float) -> torch.Tensor:
    """`v` pushed away from `v_negative`: v + guidance * (v - v_negative), ZImagePipeline's convention (its
    guidance_scale). Against the empty prompt it is classifier-free guidance; against the caption alone, for a
    context that adds an image to it, reference guidance."""
    return v + guidance * (v - v_negative)


@torch.no_grad()
def euler_sample(
    model: FewStepModel,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    contexts: Sequence[Context],
    guidance: float = 0.0,
    negative_contexts: Sequence[Context] | None = None,
) -> torch.Tensor:
    """Integrate from `noise` at sigmas[0] to sigmas[-1] (usually 0) with one velocity call per step.

    With `guidance` > 0 each step also asks for the velocity of `negative_contexts` and moves away from it
    (`guided_velocity`). By default the negative is the empty prompt (classifier-free guidance, for undistilled
    models; a few-step model has it distilled in)."""
    x = noise.float()
    negatives = None
    if guidance > 0:
        negatives = model.encode_student([""]) * len(contexts) if negative_contexts is None else negative_contexts
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        t = torch.full((x.shape[0],), sigma, device=x.device)
        v = model.velocity(x, t, contexts)
        if negatives is not None:
            v = guided_velocity(v, model.velocity(x, t, negatives), guidance)
        x = x + (sigma_next - sigma) * v
    return x


def sample_images(
    model: FewStepModel,
    contexts: Sequence[Context],
    seeds: Sequence[int],
    steps: int,
    resolution: int,
    batch: int = 64,
    guidance: float = 0.0,
    negative_contexts: Sequence[Context] | None = None,
) -> list[Image.Image]:
    """One image per (context, seed), context-major; `negative_contexts` (one per context) as in `euler_sample`.
    The i-th context at seed s starts from the noise of `noise_seed(s, i)`: the same start whatever the batch or
    the adapter (so models are compared on paired noise), and a different start for every prompt (one noise shared
    by all prompts of a seed made a whole prompt set's score hinge on a few noise draws)."""
    sigmas = model.schedule(steps, resolution, resolution)
    if negative_contexts is not None and len(negative_contexts) != len(contexts):
        raise ValueError(f"{len(negative_contexts)} negative contexts for {len(contexts)} contexts")
    jobs = [(i, noise_seed(s, i)) for i in range(len(contexts)) for s in seeds]
    images: list[Image.Image] = []
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        noise = torch.cat([model.noise(1, resolution, resolution, torch.Generator().manual_seed(s)) for _, s in chunk])
        negatives = None if negative_contexts is None else [negative_contexts[i] for i, _ in chunk]
        latents = euler_sample(model, noise, sigmas, [contexts[i] for i, _ in chunk], guidance, negatives)
        images.extend(model.to_images(latents))
    return images


def image_grid(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Tile equally sized images row by row."""
    if not images:
        raise ValueError("no images to tile")
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid
