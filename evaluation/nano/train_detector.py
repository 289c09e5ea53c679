"""Train the nano detector's classifier on renders and validate it on held-out renders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dopsd.nano.scenes import TASKS, SceneSampler
from dopsd.nano.world import Scene, Vocabulary, render
from evaluation.geneval.detection import Detector
from evaluation.nano.detector import NanoDetector, labelled_crops, object_of, train_classifier


def world_scenes(count: int, seed: int) -> list[Scene]:
    """Task scenes and free scenes of the full visual vocabulary, half each."""
    sampler = SceneSampler(Vocabulary(), np.random.default_rng(seed))
    return [sampler.sample(TASKS[i % len(TASKS)]).scene if i % 2 else sampler.random_scene() for i in range(count)]


@dataclass
class DetectorValidation:
    objects: int
    """Objects in the held-out renders."""
    found: float
    """Share of objects matched by exactly one detection (segmentation)."""
    shape: float
    """Share of objects found with the right shape."""
    colour: float
    """Share found with the right colour."""
    texture: float
    """Share found with the right texture."""
    all_attributes: float
    """Share found with shape, colour and texture all right (the per-object accuracy)."""
    extra_detections: int
    """Detections that matched no object."""


def validate(detector: Detector, scenes: list[Scene], images: list[Image.Image] | None = None) -> DetectorValidation:
    """Per-object accuracy on the scenes' renders, or on other images of the same scenes (e.g. a VAE's
    reconstructions: the ceiling of what the model's samples can score)."""
    images = images if images is not None else [render(s) for s in scenes]
    hits = {"found": 0, "shape": 0, "colour": 0, "texture": 0, "all": 0}
    total = extra = 0
    for scene, detections in zip(scenes, detector.detect(images), strict=True):
        matched = {id(o): d for d in detections if (o := object_of(d.box, scene)) is not None}
        extra += len(detections) - len(matched)
        for obj in scene.objects:
            total += 1
            d = matched.get(id(obj))
            if d is None:
                continue
            checks = {
                "shape": d.cls == obj.shape,
                "colour": d.colour == obj.colour,
                "texture": d.texture == obj.texture,
            }
            hits["found"] += 1
            for key, ok in checks.items():
                hits[key] += int(ok)
            hits["all"] += int(all(checks.values()))
    return DetectorValidation(
        objects=total,
        found=hits["found"] / total,
        shape=hits["shape"] / total,
        colour=hits["colour"] / total,
        texture=hits["texture"] / total,
        all_attributes=hits["all"] / total,
        extra_detections=extra,
    )


def build_detector(
    train_scenes: int = 6000, epochs: int = 8, seed: int = 0, log: Callable[[str], None] = print
) -> NanoDetector:
    scenes = world_scenes(train_scenes, seed)
    crops, labels = labelled_crops(scenes, [render(s) for s in scenes])
    log(f"training the nano detector on {len(crops)} object crops from {train_scenes} renders")
    return NanoDetector(train_classifier(crops, labels, epochs=epochs, seed=seed))
