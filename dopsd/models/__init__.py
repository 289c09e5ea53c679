"""Model families behind one interface, and the loader that picks the right one for a folder or hub id."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dopsd.models.base import Context, FewStepModel
from dopsd.models.flux2_klein import Flux2KleinModel
from dopsd.models.zimage import ZImageModel

PIPELINE_FAMILIES = {"ZImagePipeline": "zimage", "Flux2KleinPipeline": "flux2-klein"}

__all__ = ["Context", "FewStepModel", "Flux2KleinModel", "ZImageModel", "detect_family", "load_model"]


def detect_family(path_or_id: str) -> str:
    """The family of a local pipeline folder, read from its model_index.json."""
    index = Path(path_or_id) / "model_index.json"
    if not index.is_file():
        if Path(path_or_id).exists():
            raise ValueError(
                f"{path_or_id} is not a diffusers pipeline folder (no model_index.json); point --model at a "
                f"folder saved with save_pretrained, or a hub id with --family {'|'.join(PIPELINE_FAMILIES.values())}"
            )
        raise ValueError(f"{path_or_id}: no such folder; for a hub id pass --family explicitly")
    class_name = json.loads(index.read_text()).get("_class_name")
    if class_name not in PIPELINE_FAMILIES:
        raise ValueError(
            f"{path_or_id} holds a {class_name}, which dopsd does not support; supported pipelines: "
            f"{', '.join(PIPELINE_FAMILIES)}"
        )
    return PIPELINE_FAMILIES[class_name]


def load_model(
    path_or_id: str,
    family: str = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    teacher_encoder: str = "",
    max_caption_tokens: int = 512,
    text_encoder_layers: tuple[int, ...] = (),
    with_teacher_encoder: bool = True,
) -> FewStepModel:
    """Load a family's model; `with_teacher_encoder=False` skips Z-Image's Qwen3-VL (sampling needs none)."""
    if family == "auto":
        family = detect_family(path_or_id)
    elif Path(path_or_id).exists() and detect_family(path_or_id) != family:
        raise ValueError(f"{path_or_id} holds a {detect_family(path_or_id)} pipeline, not {family}; use --family auto")
    if family == "zimage":
        return ZImageModel.load(
            path_or_id,
            teacher_encoder or None,
            device=device,
            dtype=dtype,
            with_teacher_encoder=with_teacher_encoder,
            max_caption_tokens=max_caption_tokens,
        )
    if family == "flux2-klein":
        extra = {"text_layers": text_encoder_layers} if text_encoder_layers else {}
        return Flux2KleinModel.load(
            path_or_id, device=device, dtype=dtype, max_caption_tokens=max_caption_tokens, **extra
        )
    raise ValueError(f"unknown model family {family!r}; choose zimage or flux2-klein")
