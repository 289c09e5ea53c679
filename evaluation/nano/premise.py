"""The premise D-OPSD stands on, measured on the nano base before anything is fine-tuned.

Given [reference image + caption], the teacher must draw the pack's concept (a word it never learned) at the
student's own few-step schedule, and must not copy the reference: its layouts must follow its noise. The
reference is the prompt's scene laid out anew, as in pretraining; the student, given the prompt alone, is the
contrast (it does not know the word).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dopsd.models.zimage import ZImageModel
from dopsd.nano.packs import ConceptPack, pack_items
from dopsd.nano.world import relayout, render
from dopsd.sampling import sample_images
from evaluation.geneval.detection import Detection, Detector
from evaluation.geneval.rules import keep_detections
from evaluation.nano.geneval_nano import score_detections, score_images
from evaluation.suite import labelled_grid, seed_columns

COPY_DISTANCE = 2.0
"""Pixels: a sample whose foreground centre sits this close to the reference's counts as a copy."""


@dataclass
class PremiseResult:
    pack: str
    teacher_concept: float
    """Share of teacher samples in which the detector finds an object carrying the pack's concept (its shape,
    colour or texture), whatever else the prompt asks: does the teacher draw what it was shown?"""
    student_concept: float
    """The same with the prompt alone."""
    teacher_accuracy: float
    """Share of teacher samples the GenEval rules judge correct for the whole pack prompt (concept, counts,
    positions, other objects)."""
    student_accuracy: float
    """The same with the prompt alone."""
    layout_spread: float
    """Mean distance (pixels) between the foreground centres of one prompt's samples across seeds."""
    copies: float
    """Share of teacher samples whose foreground centre sits within COPY_DISTANCE of the reference's."""
    samples: int


def foreground_centre(image: Image.Image) -> np.ndarray:
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    mask = np.abs(array - np.median(border, axis=0)).max(-1) > 40
    if not mask.any():
        return np.array([np.nan, np.nan])
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


CONCEPT_FIELD = {"shape": "cls", "colour": "colour", "texture": "texture"}
"""Pack kind -> the detection field carrying its concept (also the key of an object in a suite verdict's `found`)."""


def shows_concept(pack: ConceptPack, detections: Sequence[Detection], tag: str) -> bool:
    """Whether a detection the GenEval rules would keep for a `tag` prompt carries the pack's concept."""
    kept = keep_detections(detections, tag).values()
    return any(getattr(detection, CONCEPT_FIELD[pack.kind]) == pack.word for found in kept for detection in found)


def objects_recorded(verdicts: Sequence[dict]) -> bool:
    """Whether there are suite verdict rows and every one records the objects found in its image (older rows do
    not, and say nothing of what was drawn)."""
    return bool(verdicts) and all("found" in row for row in verdicts)


def carries_concept(pack: ConceptPack, row: dict) -> bool:
    """Whether an object a suite verdict row found (`found`, the objects the rules kept) carries the pack's concept."""
    return any(found[CONCEPT_FIELD[pack.kind]] == pack.word for found in row["found"])


def concept_shown(pack: ConceptPack, verdicts: Sequence[dict]) -> float | None:
    """Share of suite verdict rows (`evaluation.suite`) whose kept objects carry the pack's concept. On prompts that
    do not name it, its leak: a concept learnt as "draw it whatever the prompt" leaks onto prompts that never asked
    for it, and takes their objects' place. On the pack's own prompts, how often it is drawn at all, whatever else
    the prompt asks (the teacher premise's `teacher_concept`, for any model). None when the rows do not record their
    objects."""
    if not objects_recorded(verdicts):
        return None
    return float(np.mean([carries_concept(pack, row) for row in verdicts]))


def lost_to_concept(pack: ConceptPack, verdicts: Sequence[dict]) -> float | None:
    """Share of suite verdict rows judged wrong whose kept objects carry the pack's concept: on prompts that do not
    name it, the samples its leak cost (the concept drawn in an asked-for object's place, or beside them). None when
    the rows do not record their objects."""
    if not objects_recorded(verdicts):
        return None
    return float(np.mean([not row["correct"] and carries_concept(pack, row) for row in verdicts]))


def blank_share(verdicts: Sequence[dict]) -> float | None:
    """Share of suite verdict rows whose image shows no object the rules keep, only the background: on the nano world
    the chained rounds that try to keep earlier concepts lose objects this way, at the top sampling states that no
    loss reaches (benchmarks/adapter_steps.py). None when the rows do not record their objects."""
    if not objects_recorded(verdicts):
        return None
    return float(np.mean([not row["found"] for row in verdicts]))


def concept_share(pack: ConceptPack, detections: Sequence[Sequence[Detection]], records: Sequence[dict]) -> float:
    """Share of images (detections and records in the same order) that show the pack's concept."""
    return float(np.mean([shows_concept(pack, d, r["tag"]) for d, r in zip(detections, records, strict=True)]))


def teacher_premise(
    model: ZImageModel,
    pack: ConceptPack,
    detector: Detector,
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 4,
    prompts: int = 24,
    resolution: int = 64,
    seed: int = 0,
    guidance: float = 0.0,
    grid: str | Path | None = None,
    reference_guidance: float = 0.0,
) -> PremiseResult:
    """`grid`: where to write the samples as a PNG, one row per prompt: the reference, the teacher's sample for each
    seed, then the student's. `reference_guidance`: the teacher as a D-OPSD round with that `teacher_guidance`
    sees it, guided away from the caption alone (not combined with `guidance`, which guides away from the empty
    prompt)."""
    if guidance > 0 and reference_guidance > 0:
        raise ValueError("choose classifier-free guidance or reference guidance, not both")
    items = pack_items(pack, prompts)
    rng = np.random.default_rng(seed)
    references = [render(relayout(item.scene, rng)) for item in items]
    captions = [item.caption for item in items]
    records = [item.metadata for item in items for _ in seeds]
    teacher_contexts, student_contexts = model.encode_teacher(captions, references), model.encode_student(captions)
    teacher_images = sample_images(
        model,
        teacher_contexts,
        seeds,
        steps,
        resolution,
        guidance=reference_guidance or guidance,
        negative_contexts=student_contexts if reference_guidance > 0 else None,
    )
    student_images = sample_images(model, student_contexts, seeds, steps, resolution, guidance=guidance)
    teacher_detections, student_detections = detector.detect(teacher_images), detector.detect(student_images)
    teacher_score, _ = score_detections(teacher_images, teacher_detections, records)
    student_score, _ = score_detections(student_images, student_detections, records)
    if grid is not None:
        columns = {"reference": references, **seed_columns("teacher", teacher_images, seeds)}
        labelled_grid(columns | seed_columns("student", student_images, seeds)).save(grid)
    centres = np.array([foreground_centre(im) for im in teacher_images]).reshape(len(items), len(seeds), 2)
    spreads = [
        np.linalg.norm(centres[i, a] - centres[i, b])
        for i in range(len(items))
        for a, b in itertools.combinations(range(len(seeds)), 2)
    ]
    reference_centres = np.array([foreground_centre(r) for r in references])
    distances = np.linalg.norm(centres - reference_centres[:, None, :], axis=-1)
    return PremiseResult(
        pack=pack.name,
        teacher_concept=concept_share(pack, teacher_detections, records),
        student_concept=concept_share(pack, student_detections, records),
        teacher_accuracy=teacher_score.overall or 0.0,
        student_accuracy=student_score.overall or 0.0,
        layout_spread=float(np.nanmean(spreads)) if spreads else float("nan"),
        copies=float(np.mean(distances < COPY_DISTANCE)),
        samples=len(teacher_images),
    )


def teacher_example_accuracy(
    model: ZImageModel,
    images: Sequence[Image.Image],
    records: Sequence[dict],
    detector: Detector,
    seeds: Sequence[int] = (0, 1, 2, 3),
    steps: int = 4,
    resolution: int = 64,
) -> list[float]:
    """Per training example (its image and the GenEval record of its caption, in the same order): the share of the
    teacher's samples, from [that image + its caption] as a D-OPSD round's teacher first sees it, that the rules
    judge right for the whole caption. Where the teacher draws a caption wrong (a count, a colour, a position), a
    round distils the wrong drawing into the student."""
    contexts = model.encode_teacher([record["prompt"] for record in records], list(images))
    samples = sample_images(model, contexts, seeds, steps, resolution)
    _, verdicts = score_images(samples, [record for record in records for _ in seeds], detector)
    correct = np.array([verdict.correct for verdict in verdicts], dtype=np.float64).reshape(len(records), len(seeds))
    return correct.mean(axis=1).tolist()
