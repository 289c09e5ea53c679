"""The paired bootstrap over prompts that says how far a GenEval difference between two models can be trusted."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dopsd.nano.scenes import write_jsonl
from evaluation.geneval.intervals import DifferenceInterval, family_differences, overall_difference, prompt_differences
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
    same = overall_difference([base], [base])
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0)


def test_the_difference_is_the_geneval_difference_and_lies_inside_its_interval():
    base, candidate = random_rows(40, 0.5, seed=0), random_rows(40, 0.7, seed=1)
    found = overall_difference([base], [candidate])
    expected = rows_score(candidate).overall - rows_score(base).overall
    assert found.difference == pytest.approx(expected)
    assert found.low < found.difference < found.high and found.level == 0.95
    assert overall_difference([base], [candidate]) == found  # seeded: the same report twice


def test_fewer_prompts_give_a_wider_interval_and_a_clear_gain_excludes_zero():
    def width(prompts: int) -> float:
        found = overall_difference([random_rows(prompts, 0.5, seed=0)], [random_rows(prompts, 0.5, seed=1)])
        assert found.low < 0 < found.high  # two draws of one accuracy: no difference to find
        return found.high - found.low

    assert width(20) > 2 * width(400)
    tags = {f"p{i}": "colors" for i in range(20)}
    worse, better = rows({p: [False, True] for p in tags}, tags), rows({p: [True, True] for p in tags}, tags)
    assert overall_difference([worse], [better]).low == pytest.approx(0.5)


def test_runs_are_pooled_prompt_by_prompt_on_either_side():
    tags = {"a": "colors", "b": "colors"}
    base = rows({"a": [False, False], "b": [False, False]}, tags)
    seed0, seed1 = (
        rows({"a": [True, True], "b": [False, False]}, tags),
        rows({"a": [True, False], "b": [True, True]}, tags),
    )
    assert prompt_differences([base], [seed0, seed1]) == {"colors": {"a": 0.75, "b": 0.5}}
    assert overall_difference([base], [seed0, seed1]).difference == pytest.approx(0.625)
    # One recipe's seeds against another's: the difference of the two pooled means.
    assert prompt_differences([seed0, seed1], [base]) == {"colors": {"a": -0.75, "b": -0.5}}
    assert prompt_differences([seed0, base], [seed1]) == {"colors": {"a": 0.0, "b": 1.0}}


def test_a_prompt_asked_twice_pairs_in_order_and_counts_as_one_prompt():
    base = [{"prompt": "a", "seed": 0, "tag": "colors", "correct": ok} for ok in (False, True)]
    candidate = [{"prompt": "a", "seed": 0, "tag": "colors", "correct": ok} for ok in (True, True)]
    assert prompt_differences([base], [candidate]) == {"colors": {"a": 0.5}}


def test_unpaired_verdicts_are_refused_with_the_prompt_that_does_not_pair():
    tags = {"a": "colors", "b": "colors"}
    base = rows({"a": [True, False], "b": [True, False]}, tags)
    with pytest.raises(ValueError, match="candidate 0 did not score.*'b', 1, 0"):
        overall_difference([base], [rows({"a": [True, False], "b": [True]}, tags)])
    with pytest.raises(ValueError, match="baseline 1 did not score"):
        overall_difference([base, rows({"a": [True, False]}, tags)], [base])
    with pytest.raises(ValueError, match="needs baseline and candidate verdicts"):
        overall_difference([base], [])


def test_family_differences_score_each_family_alone_and_read_without_a_negative_zero():
    tags = {"a": "colors", "b": "position"}
    base = rows({"a": [False, False], "b": [True, True]}, tags)
    candidate = rows({"a": [True, True], "b": [True, True]}, tags)
    found = family_differences([base], [candidate])
    assert list(found) == ["overall", "colors", "position"]
    assert (found["colors"].difference, found["position"].difference, found["overall"].difference) == (1.0, 0.0, 0.5)
    assert str(found["position"]) == "+0.000 [+0.000, +0.000]"
    assert str(DifferenceInterval(-0.0001, -0.25, 0.125, 0.95)) == "+0.000 [-0.250, +0.125]"


def test_the_benchmark_pools_verdict_files_per_group_and_names_a_pattern_that_matches_nothing(tmp_path):
    tags = {"a": "colors", "b": "position"}
    write_jsonl(rows({"a": [False, False], "b": [True, True]}, tags), tmp_path / "base.jsonl")
    for seed, verdicts in enumerate(([True, True], [True, False])):
        write_jsonl(rows({"a": verdicts, "b": [True, True]}, tags), tmp_path / f"run-s{seed}.jsonl")
    script = Path(__file__).parents[1] / "benchmarks" / "geneval_intervals.py"
    command = [sys.executable, str(script), f"--baseline={tmp_path / 'base.jsonl'}"]
    shown = subprocess.run([*command, f"--group=two seeds={tmp_path}/run-s*.jsonl"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "| group | runs | overall | colors (1) | position (1) |" in shown.stdout
    assert (
        "| two seeds | 2 | +0.375 [+0.375, +0.375] | +0.750 [+0.750, +0.750] | +0.000 [+0.000, +0.000] |"
        in shown.stdout
    )
    missing = subprocess.run([*command, f"--group=none={tmp_path}/nothing-*.jsonl"], capture_output=True, text=True)
    assert missing.returncode != 0 and f"no verdict file matches {tmp_path}/nothing-*.jsonl" in missing.stderr
