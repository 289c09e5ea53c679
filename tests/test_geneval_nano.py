"""GenEval-nano end to end: ground-truth renders score near the ceiling, a model's samples run through the same path."""

import dataclasses

import numpy as np
import pytest

from dopsd.models import ZImageModel
from dopsd.nano.packs import PACKS, counterfactual, pack_items
from dopsd.nano.scenes import TASKS, SceneSampler
from dopsd.nano.world import Scene, Vocabulary, render
from dopsd.sampling import sample_images
from evaluation.geneval.rules import detector_colours
from evaluation.nano.detector import NanoDetector
from evaluation.nano.geneval_nano import geneval_nano, rules_judge, score_images
from evaluation.nano.premise import blank_share, concept_shown, lost_to_concept, shows_concept
from evaluation.suite import verdict_row


@pytest.fixture(scope="module")
def detector():
    return NanoDetector.load()


def test_renders_of_each_prompt_score_at_the_ceiling(detector):
    sampler = SceneSampler(Vocabulary(), np.random.default_rng(3))
    items = [sampler.sample(TASKS[i % len(TASKS)]) for i in range(120)]
    score, verdicts = score_images([render(i.scene) for i in items], [i.metadata for i in items], detector)
    assert set(score.tasks) == set(TASKS)
    assert score.overall >= 0.95, [v.reason for v in verdicts if not v.correct]


def test_the_rules_judge_finds_renders_of_the_records_right_and_an_empty_scene_wrong(detector):
    sampler = SceneSampler(Vocabulary(), np.random.default_rng(5))
    items = [sampler.sample(task) for task in TASKS]
    renders = [render(item.scene) for item in items]
    records = [item.metadata for item in items]
    verdicts = [v.correct for v in score_images(renders, records, detector)[1]]
    assert rules_judge(detector)(renders, records) == verdicts
    assert sum(verdicts) >= len(TASKS) - 1
    empty = render(Scene((), size=items[0].scene.size))  # the world's background, nothing drawn
    assert not any(rules_judge(detector)([empty] * len(records), records))


def test_the_concept_is_found_in_renders_of_its_pack_and_not_in_their_counterfactuals(detector):
    # the pack's scenes with the concept swapped for a base attribute: the same layouts, nothing new to find
    for pack in PACKS:
        items = pack_items(pack)
        replaced, captions = zip(*(counterfactual(pack, item) for item in items), strict=True)
        assert not any(pack.word in caption.split() or pack.word + "s" in caption.split() for caption in captions)
        assert all(caption.startswith("a photo of ") for caption in captions)
        assert all(
            f"{article} {word}" not in caption
            for caption in captions
            for article, word in (("a", "orange"), ("an", "blue"), ("an", "square"))
        )
        tags = [item.metadata["tag"] for item in items]
        for scenes, shown in (([item.scene for item in items], True), (replaced, False)):
            images = [render(scene) for scene in scenes]
            found = detector.detect(images)
            share = np.mean([shows_concept(pack, d, tag) for d, tag in zip(found, tags, strict=True)])
            # The suite's verdict rows keep the objects found, so the concept is read from them as from detections.
            rows = [
                verdict_row(image, d, item.metadata, 0, detector_colours)
                for image, d, item in zip(images, found, items, strict=True)
            ]
            assert concept_shown(pack, rows) == share
            assert share >= 0.95 if shown else share == 0, pack.name
        assert concept_shown(pack, [{k: v for k, v in row.items() if k != "found"} for row in rows]) is None


def test_a_wrong_sample_showing_the_concept_counts_as_lost_to_it():
    star, teal = PACKS[0], PACKS[1]
    assert (star.kind, teal.kind) == ("shape", "colour")

    def row(correct, *objects):
        return {"correct": correct, "found": [{"cls": c, "colour": k, "texture": "plain"} for c, k in objects]}

    rows = [
        row(False, ("star", "red"), ("circle", "blue")),  # a star where a square was asked: lost to the star
        row(True, ("star", "teal"), ("circle", "red")),  # right despite its star: not lost
        row(False, ("circle", "teal")),  # wrong without a star: lost, but not to the star (to the teal)
        row(False),
    ]
    assert lost_to_concept(star, rows) == 0.25 and lost_to_concept(teal, rows) == 0.25
    assert lost_to_concept(star, rows[1:]) == 0.0
    assert lost_to_concept(star, [{"correct": False}]) is None and lost_to_concept(star, []) is None


def test_a_sample_without_any_object_counts_as_blank(detector):
    # The same scenes with their objects taken away: the grey background the world renders them on, nothing more.
    items = pack_items(PACKS[0])[:6]
    scenes = [item.scene for item in items[:4]] + [dataclasses.replace(item.scene, objects=()) for item in items[4:]]
    images = [render(scene) for scene in scenes]
    rows = [
        verdict_row(image, d, item.metadata, 0, detector_colours)
        for image, d, item in zip(images, detector.detect(images), items, strict=True)
    ]
    assert [not row["found"] for row in rows] == [False] * 4 + [True] * 2
    assert blank_share(rows) == pytest.approx(2 / 6)
    assert blank_share(rows[:4]) == 0.0
    assert blank_share([{k: v for k, v in row.items() if k != "found"} for row in rows]) is None
    assert blank_share([]) is None


def test_model_samples_are_scored_per_prompt_and_seed(tiny_zimage_path, detector):
    model = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False)
    records = [
        {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
        {
            "tag": "colors",
            "include": [{"class": "square", "count": 1, "color": "red"}],
            "prompt": "a photo of a red square",
        },
    ]
    score, verdicts, images = geneval_nano(model, records, seeds=[0, 1, 2], steps=4, detector=detector, resolution=32)
    assert len(verdicts) == len(images) == 6 and score.images == 6
    assert all(v.reason for v in verdicts if not v.correct)
    again = sample_images(model, model.encode_student(["a photo of a circle"]), [1], 4, 32)
    # same prompt, place and seed, same image (up to rounding: the batch around it differs)
    assert np.abs(np.asarray(again[0], dtype=int) - np.asarray(images[1])).max() <= 1


def test_every_prompt_of_a_seed_starts_from_its_own_noise(tiny_zimage_path):
    model = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False)
    contexts = model.encode_student(["a photo of a circle"] * 3)
    together = [np.asarray(im) for im in sample_images(model, contexts, [0, 1], 2, 32)]
    one_by_one = [np.asarray(im) for im in sample_images(model, contexts, [0, 1], 2, 32, batch=1)]
    # Batching changes nothing but float rounding (a batch of 6 and of 1 may take different CPU kernels): at most a
    # level or two of 255, where another noise moves pixels by tens.
    differences = [np.abs(a.astype(np.int16) - b).max() for a, b in zip(together, one_by_one, strict=True)]
    assert max(differences) <= 2, differences
    # context-major: images 0, 2, 4 are the same prompt at seed 0, in three positions of the prompt list
    assert not np.array_equal(together[0], together[2]) and not np.array_equal(together[2], together[4])


def test_guidance_moves_away_from_the_given_negative(tiny_zimage_path):
    model = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False)
    contexts = model.encode_student(["a photo of a circle", "a photo of a red square"])
    plain = [np.asarray(im) for im in sample_images(model, contexts, [0], 2, 32)]
    # guided away from itself a context stays where it was; away from the empty prompt (the default) it moves
    itself = sample_images(model, contexts, [0], 2, 32, guidance=3.0, negative_contexts=contexts)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(plain, itself, strict=True))
    away = sample_images(model, contexts, [0], 2, 32, guidance=3.0)
    assert not np.array_equal(plain[0], np.asarray(away[0]))
    with pytest.raises(ValueError, match="1 negative contexts for 2 contexts"):
        sample_images(model, contexts, [0], 2, 32, guidance=3.0, negative_contexts=contexts[:1])
