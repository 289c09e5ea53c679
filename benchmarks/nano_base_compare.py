"""Two nano base candidates, paired: GenEval-nano at the deployed 4 steps on the held-out prompts, both sampled from
the same noise per (prompt, seed), the candidate minus the baseline overall and per task family with 95% intervals
over the prompts (`evaluation/geneval/intervals.py`). This is how a bootstrap variant is judged before it is adopted:
two bases a few hundredths apart are within another draw of prompts unless the interval says otherwise.

A side is a model folder (`data/nano/model`) or a bootstrap work folder and one of its stages
(`runs/boot:distill_on_policy`: the pipeline of that folder with the stage's newest checkpoint). Undistilled teachers
(`WORKDIR:pretrain`) are compared as they are used, at 32 steps with the bootstrap's guidance: `--steps 32
--guidance 3`.

Measured (2026-12-07, 2 CPU cores, 104 prompts x 8 seeds, ~40 s): the adopted base against its curated on-policy
stage continued to 640 steps (`dopsd nano bootstrap --workdir runs/boot-curated-640 --stage distill_on_policy
--on-policy-steps 640`, on a copy of data/nano/bootstrap) read 0.556 against 0.513, -0.043 [-0.069, -0.018]:

    .venv/bin/python benchmarks/nano_base_compare.py --baseline data/nano/model \\
        --candidate runs/boot-curated-640:distill_on_policy
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from dopsd.models.zimage import ZImageModel
from dopsd.nano.bootstrap import BootstrapConfig
from dopsd.nano.model import NANO_CAPTION_TOKENS, NANO_RESOLUTION
from evaluation.geneval.detection import Detector
from evaluation.geneval.intervals import family_differences
from evaluation.geneval.rules import GenevalScore, detector_colours, read_metadata
from evaluation.nano.base_report import checkpoint_model, scored_stage_progress
from evaluation.nano.detector import NanoDetector
from evaluation.nano.premise import blank_share
from evaluation.suite import rows_score, sampled_verdict_rows


def check_side(spec: str) -> None:
    """Refuse a side that names no model, before either side spends minutes sampling."""
    folder, _, stage = spec.partition(":")
    if not stage:
        if not (Path(folder) / "model_index.json").is_file():
            raise SystemExit(f"{spec}: no model_index.json there (a model folder, or WORKDIR:STAGE of a bootstrap)")
    else:
        try:
            scored_stage_progress(BootstrapConfig.from_workdir(folder), stage)
        except (FileNotFoundError, ValueError) as refusal:
            raise SystemExit(f"{spec}: {refusal}") from None


def load_side(spec: str) -> ZImageModel:
    """`MODEL_DIR` or `WORKDIR:STAGE` -> the model it names."""
    folder, _, stage = spec.partition(":")
    if stage:
        return checkpoint_model(folder, stage)
    return ZImageModel.load(folder, max_caption_tokens=NANO_CAPTION_TOKENS)


def scored_rows(
    model: ZImageModel, records: Sequence[dict], seeds: Sequence[int], detector: Detector, steps: int, guidance: float
) -> tuple[GenevalScore, list[dict]]:
    """GenEval-nano and the suite's verdict row of each image (each image judged once)."""
    rows = sampled_verdict_rows(model, records, seeds, steps, NANO_RESOLUTION, detector, detector_colours, guidance)
    return rows_score(rows), rows


def comparison_lines(
    baseline: str,
    candidate: str,
    records: list[dict],
    seeds: list[int],
    detector: Detector,
    steps: int = 4,
    guidance: float = 0.0,
) -> list[str]:
    """Both sides' scores sampled at `steps` with `guidance` (4 and none: the distilled model's deployed setting),
    then the paired difference overall and per family."""
    sides = (baseline, candidate)
    scored = {spec: scored_rows(load_side(spec), records, seeds, detector, steps, guidance) for spec in sides}
    guided = f", guidance {guidance:g}" if guidance else ""
    lines = [f"GenEval-nano @{steps}{guided}, {len(records)} prompts x {len(seeds)} seeds:"]
    for spec, (score, rows) in scored.items():
        tasks = ", ".join(f"{task} {value:.3f}" for task, value in score.tasks.items())
        # An empty canvas fails a prompt differently from a wrong object: worth telling apart when a side loses.
        lines.append(f"  {spec}: {score.overall:.3f} ({tasks}); no object drawn {blank_share(rows):.3f}")
    differences = family_differences([scored[baseline][1]], [scored[candidate][1]])
    lines.append("candidate - baseline, 95% over prompts:")
    lines += [f"  {tag}: {d.difference:+.3f} [{d.low:+.3f}, {d.high:+.3f}]" for tag, d in differences.items()]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="MODEL_DIR or WORKDIR:STAGE")
    parser.add_argument("--candidate", required=True, help="MODEL_DIR or WORKDIR:STAGE")
    parser.add_argument("--prompts", default="data/nano/world/base_prompts.jsonl", help="held-out GenEval-nano prompts")
    parser.add_argument("--seeds", type=int, default=8, help="noise seeds per prompt (0..N-1)")
    parser.add_argument("--steps", type=int, default=4, help="Euler steps (32 for an undistilled teacher)")
    parser.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance (3 for the teacher)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for side in (args.baseline, args.candidate):
        check_side(side)
    torch.set_num_threads(args.threads)
    records = read_metadata(args.prompts)
    seeds, detector = list(range(args.seeds)), NanoDetector.load()
    lines = comparison_lines(args.baseline, args.candidate, records, seeds, detector, args.steps, args.guidance)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
