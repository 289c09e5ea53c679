import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torchvision.models import inception_v3

from dopsd.nano.world import render
from evaluation.fid import FrechetDistance
from evaluation.nano.train_detector import world_scenes
from evaluation.unavailable import MetricUnavailable

SET_SIZE = 10


class CountingFeatures(nn.Module):
    """A small random CNN over uint8 images that counts its forward passes."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.calls = 0

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.layers(pixels.float() / 255)


def renders(seed: int, count: int = SET_SIZE) -> list[Image.Image]:
    return [render(scene) for scene in world_scenes(count, seed)]


@pytest.fixture(scope="module")
def image_sets() -> dict[str, list[Image.Image]]:
    first = renders(seed=0)
    return {
        "renders": first,
        "reseeded": renders(seed=1),
        "black": [Image.new("RGB", first[0].size, "black") for _ in range(SET_SIZE)],
    }


def small_network_fid(cache_dir, name: str = "counting-cnn") -> FrechetDistance:
    torch.manual_seed(0)
    return FrechetDistance(CountingFeatures(), 16, name, image_size=64, cache_dir=cache_dir, batch=4)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """The FID InceptionV3 architecture at random weights (torchvision's Inception3 has the same parameter names),
    written as the safetensors file a user converts the official weights to."""
    torch.manual_seed(0)
    weights = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True).state_dict()
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_file(weights, str(path))
    return path


@pytest.fixture(scope="module", params=["inception", "small network"])
def fid(request, inception_weights, tmp_path_factory) -> FrechetDistance:
    cache_dir = tmp_path_factory.mktemp("fid_cache")
    if request.param == "inception":
        # The 64-feature layer keeps the covariance (and the CPU time) small; loading builds the whole network.
        return FrechetDistance.inception(inception_weights, cache_dir, layer=64, batch=SET_SIZE)
    return small_network_fid(cache_dir)


def test_a_set_against_itself_is_at_zero(fid, image_sets):
    renders = image_sets["renders"]
    reference = fid.reference_statistics(renders)
    scale = fid.fid(reference, image_sets["black"])
    assert scale > 0
    assert abs(fid.fid(reference, renders)) < 1e-4 * scale


def test_a_different_set_is_further_than_a_reseeded_one(fid, image_sets):
    reference = fid.reference_statistics(image_sets["renders"])
    assert fid.fid(reference, image_sets["black"]) > 10 * fid.fid(reference, image_sets["reseeded"])


def test_statistics_of_features_match_the_reference_statistics(fid, image_sets):
    features = fid.features(image_sets["reseeded"])
    assert features.shape == (SET_SIZE, fid.num_features)
    baseline = fid.statistics(features)
    assert fid.distance(baseline, features) == pytest.approx(fid.fid(baseline, image_sets["reseeded"]), abs=1e-6)
    cached = fid.reference_statistics(image_sets["reseeded"])
    torch.testing.assert_close(cached.features_cov_sum, baseline.features_cov_sum)


def test_reference_statistics_are_read_from_the_cache_on_the_next_run(tmp_path, image_sets):
    first_run = small_network_fid(tmp_path)
    computed = first_run.reference_statistics(image_sets["renders"])
    assert first_run.network.calls > 0

    next_run = small_network_fid(tmp_path)
    cached = next_run.reference_statistics(image_sets["renders"])
    assert next_run.network.calls == 0
    torch.testing.assert_close(cached.features_sum, computed.features_sum)
    torch.testing.assert_close(cached.features_cov_sum, computed.features_cov_sum)
    assert cached.num_samples == computed.num_samples == SET_SIZE

    next_run.reference_statistics(image_sets["reseeded"])
    assert next_run.network.calls > 0, "other images must not hit the cache"
    other_network = small_network_fid(tmp_path, name="another-cnn")
    other_network.reference_statistics(image_sets["renders"])
    assert other_network.network.calls > 0, "another network must not hit the cache"


def test_without_a_cache_dir_reference_statistics_are_computed_each_time(image_sets):
    fid = small_network_fid(cache_dir=None)
    fid.reference_statistics(image_sets["renders"])
    calls = fid.network.calls
    fid.reference_statistics(image_sets["renders"])
    assert fid.network.calls == 2 * calls


def test_missing_inception_weights_are_unavailable(tmp_path):
    missing = tmp_path / "inception.safetensors"
    with pytest.raises(MetricUnavailable, match=str(missing)):
        FrechetDistance.inception(missing, tmp_path / "cache")


def test_fewer_than_two_images_raise(tmp_path, image_sets):
    fid = small_network_fid(tmp_path)
    reference = fid.reference_statistics(image_sets["renders"])
    one = image_sets["renders"][:1]
    with pytest.raises(ValueError, match="got 1"):
        fid.fid(reference, one)
    with pytest.raises(ValueError, match="got 1"):
        fid.reference_statistics(one)
    with pytest.raises(ValueError, match="got 0"):
        fid.fid(reference, [])
