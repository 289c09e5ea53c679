"""The main job: a D-OPSD round on the nano world, then the evaluation suite before and after.

`run_nano_demo` teaches the nano base a concept pack's new word and scores base and adapter at the deployed 4
steps on the same prompts and noise: the concept's accuracy (did it learn?) and retention on held-out base prompts
(did it keep what it knew?), with side-by-side grids. Until the nano model is built (`dopsd nano bootstrap`),
`run_demo` stands in: the same round on a tiny random model and data it builds, which shows the pipeline working,
not a learned concept.
"""

from __future__ import annotations

import time
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


def run_nano_demo(
    workdir: Path, model: str, world: Path, pack: str = "star", steps: int = 0, prompts_per_task: int = 3
) -> Iterator[str]:
    from dopsd.models import load_model
    from dopsd.nano.model import NANO_RESOLUTION
    from evaluation.networks import NetworkPaths, load_networks
    from evaluation.prompt_sets import read_images, read_prompts, retention_set
    from evaluation.suite import PromptSet, SuiteConfig, run_suite

    data = world / "packs" / pack
    config = make_config("nano", model=model, data=str(data), output=str(workdir / "round"), steps=steps or None)
    losses: list[float] = []
    start = time.time()
    adapter = train(config, on_metrics=lambda step, m: losses.append(m["loss"]))
    trained = f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "already trained"
    yield f"D-OPSD round on {data}: {config.steps} steps, {time.time() - start:.0f} s, {trained}; adapter in {adapter}"
    prompt_sets = [
        retention_set(world / "base_prompts.jsonl", limit=prompts_per_task),
        PromptSet("concept", read_prompts(world / "packs" / f"{pack}_prompts.jsonl"), targets=read_images(data)),
    ]
    fewstep = load_model(model, max_caption_tokens=config.max_caption_tokens, with_teacher_encoder=False)
    suite = SuiteConfig(config.deployed_steps, 2, 0, NANO_RESOLUTION, 64, baseline="base")
    report = run_suite(
        fewstep,
        {"base": None, "dopsd": str(adapter)},
        prompt_sets,
        load_networks(NetworkPaths.nano()),
        suite,
        workdir / "eval",
    )
    for name, values in report.metrics.items():
        concept, retention = values["concept/geneval/overall"], values["retention/geneval/overall"]
        yield f"{name} at {suite.steps} steps: {pack} accuracy {concept:.3f}, retention {retention:.3f} (GenEval-nano)"
    for prompt_set, grid in report.grids.items():
        yield f"samples, base | dopsd: {workdir / 'eval' / grid} ({prompt_set})"
