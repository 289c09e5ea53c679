"""How far a GenEval difference between two models can be trusted: a paired bootstrap over prompts.

The suite samples every model from the same prompts and noise seeds, so two models' verdicts pair up image for image
and most of the noise an image adds cancels in their difference. What does not cancel is which prompts were asked:
a task of 20 prompts (the nano retention set's) or 80-100 (GenEval's) moves by several points with another draw of
prompts. Resampling the prompts, within each task because the overall score is the mean of the task accuracies,
shows how far.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DifferenceInterval:
    difference: float
    """Candidate's GenEval overall minus the baseline's, on the same prompts and seeds."""
    low: float
    """Lower end of the interval."""
    high: float
    """Upper end of the interval."""
    level: float
    """Share of the bootstrap draws between `low` and `high` (0.95: a 95% interval)."""

    def __str__(self) -> str:
        """`+0.012 [-0.031, +0.055]`; a value that rounds to zero reads +0.000, never -0.000."""
        difference, low, high = (0.0 if round(v, 3) == 0 else v for v in (self.difference, self.low, self.high))
        return f"{difference:+.3f} [{low:+.3f}, {high:+.3f}]"


def prompt_differences(baseline: Sequence[dict], candidates: Sequence[Sequence[dict]]) -> dict[str, dict[str, float]]:
    """Task -> prompt -> the candidates' accuracy on the prompt (mean over candidates and noise seeds) minus the
    baseline's. Rows are the suite's verdict rows (`prompt`, `seed`, `tag`, `correct`); every candidate must have
    scored exactly the baseline's (prompt, seed) pairs, or the difference would mix prompts."""
    if not candidates:
        raise ValueError("no candidate verdicts to compare with the baseline's")
    pairs = {(row["prompt"], row["seed"]): row for row in baseline}
    scored = [{(row["prompt"], row["seed"]): row["correct"] for row in rows} for rows in candidates]
    for i, (rows, correct) in enumerate(zip(candidates, scored, strict=True)):
        if correct.keys() != pairs.keys() or len(rows) != len(pairs):
            unpaired = sorted(correct.keys() ^ pairs.keys())[:3]
            raise ValueError(f"candidate {i} did not score the baseline's prompts and seeds once each: e.g. {unpaired}")
    deltas: dict[str, dict[str, list[float]]] = {}
    for key, row in pairs.items():
        delta = float(np.mean([correct[key] for correct in scored])) - row["correct"]
        deltas.setdefault(row["tag"], {}).setdefault(row["prompt"], []).append(delta)
    return {tag: {prompt: float(np.mean(d)) for prompt, d in prompts.items()} for tag, prompts in deltas.items()}


def overall_difference(
    baseline: Sequence[dict],
    candidates: Sequence[Sequence[dict]],
    level: float = 0.95,
    draws: int = 2000,
    seed: int = 0,
) -> DifferenceInterval:
    """The candidates' GenEval overall minus the baseline's, with a percentile interval from `draws` resamplings of
    the prompts within each task. Several candidates (e.g. one adapter per training seed) are pooled prompt by
    prompt: the interval is over prompts only, not over training seeds (their spread is reported on its own)."""
    by_task = [
        np.array(list(prompts.values())) for _, prompts in sorted(prompt_differences(baseline, candidates).items())
    ]
    rng = np.random.default_rng(seed)
    resampled = np.mean([d[rng.integers(0, len(d), size=(draws, len(d)))].mean(axis=1) for d in by_task], axis=0)
    tail = (1 - level) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    difference = float(np.mean([d.mean() for d in by_task]))
    return DifferenceInterval(difference, float(low), float(high), level)


def family_differences(baseline: Sequence[dict], candidates: Sequence[Sequence[dict]]) -> dict[str, DifferenceInterval]:
    """`overall` and each task family (sorted) -> `overall_difference` on the rows of that family alone."""
    families = sorted({row["tag"] for row in baseline})
    found = {}
    for family in ["overall", *families]:
        kept = [[row for row in rows if family in ("overall", row["tag"])] for rows in [baseline, *candidates]]
        found[family] = overall_difference(kept[0], kept[1:])
    return found
