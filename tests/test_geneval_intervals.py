"""The paired bootstrap over prompts that says how far a GenEval difference between two models can be trusted."""

import numpy as np
import pytest

from evaluation.geneval.intervals import overall_difference, prompt_differences
from evaluation.suite import rows_score


def rows(correct: dict[str, list[bool]], tags: dict[str, str]) -> list[dict]:
    """Verdict rows: prompt -> its images' verdicts, one per noise seed."""
    return [
        {"prompt": prompt, "seed": seed, "tag": tags[prompt], "correct": ok, "reason": ""}
        for prompt, verdicts in correct.items()
        for seed, ok in enumerate(verdicts)
    ]


def random_rows(prompts: int, accuracy: float, seed: int) -> list[dict]:
    """Two tasks of unequal size (the overall score averages tasks, not images), two noise seeds a prompt."""
    rng = np.random.default_rng(seed)
    tags = {f"p{i}": "two_object" if i < prompts // 4 else "colors" for i in range(prompts)}
    return rows({p: list(rng.random(2) < accuracy) for p in tags}, tags)


def test_a_model_against_itself_differs_by_zero_at_every_draw():
    base = random_rows(40, 0.5, seed=0)
    same = overall_difference(base, [base])
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)


def test_the_difference_is_the_geneval_difference_and_lies_inside_its_interval():
    base, candidate = random_rows(40, 0.5, seed=0), random_rows(40, 0.7, seed=1)
    found = overall_difference(base, [candidate])
    expected = rows_score(candidate).overall - rows_score(base).overall
    assert found.difference == pytest.approx(expected)
    assert found.low < found.difference < found.high and found.level == 0.95
    assert overall_difference(base, [candidate]) == found  # seeded: the same report twice


def test_fewer_prompts_give_a_wider_interval_and_a_clear_gain_excludes_zero():
    def width(prompts: int) -> float:
        found = overall_difference(random_rows(prompts, 0.5, seed=0), [random_rows(prompts, 0.5, seed=1)])
        assert found.low < 0 < found.high  # two draws of one accuracy: no difference to find
        return found.high - found.low

    assert width(20) > 2 * width(400)
    tags = {f"p{i}": "colors" for i in range(20)}
    worse, better = rows({p: [False, True] for p in tags}, tags), rows({p: [True, True] for p in tags}, tags)
    assert overall_difference(worse, [better]).low == pytest.approx(0.5)


def test_candidates_are_pooled_prompt_by_prompt():
    tags = {"a": "colors", "b": "colors"}
    base = rows({"a": [False, False], "b": [False, False]}, tags)
    seed0, seed1 = (
        rows({"a": [True, True], "b": [False, False]}, tags),
        rows({"a": [True, False], "b": [True, True]}, tags),
    )
    assert prompt_differences(base, [seed0, seed1]) == {"colors": {"a": 0.75, "b": 0.5}}
    assert overall_difference(base, [seed0, seed1]).difference == pytest.approx(0.625)


def test_unpaired_verdicts_are_refused_with_the_prompt_that_does_not_pair():
    tags = {"a": "colors", "b": "colors"}
    base = rows({"a": [True, False], "b": [True, False]}, tags)
    with pytest.raises(ValueError, match="candidate 0 did not score.*'b', 1"):
        overall_difference(base, [rows({"a": [True, False], "b": [True]}, tags)])
    with pytest.raises(ValueError, match="no candidate"):
        overall_difference(base, [])
