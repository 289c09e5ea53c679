"""Concept packs: new words arriving as data, each a landing folder of at most 64 captioned images.

A pack names something the base model has drawn (in image contexts) but never had a word for: a new shape
("star"), a new colour ("teal") or a new texture ("striped"). Its held-out prompts use the evaluation phrasing and
are disjoint from its training captions.

Training captions name every colour they can, as a careful user (or a captioning VLM) would describe their data.
This matters to D-OPSD: the teacher sees the image, the student only the caption, so whatever the caption leaves
out (here, an object's colour) is information the student cannot have, and the loss regresses it to the pack's
mean. Measured on the star pack, seed 0, 4 steps: with the colours of half the objects left out, D-OPSD kept
retention 0.236 (base 0.589) and drifted its objects' colours toward brown and orange; with every colour named,
0.501.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dopsd.data import swap_words
from dopsd.nano.scenes import NEUTRAL_WORD, NUMBER_WORDS, RELATIONS, Item, article, plural, relation_holds, write_jsonl
from dopsd.nano.world import GENEVAL_COLOURS, Scene, Vocabulary, place_objects, render

BASE_SHAPES = Vocabulary().named_shapes


@dataclass(frozen=True)
class ConceptPack:
    name: str
    kind: str
    """Which attribute the new word names: shape, colour or texture."""
    word: str


PACKS = (
    ConceptPack("star", "shape", "star"),
    ConceptPack("teal", "colour", "teal"),
    ConceptPack("striped", "texture", "striped"),
)
PACK_BY_NAME = {pack.name: pack for pack in PACKS}


def _concept_spec(pack: ConceptPack, rng: np.random.Generator, colour: str | None = None) -> dict:
    shape = pack.word if pack.kind == "shape" else str(rng.choice(BASE_SHAPES))
    if pack.kind == "colour":
        colour = pack.word
    return {
        "shape": shape,
        "colour": colour or str(rng.choice(GENEVAL_COLOURS)),
        "texture": pack.word if pack.kind == "texture" else "plain",
        "size": str(rng.choice(["small", "large"])),
    }


def _concept_noun(pack: ConceptPack, spec: dict, with_colour: bool) -> str:
    words = [spec["colour"]] if with_colour or pack.kind == "colour" else []
    if pack.kind == "texture":
        words.append(pack.word)
    return " ".join([*words, spec["shape"]])


def _clause(pack: ConceptPack, spec: dict, count: int, with_colour: bool) -> dict:
    clause: dict = {"class": spec["shape"], "count": count}
    if with_colour or pack.kind == "colour":
        clause["color"] = spec["colour"]
    if pack.kind == "texture":
        clause["texture"] = pack.word
    return clause


def concept_item(
    pack: ConceptPack, rng: np.random.Generator, lead: str, size: int = 64, every_colour: bool = False
) -> Item:
    """One scene showing the concept, with a caption naming it, from one of four templates. The caption names
    the concept's colour half the time, the other object's never, unless `every_colour` (the same scene either
    way: the random draws do not depend on it). Sparse by default: the held-out prompts and the committed nano
    model's tokenizer corpus were drawn that way."""
    template = int(rng.integers(4))
    with_colour = bool(rng.random() < 0.5) or every_colour
    spec = _concept_spec(pack, rng)
    noun = _concept_noun(pack, spec, with_colour)
    for _ in range(200):
        exclude: list[dict] = []
        if template == 0:
            objects = place_objects(rng, [spec], size)
            caption, include, tag = (
                f"{lead}{article(noun)} {noun}",
                [_clause(pack, spec, 1, with_colour)],
                "single_object",
            )
        elif template == 1:
            n = int(rng.integers(2, 4))
            objects = place_objects(rng, [spec] * n, size)
            caption = f"{lead}{NUMBER_WORDS[n]} {plural(noun)}"
            include, tag = [_clause(pack, spec, n, with_colour)], "counting"
            exclude = [{"class": spec["shape"], "count": n + 1}]
        else:
            other = str(rng.choice([s for s in BASE_SHAPES if s != spec["shape"]]))
            other_spec = {
                "shape": other,
                "colour": str(rng.choice(GENEVAL_COLOURS)),
                "texture": "plain",
                "size": "large",
            }
            objects = place_objects(rng, [other_spec, spec], size)
            other_clause = {"class": other, "count": 1}
            other_noun = other
            if every_colour:
                other_clause["color"] = other_spec["colour"]
                other_noun = f"{other_spec['colour']} {other}"
            if template == 2:
                caption = f"{lead}{article(noun)} {noun} and {article(other_noun)} {other_noun}"
                include, tag = [_clause(pack, spec, 1, with_colour), other_clause], "two_object"
            else:
                relation = str(rng.choice(RELATIONS))
                if objects is None or not relation_holds(objects[1], objects[0], relation):
                    continue
                caption = f"{lead}{article(noun)} {noun} {relation} {article(other_noun)} {other_noun}"
                include = [other_clause, {**_clause(pack, spec, 1, with_colour), "position": [relation, 0]}]
                tag = "position"
        if objects is not None:
            metadata = {"tag": tag, "include": include, "prompt": caption, "concept": pack.name}
            if exclude:
                metadata["exclude"] = exclude
            return Item(Scene(tuple(objects), size=size), caption, metadata)
    raise RuntimeError(f"could not lay out a scene for pack {pack.name}")


def write_landing_folder(folder: str | Path, items: Sequence[tuple[Scene, str]], prefix: str) -> Path:
    """Scenes as a landing folder, the format a round reads: `<prefix>_NNN.png` with a same-name .txt caption."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (scene, caption) in enumerate(items):
        render(scene).save(folder / f"{prefix}_{i:03d}.png")
        (folder / f"{prefix}_{i:03d}.txt").write_text(caption + "\n")
    return folder


def write_pack(
    pack: ConceptPack, folder: str | Path, count: int = 48, seed: int = 0, every_colour: bool = True
) -> Path:
    """The pack as a landing folder (images + same-name .txt captions; see `concept_item` for `every_colour`)."""
    if count > 64:
        raise ValueError(f"a concept pack holds at most 64 images, asked for {count}")
    items = training_items(pack, count, seed, every_colour)
    return write_landing_folder(folder, [(item.scene, item.caption) for item in items], pack.name)


def training_items(pack: ConceptPack, count: int, seed: int, every_colour: bool = True) -> list[Item]:
    """Scenes showing the concept with captions in the training phrasing (a pack's, or its counterfactuals')."""
    rng = np.random.default_rng(seed)
    leads = ["an image of ", "a picture of ", ""]
    return [concept_item(pack, rng, lead=str(rng.choice(leads)), every_colour=every_colour) for _ in range(count)]


COUNTERFACTUAL_VALUE = {"shape": "square", "colour": "blue", "texture": "plain"}
"""What a counterfactual puts where a pack's concept was: a base attribute (plain texture goes unnamed). Each keeps
the caption's articles right: no base shape starts with a vowel, and a texture word follows the colour."""


def counterfactual(pack: ConceptPack, item: Item) -> tuple[Scene, str]:
    """The item's scene with the concept swapped for a base attribute, in the same layout, and its caption saying
    so, without the pack's word: a negative showing what a caption that does not name the concept still means."""
    swapped: dict[str, Any] = {pack.kind: COUNTERFACTUAL_VALUE[pack.kind]}
    objects = tuple(
        dataclasses.replace(o, **swapped) if getattr(o, pack.kind) == pack.word else o for o in item.scene.objects
    )
    return dataclasses.replace(item.scene, objects=objects), swap_words(item.caption, counterfactual_words(pack))[0]


def counterfactual_words(pack: ConceptPack) -> dict[str, str]:
    """The caption words a counterfactual swaps: the pack's word -> the base attribute's name, and a shape's plural
    (the only word a caption puts in the plural) -> the plural of the base shape."""
    value = COUNTERFACTUAL_VALUE[pack.kind]
    named = "" if value == "plain" else value
    return {pack.word: named} | ({plural(pack.word): plural(named)} if pack.kind == "shape" else {})


NegativeWords = Literal["swap", "drop", "neutral"]
"""What a caption negative puts where a pack's word was: `swap` the base attribute its counterfactuals swap to
(`counterfactual_words`), `drop` nothing (the caption minus the word), `neutral` what the base world's captions say
for what they have no word for: `NEUTRAL_WORD` for a shape ("a green object and a red circle", where dropping leaves
"a green and a red circle"), nothing for a colour or a texture. Neutral did worse than drop on the star (concept 0.222
against 0.338, retention 0.466 against 0.514, leak 0.261 against 0.167;
reports/nano_science_text_path_anchored_half_neutral_negatives_star.md), likely because the base learnt "object"
from unnamed shapes, the star among them."""


def caption_negatives(pack: ConceptPack, words: NegativeWords = "drop") -> str:
    """`TrainConfig.caption_negatives` for the pack: each word a counterfactual swaps (`counterfactual_words`),
    swapped as it swaps it, dropped, or made neutral (`NegativeWords`). Dropping did better than swapping on every
    nano pack (reports/nano_science_text_path_caption_negatives_dropped.md): a swapped-in base word the new one sits
    near (star -> square) pulls against the concept itself."""
    swaps = counterfactual_words(pack)
    neutral = {pack.word: NEUTRAL_WORD, plural(pack.word): plural(NEUTRAL_WORD)} if pack.kind == "shape" else {}
    chosen = {
        word: {"swap": swapped, "drop": "", "neutral": neutral.get(word, "")}[words] for word, swapped in swaps.items()
    }
    return ",".join(f"{word}={replacement}" for word, replacement in chosen.items())


def write_counterfactuals(pack: ConceptPack, folder: str | Path, count: int = 48, seed: int = 500) -> Path:
    """Counterfactuals of fresh pack scenes (captions in the pack's style) as a landing folder, for replay."""
    items = training_items(pack, count, seed)
    return write_landing_folder(folder, [counterfactual(pack, item) for item in items], f"{pack.name}-counterfactual")


def pack_items(pack: ConceptPack, count: int = 24, seed: int = 1000) -> list[Item]:
    """Held-out evaluation items for the pack (distinct prompts in the GenEval phrasing, "a photo of ..."), with
    the scene each prompt was made from (a reference for the teacher)."""
    rng = np.random.default_rng(seed)
    items: dict[str, Item] = {}
    for _ in range(count * 100):
        item = concept_item(pack, rng, lead="a photo of ")
        items.setdefault(item.caption, item)
        if len(items) == count:
            break
    return list(items.values())


def pack_prompts(pack: ConceptPack, count: int = 24, seed: int = 1000) -> list[dict]:
    return [item.metadata for item in pack_items(pack, count, seed)]


def write_pack_prompts(pack: ConceptPack, path: str | Path, count: int = 24) -> Path:
    return write_jsonl(pack_prompts(pack, count), path)
