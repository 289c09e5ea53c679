"""CLIPScore and GenEval's CLIP colour check, over any open_clip model: a released checkpoint or CLIP-nano.

CLIPScore is computed here, not with torchmetrics (whose CLIPScore breaks on transformers-5 CLIP models): per
(image, text) pair, 100 * max(cos(image features, text features), 0), Hessel et al.'s formula with w = 100 as
torchmetrics has it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from evaluation.geneval.detection import Detection
from evaluation.geneval.rules import COLOURS, ColourClassifier
from evaluation.unavailable import require_file

COLOUR_TEMPLATES = (
    "a photo of a {colour} {object}",
    "a photo of a {colour}-colored {object}",
    "a photo of a {colour} object",
)
"""GenEval's colour prompts; a colour's embedding is the renormalised mean of the three."""
MASK_FILL = "#999"
"""What replaces the pixels outside a detection's mask before the colour check: GenEval's default `bgcolor`. A
neutral grey pulls the colour reading toward no hue, where white would read as a white or pale object (and the
nano world's own background is grey, so CLIP-nano has seen objects on grey)."""


def safetensors_file(path: str | Path, what: str) -> Path:
    """The weights file at `path`: MetricUnavailable when it is missing. Anything but safetensors is refused, since
    open_clip would torch.load it and unpickling a file from elsewhere can run code."""
    path = require_file(path, what)
    if path.suffix != ".safetensors":
        raise ValueError(f"{what}: {path} is not a .safetensors file; convert it to safetensors to load it")
    return path


@dataclass
class ClipModel:
    """An open_clip CLIP with its own preprocessing and tokenizer, giving L2-normalised features."""

    model: open_clip.CLIP
    """An open_clip `CLIP` (anything with `encode_image` and `encode_text`)."""
    preprocess: Callable[[Image.Image], torch.Tensor]
    """The model's evaluation transform: PIL image -> normalised (3, H, W) tensor."""
    tokenizer: Callable[..., torch.Tensor]
    """An open_clip tokenizer: texts (and an optional `context_length`) -> (N, context length) token ids."""
    device: torch.device = torch.device("cpu")
    batch: int = 64
    """Images or texts per forward pass."""

    def __post_init__(self) -> None:
        self.model = self.model.to(self.device).eval()

    @classmethod
    def load(cls, arch: str, pretrained: str | Path | None, device: str | torch.device = "cpu") -> ClipModel:
        """open_clip's `arch` with the weights in the safetensors file `pretrained`, or random weights when None."""
        weights = None if pretrained is None else safetensors_file(pretrained, f"CLIP {arch}")
        # Built empty and filled here, so a weights file only ever goes through safetensors; the text tower's
        # default weights are not fetched either, as the file replaces them.
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, pretrained_text=False)
        if weights is not None:
            model.load_state_dict(load_file(str(weights)))
        return cls(model, preprocess, open_clip.get_tokenizer(arch), torch.device(device))

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) L2-normalised image features, on the CPU."""
        features = []
        for start in range(0, len(images), self.batch):
            pixels = torch.stack(
                [self.preprocess(image.convert("RGB")) for image in images[start : start + self.batch]]
            )
            features.append(self.model.encode_image(pixels.to(self.device)).float().cpu())
        return F.normalize(torch.cat(features), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) L2-normalised text features, on the CPU; texts longer than the context are cut, with a warning."""
        tokens = self.tokens(texts)
        features = [
            self.model.encode_text(tokens[start : start + self.batch].to(self.device)).float().cpu()
            for start in range(0, len(tokens), self.batch)
        ]
        return F.normalize(torch.cat(features), dim=-1)

    def tokens(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids at the model's context length. The tokenizer cuts long texts silently; a text did not fit iff
        tokenizing it with one more slot changes its first `context` tokens (the cut one ends early with its
        end-of-text token)."""
        texts = list(texts)
        tokens = self.tokenizer(texts)
        context = tokens.shape[1]
        roomier = self.tokenizer(texts, context_length=context + 1)
        cut = int((roomier[:, :context] != tokens).any(dim=1).sum())
        if cut:
            warnings.warn(
                f"{cut} of {len(texts)} texts are longer than CLIP's {context} tokens and were cut", stacklevel=3
            )
        return tokens


def clip_score(clip: ClipModel, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
    """CLIPScore of each (image, text) pair: 100 * max(cosine similarity, 0), shape (N,)."""
    if len(images) != len(texts):
        raise ValueError(f"CLIPScore pairs images with texts, got {len(images)} images and {len(texts)} texts")
    cosine = (clip.image_features(images) * clip.text_features(texts)).sum(dim=-1)
    return 100 * cosine.clamp(min=0)


def class_embeddings(clip: ClipModel, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
    """One embedding per class from its prompts, (classes, D): the renormalised mean of the prompts' text features,
    as open_clip's zero-shot classifiers build them."""
    features = clip.text_features([p for class_prompts in prompts for p in class_prompts])
    per_class = features.split([len(class_prompts) for class_prompts in prompts])
    return F.normalize(torch.stack([f.mean(dim=0) for f in per_class]), dim=-1)


def masked_crop(image: Image.Image, detection: Detection) -> Image.Image:
    """What GenEval's colour check looks at: the detection's box, pixels outside its mask painted MASK_FILL."""
    image = image.convert("RGB")
    if detection.mask is not None:
        fill = Image.new("RGB", image.size, MASK_FILL)
        image = Image.composite(image, fill, Image.fromarray(detection.mask.astype("uint8") * 255))
    return image.crop(detection.box)


def clip_colour_classifier(clip: ClipModel, colours: Sequence[str] = COLOURS) -> ColourClassifier:
    """GenEval's colour check: CLIP zero-shot over `colours` on each detection's masked crop."""

    @cache
    def colour_embeddings(cls: str) -> torch.Tensor:
        return class_embeddings(clip, [[t.format(colour=c, object=cls) for t in COLOUR_TEMPLATES] for c in colours])

    def classify(image: Image.Image, detections: Sequence[Detection], cls: str) -> list[str]:
        if not detections:
            return []
        crops = [masked_crop(image, d) for d in detections]
        best = (clip.image_features(crops) @ colour_embeddings(cls).T).argmax(dim=-1)
        return [colours[i] for i in best.tolist()]

    return classify
