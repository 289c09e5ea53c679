"""The nano world's detector: analytic segmentation, a small learned classifier per object.

Objects sit apart on a plain background, so segmentation is exact: pixels that differ from the background
(estimated from the image border), grouped into 8-connected components. Each component's crop (and its mask) is
classified by a small CNN into shape, colour and texture, trained on renders segmented the same way; its shape
confidence is the detection score GenEval thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from scipy import ndimage
from torch import nn

from dopsd.nano.world import COLOURS, SHAPES, TEXTURES, Scene, WorldObject
from evaluation.geneval.detection import Detection

CROP = 24
MIN_AREA = 8
FOREGROUND_THRESHOLD = 40
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "nano_detector.safetensors"
COLOUR_NAMES = tuple(COLOURS)


@dataclass
class Component:
    box: tuple[float, float, float, float]
    mask: np.ndarray
    crop: np.ndarray
    """(4, CROP, CROP) float32: RGB in [-1, 1] and the component mask."""


def background_colour(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(border, axis=0)


def segment(image: Image.Image) -> list[Component]:
    """Connected components of non-background pixels, each with a square crop around its box."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    foreground = np.abs(array - background_colour(array)).max(-1) > FOREGROUND_THRESHOLD
    labels, count = ndimage.label(foreground, structure=np.ones((3, 3)))
    components = []
    for index, slices in enumerate(ndimage.find_objects(labels), start=1):
        mask = labels == index
        if mask.sum() < MIN_AREA:
            continue
        ys, xs = slices
        box = (float(xs.start), float(ys.start), float(xs.stop), float(ys.stop))
        components.append(Component(box, mask, _crop(array, mask, box)))
    return components


def _crop(array: np.ndarray, mask: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) + 4
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    h, w = mask.shape
    grid_x = torch.linspace(cx - side / 2, cx + side / 2, CROP) / (w - 1) * 2 - 1
    grid_y = torch.linspace(cy - side / 2, cy + side / 2, CROP) / (h - 1) * 2 - 1
    grid = torch.stack(torch.meshgrid(grid_y, grid_x, indexing="ij")[::-1], -1)[None]
    planes = torch.from_numpy(np.concatenate([array / 127.5 - 1, mask[..., None].astype(np.float32)], -1))
    sampled = F.grid_sample(planes.permute(2, 0, 1)[None], grid, mode="bilinear", align_corners=True)
    return sampled[0].numpy()


class ObjectClassifier(nn.Module):
    """Shape, colour and texture heads over a small CNN on (RGB + mask) crops."""

    def __init__(self, width: int = 48):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(4, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.shape = nn.Linear(2 * width, len(SHAPES))
        self.colour = nn.Linear(2 * width, len(COLOURS))
        self.texture = nn.Linear(2 * width, len(TEXTURES))

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.features(crops)
        return self.shape(h), self.colour(h), self.texture(h)


class NanoDetector:
    """GenEval-style detections (class = shape word) for any image of the nano world, real or generated."""

    def __init__(self, classifier: ObjectClassifier):
        self.classifier = classifier.eval()

    @classmethod
    def load(cls, path: str | Path = DEFAULT_WEIGHTS) -> NanoDetector:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"nano detector weights {path} not found; build them with `dopsd nano detector`")
        classifier = ObjectClassifier()
        classifier.load_state_dict(load_file(str(path)))
        return cls(classifier)

    def save(self, path: str | Path = DEFAULT_WEIGHTS) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.classifier.state_dict().items()}, str(path))
        return path

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        per_image = [segment(image) for image in images]
        flat = [c for components in per_image for c in components]
        if not flat:
            return [[] for _ in images]
        shape, colour, texture = self.classifier(torch.from_numpy(np.stack([c.crop for c in flat])))
        shape_p = shape.softmax(-1)
        out: list[list[Detection]] = []
        i = 0
        for components in per_image:
            detections = []
            for component in components:
                score, s = shape_p[i].max(0)
                detections.append(
                    Detection(
                        cls=SHAPES[int(s)],
                        box=component.box,
                        score=float(score),
                        mask=component.mask,
                        colour=COLOUR_NAMES[int(colour[i].argmax())],
                        texture=TEXTURES[int(texture[i].argmax())],
                    )
                )
                i += 1
            out.append(detections)
        return out


def labelled_crops(scenes: Sequence[Scene], images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """Crops of each scene's components with (shape, colour, texture) labels from the object whose centre lies
    in the component; components that do not contain exactly one object centre are skipped."""
    crops, labels = [], []
    for scene, image in zip(scenes, images, strict=True):
        for component in segment(image):
            o = object_of(component.box, scene)
            if o is None:
                continue
            crops.append(component.crop)
            labels.append((SHAPES.index(o.shape), COLOUR_NAMES.index(o.colour), TEXTURES.index(o.texture)))
    return np.stack(crops), np.array(labels)


def object_of(box: tuple[float, float, float, float], scene: Scene) -> WorldObject | None:
    """The one scene object whose centre lies in `box` (None when none or several do)."""
    x0, y0, x1, y1 = box
    inside = [o for o in scene.objects if x0 <= o.x <= x1 and y0 <= o.y <= y1]
    return inside[0] if len(inside) == 1 else None


def train_classifier(
    crops: np.ndarray, labels: np.ndarray, epochs: int = 6, batch: int = 128, lr: float = 2e-3, seed: int = 0
) -> ObjectClassifier:
    torch.manual_seed(seed)
    model = ObjectClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    x, y = torch.from_numpy(crops), torch.from_numpy(labels).long()
    steps = epochs * ((len(x) + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            inputs = x[idx]
            # Generated images are softer and noisier than renders: blur and noise some training crops.
            if torch.rand(()) < 0.5:
                inputs = F.avg_pool2d(inputs, 3, stride=1, padding=1, count_include_pad=False)
            inputs = inputs + 0.03 * torch.randn_like(inputs)
            s, c, t = model(inputs)
            loss = F.cross_entropy(s, y[idx, 0]) + F.cross_entropy(c, y[idx, 1]) + F.cross_entropy(t, y[idx, 2])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()
