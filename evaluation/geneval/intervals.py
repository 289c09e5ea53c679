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


def keyed(rows: Sequence[dict]) -> dict[tuple[str, int, int], dict]:
    """Verdict rows by (prompt, noise seed, occurrence): a prompt set may ask one prompt twice, and each model
    answers its records in the same order, so the n-th time of a (prompt, seed) pairs with the n-th."""
    seen: dict[tuple[str, int], int] = {}
    by_key = {}
    for row in rows:
        asked = (row["prompt"], row["seed"])
        seen[asked] = seen.get(asked, -1) + 1
        by_key[(*asked, seen[asked])] = row
    return by_key


def prompt_differences(
    baselines: Sequence[Sequence[dict]], candidates: Sequence[Sequence[dict]]
) -> dict[str, dict[str, float]]:
    """Task -> prompt -> the candidates' accuracy on the prompt minus the baselines', each side the mean over its runs
    (e.g. one adapter per training seed) and noise seeds. Rows are the suite's verdict rows (`prompt`, `seed`, `tag`,
    `correct`); every run must have scored exactly the first baseline's (prompt, seed) pairs, as often each, or the
    difference would mix prompts."""
    if not baselines or not candidates:
        raise ValueError("a difference needs baseline and candidate verdicts, got none of one")
    pairs = {key: row["tag"] for key, row in keyed(baselines[0]).items()}
    scored: dict[str, list[dict]] = {"baseline": [], "candidate": []}
    for side, runs in (("baseline", baselines), ("candidate", candidates)):
        for i, rows in enumerate(runs):
            correct = {key: row["correct"] for key, row in keyed(rows).items()}
            if correct.keys() != pairs.keys():
                unpaired = sorted(correct.keys() ^ pairs.keys())[:3]
                raise ValueError(
                    f"{side} {i} did not score the first baseline's prompts and seeds as often each: e.g. {unpaired}"
                )
            scored[side].append(correct)
    deltas: dict[str, dict[str, list[float]]] = {}
    for key, tag in pairs.items():
        mean = {side: np.mean([correct[key] for correct in runs]) for side, runs in scored.items()}
        deltas.setdefault(tag, {}).setdefault(key[0], []).append(float(mean["candidate"] - mean["baseline"]))
    return {tag: {prompt: float(np.mean(d)) for prompt, d in prompts.items()} for tag, prompts in deltas.items()}


def resampled_interval(by_task: list[np.ndarray], level: float, draws: int, seed: int) -> DifferenceInterval:
    """The mean over tasks of each task's mean prompt difference, with a percentile interval from `draws`
    resamplings of the prompts within each task."""
    rng = np.random.default_rng(seed)
    resampled = np.mean([d[rng.integers(0, len(d), size=(draws, len(d)))].mean(axis=1) for d in by_task], axis=0)
    tail = (1 - level) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    difference = float(np.mean([d.mean() for d in by_task]))
    return DifferenceInterval(difference, float(low), float(high), level)


def task_arrays(baselines: Sequence[Sequence[dict]], candidates: Sequence[Sequence[dict]]) -> dict[str, np.ndarray]:
    """Task (sorted) -> its prompts' differences (`prompt_differences`) as an array."""
    differences = prompt_differences(baselines, candidates)
    return {tag: np.array(list(differences[tag].values())) for tag in sorted(differences)}


def overall_difference(
    baselines: Sequence[Sequence[dict]],
    candidates: Sequence[Sequence[dict]],
    level: float = 0.95,
    draws: int = 2000,
    seed: int = 0,
) -> DifferenceInterval:
    """The candidates' GenEval overall minus the baselines', with a percentile interval from `draws` resamplings of
    the prompts within each task. Several runs on a side (e.g. one adapter per training seed) are pooled prompt by
    prompt: the interval is over prompts only, not over training seeds (their spread is reported on its own)."""
    return resampled_interval(list(task_arrays(baselines, candidates).values()), level, draws, seed)


def family_differences(
    baselines: Sequence[Sequence[dict]],
    candidates: Sequence[Sequence[dict]],
    level: float = 0.95,
    draws: int = 2000,
    seed: int = 0,
) -> dict[str, DifferenceInterval]:
    """`overall` and each task family (sorted) -> the difference and interval of `overall_difference`, the families
    each resampled alone; the verdicts are paired once for all of them."""
    tasks = task_arrays(baselines, candidates)
    found = {"overall": resampled_interval(list(tasks.values()), level, draws, seed)}
    return found | {tag: resampled_interval([d], level, draws, seed) for tag, d in tasks.items()}
