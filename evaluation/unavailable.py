"""A metric that cannot be computed says why; it never becomes a number."""

from __future__ import annotations

import hashlib
from pathlib import Path


class MetricUnavailable(RuntimeError):
    """Raised by a metric's loader when its network or weights are missing; the suite records the reason."""


def require_file(path: str | Path, what: str) -> Path:
    """The weights file at `path`, or MetricUnavailable naming the file and what needed it."""
    path = Path(path)
    if not path.is_file():
        raise MetricUnavailable(f"{what}: weights file {path} does not exist")
    return path


def file_digest(path: str | Path) -> str:
    """SHA-256 of a weights file: the identity of the network in cache keys."""
    with Path(path).open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
