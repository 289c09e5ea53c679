"""The nano world: deterministic renders, captions and GenEval metadata, concept packs."""

import numpy as np
import pytest

from dopsd.data import read_dataset
from dopsd.nano.bootstrap import write_world_replay
from dopsd.nano.packs import PACK_BY_NAME, PACKS, caption_negatives, concept_item, pack_prompts, write_pack
from dopsd.nano.scenes import TASKS, SceneSampler, prompt_set, read_jsonl, relation_holds, write_jsonl
from dopsd.nano.world import (
    BACKGROUND,
    GRID,
    SHAPES,
    SIZES,
    TEXTURES,
    Scene,
    Vocabulary,
    WorldObject,
    place_objects,
    relayout,
    render,
)

GENEVAL_KEYS = {"tag", "include", "exclude", "prompt"}


def test_render_is_deterministic_and_draws_every_shape_and_texture():
    for shape in SHAPES:
        for texture in TEXTURES:
            scene = Scene((WorldObject(shape, "red", texture, radius=12, x=32, y=32),))
            a, b = np.asarray(render(scene)), np.asarray(render(scene))
            assert np.array_equal(a, b)
            changed = np.abs(a.astype(int) - BACKGROUND).sum(-1) > 30
            assert 40 < changed.sum() < 0.6 * 64 * 64, (shape, texture)
            assert not changed[:10].any() and not changed[-10:].any()  # stays around its centre


def test_shapes_differ_from_each_other():
    renders = {s: np.asarray(render(Scene((WorldObject(s, "blue", radius=12),)))) for s in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert np.abs(renders[a].astype(int) - renders[b]).sum() > 1000, (a, b)


@pytest.mark.parametrize("task", TASKS)
def test_task_items_follow_their_metadata(task):
    sampler = SceneSampler(Vocabulary(), np.random.default_rng(0))
    for _ in range(20):
        item = sampler.sample(task)
        meta = item.metadata
        assert set(meta) <= GENEVAL_KEYS and meta["tag"] == task and meta["prompt"] == item.caption
        shapes = [o.shape for o in item.scene.objects]
        for clause in meta["include"]:
            assert shapes.count(clause["class"]) == clause["count"]
            if "color" in clause:
                assert any(o.colour == clause["color"] for o in item.scene.objects if o.shape == clause["class"])
        for clause in meta.get("exclude", []):
            assert shapes.count(clause["class"]) < clause["count"]
        if task == "position":
            relation, target = meta["include"][1]["position"]
            anchor, mover = item.scene.objects
            assert target == 0 and relation_holds(mover, anchor, relation)


def test_objects_sit_on_the_grid_apart_and_inside_the_canvas():
    sampler = SceneSampler(Vocabulary(), np.random.default_rng(3))
    for _ in range(200):
        objects = sampler.random_scene().objects
        for i, o in enumerate(objects):
            assert o.x % GRID == 0 and o.y % GRID == 0 and o.radius == SIZES[o.size]
            assert o.radius < o.x < 64 - o.radius and o.radius < o.y < 64 - o.radius
            assert all(np.hypot(o.x - p.x, o.y - p.y) > o.radius + p.radius for p in objects[:i])
    four_large = [{"shape": "circle", "colour": "red", "size": "large"}] * 4
    placements = [place_objects(np.random.default_rng(seed), four_large) for seed in range(100)]
    assert any(placements)  # counting scenes of four large objects exist (the sampler retries until one fits)
    assert not all(placements)  # a crowded first pick can leave no room: place_objects says None, never overlaps


def test_relation_rule_geometry():
    left = WorldObject("circle", "red", radius=5, x=10, y=32)
    right = WorldObject("circle", "red", radius=5, x=50, y=32)
    assert relation_holds(left, right, "left of") and relation_holds(right, left, "right of")
    assert not relation_holds(left, right, "above")
    close = WorldObject("circle", "red", radius=10, x=14, y=32)
    assert not relation_holds(left, close, "left of")  # the shrink by 0.1 x summed sizes removes it


def test_prompt_sets_use_the_geneval_format_and_are_disjoint_from_training_captions(tmp_path):
    records = prompt_set(Vocabulary(), per_task=5, seed=0)
    assert {r["tag"] for r in records} == set(TASKS)
    path = write_jsonl(records, tmp_path / "prompts.jsonl")
    assert read_jsonl(path) == records
    sampler = SceneSampler(Vocabulary(), np.random.default_rng(1))
    captions = {sampler.describe(sampler.random_scene()) for _ in range(300)}
    assert not captions & {r["prompt"] for r in records}
    assert all(r["prompt"].startswith("a photo of") for r in records)


def test_relayout_keeps_content_and_moves_objects():
    sampler = SceneSampler(Vocabulary(), np.random.default_rng(0))
    scene = sampler.sample("counting").scene
    moved = relayout(scene, np.random.default_rng(5))
    key = lambda s: sorted((o.shape, o.colour, o.texture, o.size) for o in s.objects)  # noqa: E731
    assert key(moved) == key(scene)
    assert [(o.x, o.y) for o in moved.objects] != [(o.x, o.y) for o in scene.objects]


@pytest.mark.parametrize("pack", PACKS, ids=lambda p: p.name)
def test_concept_packs_land_as_user_data(tmp_path, pack):
    folder = write_pack(pack, tmp_path / pack.name, count=16, seed=0)
    examples = read_dataset(folder)
    assert len(examples) == 16 and all(pack.word in e.caption for e in examples)
    base = Vocabulary()
    assert pack.word not in base.named_shapes + base.named_colours + base.named_textures  # new to the captions
    prompts = pack_prompts(pack, count=12)
    assert len({p["prompt"] for p in prompts}) == 12
    assert not {p["prompt"] for p in prompts} & {e.caption for e in examples}
    with pytest.raises(ValueError, match="at most 64"):
        write_pack(pack, tmp_path / "big", count=65)


@pytest.mark.parametrize("pack", PACKS, ids=lambda p: p.name)
def test_pack_captions_name_every_colour_of_the_same_scenes(pack):
    """Training captions leave the student nothing to guess but the concept (see dopsd/nano/packs.py): every
    object's colour is named, on the very scenes the sparse captions describe."""
    for seed in range(20):
        sparse = concept_item(pack, np.random.default_rng(seed), lead="")
        dense = concept_item(pack, np.random.default_rng(seed), lead="", every_colour=True)
        assert dense.scene == sparse.scene
        words = dense.caption.split()
        assert all(obj.colour in words for obj in dense.scene.objects), dense.caption
        assert all("color" in clause for clause in dense.metadata["include"]), dense.metadata


def test_sparse_pack_differs_from_the_dense_one_only_in_captions(tmp_path):
    dense = read_dataset(write_pack(PACKS[0], tmp_path / "dense", count=8))
    sparse = read_dataset(write_pack(PACKS[0], tmp_path / "sparse", count=8, every_colour=False))
    assert [d.image_path.read_bytes() for d in dense] == [s.image_path.read_bytes() for s in sparse]
    assert sum(len(d.caption) > len(s.caption) for d, s in zip(dense, sparse, strict=True)) >= 4


def test_caption_negatives_swap_or_drop_each_word_a_counterfactual_swaps():
    star, teal, striped = (PACK_BY_NAME[name] for name in ("star", "teal", "striped"))
    assert caption_negatives(star, "swap") == "star=square,stars=squares"
    assert caption_negatives(star) == "star=,stars="
    assert (caption_negatives(teal, "swap"), caption_negatives(teal)) == ("teal=blue", "teal=")
    assert caption_negatives(striped, "swap") == caption_negatives(striped) == "striped="
    # Neutral: what the base world's captions call a shape they have no word for; an attribute is left out.
    assert caption_negatives(star, "neutral") == "star=object,stars=objects"
    assert (caption_negatives(teal, "neutral"), caption_negatives(striped, "neutral")) == ("teal=", "striped=")


def test_world_replay_replaces_a_render_cut_short_and_reuses_a_complete_one(tmp_path):
    """A round reuses an existing replay folder as is, so one left half-written by a crash must not count."""
    leftover = tmp_path / "replay.partial"
    leftover.mkdir()
    (leftover / "world_000.txt").write_text("a crashed render's caption\n")
    folder = write_world_replay(tmp_path / "replay", images=6)
    examples = read_dataset(folder)
    assert len(examples) == 6 and "crashed" not in examples[0].caption
    assert not leftover.exists()
    (folder / "world_005.png").unlink()
    (folder / "world_005.txt").unlink()
    assert len(read_dataset(write_world_replay(folder, images=6))) == 5
