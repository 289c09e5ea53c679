"""FID: the Fréchet distance between Gaussian fits of two image sets' features (Heusel et al., 2017).

torchmetrics' `FrechetInceptionDistance` does the maths (feature sums, covariances, the distance); this module
feeds it the features of one network, loaded once per evaluation run, and caches the statistics of reference sets
on disk, keyed by the images' pixels and the network, because real reference sets are large and never change.

Both FIDs of the suite are the same call, `fid(statistics_of_set_a, images_of_set_b)`: set A is the real reference
images for `fid/reference`, the baseline's samples of the same prompts and seeds for `fid/baseline`.

Standard FID runs torch-fidelity's port of the TensorFlow InceptionV3 with its 2015-12-05 weights (the file
pytorch-fid and torch-fidelity both download as `*inception-2015-12-05-6726825d.pth`). Weights are read from
safetensors only; convert that file once with

    python -c "import torch, safetensors.torch as st; w = torch.load('pt_inception-2015-12-05-6726825d.pth',
    weights_only=True); st.save_file({k: v.contiguous() for k, v in w.items()}, 'inception-2015-12-05.safetensors')"

Any other network fits as well (`FrechetDistance(network, ...)`), e.g. the nano world's own small one.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchvision.transforms import Normalize

from evaluation.unavailable import file_digest, require_file

if TYPE_CHECKING:
    from evaluation.clip import ClipModel

INCEPTION_SIZE = 299
"""InceptionV3's input side."""


@dataclass(frozen=True)
class FeatureStatistics:
    """What FID keeps of an image set: torchmetrics' states for one set (sum of the features, sum of their outer
    products, count), which are summed over batches and turned into a mean and a covariance only at the end."""

    features_sum: torch.Tensor
    features_cov_sum: torch.Tensor
    num_samples: int

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside, then renamed: a run killed mid-write must not leave a truncated cache entry behind.
        partial = path.with_name(path.name + ".partial")
        tensors = {
            "features_sum": self.features_sum,
            "features_cov_sum": self.features_cov_sum,
            "num_samples": torch.tensor(self.num_samples),
        }
        save_file(tensors, str(partial))
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> FeatureStatistics:
        tensors = load_file(str(path))
        return cls(tensors["features_sum"], tensors["features_cov_sum"], int(tensors["num_samples"]))


class _GivenFeatures(nn.Module):
    """torchmetrics' feature network when the features are computed beforehand: it hands them through."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def load_inception(path: Path, layer: int = 2048) -> nn.Module:
    """torch-fidelity's FID InceptionV3 (as torchmetrics wraps it: always in eval mode) with the weights of a
    safetensors file, returning the features of `layer` (64, 192, 768 or 2048, the standard FID's)."""
    weights = load_file(str(path))
    # torch-fidelity takes weights only through torch.load, of a path or of a download when none is given. A buffer
    # we pickle here from the safetensors tensors keeps both away: nothing is downloaded, no user pickle is read.
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    buffer.seek(0)
    return NoTrainInceptionV3("inception-v3-compat", [str(layer)], feature_extractor_weights_path=buffer)


class ClipImageTower(nn.Module):
    """A CLIP image encoder as the feature network: uint8 pixels at its input size -> its image embeddings. FID in
    a CLIP space tracks human judgement better than Inception's on unusual image sets (Kynkaanniemi et al., 2023),
    and the nano world has no Inception of its own."""

    def __init__(self, clip: ClipModel):
        super().__init__()
        self.model = clip.model
        normalize = next(t for t in getattr(clip.preprocess, "transforms", []) if isinstance(t, Normalize))
        self.normalize = normalize

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self.normalize(pixels.float() / 255))


class FrechetDistance:
    """FID in the feature space of one network, which maps uint8 (N, 3, S, S) images to (N, num_features)."""

    def __init__(
        self,
        network: nn.Module,
        num_features: int,
        name: str,
        image_size: int,
        cache_dir: str | Path | None = None,
        batch: int = 32,
        device: str | torch.device = "cpu",
    ):
        """`name` stands for the network and its weights in the cache keys: give another name when they change.
        Without a `cache_dir`, reference statistics are computed on every call."""
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.num_features = num_features
        self.name = name
        self.image_size = image_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch = batch
        self._metric = FrechetInceptionDistance(feature=_GivenFeatures(num_features))

    @classmethod
    def inception(
        cls,
        weights: str | Path,
        cache_dir: str | Path | None = None,
        layer: int = 2048,
        batch: int = 32,
        device: str | torch.device = "cpu",
    ) -> FrechetDistance:
        """Standard FID (InceptionV3 from a safetensors file, see the module's docstring); MetricUnavailable when
        the file is missing. A shallower `layer` suits sets too small for a 2048-dimensional covariance."""
        path = require_file(weights, "FID (InceptionV3)")
        network = load_inception(path, layer)
        name = f"inception-v3-{layer}-{file_digest(path)}"
        return cls(network, layer, name, INCEPTION_SIZE, cache_dir, batch, device)

    @classmethod
    def clip(cls, clip: ClipModel, name: str, cache_dir: str | Path | None = None, batch: int = 32) -> FrechetDistance:
        """FID in the image-embedding space of `clip` (see `ClipImageTower`); `name` identifies its weights."""
        size = clip.model.visual.image_size
        side = size if isinstance(size, int) else size[0]
        tower = ClipImageTower(clip)
        dimension = int(tower(torch.zeros(1, 3, side, side, dtype=torch.uint8, device=clip.device)).shape[-1])
        return cls(tower, dimension, f"clip-{name}", side, cache_dir, batch, clip.device)

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, num_features) on the CPU, computed batch by batch."""
        batches = [
            self.network(self._pixels(images[start : start + self.batch]).to(self.device)).float().cpu()
            for start in range(0, len(images), self.batch)
        ]
        return torch.cat(batches) if batches else torch.empty(0, self.num_features)

    def statistics(self, features: torch.Tensor) -> FeatureStatistics:
        """The statistics of one set's features (e.g. the baseline's samples, gathered batch by batch)."""
        _require_covariance(len(features))
        self._metric.reset()
        self._metric.update(features, real=True)
        return FeatureStatistics(
            self._metric.real_features_sum.clone(),
            self._metric.real_features_cov_sum.clone(),
            int(self._metric.real_features_num_samples),
        )

    def reference_statistics(self, images: Sequence[Image.Image]) -> FeatureStatistics:
        """The statistics of a set compared against again and again (real reference images): computed once, then
        read from `cache_dir`, where they are keyed by the images' pixels and the network."""
        if self.cache_dir is None:
            return self.statistics(self.features(images))
        path = self.cache_dir / f"{self._cache_key(images)}.safetensors"
        if path.is_file():
            return FeatureStatistics.load(path)
        statistics = self.statistics(self.features(images))
        statistics.save(path)
        return statistics

    def distance(self, reference: FeatureStatistics, features: torch.Tensor) -> float:
        """FID between the set `reference` summarises and the set of `features`."""
        _require_covariance(len(features))
        self._metric.reset()
        self._metric.real_features_sum = reference.features_sum
        self._metric.real_features_cov_sum = reference.features_cov_sum
        self._metric.real_features_num_samples = torch.tensor(reference.num_samples)
        self._metric.update(features, real=False)
        # A distance is never negative; the square root of a covariance product can dip just below 0 numerically.
        return max(0.0, float(self._metric.compute()))

    def fid(self, reference: FeatureStatistics, images: Sequence[Image.Image]) -> float:
        """FID of `images` against a set's statistics: real references (`reference_statistics`) or another model's
        samples (`statistics(features(samples))`)."""
        return self.distance(reference, self.features(images))

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        # PIL's antialiased bicubic resize (clean-fid's choice) brings sets of any image size to one batchable size.
        side = (self.image_size, self.image_size)
        arrays = [np.asarray(image.convert("RGB").resize(side, Image.Resampling.BICUBIC)) for image in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    def _cache_key(self, images: Sequence[Image.Image]) -> str:
        digest = hashlib.sha256(f"{self.name}\n{self.image_size}\n".encode())
        for image in images:
            # Mode and size fix how many pixel bytes follow, so no two different sets hash the same stream.
            digest.update(f"{image.mode} {image.size}\n".encode())
            digest.update(image.tobytes())
        return digest.hexdigest()


def _require_covariance(count: int) -> None:
    if count < 2:
        raise ValueError(f"FID needs at least 2 images per set to estimate a covariance, got {count}")
