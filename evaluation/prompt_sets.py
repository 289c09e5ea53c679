"""The suite's prompt sets, read from files as users keep them.

- retention: GenEval metadata (one JSON object a line), optionally with real reference images for FID;
- concept rewrite: a concept's data folder (images + same-name captions): its captions as prompts, its images as
  the targets (did the model learn what it was shown?);
- concept new scenes: prompts that put the concept in scenes it was not shown (JSONL with `prompt`, GenEval
  metadata included, or plain text, one prompt a line), scored against the same targets.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from dopsd.data import DatasetError, image_files, image_problem, read_dataset
from evaluation.geneval.rules import read_metadata
from evaluation.suite import PromptSet


def read_images(folder: str | Path) -> list[Image.Image]:
    """Every image in `folder` (sorted by name); one error lists every file that does not decode."""
    root = Path(folder)
    paths = image_files(root)
    problems = [f"{path}: {problem}" for path in paths if (problem := image_problem(path))]
    if problems:
        raise DatasetError(f"image folder {root} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def read_prompts(path: str | Path) -> list[dict]:
    """Records with a `prompt` key from a .jsonl file (GenEval metadata or just prompts) or a text file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {path} does not exist")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise ValueError(f"{path}:{number}: each line needs a string `prompt`")
                records.append(record)
    else:
        records = [{"prompt": line.strip()} for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"prompt file {path} holds no prompts")
    return records


def first_per_task(records: list[dict], limit: int) -> list[dict]:
    """The first `limit` records of each GenEval task (records without a tag count as one task); 0 keeps all."""
    if not limit:
        return records
    seen: dict[str, int] = {}
    kept = []
    for record in records:
        tag = str(record.get("tag", ""))
        seen[tag] = seen.get(tag, 0) + 1
        if seen[tag] <= limit:
            kept.append(record)
    return kept


def retention_set(metadata: str | Path, references: str | Path | None = None, limit: int = 0) -> PromptSet:
    """GenEval prompts the model already knew (the first `limit` of each task, 0: all)."""
    records = first_per_task(read_metadata(metadata), limit)
    return PromptSet("retention", records, read_images(references) if references else [])


def concept_sets(data: str | Path, new_scene_prompts: str | Path | None = None, limit: int = 0) -> list[PromptSet]:
    """The concept's rewrite set (its own captions) and, given prompts, its new-scene set."""
    examples = read_dataset(data)
    targets = [example.load_image() for example in examples]
    rewrite = [{"prompt": example.caption} for example in examples]
    sets = [PromptSet("concept_rewrite", first_per_task(rewrite, limit), targets=targets)]
    if new_scene_prompts:
        sets.append(PromptSet("concept_new", first_per_task(read_prompts(new_scene_prompts), limit), targets=targets))
    return sets
