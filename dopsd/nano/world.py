"""The nano world: plain-background images of 1-4 flat objects, rendered deterministically from a scene.

An object has a shape, a colour, a texture, a size and a position. Sizes are two fixed radii and centres sit on an
8-pixel grid, upright: a shape then has one look per size, wherever it is. The nano model must learn to draw every
look of a shape at every position it can take; on a 2-core CPU that decides whether it learns shape words at all
(see data/nano/bootstrap/README.md). The visual space is deliberately richer than the words the base model is
taught: some shapes, colours and textures are drawn in pretraining but never named in a caption, so that an image
context (the teacher's) can carry concepts the text cannot. Concept packs later give those a word.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4
BACKGROUND = (128, 128, 128)

# GenEval's ten colours plus unnamed ones: every colour is drawn, only GENEVAL_COLOURS are words in base captions.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "purple": (135, 45, 185),
    "pink": (250, 140, 200),
    "brown": (125, 75, 35),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "teal": (0, 170, 170),
    "lime": (170, 235, 60),
    "navy": (20, 30, 100),
    "maroon": (110, 10, 40),
}
GENEVAL_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "crescent", "star", "heart", "ring", "arrow")
TEXTURES = ("plain", "striped", "dotted", "checkered")
SIZES = {"small": 7.0, "large": 11.0}
"""Object radius in pixels at IMAGE_SIZE, per size word."""
GRID = 8
"""Object centres sit on multiples of this many pixels: one token of the nano transformer (4x VAE, patch 2), so a
shape covers the same pattern of tokens wherever it sits."""


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    texture: str = "plain"
    size: str = "large"
    radius: float = 11.0
    """Half the object's extent in pixels."""
    x: float = 32.0
    """Centre, pixels from the left."""
    y: float = 32.0
    """Centre, pixels from the top."""

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x - self.radius, self.y - self.radius, self.x + self.radius, self.y + self.radius)


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]
    background: tuple[int, int, int] = BACKGROUND
    size: int = IMAGE_SIZE
    tags: dict = field(default_factory=dict, compare=False, hash=False)


def _polygon(shape: str, radius: float) -> list[tuple[float, float]]:
    """Unit outline of a polygonal shape, scaled to `radius`, centred at the origin (y down)."""

    def ring(n: int, r: float, phase: float = -90.0) -> list[tuple[float, float]]:
        return [
            (r * math.cos(math.radians(phase + 360 * i / n)), r * math.sin(math.radians(phase + 360 * i / n)))
            for i in range(n)
        ]

    r = radius
    if shape == "square":
        s = r * 0.85
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "triangle":
        return [(0, -r), (r * 0.95, r * 0.75), (-r * 0.95, r * 0.75)]
    if shape == "diamond":
        return [(0, -r), (r * 0.7, 0), (0, r), (-r * 0.7, 0)]
    if shape == "star":
        outer, inner = ring(5, r), ring(5, r * 0.42, -54)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if shape == "cross":
        a, b = r * 0.33, r
        return [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    if shape == "arrow":
        return [
            (-r, -r * 0.3),
            (r * 0.1, -r * 0.3),
            (r * 0.1, -r * 0.8),
            (r, 0),
            (r * 0.1, r * 0.8),
            (r * 0.1, r * 0.3),
            (-r, r * 0.3),
        ]
    if shape == "heart":
        points = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            hx = 16 * math.sin(t) ** 3
            hy = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            points.append((hx * r / 17, (hy + 2.5) * r / 17))
        return points
    raise ValueError(f"{shape} is not a polygon")


def _translate(points, cx: float, cy: float, scale: float):
    return [((x + cx) * scale, (y + cy) * scale) for x, y in points]


def _texture_fill(size: tuple[int, int], origin: tuple[int, int], texture: str, colour, scale: int) -> Image.Image:
    """The object's paint over a patch at `origin` (canvas pixels): its colour, patterned with a darker or lighter
    shade for textured objects. The pattern is anchored to the canvas, so it does not move with the patch."""
    w, h = size
    base = np.array(colour, dtype=np.float32)
    # The pattern's shade contrasts with the object and stays far from the grey background.
    shade = base * 0.3 if base.mean() > 128 else base + (255 - base) * 0.75
    yy, xx = np.mgrid[origin[1] : origin[1] + h, origin[0] : origin[0] + w] / scale
    if texture == "striped":
        pattern = (np.floor((xx + yy) / 3.0) % 2) == 1
    elif texture == "dotted":
        pattern = ((xx % 5 - 2.5) ** 2 + (yy % 5 - 2.5) ** 2) < 1.6**2
    elif texture == "checkered":
        pattern = ((np.floor(xx / 3) + np.floor(yy / 3)) % 2) == 1
    else:
        pattern = np.zeros((h, w), dtype=bool)
    paint = np.where(pattern[..., None], shade, base).clip(0, 255).astype(np.uint8)
    return Image.fromarray(paint)


def render(scene: Scene) -> Image.Image:
    """Draw the scene (supersampled, then downsampled: smooth edges, identical output for identical scenes).
    Each object is drawn on a patch around its box, which keeps a scene at a few milliseconds."""
    k = SUPERSAMPLE
    canvas = Image.new("RGB", (scene.size * k, scene.size * k), scene.background)
    for obj in scene.objects:
        reach = obj.radius * 1.15 + 2  # the heart's point reaches 1.15 radius from its centre
        x0, y0 = int((obj.x - reach) * k), int((obj.y - reach) * k)
        side = int(2 * reach * k) + 1
        mask = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(mask)
        if obj.shape in ("circle", "ring", "crescent"):
            bx0, by0, bx1, by1 = ((v - o) * k for v, o in zip(obj.box, (x0 / k, y0 / k) * 2, strict=True))
            draw.ellipse((bx0, by0, bx1, by1), fill=255)
            if obj.shape == "ring":
                inset = obj.radius * 0.45 * k
                draw.ellipse((bx0 + inset, by0 + inset, bx1 - inset, by1 - inset), fill=0)
            if obj.shape == "crescent":
                shift = obj.radius * 0.7 * k
                draw.ellipse((bx0 + shift, by0 - shift * 0.3, bx1 + shift, by1 - shift * 0.3), fill=0)
        else:
            outline = _translate(_polygon(obj.shape, obj.radius), obj.x - x0 / k, obj.y - y0 / k, k)
            draw.polygon(outline, fill=255)
        paint = _texture_fill((side, side), (x0, y0), obj.texture, COLOURS[obj.colour], k)
        canvas.paste(paint, (x0, y0), mask)
    return canvas.resize((scene.size, scene.size), Image.Resampling.LANCZOS)


@dataclass(frozen=True)
class Vocabulary:
    """What a world draws, and which of it captions may name."""

    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    textures: tuple[str, ...] = TEXTURES
    named_shapes: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "crescent")
    named_colours: tuple[str, ...] = GENEVAL_COLOURS
    named_textures: tuple[str, ...] = ("plain",)


def place_objects(
    rng: np.random.Generator, specs: list[dict], size: int = IMAGE_SIZE
) -> tuple[WorldObject, ...] | None:
    """Random non-overlapping placement of objects given as attribute dicts, each centre drawn from the grid points
    still free (None if an object finds none)."""
    placed: list[WorldObject] = []
    for spec in specs:
        radius = SIZES[spec.get("size", "large")]
        axis = np.arange(math.ceil((radius + 1) / GRID), math.floor((size - radius - 1) / GRID) + 1) * GRID
        # A gap of 3 pixels keeps anti-aliased edges of neighbours from touching.
        free = [
            (float(x), float(y))
            for x in axis
            for y in axis
            if all(math.hypot(x - o.x, y - o.y) > radius + o.radius + 3 for o in placed)
        ]
        if not free:
            return None
        x, y = free[int(rng.integers(len(free)))]
        placed.append(WorldObject(radius=radius, x=x, y=y, **spec))
    return tuple(placed)


def relayout(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same content (shapes, colours, textures, sizes, count) at new positions: a reference that shows what
    to draw without fixing where, so a model conditioned on it must still follow its own noise."""
    specs = [{"shape": o.shape, "colour": o.colour, "texture": o.texture, "size": o.size} for o in scene.objects]
    for _ in range(20):
        objects = place_objects(rng, specs, scene.size)
        if objects:
            return replace(scene, objects=objects)
    return scene
