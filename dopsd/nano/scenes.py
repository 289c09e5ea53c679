"""Scenes with captions and GenEval metadata for the nano world's six task families.

Each sampled item is a scene, its caption and the official GenEval metadata record for that caption (`tag`,
`include`/`exclude` with `class`, `count`, optional `color` and `position`), so one rules engine scores nano
and real GenEval. Nano adds one optional key, `texture`, for texture words.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dopsd.nano.world import Scene, Vocabulary, WorldObject, place_objects

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
TRAINING_LEADS = ("an image of ", "a picture of ", "")
NEUTRAL_WORD = "object"
"""Word for a shape the captions do not name (the image context can still show it)."""


@dataclass(frozen=True)
class Item:
    scene: Scene
    caption: str
    metadata: dict


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(phrase: str) -> str:
    """Plural of a noun phrase: its last word takes the ending ("striped star" -> "striped stars")."""
    return phrase + ("es" if phrase.endswith(("s", "x", "sh", "ch")) else "s")


def noun(obj: WorldObject, vocab: Vocabulary, with_colour: bool, with_texture: bool = True) -> str:
    """How a caption names an object: [colour] [texture] shape, unnamed attributes left out."""
    words = []
    if with_colour and obj.colour in vocab.named_colours:
        words.append(obj.colour)
    if with_texture and obj.texture in vocab.named_textures and obj.texture != "plain":
        words.append(obj.texture)
    words.append(obj.shape if obj.shape in vocab.named_shapes else NEUTRAL_WORD)
    return " ".join(words)


def relation_holds(a: WorldObject, b: WorldObject, relation: str) -> bool:
    """GenEval's relation of `a` to `b` (box-centre offset, shrunk by 0.1 x summed sizes), the clear case only."""
    dx, dy = a.x - b.x, a.y - b.y
    sx, sy = max(abs(dx) - 0.2 * (a.radius + b.radius), 0), max(abs(dy) - 0.2 * (a.radius + b.radius), 0)
    norm = max(1e-6, (dx * dx + dy * dy) ** 0.5)
    x, y = np.sign(dx) * sx / norm, np.sign(dy) * sy / norm
    wanted = {"left of": x < -0.5, "right of": x > 0.5, "above": y < -0.5, "below": y > 0.5}
    # A clear relation: the wanted one holds and no perpendicular one does.
    perpendicular = ("above", "below") if relation in ("left of", "right of") else ("left of", "right of")
    return bool(wanted[relation]) and not any(wanted[p] for p in perpendicular)


class SceneSampler:
    """Draws (scene, caption, metadata) items for each task family from a vocabulary."""

    def __init__(self, vocab: Vocabulary, rng: np.random.Generator, size: int = 64):
        self.vocab, self.rng, self.size = vocab, rng, size

    def _pick(self, options: Sequence[str]) -> str:
        return str(options[int(self.rng.integers(len(options)))])

    def _spec(self, shape: str | None = None, colour: str | None = None, texture: str | None = None) -> dict:
        v = self.vocab
        return {
            "shape": shape or self._pick(v.shapes),
            "colour": colour or self._pick(v.colours),
            # Half the objects plain, the rest spread over the textures.
            "texture": texture or ("plain" if self.rng.random() < 0.5 else self._pick(v.textures)),
            "size": self._pick(("small", "large")),
        }

    def _place(self, specs: list[dict]) -> tuple[WorldObject, ...]:
        # Four large objects fit on the canvas in 14% of random placements: 50 tries failed once in ~2300 such
        # scenes (a training run draws thousands), 1000 tries fail with odds below 1e-60.
        for _ in range(1000):
            objects = place_objects(self.rng, specs, self.size)
            if objects:
                return objects
        raise RuntimeError(f"could not place {len(specs)} objects on a {self.size}px canvas")

    def sample(self, task: str) -> Item:
        v = self.vocab
        named = v.named_shapes
        if task == "single_object":
            (obj,) = self._place([self._spec(self._pick(named))])
            return self._item(task, (obj,), f"a photo of {article(obj.shape)} {obj.shape}", [_clause(obj.shape, 1)])
        if task == "two_object":
            a, b = self.rng.choice(len(named), 2, replace=False)
            objs = self._place([self._spec(named[a]), self._spec(named[b])])
            caption = f"a photo of {article(named[a])} {named[a]} and {article(named[b])} {named[b]}"
            return self._item(task, objs, caption, [_clause(named[a], 1), _clause(named[b], 1)])
        if task == "counting":
            shape, n = self._pick(named), int(self.rng.integers(2, 5))
            colour, texture = self._pick(v.colours), self._pick(v.textures)
            objs = self._place([self._spec(shape, colour, texture) for _ in range(n)])
            meta = {"include": [_clause(shape, n)], "exclude": [_clause(shape, n + 1)]}
            return self._item(task, objs, f"a photo of {NUMBER_WORDS[n]} {plural(shape)}", **meta)
        if task == "colors":
            shape, colour = self._pick(named), self._pick(v.named_colours)
            objs = self._place([self._spec(shape, colour)])
            caption = f"a photo of {article(colour)} {colour} {shape}"
            return self._item(task, objs, caption, [_clause(shape, 1, color=colour)])
        if task == "position":
            return self._position()
        if task == "color_attr":
            a, b = self.rng.choice(len(named), 2, replace=False)
            ca, cb = self.rng.choice(len(v.named_colours), 2, replace=False)
            sa, sb, ka, kb = named[a], named[b], v.named_colours[ca], v.named_colours[cb]
            objs = self._place([self._spec(sa, ka), self._spec(sb, kb)])
            caption = f"a photo of {article(ka)} {ka} {sa} and {article(kb)} {kb} {sb}"
            return self._item(task, objs, caption, [_clause(sa, 1, color=ka), _clause(sb, 1, color=kb)])
        raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")

    def _position(self) -> Item:
        named = self.vocab.named_shapes
        a, b = self.rng.choice(len(named), 2, replace=False)
        relation = self._pick(RELATIONS)
        for _ in range(200):
            anchor, mover = self._place([self._spec(named[a]), self._spec(named[b])])
            if relation_holds(mover, anchor, relation):
                caption = f"a photo of {article(named[b])} {named[b]} {relation} {article(named[a])} {named[a]}"
                clauses = [_clause(named[a], 1), {**_clause(named[b], 1), "position": [relation, 0]}]
                return self._item("position", (anchor, mover), caption, clauses)
        raise RuntimeError(f"could not place a {named[b]} {relation} a {named[a]}")

    def _item(self, tag: str, objects, caption: str, include: list[dict], exclude: list[dict] | None = None) -> Item:
        metadata = {"tag": tag, "include": include, "prompt": caption}
        if exclude:
            metadata["exclude"] = exclude
        return Item(Scene(tuple(objects), size=self.size), caption, metadata)

    def describe(self, scene: Scene) -> str:
        """A free training caption for any scene: counts, named colours, the neutral word for unnamed shapes.
        Training captions never use the evaluation lead "a photo of", so held-out prompts are disjoint from them."""
        groups: dict[str, int] = {}
        for obj in scene.objects:
            key = noun(obj, self.vocab, with_colour=bool(self.rng.random() < 0.7))
            groups[key] = groups.get(key, 0) + 1
        parts = [f"{article(k)} {k}" if n == 1 else f"{NUMBER_WORDS[n]} {plural(k)}" for k, n in groups.items()]
        return f"{self._pick(TRAINING_LEADS)}{' and '.join(parts)}"

    def random_scene(self, max_objects: int = 4) -> Scene:
        n = int(self.rng.integers(1, max_objects + 1))
        return Scene(self._place([self._spec() for _ in range(n)]), size=self.size)


def _clause(cls: str, count: int, color: str | None = None) -> dict:
    clause: dict = {"class": cls, "count": count}
    if color:
        clause["color"] = color
    return clause


def prompt_set(vocab: Vocabulary, per_task: int, seed: int, exclude: Collection[str] = ()) -> list[dict]:
    """`per_task` distinct GenEval metadata records per task family, none of whose prompts is in `exclude`."""
    sampler = SceneSampler(vocab, np.random.default_rng(seed))
    records: list[dict] = []
    for task in TASKS:
        seen: set[str] = set()
        for _ in range(per_task * 200):
            item = sampler.sample(task)
            if item.caption not in seen and item.caption not in exclude:
                seen.add(item.caption)
                records.append(item.metadata)
                if len(seen) == per_task:
                    break
    return records


def write_jsonl(records: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def iterate_items(vocab: Vocabulary, seed: int) -> Iterator[Item]:
    """An endless stream of task items cycling through the six families (pretraining data)."""
    sampler = SceneSampler(vocab, np.random.default_rng(seed))
    while True:
        for task in TASKS:
            yield sampler.sample(task)
