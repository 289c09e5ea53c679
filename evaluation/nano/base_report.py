"""reports/nano_base.md: is the nano base good enough to fine-tune, and does the premise hold?

Measured: GenEval-nano of the distilled model at 4 steps, of the undistilled (pretrained) model at 4 and 32
steps, and the teacher premise on each concept pack. Targets (issue 3): distilled@4 >= 0.75; undistilled@4
clearly below undistilled@32; distilled@4 within 0.05 of undistilled@32; teacher concept accuracy >= 0.7 with
layouts that follow the noise.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from dopsd.models.zimage import ZImageModel
from dopsd.nano.bootstrap import BootstrapConfig, checkpoint_transformer, stage_progress
from dopsd.nano.model import NANO_CAPTION_TOKENS, NANO_RESOLUTION
from dopsd.nano.packs import PACKS
from dopsd.nano.world import render
from evaluation.geneval.detection import Detector
from evaluation.geneval.rules import TASKS, GenevalScore, read_metadata
from evaluation.nano.geneval_nano import geneval_nano
from evaluation.nano.premise import PremiseResult, teacher_premise
from evaluation.nano.train_detector import validate, world_scenes
from evaluation.prompt_sets import first_per_task
from evaluation.suite import labelled_grid, seed_columns


def base_metrics(
    model_dir: str | Path,
    undistilled_transformer: dict[str, torch.Tensor],
    prompts: str | Path,
    detector: Detector,
    seeds: Sequence[int] = (0, 1, 2),
    guidance: float = 0.0,
    grids: Path | None = None,
) -> dict:
    """`undistilled_transformer`: the pretraining stage's weights, scored at 4 and 32 steps beside the distilled
    model of `model_dir`. `guidance`: the undistilled model's classifier-free guidance (the distilled model samples
    without). `grids`: a folder for each pack's premise samples, `premise_<pack>.png`."""
    model = ZImageModel.load(str(model_dir), max_caption_tokens=NANO_CAPTION_TOKENS)
    records = read_metadata(prompts)
    results: dict[str, dict] = {}

    def score(name: str, steps: int, guidance: float = 0.0) -> None:
        geneval, _, _ = geneval_nano(model, records, seeds, steps, detector, NANO_RESOLUTION, guidance)
        results[name] = dataclasses.asdict(geneval)

    scenes = world_scenes(200, seed=4242)
    reconstructions = model.to_images(model.to_latents([render(sc) for sc in scenes], NANO_RESOLUTION, NANO_RESOLUTION))
    vae = dataclasses.asdict(validate(detector, scenes, reconstructions))
    score("distilled@4", 4)
    premise = [
        dataclasses.asdict(
            teacher_premise(model, pack, detector, seeds, grid=grids / f"premise_{pack.name}.png" if grids else None)
        )
        for pack in PACKS
    ]
    model.pipeline.transformer.load_state_dict(undistilled_transformer)
    score("undistilled@4", 4, guidance)
    score("undistilled@32", 32, guidance)
    return {
        "undistilled_guidance": guidance,
        "geneval_nano": results,
        "premise": premise,
        "vae_reconstruction": vae,
        "prompts": len(records),
        "seeds": list(seeds),
    }


def render_markdown(metrics: dict, command: str, bootstrap: dict, grids: str) -> str:
    """`grids`: the folder of the premise sample grids, relative to the report."""
    g = metrics["geneval_nano"]
    lines = [
        "# Nano base: GenEval-nano and the teacher premise",
        "",
        f"Command: `{command}`  ",
        f"{metrics['prompts']} held-out prompts x {len(metrics['seeds'])} seeds; detector + GenEval rules. The "
        f"undistilled model samples with classifier-free guidance {metrics['undistilled_guidance']} (its 32-step "
        "samples taught the distilled one), the distilled model without.",
        "",
        "| model | steps | overall | " + " | ".join(TASKS) + " |",
        "|---|---|---|" + "---|" * len(TASKS),
    ]
    for name, result in g.items():
        score = GenevalScore(**result)
        model, steps = name.split("@")
        tasks = " | ".join(f"{score.tasks.get(t, float('nan')):.3f}" for t in TASKS)
        lines.append(f"| {model} | {steps} | {score.overall:.3f} | {tasks} |")
    lines += [
        "",
        "Teacher: [reference + caption], student: the caption alone, both at 4 steps. Concept shown: the detector "
        "finds an object with the pack's shape, colour or texture; prompt correct: the GenEval rules accept the "
        "whole prompt (counts, positions, other objects).",
        "",
        "| pack | concept shown: teacher | student | prompt correct: teacher | student | layout spread px | copies "
        "| samples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in metrics["premise"]:
        p = PremiseResult(**row)
        lines.append(
            f"| {p.pack} | {p.teacher_concept:.3f} | {p.student_concept:.3f} | {p.teacher_accuracy:.3f} | "
            f"{p.student_accuracy:.3f} | {p.layout_spread:.1f} | {p.copies:.3f} | "
            f"[grid]({grids}/premise_{p.pack}.png) |"
        )
    vae = metrics["vae_reconstruction"]
    lines += [
        "",
        f"VAE round trip of {vae['objects']} held-out objects, read by the detector (the ceiling for samples): "
        f"shape {vae['shape']:.3f}, colour {vae['colour']:.3f}, texture {vae['texture']:.3f}, "
        f"all three {vae['all_attributes']:.3f}.",
    ]
    d4, u4, u32 = (g[k]["overall"] for k in ("distilled@4", "undistilled@4", "undistilled@32"))
    premise_ok = all(r["teacher_concept"] >= 0.7 and r["copies"] < 0.5 for r in metrics["premise"])
    lines += [
        "",
        "Targets:",
        f"- distilled@4 >= 0.75: {'met' if d4 >= 0.75 else 'NOT met'} ({d4:.3f})",
        f"- undistilled@4 clearly below undistilled@32: {'met' if u32 - u4 >= 0.05 else 'NOT met'} "
        f"({u4:.3f} vs {u32:.3f})",
        f"- distilled@4 within 0.05 of undistilled@32: {'met' if abs(d4 - u32) <= 0.05 else 'NOT met'}",
        f"- teacher shows each pack's concept (>= 0.7) without copying: {'met' if premise_ok else 'NOT met'}",
        "",
        "Bootstrap (training seconds of each stage, summed over every sitting):",
        *[f"- {stage}: {info['seconds']} s on {info['machine']}" for stage, info in bootstrap.items()],
    ]
    return "\n".join(lines) + "\n"


def write_base_report(
    workdir: str | Path,
    prompts: str | Path,
    detector: Detector,
    out: str | Path,
    command: str,
    seeds: Sequence[int] = (0, 1, 2),
) -> dict:
    config = BootstrapConfig.from_workdir(workdir)
    out = Path(out)
    grids = out.parent / f"{out.stem}_grids"
    grids.mkdir(parents=True, exist_ok=True)
    metrics = base_metrics(
        config.model_dir, checkpoint_transformer(config, "pretrain"), prompts, detector, seeds, config.guidance, grids
    )
    bootstrap = json.loads((Path(workdir) / "done.json").read_text())
    out.write_text(render_markdown(metrics, command, bootstrap, grids.name))
    out.with_suffix(".json").write_text(json.dumps(metrics, indent=2))
    return metrics


STAGE_STEPS = {"pretrain": 32, "distill": 4, "distill_on_policy": 4}
"""The step count each stage's model is meant to be sampled at."""


def scored_stage_progress(config: BootstrapConfig, stage: str) -> dict:
    """`stage_progress` of a stage that has a model to score; ValueError when it has none, or no checkpoint yet."""
    if stage not in STAGE_STEPS:
        raise ValueError(f"stage {stage!r} has no model to score (one of {list(STAGE_STEPS)})")
    progress = stage_progress(config, stage)
    if not progress:
        raise ValueError(f"no {stage} checkpoint in {config.stage_dir(stage)}")
    return progress


def checkpoint_model(workdir: str | Path, stage: str) -> ZImageModel:
    """The work folder's pipeline with the transformer of `stage`'s newest checkpoint."""
    config = BootstrapConfig.from_workdir(workdir)
    model = ZImageModel.load(str(config.model_dir), max_caption_tokens=NANO_CAPTION_TOKENS)
    model.pipeline.transformer.load_state_dict(checkpoint_transformer(config, stage))
    return model


def probe_lines(result: dict, seeds: int) -> list[str]:
    """A probe's result as `dopsd nano probe` prints it."""
    lines = [
        f"{result['stage']} step {result['step']} ({result['prompts']} prompts x {seeds} seeds, "
        f"guidance {result['guidance']}):"
    ]
    for steps in (32, 4):
        score = result[f"geneval_nano@{steps}"]
        tasks = ", ".join(f"{task} {value:.2f}" for task, value in score["tasks"].items())
        lines.append(f"  GenEval-nano @{steps}: {score['overall']:.3f} ({tasks})")
    lines += [
        f"  premise {row['pack']}: concept shown by teacher {row['teacher_concept']:.3f}, student "
        f"{row['student_concept']:.3f}; prompt correct teacher {row['teacher_accuracy']:.3f}, student "
        f"{row['student_accuracy']:.3f}; layout spread {row['layout_spread']:.1f} px, copies {row['copies']:.2f}"
        for row in result["premise"]
    ]
    return lines


def probe_checkpoint(
    workdir: str | Path,
    stage: str,
    prompts: str | Path,
    detector: Detector,
    seeds: Sequence[int] = (0, 1),
    limit: int = 5,
    premise_prompts: int = 12,
    guidance: float | None = None,
) -> dict:
    """Score a stage's newest checkpoint while the bootstrap runs: GenEval-nano at 32 and 4 steps on the first
    `limit` prompts of each task, and the teacher premise per pack at the stage's own step count, all with
    `guidance` (default: the bootstrap's for pretraining, none for the distilled model). Each probe is
    appended to `<workdir>/probes.jsonl`, so the trend of a long run is kept, and its samples are drawn in
    `<workdir>/probes/<stage>_<step>_{geneval,<pack>}.png`."""
    workdir = Path(workdir)
    config = BootstrapConfig.from_workdir(workdir)
    progress = scored_stage_progress(config, stage)
    model = checkpoint_model(workdir, stage)
    records = first_per_task(read_metadata(prompts), limit)
    if guidance is None:
        guidance = config.guidance if stage == "pretrain" else 0.0
    result: dict = {"stage": stage, **progress, "prompts": len(records)}
    result["guidance"] = guidance
    grids = workdir / "probes"
    grids.mkdir(exist_ok=True)
    columns: dict[str, list[Image.Image]] = {}
    for steps in (32, 4):
        geneval, _, images = geneval_nano(model, records, seeds, steps, detector, NANO_RESOLUTION, guidance)
        result[f"geneval_nano@{steps}"] = dataclasses.asdict(geneval)
        columns |= seed_columns(f"@{steps}", images, seeds)
    # One row per prompt, in the prompts' order: where a task family fails, the samples show how.
    labelled_grid(columns).save(grids / f"{stage}_{result['step']}_geneval.png")
    result["premise"] = [
        dataclasses.asdict(
            teacher_premise(
                model,
                pack,
                detector,
                seeds,
                STAGE_STEPS[stage],
                premise_prompts,
                NANO_RESOLUTION,
                guidance=guidance,
                grid=grids / f"{stage}_{result['step']}_{pack.name}.png",
            )
        )
        for pack in PACKS
    ]
    with (workdir / "probes.jsonl").open("a") as probes:
        probes.write(json.dumps(result) + "\n")
    return result
