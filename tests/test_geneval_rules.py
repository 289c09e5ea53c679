"""GenEval rules on hand-made detections: every rule and boundary, with the protocol's verdict and reason."""

from pathlib import Path

import pytest
from PIL import Image

from evaluation.geneval.detection import Detection
from evaluation.geneval.rules import (
    aggregate,
    evaluate_image,
    keep_detections,
    read_metadata,
    relation_outcome,
    relative_position,
)

IMAGE = Image.new("RGB", (100, 100))
METADATA = Path(__file__).resolve().parents[2] / "shared" / "geneval" / "evaluation_metadata.jsonl"


def det(cls, score=0.95, box=(10, 10, 20, 20), colour="red"):
    return Detection(cls=cls, box=box, score=score, colour=colour)


def judge(detections, metadata):
    return evaluate_image(IMAGE, detections, {"prompt": "p", **metadata})


def test_threshold_is_strict_and_counting_uses_point_nine():
    single = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    assert not judge([det("cat", 0.3)], single).correct
    assert judge([det("cat", 0.3001)], single).correct
    counting = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}
    verdict = judge([det("cat", 0.95), det("cat", 0.9), det("cat", 0.5)], counting)
    assert not verdict.correct and verdict.reason == "expected cat>=2, found 1"
    assert judge([det("cat", 0.95), det("cat", 0.91), det("cat", 0.5)], counting).correct


def test_at_most_sixteen_most_confident_first():
    kept = keep_detections([det("cat", 0.4 + i * 0.01) for i in range(20)], "single_object")["cat"]
    assert len(kept) == 16 and kept[0].score == pytest.approx(0.59) and kept[-1].score == pytest.approx(0.44)


def test_exclude_fails_when_the_count_is_reached():
    meta = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}
    verdict = judge([det("cat", 0.99)] * 3, meta)
    assert not verdict.correct and verdict.reason == "expected cat<3, found 3"


def test_only_the_top_count_objects_are_colour_checked():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert judge([det("car", 0.9, colour="red"), det("car", 0.8, colour="blue")], meta).correct
    verdict = judge([det("car", 0.9, colour="blue"), det("car", 0.8, colour="red")], meta)
    assert not verdict.correct
    assert verdict.reason == "expected red car>=1, found 0 red; and 1 blue"


def test_colour_classifier_is_a_parameter():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "green"}]}
    verdict = evaluate_image(IMAGE, [det("car", colour=None)], {"prompt": "p", **meta}, lambda im, ds, c: ["green"])
    assert verdict.correct


def test_position_shrink_and_direction():
    a, b = det("dog", box=(0, 40, 10, 50)), det("cat", box=(30, 40, 40, 50))
    assert relative_position(a, b) == {"left of"} and relative_position(b, a) == {"right of"}
    up, down = det("dog", box=(40, 0, 50, 10)), det("cat", box=(40, 30, 50, 40))
    assert relative_position(up, down) == {"above"} and relative_position(down, up) == {"below"}
    # centres 3 apart, each box 20 wide: the shrink (0.1 x 40 = 4) removes the offset entirely
    assert relative_position(det("dog", box=(0, 0, 20, 20)), det("cat", box=(3, 0, 23, 20))) == set()
    # a diagonal offset can carry two relations
    assert relative_position(det("dog", box=(0, 0, 10, 10)), det("cat", box=(50, 50, 60, 60))) == {"left of", "above"}


def test_position_against_every_target_and_failed_groups():
    meta = {
        "tag": "position",
        "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
    }
    cat, dog_right, dog_left = (
        det("cat", box=(0, 40, 10, 50)),
        det("dog", box=(60, 40, 70, 50)),
        det("dog", box=(0, 80, 2, 82)),
    )
    assert judge([cat, dog_right], meta).correct
    verdict = judge([det("cat", box=(60, 40, 70, 50)), det("dog", box=(0, 40, 10, 50))], meta)
    assert not verdict.correct and verdict.reason == "expected dog right of target, found left of target"
    verdict = judge([dog_right], meta)  # target group failed: it counts as missing
    assert verdict.reason == "expected cat>=1, found 0\nno target for dog to be right of"
    assert not judge([cat, dog_left], meta).correct


def test_relation_outcome_reads_where_the_named_object_landed():
    dog_left_of_cat = {
        "tag": "position",
        "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}],
    }
    cat = det("cat", box=(50, 40, 60, 50))

    def outcome(dog_box, *extra):
        return relation_outcome([cat, det("dog", box=dog_box), *extra], dog_left_of_cat)

    assert outcome((10, 40, 20, 50)) == "named side"
    assert outcome((80, 40, 90, 50)) == "opposite side"
    assert outcome((50, 80, 60, 90)) == "elsewhere"  # below, not beside
    assert outcome((52, 42, 62, 52)) == "elsewhere"  # too close to read a relation
    assert relation_outcome([cat], dog_left_of_cat) == "object missing"
    assert relation_outcome([cat, det("dog", score=0.2)], dog_left_of_cat) == "object missing"  # under threshold
    # The most confident detection of each class is the one read.
    assert outcome((80, 40, 90, 50), det("dog", score=0.99, box=(10, 40, 20, 50))) == "named side"


def test_aggregate_is_the_mean_of_task_accuracies():
    single = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    two = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    verdicts = [judge([det("cat")], single), judge([], single), judge([det("cat")], single), judge([det("cat")], two)]
    score = aggregate(verdicts)
    assert score.tasks == {"single_object": pytest.approx(2 / 3), "two_object": 0.0}
    assert score.overall == pytest.approx(1 / 3) and score.images == 4
    assert aggregate([]).overall is None


def test_the_public_metadata_parses_with_the_protocol_counts():
    records = read_metadata(METADATA)
    counts = {}
    for r in records:
        counts[r["tag"]] = counts.get(r["tag"], 0) + 1
    assert len(records) == 553
    assert counts == {
        "single_object": 80,
        "two_object": 99,
        "counting": 80,
        "colors": 94,
        "position": 100,
        "color_attr": 100,
    }


def test_bad_metadata_names_file_and_line(tmp_path):
    bad = tmp_path / "meta.jsonl"
    bad.write_text('{"tag": "colors", "include": [], "prompt": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"meta.jsonl:2: not JSON"):
        read_metadata(bad)
