"""The main job until the nano world lands: a D-OPSD round end to end on a tiny model and data it builds.

Everything is local and takes about a minute on a 2-core CPU. The tiny model is random, so the pictures show the
pipeline working (before/after grids at the deployed 4 steps), not a learned concept: that is the nano world's job.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw

from dopsd.config import make_config
from dopsd.models.tiny import build_tiny_zimage
from dopsd.preview import sample_grid
from dopsd.train import train

CONCEPT_PROMPTS = ["a photo of a zorb ring", "two zorb rings", "a zorb ring on the left"]


def write_concept_images(folder: Path, count: int = 8, size: int = 32) -> Path:
    """A small landing folder: rings of a made-up concept word at varying places, each with a caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), "white")
        x, y = 4 + (i * 5) % 14, 4 + (i * 3) % 14
        ImageDraw.Draw(image).ellipse((x, y, x + 12, y + 12), outline=(200, 30, 160), width=3)
        image.save(folder / f"ring_{i:02d}.png")
        (folder / f"ring_{i:02d}.txt").write_text(CONCEPT_PROMPTS[i % len(CONCEPT_PROMPTS)])
    return folder


def run_demo(workdir: Path, steps: int = 40) -> Iterator[str]:
    model_dir = workdir / "model"
    if not (model_dir / "model_index.json").is_file():
        build_tiny_zimage(model_dir, corpus=tuple(CONCEPT_PROMPTS))
        yield f"built tiny Z-Image pipeline in {model_dir}"
    data = write_concept_images(workdir / "data")
    yield f"wrote concept data to {data}"
    config = make_config("tiny", model=str(model_dir), data=str(data), output=str(workdir / "round"), steps=steps)
    losses: list[float] = []
    adapter = train(config, on_metrics=lambda step, m: losses.append(m["loss"]))
    yield f"D-OPSD round: {steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; adapter in {adapter}"
    for name, lora in (("before", None), ("after", str(adapter))):
        grid = sample_grid(str(model_dir), CONCEPT_PROMPTS, list(range(4)), 4, 32, adapter=lora)
        path = workdir / f"samples_{name}.png"
        grid.save(path)
        yield f"4-step samples {name} the round: {path}"
