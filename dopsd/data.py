"""Training data as it lands: a folder of images, each with a same-name .txt caption.

`read_dataset` checks the whole folder before any training starts and stops with one message per problem,
naming the file and what to do. Paths never leave the data root (symlinks out of it are refused).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DatasetError(ValueError):
    """The data folder cannot be trained on; the message lists every problem found."""


@dataclass(frozen=True)
class Example:
    image_path: Path
    caption: str

    def load_image(self) -> Image.Image:
        with Image.open(self.image_path) as image:
            return image.convert("RGB")


def inside(root: Path, path: Path) -> bool:
    """True when `path`, with links resolved, stays under `root`."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def image_problem(path: Path) -> str | None:
    """Why an image file cannot be used, or None when it decodes."""
    try:
        with Image.open(path) as image:
            image.load()
            if min(image.size) < 8:
                return f"image is {image.size[0]}x{image.size[1]}: too small to train on"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return f"unreadable image ({type(error).__name__}: {error})"
    return None


def image_files(root: Path) -> list[Path]:
    """The image files directly in `root`, sorted by name."""
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist or is not a folder")
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DatasetError(
            f"data folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)}); put images there, each with a "
            "same-name .txt caption"
        )
    return images


def read_dataset(folder: str | Path) -> list[Example]:
    """All (image, caption) pairs in `folder`, sorted by name, after checking every one of them."""
    root = Path(folder)
    images = image_files(root)
    problems, examples = [], []
    for path in images:
        caption_path = path.with_suffix(".txt")
        if not inside(root, path) or (caption_path.exists() and not inside(root, caption_path)):
            problems.append(f"{path}: links outside the data folder {root}; copy the file in instead")
            continue
        problem = image_problem(path)
        if problem:
            problems.append(f"{path}: {problem}; replace or remove it")
            continue
        caption = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else ""
        if not caption:
            problems.append(f"{path}: no caption; write one in {caption_path.name}")
            continue
        examples.append(Example(path, caption))
    if problems:
        raise DatasetError(f"data folder {root} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return examples


def swap_words(caption: str, pairs: dict[str, str]) -> tuple[str, int]:
    """`caption` with every word of `pairs` (whole words, any case; keys in lower case) replaced, dropped when its
    replacement is empty, and how many were."""
    if not pairs:
        return caption, 0
    words = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(pairs, key=len, reverse=True)) + r")\b", re.I)
    swapped, named = words.subn(lambda match: pairs[match.group(1).lower()], caption)
    return " ".join(swapped.split()), named


def caption_negatives(examples: list[Example], pairs: dict[str, str]) -> list[Example]:
    """The examples whose caption names a word of `pairs`, each with its words swapped (`swap_words`). The image
    stays beside the new caption unused: a negative is taught from its caption alone."""
    negatives = []
    for example in examples:
        caption, named = swap_words(example.caption, pairs)
        if named:
            negatives.append(Example(example.image_path, caption))
    return negatives
