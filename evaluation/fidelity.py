"""Concept fidelity: how close a round's samples are to the concept's target images, in a feature space.

The score is DreamBooth's (DINO / CLIP-I): the mean cosine similarity over every (sample, target) pair, 1 for
identical features. It is measured on two prompt sets: prompts that rewrite the training scenes (did the model
learn what it was shown?) and new-scene prompts (does the concept carry to scenes it was not shown?).

Any backbone that maps images to features works (`ImageEmbedder`); two are provided: CLIP image features
(`evaluation.clip.ClipModel`) and a DINOv2 backbone from a local folder (`DinoEmbedder`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image

from evaluation.unavailable import MetricUnavailable


class ImageEmbedder(Protocol):
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) L2-normalised features."""
        ...


class DinoEmbedder:
    """The CLS token of a DINOv2 backbone (transformers `Dinov2Model`) loaded from a local folder."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch: int = 32):
        from transformers import AutoImageProcessor, Dinov2Model

        if not Path(path, "config.json").is_file():
            raise MetricUnavailable(f"DINO fidelity: no DINOv2 model folder at {path} (config.json missing)")
        self.model = Dinov2Model.from_pretrained(path, local_files_only=True, use_safetensors=True).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.device = torch.device(device)
        self.batch = batch

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        features = []
        for start in range(0, len(images), self.batch):
            chunk = [im.convert("RGB") for im in images[start : start + self.batch]]
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device)
            features.append(self.model(pixel_values=pixels).pooler_output.float().cpu())
        return F.normalize(torch.cat(features), dim=-1)


def dinov2_preprocessing(folder: str | Path, crop: int = 224) -> Path:
    """Write DINOv2's released image preprocessing (resize the short side, centre crop, ImageNet statistics) into a
    model folder; for backbones built locally (tests, benchmarks) rather than downloaded with their own."""
    from transformers import BitImageProcessor

    BitImageProcessor(
        size={"shortest_edge": crop * 8 // 7},
        crop_size={"height": crop, "width": crop},
        do_center_crop=True,
        do_convert_rgb=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return Path(folder)


def target_similarity(sample_features: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
    """Each sample's mean cosine similarity to the targets (L2-normalised features); their mean over the samples is
    the fidelity score. Per sample, so samples can be scored batch by batch against targets embedded once."""
    if not len(sample_features) or not len(target_features):
        raise ValueError(
            f"concept fidelity needs samples and targets, got {len(sample_features)} and {len(target_features)}"
        )
    return (sample_features @ target_features.T).mean(dim=1)
