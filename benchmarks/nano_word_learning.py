"""How fast does the nano transformer learn shape words? A diagnostic for choosing the nano recipe.

The full bootstrap learned colour words long before shape words (data/nano/bootstrap/README.md). This trains a
fresh transformer (the bootstrap model folder's trained VAE and text encoder, its initial transformer) on a
reduced world of one large plain object, 6 named shapes x 2 colours, caption "a picture of a {colour} {shape}",
and prints how often its samples show the named shape, every `every` steps:

    python benchmarks/nano_shape_learning.py --world free --steps 1500
    python benchmarks/nano_shape_learning.py --world grid --steps 1500   # centres on the 8-px token grid

Worlds: `fixed` (4 centred images: the conditioning path alone), `grid`, `free` (any position).

Measured (one seed each, 2-core CPU; shape hit at 250 / 500 / 750 / 1000 steps): free, lr 3e-4: 0.10 / - / 0.12 /
0.12; grid, lr 3e-4: 0.08 / 0.15 / 0.10 / 0.23; grid, `--lr 1e-3`: 0.04 / 0.29 / 0.54 / - (stopped at 750, loss
0.24). The nano world now puts centres on the grid and pretrains at 1e-3.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from dopsd.config import parse_dataclass_args
from dopsd.models.zimage import ZImageModel
from dopsd.nano.bootstrap import encode_targets, flow_matching_loss
from dopsd.nano.model import NANO_CAPTION_TOKENS, NANO_RESOLUTION
from dopsd.nano.world import GRID, Scene, WorldObject
from dopsd.sampling import image_grid, sample_images
from evaluation.nano.detector import NanoDetector

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "crescent")
COLOURS = ("red", "blue")


@dataclass
class ShapeLearningConfig:
    model: str = "data/nano/bootstrap/model"
    """A nano pipeline folder with a trained VAE (its transformer is trained from its current weights)."""
    world: Literal["fixed", "grid", "free"] = "free"
    """fixed, grid or free: where the object may sit."""
    steps: int = 1500
    """Training steps."""
    every: int = 250
    """Steps between two measurements."""
    batch: int = 64
    """Batch size."""
    lr: float = 3e-4
    """AdamW learning rate (linear warm-up over 100 steps)."""
    pool: int = 4096
    """Training images, encoded once."""
    sample_steps: int = 16
    """Euler steps of the measured samples."""
    seed: int = 0
    """Seed of data, noise and initialisation order."""
    out: str = "runs/nano-shape-learning"
    """Folder for the sample grids."""


def reduced_world(world: str, count: int, rng: np.random.Generator) -> list[tuple[Scene, str]]:
    if world == "fixed":
        shapes = [SHAPES[i % 4] for i in range(count)]
        return [(Scene((WorldObject(shape, "red", radius=12.0),)), f"a picture of a red {shape}") for shape in shapes]
    items = []
    for _ in range(count):
        shape, colour = SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))]
        if world == "grid":
            x, y = (float(16 + GRID * rng.integers(5)) for _ in range(2))
        else:
            x, y = (float(rng.uniform(16, 48)) for _ in range(2))
        obj = WorldObject(shape, colour, radius=float(rng.uniform(10, 13)), x=x, y=y)
        items.append((Scene((obj,)), f"a picture of a {colour} {shape}"))
    return items


def shape_hit_rate(model: ZImageModel, prompts: list[str], detector: NanoDetector, steps: int, seeds: list[int]):
    """Share of samples in which the detector finds the shape the prompt names, and the samples."""
    images = sample_images(model, model.encode_student(prompts), seeds, steps, NANO_RESOLUTION)
    named = [p.split()[-1] for p in prompts for _ in seeds]
    found = [any(d.cls == shape for d in found) for shape, found in zip(named, detector.detect(images), strict=True)]
    return float(np.mean(found)), images


def main(config: ShapeLearningConfig) -> list[dict]:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = ZImageModel.load(config.model, max_caption_tokens=NANO_CAPTION_TOKENS, with_teacher_encoder=False)
    transformer = model.pipeline.transformer
    transformer.requires_grad_(True)
    items = reduced_world(config.world, config.pool, rng)
    latents = torch.cat([encode_targets(model, items[i : i + 256]) for i in range(0, len(items), 256)])
    captions = sorted({c for _, c in items})
    features = dict(zip(captions, model.encode_student(captions), strict=True))
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    detector = NanoDetector.load()
    out = Path(config.out) / config.world
    out.mkdir(parents=True, exist_ok=True)
    start, losses, rows = time.time(), [], []
    for step in range(1, config.steps + 1):
        transformer.train()
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, step / 100)
        chosen = torch.randint(len(items), (config.batch,), generator=generator)
        contexts = [features[items[i][1]] for i in chosen.tolist()]
        loss = flow_matching_loss(model, latents[chosen], contexts, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % config.every == 0 or step == config.steps:
            transformer.eval()
            hit, images = shape_hit_rate(model, captions, detector, config.sample_steps, [0, 1, 2, 3])
            row = {
                "step": step,
                "loss": float(np.mean(losses[-config.every :])),
                "shape_hit": hit,
                "seconds": round(time.time() - start),
            }
            rows.append(row)
            print(
                f"{config.world} step {step}: loss {row['loss']:.4f}, shape hit {hit:.2f} ({row['seconds']} s)",
                flush=True,
            )
            image_grid(images, 4).save(out / f"step_{step}.png")
    return rows


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(parse_dataclass_args(ShapeLearningConfig, sys.argv[1:], __doc__.split("\n\n")[0]))
