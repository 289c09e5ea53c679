"""Concept fidelity: DINOv2 from a local folder (real class, tiny random config) and CLIP-nano's image space."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import Dinov2Config, Dinov2Model

from dopsd.data import read_dataset
from evaluation.fidelity import DinoEmbedder, dinov2_preprocessing, target_similarity
from evaluation.nano.clip import load_nano_clip
from evaluation.unavailable import MetricUnavailable

PACKS = Path(__file__).parents[1] / "data" / "nano" / "world" / "packs"


def pack_images(name: str) -> list[Image.Image]:
    return [example.load_image() for example in read_dataset(PACKS / name)]


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=32)
    Dinov2Model(config).save_pretrained(folder)
    dinov2_preprocessing(folder, crop=32)
    return DinoEmbedder(folder, batch=4)


def test_dino_features_are_normalised_and_an_image_is_closest_to_itself(dino):
    images = pack_images("star")[:6]
    features = dino.image_features(images)
    assert features.shape == (6, 32)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(6))
    similarity = target_similarity(features[:1], features[:1])
    assert similarity.item() == pytest.approx(1.0, abs=1e-5)
    assert (target_similarity(features[1:], features[:1]) < 1 - 1e-4).all()


def test_clip_nano_fidelity_tells_the_concept_from_another():
    clip = load_nano_clip()
    star = clip.image_features(pack_images("star"))
    teal = clip.image_features(pack_images("teal"))
    targets, held_out = star[: len(star) // 2], star[len(star) // 2 :]
    assert target_similarity(held_out, targets).mean() > target_similarity(teal, targets).mean() + 0.02


def test_missing_backbone_and_empty_sets_are_refused(tmp_path):
    with pytest.raises(MetricUnavailable, match=str(tmp_path / "none")):
        DinoEmbedder(tmp_path / "none")
    with pytest.raises(ValueError, match="needs samples and targets"):
        target_similarity(torch.empty(0, 4), torch.ones(2, 4))
