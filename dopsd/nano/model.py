"""The nano model: a Z-Image pipeline at a tiny config (same classes as Z-Image-Turbo), sized for a 2-core CPU.

64x64 images, a 4x VAE with 8 latent channels (16x16 latents, 64 image tokens at patch 2), a 2-layer Qwen3 text
encoder, a 4-block transformer, and a Qwen3-VL teacher encoder carrying the text encoder's weights.

Why 4x: a first layout with an 8x VAE (8x8x16 latents, 16 image tokens) learned colours but not shapes in 12400
pretraining steps (GenEval-nano 0.017 at 32 steps): each token had to emit a shape as one precise 64-number code,
and the averaged codes of an uncertain prediction decode to blobs. At 4x a shape is a pattern across tokens (an
object spans 3-7 latent cells a side), for about 15% more time per pretraining step on a CPU. The record is in
data/nano/bootstrap/README.md at commit e203025.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dopsd.models.tiny import TinyConfig, build_tiny_zimage
from dopsd.nano.packs import PACKS, concept_item
from dopsd.nano.scenes import TASKS, TRAINING_LEADS, SceneSampler
from dopsd.nano.world import IMAGE_SIZE, Vocabulary

NANO_RESOLUTION = IMAGE_SIZE
NANO_CAPTION_TOKENS = 64
"""Caption tokens kept (nano captions are short; padding to 512 would cost most of the text encoder's time)."""
NANO_CONFIG = TinyConfig(
    text_hidden=64,
    text_layers=2,
    dim=128,
    layers=4,
    heads=4,
    latent_channels=8,
    vae_channels=(16, 32, 64),
    vocab_size=640,
    vision_patch=8,
    vision_hidden=64,
    vision_layers=2,
    refiner_layers=1,
)


def nano_corpus(count: int = 3000, seed: int = 0) -> list[str]:
    """Captions of every phrasing the world uses (training, evaluation, concept packs): the tokenizer's corpus,
    so every world word is a token or two."""
    rng = np.random.default_rng(seed)
    sampler = SceneSampler(Vocabulary(), rng)
    corpus = [sampler.sample(TASKS[i % len(TASKS)]).caption for i in range(count)]
    corpus += [sampler.describe(sampler.random_scene()) for _ in range(count)]
    for pack in PACKS:
        corpus += [concept_item(pack, rng, lead=str(rng.choice(TRAINING_LEADS))).caption for _ in range(count // 10)]
    return corpus


def build_nano_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """A randomly initialised nano pipeline folder (the bootstrap trains it)."""
    return build_tiny_zimage(out_dir, NANO_CONFIG, seed=seed, corpus=tuple(nano_corpus(seed=seed)))
