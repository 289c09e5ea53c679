"""Load the suite's networks once, from local files; a missing one is recorded with why, never replaced.

Each network is named by a path, or by `nano` for the nano world's own (its detector, CLIP-nano, and CLIP-nano's
image tower as the FID feature network), or left empty (not measured).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from evaluation.suite import Evaluators
from evaluation.unavailable import MetricUnavailable, file_digest

NANO = "nano"


@dataclass
class NetworkPaths:
    detector: str = ""
    """GenEval detector: `nano`, or a Mask2Former folder with COCO instance-segmentation weights."""
    clip: str = ""
    """CLIPScore, GenEval's colour check and CLIP fidelity: `nano`, or an open_clip weights file (.safetensors)."""
    clip_arch: str = "ViT-H-14"
    """open_clip architecture of the `clip` weights (the paper's CLIPScore used ViT-H-14)."""
    fid: str = ""
    """FID features: `nano` (CLIP-nano's image tower), or the FID Inception weights (.safetensors)."""
    dino: str = ""
    """DINO fidelity: a DINOv2 folder (transformers format)."""
    fid_cache: str = ""
    """Folder for cached reference statistics (empty: no cache)."""
    device: str = "cpu"
    """Where the networks run."""

    @classmethod
    def nano(cls, **overrides: Any) -> NetworkPaths:
        return cls(**{"detector": NANO, "clip": NANO, "fid": NANO, **overrides})


def load_networks(paths: NetworkPaths) -> Evaluators:
    evaluators = Evaluators()

    def attempt(name: str, option: str, load: Callable[[], Any]) -> Any:
        if not option:
            evaluators.unavailable[name] = f"no {name} network configured"
            return None
        try:
            return load()
        except MetricUnavailable as error:
            evaluators.unavailable[name] = str(error)
            return None

    evaluators.clip = attempt("clip", paths.clip, lambda: _load_clip(paths))
    evaluators.detector = attempt("detector", paths.detector, lambda: _load_detector(paths))
    if evaluators.detector is not None and paths.detector != NANO:
        if evaluators.clip is None:
            # Real GenEval reads colours with CLIP; without it, colour clauses cannot be judged.
            evaluators.unavailable["detector"] = f"GenEval's colour check needs CLIP: {evaluators.unavailable['clip']}"
            evaluators.detector = None
        else:
            from evaluation.clip import clip_colour_classifier

            evaluators.colour_classifier = clip_colour_classifier(evaluators.clip)
    evaluators.fid = attempt("fid", paths.fid, lambda: _load_fid(paths, evaluators))
    if evaluators.clip is not None:
        evaluators.embedders["clip"] = evaluators.clip
    else:
        evaluators.unavailable["fidelity/clip"] = evaluators.unavailable["clip"]
    dino = attempt("fidelity/dino", paths.dino, lambda: _load_dino(paths))
    if dino is not None:
        evaluators.embedders["dino"] = dino
    return evaluators


def _load_clip(paths: NetworkPaths):
    from evaluation.clip import ClipModel

    if paths.clip == NANO:
        from evaluation.nano.clip import load_nano_clip

        return load_nano_clip(device=paths.device)
    return ClipModel.load(paths.clip_arch, paths.clip, device=paths.device)


def _load_detector(paths: NetworkPaths):
    if paths.detector == NANO:
        from evaluation.nano.detector import NanoDetector

        return NanoDetector.load()
    from evaluation.geneval.mask2former import Mask2FormerDetector

    return Mask2FormerDetector(paths.detector, device=paths.device)


def _load_fid(paths: NetworkPaths, evaluators: Evaluators):
    from evaluation.fid import FrechetDistance

    cache = paths.fid_cache or None
    if paths.fid == NANO:
        if evaluators.clip is None or paths.clip != NANO:
            raise MetricUnavailable("FID-nano is measured in CLIP-nano's image space: it needs clip=nano")
        from evaluation.nano.clip import DEFAULT_WEIGHTS

        return FrechetDistance.clip(evaluators.clip, f"nano-{file_digest(DEFAULT_WEIGHTS)}", cache)
    return FrechetDistance.inception(paths.fid, device=paths.device, cache_dir=cache)


def _load_dino(paths: NetworkPaths):
    from evaluation.fidelity import DinoEmbedder

    return DinoEmbedder(paths.dino, device=paths.device)
