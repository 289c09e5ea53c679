"""The main job: a D-OPSD round on the nano world, then the evaluation suite before and after.

`run_nano_demo` teaches the nano base a concept pack's new word and scores base and adapter at the deployed 4
steps on the same prompts and noise: the concept's accuracy (did it learn?) and retention on held-out base prompts
(did it keep what it knew?), and how often the concept is drawn on those base prompts, which never name it (did it
learn the word, or to draw the concept whatever the prompt?), with side-by-side grids. On a nano pack the round
also trains on caption negatives, the pack's captions minus its word, as a user with a leaky word would
(`--set caption_negatives= --set negative_ratio=0`: none).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from dopsd.config import make_config
from dopsd.train import train

DEMO_NEGATIVE_RATIO = 0.625
"""Share of each demo batch drawn from the caption negatives: the share every nano screen of them used."""


def run_nano_demo(
    workdir: Path,
    model: str,
    world: Path,
    pack: str = "star",
    steps: int = 0,
    prompts_per_task: int = 3,
    overrides: dict | None = None,
) -> Iterator[str]:
    """`overrides`: training config fields set over the `nano` preset (how the preset was tuned)."""
    from dopsd.models import load_model
    from dopsd.nano.model import NANO_RESOLUTION
    from dopsd.nano.packs import PACK_BY_NAME, caption_negatives
    from dopsd.nano.scenes import read_jsonl
    from evaluation.nano.premise import concept_shown
    from evaluation.networks import NetworkPaths, load_networks
    from evaluation.prompt_sets import read_images, read_prompts, retention_set
    from evaluation.suite import PromptSet, SuiteConfig, run_suite

    data = world / "packs" / pack
    fields: dict[str, str | float | None] = {
        "model": model,
        "data": str(data),
        "output": str(workdir / "round"),
        "steps": steps or None,
    }
    nano_pack = PACK_BY_NAME.get(pack)
    if nano_pack is not None:
        # A new word leaks onto prompts that do not name it; negatives that drop it from the pack's own captions
        # halve that on the star and keep more of the base (3 seeds: leak 0.261 vs 0.506, retention 0.472 vs 0.415,
        # concept 0.316 vs 0.328; reports/nano_science_text_path_caption_negatives_dropped.md).
        fields |= {"caption_negatives": caption_negatives(nano_pack), "negative_ratio": DEMO_NEGATIVE_RATIO}
    # An override wins over the demo's own fields (--set steps=600 over --steps).
    config = make_config("nano", **(fields | (overrides or {})))
    losses: list[float] = []
    start = time.time()
    adapter = train(config, on_metrics=lambda step, m: losses.append(m["loss"]))
    trained = f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "already trained"
    negatives = (
        f", caption negatives {config.caption_negatives} ({config.negative_ratio})" if config.negative_ratio else ""
    )
    yield (
        f"D-OPSD round on {data}: {config.steps} steps{negatives}, {time.time() - start:.0f} s, {trained}; "
        f"adapter in {adapter}"
    )
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
        rows = read_jsonl(workdir / "eval" / report.verdicts[f"retention/{name}"])
        leak = concept_shown(nano_pack, rows) if nano_pack is not None else None
        drawn = f"{leak:.3f} of the base prompts' samples" if leak is not None else "not measured (no nano concept)"
        yield (
            f"{name} at {suite.steps} steps: {pack} accuracy {concept:.3f}, retention {retention:.3f} (GenEval-nano); "
            f"{pack} drawn on {drawn}"
        )
    for prompt_set, grid in report.grids.items():
        yield f"samples, base | dopsd: {workdir / 'eval' / grid} ({prompt_set})"
