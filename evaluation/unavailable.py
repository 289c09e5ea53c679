"""A metric that cannot be computed says why; it never becomes a number."""

from __future__ import annotations

from pathlib import Path


class MetricUnavailable(RuntimeError):
    """Raised by a metric's loader when its network or weights are missing; the suite records the reason."""


def require_file(path: str | Path, what: str) -> Path:
    """The weights file at `path`, or MetricUnavailable naming the file and what needed it."""
    path = Path(path)
    if not path.is_file():
        raise MetricUnavailable(f"{what}: weights file {path} does not exist")
    return path
