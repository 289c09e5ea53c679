"""Throughput of the evaluation suite's parts, in images per second: sampling at the deployed step count, and
each metric's network on those images.

- `--world nano` (CPU): the nano model's architecture (random weights: speed does not depend on them) sampled at
  64 px; the nano detector with GenEval's rules, CLIP-nano's CLIPScore, FID-nano (CLIP-nano's image tower), and
  for scale the real metric architectures at random weights: FID InceptionV3 (2048 features), a tiny Mask2Former.
- `--world full` (GPU): Z-Image's full transformer at 1024 px with random weights (tiny stand-in VAE and text
  encoder, as in step_cost.py), ViT-H-14 CLIPScore, FID InceptionV3, Mask2Former with a Swin-L backbone, DINOv2-L.

Each part is built when its turn comes (`--only` picks some), runs once on two images to warm up, then is timed
over `--images` images.

    .venv/bin/python benchmarks/eval_cost.py --world nano --images 64
    .venv/bin/python benchmarks/eval_cost.py --world full --device cuda --images 32   # GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.models import inception_v3

from dopsd.models.zimage import ZImageModel
from dopsd.nano.model import NANO_RESOLUTION, build_nano_pipeline
from dopsd.nano.world import render
from dopsd.sampling import sample_images
from evaluation.clip import ClipModel, clip_score
from evaluation.fid import FrechetDistance
from evaluation.geneval.mask2former import Mask2FormerDetector, build_tiny_mask2former
from evaluation.geneval.rules import evaluate_image
from evaluation.nano.train_detector import world_scenes

Part = Callable[[list[Image.Image]], object]


def timed(part: Part, images: list[Image.Image], device: torch.device) -> float:
    """Images per second of `part` over `images`, after one warm-up call on a few of them."""
    part(images[:2])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    part(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(images) / (time.perf_counter() - start)


def inception_weights(folder: Path) -> Path:
    """The FID InceptionV3 architecture at random weights, as the safetensors file users convert theirs to."""
    weights = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True).state_dict()
    path = folder / "inception.safetensors"
    save_file(weights, str(path))
    return path


def sampler(model: ZImageModel, steps: int, resolution: int, batch: int) -> Part:
    contexts = model.encode_student(["a red circle above a blue square"])

    def sample(images: list[Image.Image]) -> object:
        return sample_images(model, contexts * len(images), [0], steps, resolution, batch)

    return sample


def clip_scorer(clip: ClipModel) -> Part:
    return lambda images: clip_score(clip, images, ["a photo of a red circle"] * len(images))


def nano_geneval() -> Part:
    from evaluation.nano.detector import NanoDetector

    detector = NanoDetector.load()
    record = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a red circle"}
    return lambda images: [evaluate_image(im, d, record) for im, d in zip(images, detector.detect(images), strict=True)]


def nano_parts(folder: Path, device: torch.device, steps: int, batch: int) -> dict[str, Callable[[], Part]]:
    from evaluation.nano.clip import load_nano_clip

    def nano_model() -> ZImageModel:
        return ZImageModel.load(str(build_nano_pipeline(folder / "nano")), device=device, with_teacher_encoder=False)

    return {
        f"sampling, {steps} steps, {NANO_RESOLUTION} px": lambda: sampler(nano_model(), steps, NANO_RESOLUTION, batch),
        "GenEval: nano detector + rules": nano_geneval,
        "CLIPScore (CLIP-nano)": lambda: clip_scorer(load_nano_clip(device=device)),
        "FID-nano features (CLIP-nano image tower)": lambda: FrechetDistance.clip(load_nano_clip(), "nano").features,
        "FID features (InceptionV3, 2048, random weights)": lambda: (
            FrechetDistance.inception(inception_weights(folder), device=device).features
        ),
        "Mask2Former detection (tiny, random weights)": lambda: (
            Mask2FormerDetector(build_tiny_mask2former(folder / "mask2former"), device=str(device)).detect
        ),
    }


def swin_large_mask2former(folder: Path) -> Path:
    """Mask2Former with GenEval's Swin-L backbone and COCO's 80 instance classes, at random weights."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    from evaluation.geneval.mask2former import COCO_INSTANCE_LABELS

    swin_large = SwinConfig(
        embed_dim=192,
        depths=[2, 2, 18, 2],
        num_heads=[6, 12, 24, 48],
        window_size=12,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=swin_large, num_queries=200, id2label=dict(enumerate(COCO_INSTANCE_LABELS))
    )
    Mask2FormerForUniversalSegmentation(config).save_pretrained(folder)
    Mask2FormerImageProcessor().save_pretrained(folder)
    return folder


def dinov2_large(folder: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    from evaluation.fidelity import dinov2_preprocessing

    Dinov2Model(Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16)).save_pretrained(folder)
    return dinov2_preprocessing(folder)


def full_parts(folder: Path, device: torch.device, steps: int, batch: int) -> dict[str, Callable[[], Part]]:
    from step_cost import PRESETS, build_model  # run as a script: benchmarks/ is on the path

    from evaluation.fidelity import DinoEmbedder

    return {
        f"sampling, {steps} steps, 1024 px (Z-Image full, bf16)": lambda: sampler(
            build_model(PRESETS["full"], device, torch.bfloat16), steps, 1024, batch
        ),
        "CLIPScore (ViT-H-14)": lambda: clip_scorer(ClipModel.load("ViT-H-14", None, device=device)),
        "FID features (InceptionV3, 2048)": lambda: (
            FrechetDistance.inception(inception_weights(folder), device=device).features
        ),
        "Mask2Former detection (Swin-L)": lambda: (
            Mask2FormerDetector(swin_large_mask2former(folder / "mask2former"), device=str(device)).detect
        ),
        "DINO fidelity features (DINOv2-L)": lambda: (
            DinoEmbedder(dinov2_large(folder / "dino"), device=device).image_features
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", choices=["nano", "full"], default="nano")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=64, help="images timed per part")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps (the deployed setting)")
    parser.add_argument("--batch", type=int, default=16, help="images per sampling batch")
    parser.add_argument("--only", nargs="*", help="time only the parts whose names contain one of these words")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        build = nano_parts if args.world == "nano" else full_parts
        parts = {name: make for name, make in build(Path(tmp), device, args.steps, args.batch).items()}
        chosen = {name: make for name, make in parts.items() if not args.only or any(k in name for k in args.only)}
        side = NANO_RESOLUTION if args.world == "nano" else 1024
        pool = [render(scene).resize((side, side)) for scene in world_scenes(16, seed=0)]
        images = [pool[i % len(pool)] for i in range(args.images)]
        rates = {name: timed(make(), images, device) for name, make in chosen.items()}
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    lines = [
        f"# Evaluation cost ({args.world})",
        "",
        "`" + shlex.join([sys.executable, *sys.argv]) + "`",
        "",
        f"- device: {machine}, {torch.get_num_threads()} torch threads; torch {torch.__version__}",
        f"- images per part: {args.images}",
        "",
        "| part | images/s |",
        "|---|---|",
        *[f"| {name} | {rate:.3g} |" for name, rate in rates.items()],
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"world": args.world, "device": machine, "images_per_s": rates}, indent=2))


if __name__ == "__main__":
    main()
