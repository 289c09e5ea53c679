"""GenEval verdicts of runs pooled against a baseline's, by task family, with 95% intervals over prompts.

The science benchmark gives each chain's spread over training seeds; whether a loss against the base is more than
another draw of prompts would move needs the prompts resampled (`evaluation/geneval/intervals.py`). A group pools
its verdict files (the suite's `verdicts/<set>/<model>.jsonl`, e.g. one chain per seed and pack order after its
n-th round) prompt by prompt, and so may the baseline (one recipe's seeds against another's); every file must have
scored the same prompts and noise seeds.

Measured (2026-12-06, CPU): reports/README.md, "How far the continual figures can be trusted", from commands like

    V=eval/continual/steps-4/verdicts/retention; A=dopsd-text-path-lr2e-3-anchored-half+lwf
    .venv/bin/python benchmarks/geneval_intervals.py --baseline runs/nano-science-continual/$V/base.jsonl \\
        --group "anchored 450, round 3=runs/nano-science-continual/$V/$A-s*-after-striped.jsonl,\\
    runs/science-text-anchored-half-steps450-teal-first/$V/$A-s*-after-star.jsonl,\\
    runs/science-text-anchored-half-steps450-striped-first/$V/$A-s*-after-teal.jsonl"
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

from dopsd.nano.scenes import read_jsonl
from evaluation.geneval.intervals import family_differences


def matching_files(patterns: str, what: str) -> list[Path]:
    """The files of comma-separated glob patterns, each of which must match one or more."""
    files = []
    for pattern in patterns.split(","):
        matched = sorted(glob.glob(pattern))
        if not matched:
            raise SystemExit(f"{what}: no verdict file matches {pattern}")
        files += [Path(path) for path in matched]
    return files


def group_files(spec: str) -> tuple[str, list[Path]]:
    """`NAME=GLOB,GLOB,...` -> the name and the files its patterns match."""
    name, sep, patterns = spec.partition("=")
    if not sep or not patterns:
        raise SystemExit(f"--group {spec!r}: expected NAME=GLOB[,GLOB...]")
    return name, matching_files(patterns, f"--group {name!r}")


def intervals_table(baselines: list[list[dict]], groups: dict[str, list[list[dict]]]) -> list[str]:
    """A markdown table: one row per group, `difference [low, high]` overall and per task family."""
    families = sorted({row["tag"] for row in baselines[0]})
    counts = {f: len({row["prompt"] for row in baselines[0] if row["tag"] == f}) for f in families}
    lines = [
        "| group | runs | overall | " + " | ".join(f"{f} ({counts[f]})" for f in families) + " |",
        "| --- | --- | --- |" + " --- |" * len(families),
    ]
    for name, runs in groups.items():
        cells = [str(found) for found in family_differences(baselines, runs).values()]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="GLOB[,GLOB...]: the baseline's verdict files, pooled.")
    parser.add_argument(
        "--group", action="append", required=True, help="NAME=GLOB[,GLOB...]: verdict files pooled as one row."
    )
    args = parser.parse_args(argv)
    baselines = [read_jsonl(path) for path in matching_files(args.baseline, "--baseline")]
    groups = dict(group_files(spec) for spec in args.group)
    runs = {name: [read_jsonl(path) for path in files] for name, files in groups.items()}
    print("\n".join(intervals_table(baselines, runs)))


if __name__ == "__main__":
    main()
