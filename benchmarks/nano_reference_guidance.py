"""Does reference guidance strengthen the teacher premise on the nano base?

A D-OPSD teacher sees [reference image + caption]; the concept no word names reaches it only through the image.
Reference guidance (`TrainConfig.teacher_guidance`, w) pushes the teacher's velocity away from its own caption-only
prediction, v + w * (v - v_caption), so what the image adds weighs w + 1 times. This measures, for each w, the
teacher premise of `reports/nano_base.md` (`evaluation.nano.premise.teacher_premise`) on every concept pack at
the deployed 4 steps: how often the teacher's samples show the pack's concept, whole-prompt accuracy, and whether
the layouts still follow the noise (spread across seeds, copies of the reference). w = 0 is the paper's teacher.

    .venv/bin/python benchmarks/nano_reference_guidance.py --weights 0,1,2 --seeds 0-7 \
        --out reports/nano_reference_guidance.md
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dopsd.config import comma_separated, parse_dataclass_args
from dopsd.models.zimage import ZImageModel
from dopsd.nano.bootstrap import machine_description
from dopsd.nano.model import NANO_CAPTION_TOKENS, NANO_RESOLUTION
from dopsd.nano.packs import PACKS
from dopsd.preview import parse_seeds
from evaluation.nano.detector import NanoDetector
from evaluation.nano.premise import teacher_premise


@dataclass
class ReferenceGuidanceConfig:
    model: str = "data/nano/model"
    """The nano base (a ZImagePipeline folder with its teacher encoder)."""
    weights: str = "0,1,2"
    """Comma-separated reference guidance weights w to measure (0: the unguided teacher)."""
    seeds: str = "0-7"
    """Sampling seeds per prompt (each prompt and seed has its own noise), e.g. 0-7 or 0,3,5."""
    prompts: int = 24
    """Prompts per concept pack."""
    steps: int = 4
    """Sampling steps (the deployed setting)."""
    grid_packs: str = "star"
    """Comma-separated packs whose sample grids are written, one per weight (about 1 MB each)."""
    threads: int = 2
    """Torch CPU threads."""
    out: str = "reports/nano_reference_guidance.md"
    """Markdown report (a JSON twin is written beside it; sample grids in a folder of its name)."""


def grid_name(pack: str, weight: float) -> str:
    """The file, in the report's folder, of one pack's samples at one weight."""
    return f"{pack}_w{weight:g}.png"


def main(config: ReferenceGuidanceConfig, command: str) -> list[dict]:
    torch.set_num_threads(config.threads)
    model = ZImageModel.load(config.model, max_caption_tokens=NANO_CAPTION_TOKENS)
    detector = NanoDetector.load()
    seeds = parse_seeds(config.seeds)
    grid_packs = comma_separated(config.grid_packs)
    out = Path(config.out)
    grids = out.with_suffix("")
    grids.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = []
    for weight in [float(w) for w in comma_separated(config.weights)]:
        for pack in PACKS:
            result = teacher_premise(
                model,
                pack,
                detector,
                seeds,
                config.steps,
                config.prompts,
                NANO_RESOLUTION,
                grid=grids / grid_name(pack.name, weight) if pack.name in grid_packs else None,
                reference_guidance=weight,
            )
            rows.append({"weight": weight, **dataclasses.asdict(result)})
            print(json.dumps(rows[-1]), flush=True)
    seconds = time.perf_counter() - started
    machine = machine_description(torch.device("cpu"), config.threads)
    out.with_suffix(".json").write_text(json.dumps({"config": dataclasses.asdict(config), "rows": rows}, indent=2))
    lines = [
        "# Reference guidance and the teacher premise",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}; {seconds:.0f} s; {time.strftime('%F')}.  ",
        f"Model: `{config.model}`; {config.prompts} prompts per pack x {len(seeds)} seeds at {config.steps} steps.",
        "",
        "Concept shown: share of samples in which the detector finds an object carrying the pack's concept. Whole "
        "prompt: the GenEval rules on the whole pack prompt. Spread: mean distance (px) between one prompt's samples "
        "across seeds. Copies: samples centred within 2 px of their reference. Student: the caption alone.",
        "",
        "| w | pack | teacher: concept shown | teacher: whole prompt | student: concept shown | spread px | copies |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['weight']:g} | {r['pack']} | {r['teacher_concept']:.3f} | {r['teacher_accuracy']:.3f} | "
        f"{r['student_concept']:.3f} | {r['layout_spread']:.1f} | {r['copies']:.3f} |"
        for r in rows
    ]
    links = ", ".join(
        f"[{r['pack']}, w {r['weight']:g}]({grids.name}/{grid_name(r['pack'], r['weight'])})"
        for r in rows
        if r["pack"] in grid_packs
    )
    lines += ["", f"Samples (rows: prompts; columns: reference, teacher per seed, student per seed): {links}"]
    out.write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    config = parse_dataclass_args(ReferenceGuidanceConfig, sys.argv[1:], __doc__.split("\n\n")[0])
    main(config, shlex.join(["python", "benchmarks/nano_reference_guidance.py", *sys.argv[1:]]))
