"""GenEval-nano: sample a FewStepModel on GenEval-format prompts, detect with the nano detector, score with the
protocol's rules. The same rules engine scores real GenEval with a COCO detector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from PIL import Image

from dopsd.models.base import FewStepModel
from dopsd.sampling import sample_images
from evaluation.geneval.detection import Detection, Detector
from evaluation.geneval.rules import GenevalScore, Verdict, aggregate, evaluate_image

if TYPE_CHECKING:
    from dopsd.nano.bootstrap import Judge


def score_images(
    images: Sequence[Image.Image], records: Sequence[dict], detector: Detector
) -> tuple[GenevalScore, list[Verdict]]:
    """Score images against the records they were made for (images and records in the same order)."""
    return score_detections(images, detector.detect(images), records)


def score_detections(
    images: Sequence[Image.Image], detections: Sequence[Sequence[Detection]], records: Sequence[dict]
) -> tuple[GenevalScore, list[Verdict]]:
    """Score images whose detections are already known."""
    verdicts = [evaluate_image(im, d, r) for im, d, r in zip(images, detections, records, strict=True)]
    return aggregate(verdicts), verdicts


def rules_judge(detector: Detector) -> Judge:
    """A judge of whether each image draws its GenEval record right, by `detector` and the rules: the nano
    bootstrap's distillation keeps only the teacher endpoints it finds right (`curate_on_policy`, and with
    `curate_distill` the straight-line stage too)."""

    def judge(images: list[Image.Image], records: list[dict]) -> list[bool]:
        return [verdict.correct for verdict in score_images(images, records, detector)[1]]

    return judge


def geneval_nano(
    model: FewStepModel,
    records: Sequence[dict],
    seeds: Sequence[int],
    steps: int,
    detector: Detector,
    resolution: int,
    guidance: float = 0.0,
) -> tuple[GenevalScore, list[Verdict], list[Image.Image]]:
    """Sample every prompt at every seed with the prompt alone (the deployed setting) and score the images.
    `guidance`: classifier-free guidance, for an undistilled model (see euler_sample)."""
    contexts = model.encode_student([r["prompt"] for r in records])
    images = sample_images(model, contexts, seeds, steps, resolution, guidance=guidance)
    expanded = [r for r in records for _ in seeds]
    score, verdicts = score_images(images, expanded, detector)
    return score, verdicts, images
