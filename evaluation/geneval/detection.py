"""What a GenEval detector returns, whatever the detector (COCO instance segmentation or the nano world's)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image


@dataclass(frozen=True, eq=False)  # eq would compare masks elementwise
class Detection:
    cls: str
    """Class name as the metadata spells it."""
    box: tuple[float, float, float, float]
    """x0, y0, x1, y1 in pixels (y grows downward)."""
    score: float
    """Confidence in [0, 1]."""
    mask: np.ndarray | None = None
    """Boolean instance mask (H, W), when the detector has one (colour classification uses it)."""
    colour: str | None = None
    """Colour the detector itself read, when it can (the nano detector); else the rules' classifier decides."""
    texture: str | None = None
    """Texture the detector read (nano only)."""


class Detector(Protocol):
    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        """Detections per image, any order."""
        ...
