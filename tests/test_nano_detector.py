"""The committed nano detector on held-out renders, and its segmentation on hand-built scenes."""

import pytest
from PIL import Image

from dopsd.nano.world import Scene, WorldObject, render
from evaluation.geneval.rules import evaluate_image
from evaluation.nano.detector import NanoDetector, segment
from evaluation.nano.train_detector import validate, world_scenes


@pytest.fixture(scope="module")
def detector():
    return NanoDetector.load()


def test_per_object_accuracy_on_held_out_renders(detector):
    result = validate(detector, world_scenes(150, seed=777))
    assert result.objects > 250
    assert result.found == 1.0 and result.extra_detections == 0
    assert result.all_attributes >= 0.98, result


def test_segmentation_separates_objects_and_ignores_background():
    scene = Scene(
        (
            WorldObject("ring", "white", "striped", radius=10, x=15, y=15),
            WorldObject("star", "black", "dotted", radius=9, x=45, y=45),
        )
    )
    components = segment(render(scene))
    assert len(components) == 2
    assert segment(Image.new("RGB", (64, 64), (128, 128, 128))) == []


def test_detections_feed_the_geneval_rules(detector):
    scene = Scene(
        (WorldObject("circle", "red", radius=9, x=14, y=32), WorldObject("square", "blue", radius=9, x=48, y=32))
    )
    image = render(scene)
    (detections,) = detector.detect([image])
    meta = {
        "tag": "position",
        "prompt": "a photo of a square right of a circle",
        "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["right of", 0]}],
    }
    assert evaluate_image(image, detections, meta).correct
    wrong = {
        **meta,
        "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["right of", 0]}],
    }
    assert not evaluate_image(image, detections, wrong).correct


def test_missing_weights_say_how_to_build_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="dopsd nano detector"):
        NanoDetector.load(tmp_path / "none.safetensors")
