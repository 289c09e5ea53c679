"""CLIP-nano: open_clip's CLIP at a tiny size, trained contrastively on nano-world renders, so that CLIPScore and
GenEval's CLIP colour check have a network that knows the nano world.

Its captions name every attribute the world draws (shape, colour, texture, count, relative position), all of the
vocabulary included, not only the words the nano model is taught: an evaluator must tell apart what it sees.
Each caption is worded at random (attributes left out, GenEval's "red-colored" and "object" phrasings), so prompts
that name less, like GenEval's, still match.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from dopsd.nano.scenes import NUMBER_WORDS, RELATIONS, article, plural, relation_holds
from dopsd.nano.world import GENEVAL_COLOURS, Scene, Vocabulary, WorldObject, render
from evaluation.clip import ClipModel, clip_colour_classifier, masked_crop, safetensors_file
from evaluation.geneval.detection import Detection
from evaluation.nano.detector import object_of, segment
from evaluation.nano.train_detector import world_scenes

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "nano_clip.safetensors"
DEFAULT_METRICS = Path("metrics/nano_clip.json")
HELD_OUT_SEED = 1_000_003
"""Seed of the held-out scenes; training scenes come from `NanoClipTraining.seed`, which must differ."""
WORLD = Vocabulary()
"""Everything the world draws; CLIP-nano names all of it."""
NANO_CLIP_CONFIG: dict = {
    "embed_dim": 64,
    # open_clip's ModifiedResNet: at this size a ViT learns the colours but not the shapes in the time a CPU has.
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
    # The bundled BPE vocabulary has 49408 tokens; its table dominates the parameter count, so the text tower
    # stays narrow to keep the weights file small.
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
"""open_clip `CLIP(**NANO_CLIP_CONFIG)`: a one-block-per-stage ResNet over the 64px renders, a 3-layer text
transformer over open_clip's bundled BPE tokens, 64-dimensional joint space."""


@dataclass(frozen=True)
class Wording:
    """How a caption names a scene. Training draws one at random per caption; evaluation names everything."""

    lead: str = "a photo of "
    colour: bool = True
    """Name each object's colour."""
    colored: bool = False
    """Write a colour as GenEval's colour check does, "red-colored"."""
    texture: bool = True
    """Name each object's texture, "plain" included."""
    shape: bool = True
    """Name each object's shape (else "object", as in GenEval's "a photo of a red object")."""
    relation: bool = False
    """For two objects in a clear relation, say where the first is relative to the second."""


def random_wording(rng: np.random.Generator) -> Wording:
    return Wording(
        lead=str(rng.choice(["a photo of ", "an image of ", "a picture of ", ""])),
        colour=bool(rng.random() < 0.5),
        colored=bool(rng.random() < 0.2),
        texture=bool(rng.random() < 0.5),
        shape=bool(rng.random() < 0.9),
        relation=bool(rng.random() < 0.5),
    )


def noun_phrase(obj: WorldObject, wording: Wording) -> str:
    words = []
    if wording.colour:
        words.append(f"{obj.colour}-colored" if wording.colored else obj.colour)
    if wording.texture:
        words.append(obj.texture)
    words.append(obj.shape if wording.shape else "object")
    return " ".join(words)


def caption(scene: Scene, wording: Wording = Wording()) -> str:
    """The scene in words: its objects with counts ("two red circles and a blue striped square"), or, for two
    objects in a clear relation and a wording that asks for it, where one is ("a red circle left of a blue square")."""
    if wording.relation and len(scene.objects) == 2:
        first, second = scene.objects
        relation = next((r for r in RELATIONS if relation_holds(first, second, r)), None)
        if relation is not None:
            a, b = noun_phrase(first, wording), noun_phrase(second, wording)
            return f"{wording.lead}{article(a)} {a} {relation} {article(b)} {b}"
    groups = Counter(noun_phrase(obj, wording) for obj in scene.objects)
    parts = [f"{article(k)} {k}" if n == 1 else f"{NUMBER_WORDS[n]} {plural(k)}" for k, n in groups.items()]
    return wording.lead + " and ".join(parts)


def build_nano_clip(device: str | torch.device = "cpu") -> ClipModel:
    """CLIP-nano at random weights."""
    model = open_clip.CLIP(**NANO_CLIP_CONFIG)
    preprocess = open_clip.image_transform(NANO_CLIP_CONFIG["vision_cfg"]["image_size"], is_train=False)
    tokenizer = open_clip.SimpleTokenizer(context_length=NANO_CLIP_CONFIG["text_cfg"]["context_length"])
    return ClipModel(model, preprocess, tokenizer, torch.device(device))


def save_nano_clip(clip: ClipModel, path: str | Path = DEFAULT_WEIGHTS) -> Path:
    """Floats in half precision: the token table alone is 12 MB in float32; this way the file stays under 10 MB."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = clip.model.state_dict()
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(path))
    return path


def load_nano_clip(path: str | Path = DEFAULT_WEIGHTS, device: str | torch.device = "cpu") -> ClipModel:
    """The trained CLIP-nano (float32); MetricUnavailable when its weights file is missing."""
    clip = build_nano_clip(device)
    clip.model.load_state_dict(load_file(str(safetensors_file(path, "CLIP-nano"))))
    return clip


@dataclass
class NanoClipTraining:
    steps: int = 1800
    """Optimizer steps."""
    batch: int = 64
    """Image-caption pairs per step: each image's negatives are the captions of its batch not true of it."""
    scenes: int = 6000
    """World scenes to train on (see `training_views`), rendered once and captioned afresh at every draw."""
    lr: float = 2e-3
    """Peak learning rate of the one-cycle schedule."""
    seed: int = 0
    """Seed of the training scenes, captions and initialisation."""
    threads: int = 1
    """CPU threads for torch. One: on a shared 2-core machine, two threads wait on each other behind any other
    process and a step takes ten times longer."""


def training_views(count: int, seed: int) -> tuple[list[Scene], list[Image.Image]]:
    """Scenes and the images CLIP-nano learns them from: `count` of the world's scenes; each object of their first
    half alone (captions of one object tie the attribute words to what they look like, where a whole scene can be
    told apart by its colours alone); and those objects again as GenEval's colour check shows them."""
    scenes = world_scenes(count, seed)
    singles = [Scene((obj,)) for scene in scenes[: count // 2] for obj in scene.objects]
    images = [render(s) for s in scenes + singles]
    crops = [colour_check_view(image) for image in images[len(scenes) :]]
    return scenes + singles + singles, images + crops


def colour_check_view(image: Image.Image) -> Image.Image:
    """A one-object render as GenEval's colour check shows it to CLIP: the masked crop of the nano detector's
    segment, the object filling the frame at a scale no whole render has."""
    (component,) = segment(image)
    return masked_crop(image, Detection("object", component.box, 1.0, component.mask))


def train_nano_clip(config: NanoClipTraining, log: Callable[[str], None] = print) -> ClipModel:
    """CLIP-nano trained contrastively on renders of the world's scenes, captioned with random wordings."""
    if config.seed == HELD_OUT_SEED:
        raise ValueError(f"seed {HELD_OUT_SEED} draws the held-out scenes; train with another")
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    started = time.monotonic()
    scenes, images = training_views(config.scenes, config.seed)
    log(f"rendered {len(images)} training images in {time.monotonic() - started:.0f}s")
    clip = build_nano_clip()
    model = clip.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps)
    for step in range(config.steps):
        picked = rng.choice(len(scenes), config.batch, replace=False)
        chosen = [scenes[i] for i in picked]
        wordings = [random_wording(rng) for _ in chosen]
        captions = [caption(s, w) for s, w in zip(chosen, wordings, strict=True)]
        # A caption is true of a scene iff the scene, worded the same way, reads the same.
        true_of = torch.tensor([[caption(s, w) == c for w, c in zip(wordings, captions, strict=True)] for s in chosen])
        pixels = augment(torch.stack([clip.preprocess(images[i]) for i in picked]))
        image_features, text_features, scale = model(pixels, clip.tokenizer(captions))
        loss = contrastive_loss(image_features, text_features, scale, true_of.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == config.steps - 1:
            log(f"step {step}: loss {loss.item():.3f} ({time.monotonic() - started:.0f}s)")
    model.eval()
    return clip


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor, true_of: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, with every caption that is true of an image as one of its positives, the
    target spread evenly over them: a caption that leaves attributes out ("a circle") is true of more images of
    the batch than its own, and pushing those apart would teach CLIP-nano to ignore what the caption says."""
    logits = scale * image_features @ text_features.T
    per_image = true_of / true_of.sum(dim=1, keepdim=True)
    per_text = true_of.T / true_of.T.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, per_image) + F.cross_entropy(logits.T, per_text)) / 2


def augment(pixels: torch.Tensor) -> torch.Tensor:
    """Generated images are softer and noisier than renders: blur half the batches, add a little noise."""
    if torch.rand(()) < 0.5:
        pixels = F.avg_pool2d(pixels, 3, stride=1, padding=1, count_include_pad=False)
    return pixels + 0.05 * torch.randn_like(pixels)


@dataclass
class NanoClipValidation:
    scenes: int
    """Held-out scenes."""
    objects: int
    """Their objects, each also rendered alone for the zero-shot accuracies."""
    image_to_text: float
    """Top-1 retrieval of each scene's full caption among the captions of its batch of `batch` scenes."""
    batch: int
    """Scenes per retrieval batch: the captions each image picks its own from."""
    shape: float
    """Zero-shot shape accuracy over every shape of the world ("a photo of a star"), one object per image."""
    colour: float
    """Zero-shot colour accuracy over every colour of the world ("a photo of a teal object")."""
    texture: float
    """Zero-shot texture accuracy over every texture of the world ("a photo of a dotted object")."""
    colour_check: float
    """GenEval's colour check (`clip_colour_classifier`) on the scenes' objects of GenEval's ten colours, masked
    crops from the nano detector's segmentation."""


def zero_shot_accuracy(clip: ClipModel, features: torch.Tensor, truth: Sequence[str], prompts: dict[str, str]) -> float:
    """Share of images (features) whose most similar prompt is the one of their true label."""
    labels = list(prompts)
    best = (features @ clip.text_features(list(prompts.values())).T).argmax(dim=-1)
    return float(np.mean([labels[i] == t for i, t in zip(best.tolist(), truth, strict=True)]))


def colour_check_accuracy(clip: ClipModel, scenes: Sequence[Scene], images: Sequence[Image.Image]) -> float:
    """Share of objects of GenEval's colours that GenEval's colour check reads right, given each image's segments
    grouped by their object's shape (the class a GenEval detection would carry)."""
    classify = clip_colour_classifier(clip)
    right = checked = 0
    for scene, image in zip(scenes, images, strict=True):
        by_shape: dict[str, list[tuple[WorldObject, Detection]]] = {}
        for component in segment(image):
            obj = object_of(component.box, scene)
            if obj is not None and obj.colour in GENEVAL_COLOURS:
                detection = Detection(obj.shape, component.box, 1.0, component.mask)
                by_shape.setdefault(obj.shape, []).append((obj, detection))
        for shape, found in by_shape.items():
            colours = classify(image, [d for _, d in found], shape)
            right += sum(c == obj.colour for c, (obj, _) in zip(colours, found, strict=True))
            checked += len(found)
    return right / checked


@torch.no_grad()
def validate_nano_clip(clip: ClipModel, scenes: Sequence[Scene], batch: int = 64) -> NanoClipValidation:
    images = [render(s) for s in scenes]
    captions = [caption(s) for s in scenes]
    hits = 0
    for start in range(0, len(scenes), batch):
        chunk = captions[start : start + batch]
        best = (clip.image_features(images[start : start + batch]) @ clip.text_features(chunk).T).argmax(dim=-1)
        hits += sum(chunk[j] == chunk[i] for i, j in enumerate(best.tolist()))
    objects = [obj for scene in scenes for obj in scene.objects]
    alone = clip.image_features([render(Scene((obj,))) for obj in objects])

    def accuracy(attribute: str, values: Sequence[str], prompt: Callable[[str], str]) -> float:
        truth = [getattr(obj, attribute) for obj in objects]
        return zero_shot_accuracy(clip, alone, truth, {v: prompt(v) for v in values})

    return NanoClipValidation(
        scenes=len(scenes),
        objects=len(objects),
        image_to_text=hits / len(scenes),
        batch=batch,
        shape=accuracy("shape", WORLD.shapes, lambda s: f"a photo of {article(s)} {s}"),
        colour=accuracy("colour", WORLD.colours, lambda c: f"a photo of {article(c)} {c} object"),
        texture=accuracy("texture", WORLD.textures, lambda t: f"a photo of {article(t)} {t} object"),
        colour_check=colour_check_accuracy(clip, scenes, images),
    )


def held_out_scenes(count: int) -> list[Scene]:
    return world_scenes(count, HELD_OUT_SEED)


def build_and_validate(
    config: NanoClipTraining,
    weights: str | Path = DEFAULT_WEIGHTS,
    metrics: str | Path = DEFAULT_METRICS,
    held_out: int = 512,
    log: Callable[[str], None] = print,
) -> NanoClipValidation:
    """Train CLIP-nano, write its weights, and validate the written file (`validate_weights`)."""
    save_nano_clip(train_nano_clip(config, log), weights)
    validation = validate_weights(weights, metrics, held_out)
    log(f"held-out validation: {validation}")
    return validation


def validate_weights(
    weights: str | Path = DEFAULT_WEIGHTS, metrics: str | Path = DEFAULT_METRICS, held_out: int = 512
) -> NanoClipValidation:
    """Validate a CLIP-nano weights file on `held_out` held-out scenes; the figures also go to `metrics` (JSON)."""
    validation = validate_nano_clip(load_nano_clip(weights), held_out_scenes(held_out))
    metrics = Path(metrics)
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps(dataclasses.asdict(validation), indent=2) + "\n")
    return validation


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train and validate CLIP-nano.")
    for f in dataclasses.fields(NanoClipTraining):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--metrics", type=Path, default=DEFAULT_METRICS)
    args = vars(parser.parse_args(argv))
    weights, metrics = args.pop("weights"), args.pop("metrics")
    build_and_validate(NanoClipTraining(**args), weights, metrics)


if __name__ == "__main__":
    main()
