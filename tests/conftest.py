import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from PIL import Image, ImageDraw

from dopsd.models.tiny import build_tiny_flux2_klein, build_tiny_zimage

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_zimage_path(tmp_path_factory):
    return str(build_tiny_zimage(tmp_path_factory.mktemp("tiny_zimage")))


@pytest.fixture(scope="session")
def tiny_klein_path(tmp_path_factory):
    return str(build_tiny_flux2_klein(tmp_path_factory.mktemp("tiny_klein")))


def write_dataset(folder, count=4, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), (255, 255, 255))
        ImageDraw.Draw(image).rectangle((2 + i, 4, 14 + i, 20), fill=(40 * i, 100, 200))
        image.save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(f"a blue box number {i}")
    return folder


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / "data")
