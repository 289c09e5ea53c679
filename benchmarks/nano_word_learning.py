"""How fast does a nano transformer learn shape and relation words? A diagnostic for choosing the nano recipe.

It trains the transformer of a nano model folder (the folder's trained VAE and text encoder; the transformer from
its weights, or freshly initialised with `--init fresh`) on a reduced world, encoded once, and prints every
`every` steps how its samples (no guidance) follow the prompts.

Shape worlds: one large plain object, 6 named shapes x 2 colours, caption "a picture of a {colour} {shape}";
measured: how often the detector finds the named shape.

    python benchmarks/nano_word_learning.py --world free --steps 1500
    python benchmarks/nano_word_learning.py --world grid --steps 1500   # centres on the 8-px token grid

`fixed` (4 centred images) tests the conditioning path alone, `grid` puts centres on the grid, `free` anywhere.
Measured (one seed each, 2-core CPU; shape hit at 250 / 500 / 750 / 1000 steps): free, lr 3e-4: 0.10 / - / 0.12 /
0.12; grid, lr 3e-4: 0.08 / 0.15 / 0.10 / 0.23; grid, `--lr 1e-3`: 0.04 / 0.29 / 0.54 / - (stopped at 750, loss
0.24). The nano world now puts centres on the grid and pretrains at 1e-3.

Position worlds: `position` draws two large plain objects of two of three shapes on the grid
(`dopsd.nano.world.place_objects`), one of four relations holding clearly, caption "a picture of a {shape}
{relation} a {shape}"; each shape keeps its own colour, or with `--colour-per-shape false` colours are drawn, so
only the shape tells which object is which. `position-full` takes the full world's position scenes (six shapes,
every colour, textures, two sizes); `position-mix` the pretraining stream with position as its only GenEval family
(half position scenes in the three training phrasings, half free scenes with free captions), measured on its
position captions that begin "a picture of". Measured: where the named object lands relative to the other
(`evaluation.geneval.rules.relation_outcome`) in 4 samples of each caption; "named | both" counts only samples
where both objects were found. `--image-context-prob 0.5` conditions half the samples on [reference + caption]
through the VL encoder, the reference the same objects at other positions, as pretraining does;
`--train-text-encoder` trains the text encoder too (pretraining keeps it frozen at its random initialisation).

    python benchmarks/nano_word_learning.py --world position --init fresh --lr 1e-3 --steps 1000
    python benchmarks/nano_word_learning.py --world position --init loaded --lr 1e-3 --steps 1000 \
        --colour-per-shape false --image-context-prob 0.5

Measured (stop 22, one seed each, 2-core CPU, batch 64, lr 1e-3; "base" is `--init loaded` from the finished
bootstrap's distilled transformer; the training captions' 16-step samples; named side / opposite side / named |
both at 250, 500, 750, 1000 steps; all `--world position --lr 1e-3`, the rows `--init fresh --steps 1000`, the
same with `--colour-per-shape false`, `--init loaded --colour-per-shape false --steps 750`, and that with
`--image-context-prob 0.5 --steps 1000`; 1174, 1319, 848 and 2319 s, the fourth slowed by other jobs).
Rows 1, 2 and 4 were measured at commit 44a46e8, when `position` placed its objects by hand with edges allowed to
touch (`place_objects` keeps 3 px between them); row 3 is measured again with `place_objects` (stop 23; at
44a46e8 it read .27 / .58 / .82, .21 / .14 / .00, .57 / .76 / .92 in 1052 s shared with other jobs):

| start | colours | image contexts | named side | opposite side | named given both |
|---|---|---|---|---|---|
| fresh | per shape | none | .04 / .26 / .57 / .57 | .04 / .14 / .18 / .08 | .33 / .48 / .67 / .69 |
| fresh | drawn | none | .01 / .04 / .20 / .53 | .00 / .04 / .07 / .02 | - / .29 / .68 / .96 |
| base | drawn | none | .27 / .48 / .73 / - | .29 / .11 / .04 / - | .42 / .70 / .92 / - |
| base | drawn | half | .30 / .21 / .32 / .52 | .31 / .20 / .25 / .12 | .48 / .33 / .46 / .75 |

The frozen random text encoder and this transformer learn relation words in a few hundred steps, from scratch
or from the base: the model is not what holds position at chance in the full bootstrap (0.17 at 32 steps). Half
the samples on the image context slowed the base to the pace of the caption-only samples it saw (step 1000 with
them reads as step 500 without), after a dip at 500-750: those samples neither taught the relation nor stopped
it.

The full world, from the base, 2000 steps (stop 23: `--init loaded --steps 2000` with `--world position-full`,
2465 s, and `--world position-mix`, 2986 s; at 500, 1000, 1500, 2000 steps):

| world | named side | opposite side | both drawn | named given both |
|---|---|---|---|---|
| position-full | .20 / .44 / .55 / .55 | .10 / .01 / .00 / .01 | .41 / .51 / .57 / .58 | .49 / .88 / .97 / .95 |
| position-mix | .17 / .18 / .47 / .49 | .14 / .10 / .03 / .01 | .46 / .38 / .55 / .57 | .38 / .48 / .85 / .85 |

The full world's objects slow the relation, but it is learned: after about 1000 steps of position scenes the named
object is on the named side in 0.88 of the samples that show both, and almost never opposite. Free scenes mixed in
half and half do not stop it either, only slow it (position-mix at 1500 steps, 750 batches' worth of position
scenes, reads like position-full at 1000). What caps the reading is drawing both objects at all (0.58 after 2000
steps), the two-object weakness of `reports/nano_base.md`. Pretraining gave position 1/12 of its samples and half of
those through the image context, about 830 caption-only batches' worth in 20000 steps; stop 20's screens
(`benchmarks/nano_task_mix.py`) gave it 110-150 (1000 steps at 2/9 of each batch, 600 at 1/2, half of it through the
image context): too few to see it. It carries over to the held-out phrasing "a photo of": continued pretraining
that gave position about 1000 caption-only batches lifted GenEval-nano position 0.17 -> 0.48 at 32 steps, 0.38 at 4
(stop 24, `benchmarks/nano_task_mix.py`).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import ZImageTransformer2DModel

from dopsd.config import parse_dataclass_args
from dopsd.models.tiny import init_pad_tokens
from dopsd.models.zimage import ZImageModel
from dopsd.nano.bootstrap import WorldStream, contexts_for, encode_targets, flow_matching_loss
from dopsd.nano.model import NANO_CAPTION_TOKENS, NANO_RESOLUTION
from dopsd.nano.scenes import RELATIONS, TASKS, SceneSampler, relation_holds
from dopsd.nano.world import GRID, Scene, Vocabulary, WorldObject, place_objects
from dopsd.sampling import image_grid, sample_images
from evaluation.geneval.rules import RELATION_OUTCOMES, relation_outcome
from evaluation.nano.detector import NanoDetector

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "crescent")
COLOURS = ("red", "blue")
POSITION_COLOURS = {"circle": "red", "square": "blue", "triangle": "yellow"}
"""The position world's shapes, each in its own colour."""
POSITION_ONLY = tuple(float(task == "position") for task in TASKS)
"""Task weights that draw the GenEval half of the pretraining stream from position scenes alone."""


@dataclass
class WordLearningConfig:
    model: str = "data/nano/bootstrap/model"
    """A nano pipeline folder with a trained VAE."""
    world: Literal["fixed", "grid", "free", "position", "position-full", "position-mix"] = "free"
    """fixed, grid or free (shape words: where the object may sit); position (relation words); position-full (the
    full world's position scenes: six shapes, every colour, textures, two sizes); position-mix (the pretraining
    stream with position as its only GenEval family: half position scenes, half free scenes)."""
    init: Literal["loaded", "fresh"] = "loaded"
    """loaded: train the folder's transformer from its weights; fresh: from a random initialisation of its config."""
    colour_per_shape: bool = True
    """Position world: each shape always in its own colour, so identity is learned fast and what is measured is the
    relation; false: each object's colour drawn from the same three, so only its shape tells which it is."""
    train_text_encoder: bool = False
    """Train the Qwen3 text encoder together with the transformer, at the same learning rate."""
    image_context_prob: float = 0.0
    """Share of training samples conditioned on [reference image + caption] through the Qwen3-VL teacher encoder,
    the reference the same content at other positions, as the bootstrap's pretraining does (0.5 there)."""
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
    """Seed of data, noise and initialisation."""
    out: str = "runs/nano-word-learning"
    """Folder for the sample grids."""


def grid_centre(rng: np.random.Generator) -> float:
    return float(16 + GRID * rng.integers(5))


def position_item(rng: np.random.Generator, colour_per_shape: bool) -> tuple[Scene, str]:
    shapes, colours = list(POSITION_COLOURS), list(POSITION_COLOURS.values())
    anchor_shape, mover_shape = rng.choice(shapes, 2, replace=False).tolist()
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    specs = [
        {"shape": shape, "colour": POSITION_COLOURS[shape] if colour_per_shape else colours[rng.integers(len(colours))]}
        for shape in (anchor_shape, mover_shape)
    ]
    while True:
        placed = place_objects(rng, specs)
        if placed and relation_holds(placed[1], placed[0], relation):
            return Scene(placed), f"a picture of a {mover_shape} {relation} a {anchor_shape}"


def reduced_world(
    world: str, count: int, rng: np.random.Generator, colour_per_shape: bool = True
) -> list[tuple[Scene, str]]:
    if world == "fixed":
        shapes = [SHAPES[i % 4] for i in range(count)]
        return [(Scene((WorldObject(shape, "red", radius=12.0),)), f"a picture of a red {shape}") for shape in shapes]
    if world == "position":
        return [position_item(rng, colour_per_shape) for _ in range(count)]
    if world == "position-full":
        sampler = SceneSampler(Vocabulary(), rng)
        items = [sampler.sample("position") for _ in range(count)]
        return [(item.scene, item.caption.replace("a photo of ", "a picture of ", 1)) for item in items]
    if world == "position-mix":
        return WorldStream(int(rng.integers(2**31)), task_weights=POSITION_ONLY).batch(count)
    items = []
    for _ in range(count):
        shape, colour = SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))]
        if world == "grid":
            x, y = grid_centre(rng), grid_centre(rng)
        else:
            x, y = (float(rng.uniform(16, 48)) for _ in range(2))
        obj = WorldObject(shape, colour, radius=float(rng.uniform(10, 13)), x=x, y=y)
        items.append((Scene((obj,)), f"a picture of a {colour} {shape}"))
    return items


def position_metadata(caption: str) -> dict:
    """The GenEval record of a position-world caption ("a picture of a {mover} {relation} a {anchor}")."""
    words = caption.split()
    mover, anchor, relation = words[4], words[-1], " ".join(words[5:-2])
    include = [{"class": anchor, "count": 1}, {"class": mover, "count": 1, "position": [relation, 0]}]
    return {"tag": "position", "include": include, "prompt": caption}


def measured_captions(world: str, captions: list[str]) -> list[str]:
    """The captions whose samples are measured: every training caption, but in position-mix only its position
    captions in one phrasing (its free captions say nothing of where objects sit)."""
    if world != "position-mix":
        return captions
    return [c for c in captions if c.startswith("a picture of ") and any(f" {r} " in c for r in RELATIONS)]


def measure(world: str, captions: list[str], images: list, detector: NanoDetector) -> dict[str, float]:
    """Shape worlds: the share of samples showing the named shape. Position: each relation outcome's share, and
    the named side's share among samples where both objects were found."""
    seeds = len(images) // len(captions)
    prompts = [c for c in captions for _ in range(seeds)]
    paired = list(zip(prompts, detector.detect(images), strict=True))
    if not world.startswith("position"):
        return {"shape hit": float(np.mean([any(d.cls == p.split()[-1] for d in found) for p, found in paired]))}
    counts = Counter(relation_outcome(found, position_metadata(p)) for p, found in paired)
    shares = {outcome: counts[outcome] / len(prompts) for outcome in RELATION_OUTCOMES}
    both = len(prompts) - counts["object missing"]
    return shares | {"named | both": counts["named side"] / both if both else float("nan")}


def main(config: WordLearningConfig) -> list[dict]:
    if config.train_text_encoder and config.image_context_prob:
        raise ValueError(
            "train_text_encoder and image_context_prob go one at a time (the VL encoder's copy of the "
            "text weights would not follow the trained text encoder)"
        )
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    with_image = config.image_context_prob > 0
    model = ZImageModel.load(config.model, max_caption_tokens=NANO_CAPTION_TOKENS, with_teacher_encoder=with_image)
    references = WorldStream(config.seed + 1)
    transformer, text_encoder = model.pipeline.transformer, model.pipeline.text_encoder
    if config.init == "fresh":
        fresh = ZImageTransformer2DModel.from_config(transformer.config)
        init_pad_tokens(fresh)
        transformer.load_state_dict(fresh.state_dict())
    transformer.requires_grad_(True)
    text_encoder.requires_grad_(config.train_text_encoder)
    trained = [*transformer.parameters(), *(text_encoder.parameters() if config.train_text_encoder else [])]
    items = reduced_world(config.world, config.pool, rng, config.colour_per_shape)
    latents = torch.cat([encode_targets(model, items[i : i + 256]) for i in range(0, len(items), 256)])
    captions = sorted({c for _, c in items})
    features = dict(zip(captions, model.encode_student(captions), strict=True))
    shown = measured_captions(config.world, captions)
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    detector = NanoDetector.load()
    out = Path(config.out) / config.world
    out.mkdir(parents=True, exist_ok=True)
    start, losses, rows = time.time(), [], []
    for step in range(1, config.steps + 1):
        transformer.train()
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, step / 100)
        chosen = torch.randint(len(items), (config.batch,), generator=generator).tolist()
        if with_image:
            contexts = contexts_for(model, [items[i] for i in chosen], references, config.image_context_prob, rng)
        elif config.train_text_encoder:
            batch_captions = [items[i][1] for i in chosen]
            # The pipeline's own encoding, with gradient (encode_student runs it without).
            feats = model.pipeline._encode_prompt(batch_captions, model.device, max_sequence_length=NANO_CAPTION_TOKENS)
            contexts = [{"cap_feats": f} for f in feats]
        else:
            contexts = [features[items[i][1]] for i in chosen]
        loss = flow_matching_loss(model, latents[chosen], contexts, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % config.every == 0 or step == config.steps:
            transformer.eval()
            if config.train_text_encoder:
                features = dict(zip(captions, model.encode_student(captions), strict=True))
            contexts = [features[c] for c in shown]
            images = sample_images(model, contexts, [0, 1, 2, 3], config.sample_steps, NANO_RESOLUTION)
            measured = measure(config.world, shown, images, detector)
            row = {"step": step, "loss": float(np.mean(losses[-config.every :])), **measured}
            row["seconds"] = round(time.time() - start)
            rows.append(row)
            readings = ", ".join(f"{k} {v:.2f}" for k, v in measured.items())
            print(f"{config.world} step {step}: loss {row['loss']:.4f}, {readings} ({row['seconds']} s)", flush=True)
            image_grid(images, 4).save(out / f"step_{step}.png")
    return rows


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(parse_dataclass_args(WordLearningConfig, sys.argv[1:], __doc__.split("\n\n")[0]))
