"""GenEval's Mask2Former detector on a tiny random-weight model with the real COCO classes, loaded from a folder."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

from evaluation.geneval.mask2former import (
    COCO_INSTANCE_LABELS,
    GENEVAL_OBJECTS,
    Mask2FormerDetector,
    build_tiny_mask2former,
    geneval_names,
)
from evaluation.geneval.rules import THRESHOLD, evaluate_image, read_metadata
from evaluation.unavailable import MetricUnavailable

GENEVAL = Path(__file__).resolve().parents[2] / "shared" / "geneval"
SIZES = ((128, 96), (128, 96), (60, 80))
"""(width, height) of the test images: two share a size, so a batch of three holds a two-image forward pass."""


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_mask2former(tmp_path_factory.mktemp("tiny_mask2former"))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


@pytest.fixture(scope="module")
def detections(tiny_path, images):
    return Mask2FormerDetector(tiny_path, batch_size=3, min_score=0.0).detect(images)


def record(prompt):
    return next(r for r in read_metadata(GENEVAL / "evaluation_metadata.jsonl") if r["prompt"] == prompt)


def test_vocabulary_is_genevals_object_list_and_covers_the_metadata():
    assert tuple((GENEVAL / "object_names.txt").read_text().splitlines()) == GENEVAL_OBJECTS
    metadata = read_metadata(GENEVAL / "evaluation_metadata.jsonl")
    classes = {c["class"] for r in metadata for key in ("include", "exclude") for c in r.get(key, [])}
    assert classes <= set(GENEVAL_OBJECTS)


def test_coco_and_pascal_spellings_map_to_geneval_names():
    assert geneval_names(dict(enumerate(COCO_INSTANCE_LABELS))) == dict(enumerate(GENEVAL_OBJECTS))
    pascal = {"motorcycle": "motorbike", "couch": "sofa", "potted plant": "pottedplant", "tv": "tvmonitor"}
    names = geneval_names({i: pascal.get(name, name.replace(" ", "_")) for i, name in enumerate(GENEVAL_OBJECTS)})
    assert names == dict(enumerate(GENEVAL_OBJECTS))


def test_classes_outside_genevals_vocabulary_fail_at_load():
    labels = dict(enumerate(COCO_INSTANCE_LABELS))
    with pytest.raises(ValueError, match=r"no GenEval name \['wall'\].*no class \['toothbrush'\]"):
        geneval_names({**labels, 79: "wall"})


def test_missing_folder_is_unavailable_and_named(tmp_path):
    missing = tmp_path / "mask2former-swin-s-coco-instance"
    with pytest.raises(MetricUnavailable, match=str(missing)):
        Mask2FormerDetector(missing)


def test_detections_per_image_lie_inside_it_with_its_masks(images, detections):
    assert len(detections) == len(images)
    for image, found in zip(images, detections, strict=True):
        width, height = image.size
        assert found
        for d in found:
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            assert d.mask.shape == (height, width) and d.mask.dtype == bool
            assert d.mask[int(y0) : int(y1), int(x0) : int(x1)].sum() == d.mask.sum()
            assert 0 <= d.score <= 1 and d.cls in GENEVAL_OBJECTS
        assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)


def test_batch_size_does_not_change_detections(tiny_path, images, detections):
    one_by_one = Mask2FormerDetector(tiny_path, batch_size=1, min_score=0.0).detect(images)
    for batched, single in zip(detections, one_by_one, strict=True):
        assert [(d.cls, d.box) for d in batched] == [(d.cls, d.box) for d in single]
        assert [d.score for d in batched] == pytest.approx([d.score for d in single], abs=1e-5)
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(batched, single, strict=True))


def test_random_weights_find_nothing_genevals_threshold_keeps(images, detections):
    assert max(d.score for found in detections for d in found) < THRESHOLD
    verdict = evaluate_image(images[0], detections[0], record("a photo of a toilet and a computer mouse"))
    assert not verdict.correct and verdict.reason == "expected toilet>=1, found 0\nexpected computer mouse>=1, found 0"


def test_a_confident_coco_mouse_passes_genevals_computer_mouse_prompt(tiny_path, tmp_path, images):
    model = Mask2FormerForUniversalSegmentation.from_pretrained(tiny_path, use_safetensors=True)
    with torch.no_grad():  # a model sure that every query is COCO's "mouse"
        model.class_predictor.bias[COCO_INSTANCE_LABELS.index("mouse")] = 30.0
    model.save_pretrained(tmp_path)
    Mask2FormerImageProcessor.from_pretrained(tiny_path).save_pretrained(tmp_path)
    found = Mask2FormerDetector(tmp_path).detect(images[:1])[0]
    assert found and {d.cls for d in found} == {"computer mouse"} and min(d.score for d in found) > THRESHOLD
    assert evaluate_image(images[0], found, record("a photo of a computer mouse")).correct
    verdict = evaluate_image(images[0], found, record("a photo of a toilet and a computer mouse"))
    assert verdict.reason == "expected toilet>=1, found 0"
