"""The main job: a D-OPSD round on the nano world, then the evaluation suite before and after.

`run_nano_demo` teaches the nano base a concept pack's new word and scores base and adapter at the deployed 4
steps on the same prompts and noise: the concept's accuracy (did it learn?) and retention on held-out base prompts
(did it keep what it knew?), and how often the concept is drawn on those base prompts, which never name it (did it
learn the word, or to draw the concept whatever the prompt?), with side-by-side grids. On a nano pack the round
also keeps what the base draws as a continual round would: caption negatives (the pack's captions minus its word)
and replayed base-world renders, both taught by the base from their captions, their top sampling states held at
half weight (`--set anchor_layout=0 --set replay_ratio=0 --set negative_ratio=0`: none of it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from dopsd.config import make_config
from dopsd.train import train

RETENTION = "retention/geneval/overall"
KEEP_THE_BASE: dict[str, str | float] = {
    "negative_ratio": 0.375,
    "replay_ratio": 0.125,
    "replay_teacher": "previous",
    "anchor_layout": 0.5,
}
"""How a demo round on a nano pack keeps what the base draws: the recommended continual chain's first round (dvc.yaml,
stage nano_science), caption negatives, 0.375 of each batch, and base-world renders, 0.125, taught by the base from
their captions, with their top sampling states held at half weight (the chain's later rounds too, at 450 steps: at
300 the anchor held back a new shape, reports/nano_continual_text_path_anchored_half_teal_first.md). On star / teal /
striped, 3 seeds, 4 steps, it learns 0.338 / 0.333 / 0.312 and keeps retention 0.514 / 0.519 / 0.530 of the base's
0.528, with FID-nano 64.5 / 44.7 / 44.0 (base 47.9; reports/nano_science_text_path_anchored_half.md), where negatives
alone at 0.625 learnt 0.316 / 0.259 / 0.319 and kept 0.472 / 0.488 / 0.505, and the preset alone 0.328 / 0.438 / 0.357
and 0.415 / 0.425 / 0.446 (reports/nano_science_text_path_caption_negatives_dropped.md, the stripes' in
reports/nano_science_text_path_caption_negatives.md; reports/nano_science.md)."""


def keep_the_base(pack_words: str, replay: Path, overrides: dict) -> dict:
    """The demo round's fields that keep what the base draws (`KEEP_THE_BASE`, the caption negatives dropping
    `pack_words`, the world renders in `replay`), less what `overrides` turns off: a source set to 0 goes with its data
    and the anchor without any source to hold, so that `--set replay_ratio=0` is all it takes. A round of words alone
    (`lora_rank` 0) keeps nothing: it cannot change a prompt that does not name them."""
    if overrides.get("lora_rank") == 0:
        return {}
    fields: dict = {"caption_negatives": pack_words, "replay_data": str(replay), **KEEP_THE_BASE}
    if overrides.get("replay_ratio") == 0:
        fields = {k: v for k, v in fields.items() if k not in ("replay_data", "replay_ratio", "replay_teacher")}
    if overrides.get("negative_ratio") == 0:
        fields = {k: v for k, v in fields.items() if k not in ("caption_negatives", "negative_ratio")}
    if "replay_data" not in fields and "caption_negatives" not in fields:
        fields.pop("anchor_layout")
    return fields


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
    from dopsd.nano.bootstrap import write_world_replay
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
        fields |= keep_the_base(caption_negatives(nano_pack), write_world_replay(workdir / "replay"), overrides or {})
    # An override wins over the demo's own fields (--set steps=600 over --steps).
    config = make_config("nano", **(fields | (overrides or {})))
    losses: list[float] = []
    start = time.time()
    adapter = train(config, on_metrics=lambda step, m: losses.append(m["loss"]))
    trained = f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "already trained"
    keeping = [
        f"caption negatives {config.caption_negatives} ({config.negative_ratio})" if config.negative_ratio else "",
        f"world replay ({config.replay_ratio})" if config.replay_ratio else "",
        f"layout anchor {config.anchor_layout}" if config.anchor_layout else "",
    ]
    yield (
        f"D-OPSD round on {data}: {config.steps} steps{''.join(', ' + part for part in keeping if part)}, "
        f"{time.time() - start:.0f} s, {trained}; adapter in {adapter}"
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
        concept, retention = values["concept/geneval/overall"], values[RETENTION]
        rows = read_jsonl(workdir / "eval" / report.verdicts[f"retention/{name}"])
        leak = concept_shown(nano_pack, rows) if nano_pack is not None else None
        drawn = f"{leak:.3f} of the base prompts' samples" if leak is not None else "not measured (no nano concept)"
        yield (
            f"{name} at {suite.steps} steps: {pack} accuracy {concept:.3f}, retention {retention:.3f} (GenEval-nano); "
            f"{pack} drawn on {drawn}"
        )
    delta, (low, high) = report.deltas["dopsd"][RETENTION], report.intervals["dopsd"][RETENTION]
    yield (
        f"dopsd - base retention {delta:+.3f}, 95% over the {len(prompt_sets[0].records)} prompts [{low:+.3f}, "
        f"{high:+.3f}] (an interval that holds 0 is within what another draw of prompts would move)"
    )
    for prompt_set, grid in report.grids.items():
        yield f"samples, base | dopsd: {workdir / 'eval' / grid} ({prompt_set})"
