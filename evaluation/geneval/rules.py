"""GenEval's scoring rules, exactly as the protocol applies them, for any detector and colour classifier.

- Per class, detections with confidence strictly above 0.3 (0.9 for `counting` prompts) are kept, most
  confident first, at most 16; no further suppression.
- `include` clauses are AND-ed: at least `count` kept objects of the class; only the `count` most confident are
  checked further: colour (at least `count` of them classified as the wanted colour) and position (every checked
  object in the relation to every object of the target clause's group; a failed group counts as missing).
- `exclude` clauses fail the image when the kept count of the class reaches `count`.
- Accuracy per task is the mean over its images; overall is the mean of the task accuracies.
The nano world adds `texture` clauses, checked like colour from the detector's own reading.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation.geneval.detection import Detection

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

ColourClassifier = Callable[[Image.Image, Sequence[Detection], str], list[str]]
"""(image, detections of one class, class name) -> the colour of each detection."""


def detector_colours(image: Image.Image, detections: Sequence[Detection], cls: str) -> list[str]:
    """The colours the detector itself read (the nano detector does)."""
    missing = [d for d in detections if d.colour is None]
    if missing:
        raise ValueError("these detections carry no colour; pass a colour classifier (e.g. CLIP zero-shot)")
    return [str(d.colour) for d in detections]


@dataclass(frozen=True)
class Verdict:
    tag: str
    correct: bool
    reason: str
    """Why the image failed, one line per failed clause; empty when correct."""


def read_metadata(path: str | Path) -> list[dict]:
    """The official metadata format: one JSON object a line."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not {"tag", "include", "prompt"} <= set(record):
            raise ValueError(f"{path}:{number}: a GenEval record needs tag, include and prompt")
        records.append(record)
    return records


def keep_detections(detections: Sequence[Detection], tag: str) -> dict[str, list[Detection]]:
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    kept: dict[str, list[Detection]] = {}
    for d in sorted(detections, key=lambda d: -d.score):
        if d.score > threshold and len(kept.setdefault(d.cls, [])) < MAX_OBJECTS:
            kept[d.cls].append(d)
    return kept


def relative_position(a: Detection, b: Detection) -> set[str]:
    """Relations of A to B from their boxes (y grows downward)."""
    boxes = np.array([a.box, b.box], dtype=np.float64).reshape(2, 2, 2)
    centre_a, centre_b = boxes.mean(axis=-2)
    size_a, size_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = centre_a - centre_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATION_OUTCOMES = ("named side", "opposite side", "elsewhere", "object missing")


def relation_outcome(detections: Sequence[Detection], metadata: dict) -> str:
    """Where a position sample put the named object relative to the other one: on the named side, on the opposite
    side, elsewhere (another axis, or too close), or no relation to read (an object missing). A finer reading of
    position failures than the verdict: a model that ignores relation words lands on both sides equally often."""
    anchor, mover = metadata["include"]
    kept = keep_detections(detections, "position")
    if not (kept.get(anchor["class"]) and kept.get(mover["class"])):
        return "object missing"
    relations = relative_position(kept[mover["class"]][0], kept[anchor["class"]][0])
    named = mover["position"][0]
    return "named side" if named in relations else "opposite side" if OPPOSITE[named] in relations else "elsewhere"


def _attribute_failure(
    image, found: list[Detection], clause: dict, classify: ColourClassifier, key: str, palette: Sequence[str]
) -> str | None:
    if key not in clause:
        return None
    cls, count, wanted = clause["class"], clause["count"], clause[key]
    values = classify(image, found, cls) if key == "color" else [str(d.texture) for d in found]
    if values.count(wanted) >= count:
        return None
    seen = ", ".join(f"{values.count(v)} {v}" for v in palette if v in values)
    return f"expected {wanted} {cls}>={count}, found {values.count(wanted)} {wanted}; and {seen}"


def evaluate_image(
    image: Image.Image,
    detections: Sequence[Detection],
    metadata: dict,
    classify_colour: ColourClassifier = detector_colours,
    colour_names: Sequence[str] = COLOURS,
) -> Verdict:
    tag = metadata["tag"]
    kept = keep_detections(detections, tag)
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []
    for clause in metadata.get("include", []):
        cls, count = clause["class"], clause["count"]
        found = kept.get(cls, [])[:count]
        matched = True
        if len(found) < count:
            matched = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            for key, palette in (("color", colour_names), ("texture", sorted({str(d.texture) for d in found}))):
                failure = _attribute_failure(image, found, clause, classify_colour, key, palette)
                if failure:
                    matched = False
                    reasons.append(failure)
            if "position" in clause and matched:
                relation, target = clause["position"]
                group = groups[target] if target < len(groups) else None
                if group is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {relation}")
                else:
                    for obj in found:
                        wrong = next((t for t in group if relation not in relative_position(obj, t)), None)
                        if wrong is not None:
                            matched = False
                            actual = " and ".join(sorted(relative_position(obj, wrong)))
                            reasons.append(f"expected {cls} {relation} target, found {actual} target")
                            break
        groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        cls, count = clause["class"], clause["count"]
        if len(kept.get(cls, [])) >= count:
            reasons.append(f"expected {cls}<{count}, found {len(kept[cls])}")
    return Verdict(tag=tag, correct=not reasons, reason="\n".join(reasons))


@dataclass(frozen=True)
class GenevalScore:
    overall: float | None
    """Mean of the task accuracies (None when no task has images)."""
    tasks: dict[str, float]
    """Accuracy per task that has images."""
    images: int


def aggregate(verdicts: Sequence[Verdict]) -> GenevalScore:
    by_task: dict[str, list[bool]] = {}
    for v in verdicts:
        by_task.setdefault(v.tag, []).append(v.correct)
    tasks = {tag: float(np.mean(results)) for tag, results in by_task.items()}
    overall = float(np.mean(list(tasks.values()))) if tasks else None
    return GenevalScore(overall=overall, tasks=tasks, images=len(verdicts))
