"""GenEval's detector: Mask2Former COCO instance segmentation (transformers), loaded from a local folder.

GenEval runs Mask2Former (Swin backbone, COCO instances) and keeps, per instance, class, box, confidence and mask;
its rules apply the score thresholds themselves. `Mask2FormerDetector` does the same with transformers'
`Mask2FormerForUniversalSegmentation`: score = class probability x mean mask probability inside the mask (the
instance score of the original), box = the mask's extent. `build_tiny_mask2former` writes a randomly initialised
tiny model with the real 80 COCO classes, which loads exactly like released weights (tests, benchmarks).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessor,
    SwinConfig,
)
from transformers.models.mask2former.modeling_mask2former import Mask2FormerForUniversalSegmentationOutput

from evaluation.geneval.detection import Detection
from evaluation.geneval.rules import THRESHOLD
from evaluation.unavailable import MetricUnavailable

GENEVAL_OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
"""GenEval's object vocabulary (its `object_names.txt`), in COCO category order."""
COCO_NAMES = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}
"""Where COCO's own category names, which COCO checkpoints carry in `id2label`, differ from GenEval's prompts."""
OTHER_SPELLINGS = {
    "motorcycle": "motorbike",
    "airplane": "aeroplane",
    "couch": "sofa",
    "tv": "tvmonitor",
    "hair drier": "hair dryer",
    "donut": "doughnut",
}
"""PASCAL-style and British spellings of the same classes, which some converted COCO checkpoints carry."""
COCO_INSTANCE_LABELS = tuple(COCO_NAMES.get(name, name) for name in GENEVAL_OBJECTS)
"""The 80 COCO instance classes as COCO names them, index = class id of a COCO instance-segmentation model."""
DEFAULT_MIN_SCORE = 0.05
"""Instances kept per image: any floor at or below the rules' thresholds gives the same verdicts; a floor above
zero keeps the near-zero queries' masks (up to one per query) out of memory."""


def _normalised(label: str) -> str:
    # "pottedplant", "dining_table", "Cell-Phone": checkpoints differ in case and word separators.
    return re.sub(r"[^a-z0-9]", "", label.lower())


def geneval_names(id2label: Mapping[int, str]) -> dict[int, str]:
    """The GenEval spelling of each class id of a model. A GenEval object that no class spells, or a class that
    is no GenEval object, raises: either would make detections miss without a word."""
    spellings = {
        _normalised(spelling): name
        for name in GENEVAL_OBJECTS
        for spelling in (name, COCO_NAMES.get(name, name), OTHER_SPELLINGS.get(name, name))
    }
    names = {int(i): spellings.get(_normalised(label)) for i, label in id2label.items()}
    unknown = sorted(id2label[i] for i, name in names.items() if name is None)
    missing = sorted(set(GENEVAL_OBJECTS) - set(names.values()))
    if unknown or missing:
        raise ValueError(
            f"the detector's classes do not match GenEval's 80 COCO objects: classes with no GenEval name {unknown}, "
            f"GenEval objects with no class {missing}; GenEval needs a COCO instance-segmentation checkpoint"
        )
    return {i: str(name) for i, name in names.items()}


def same_size_batches(images: Sequence[Image.Image], batch_size: int) -> list[list[int]]:
    """Indices of `images` in batches of at most `batch_size` images of one size."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(image.size, []).append(index)
    return [group[s : s + batch_size] for group in by_size.values() for s in range(0, len(group), batch_size)]


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """x0, y0, x1, y1 of a non-empty boolean mask, x1 and y1 exclusive (as mmdet's `mask2bbox`, GenEval's)."""
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


class Mask2FormerDetector:
    """GenEval detections from a Mask2Former COCO instance-segmentation folder (config, model.safetensors and
    preprocessor_config.json, as `save_pretrained` writes them)."""

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        min_score: float = DEFAULT_MIN_SCORE,
    ):
        folder = Path(path)
        if not folder.is_dir():
            raise MetricUnavailable(f"GenEval detector: Mask2Former folder {folder} does not exist")
        if min_score > THRESHOLD:
            raise ValueError(f"min_score {min_score} would drop instances GenEval's {THRESHOLD} threshold keeps")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.min_score = min_score
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(
            folder, local_files_only=True, use_safetensors=True
        )
        self.model = self.model.to(self.device).eval()
        self.processor = Mask2FormerImageProcessor.from_pretrained(folder, local_files_only=True)
        self.names = geneval_names(self.model.config.id2label)

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        """Detections per image, most confident first."""
        detections: list[list[Detection]] = [[] for _ in images]
        # One size per forward pass: the processor pads a mixed batch to its largest image, the padding changes
        # the backbone's features, and the post-processing would stretch the padded masks over the image.
        for batch in same_size_batches(images, self.batch_size):
            width, height = images[batch[0]].size
            inputs = self.processor(images=[images[i].convert("RGB") for i in batch], return_tensors="pt")
            outputs = self.model(pixel_values=inputs["pixel_values"].to(self.device))
            # The post-processing builds its masks on the CPU, whatever the device of the logits.
            on_cpu = Mask2FormerForUniversalSegmentationOutput(
                class_queries_logits=outputs.class_queries_logits.cpu(),
                masks_queries_logits=outputs.masks_queries_logits.cpu(),
            )
            results = self.processor.post_process_instance_segmentation(
                on_cpu, threshold=self.min_score, target_sizes=[(height, width)] * len(batch), return_binary_maps=True
            )
            for index, result in zip(batch, results, strict=True):
                detections[index] = sorted(self._detections(result), key=lambda d: -d.score)
        return detections

    def _detections(self, result: dict) -> list[Detection]:
        # Without instances `segmentation` is a single label map rather than one mask per instance. The
        # post-processing already drops instances whose mask is empty at the image's size.
        if not result["segments_info"]:
            return []
        masks = result["segmentation"].bool().numpy()
        return [
            Detection(cls=self.names[info["label_id"]], box=mask_box(mask), score=float(info["score"]), mask=mask)
            for info, mask in zip(result["segments_info"], masks, strict=True)
        ]


def build_tiny_mask2former(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny, randomly initialised Mask2Former with the 80 COCO instance classes and its image processor to
    `out_dir` (about 360k parameters; images resized to 64-128 px)."""
    torch.manual_seed(seed)
    backbone = SwinConfig(
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        drop_path_rate=0.0,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=64,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=64,
        num_queries=20,
        id2label=dict(enumerate(COCO_INSTANCE_LABELS)),
        label2id={label: i for i, label in enumerate(COCO_INSTANCE_LABELS)},
    )
    out = Path(out_dir)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(out)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}).save_pretrained(out)
    return out
