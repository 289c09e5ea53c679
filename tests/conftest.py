import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests start torch subprocesses (the CLI, accelerate's two processes): OpenMP threads that spin while waiting
# would make processes sharing a small CPU ~10x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
from PIL import Image, ImageDraw

from dopsd.models.tiny import build_tiny_flux2_klein, build_tiny_zimage
from dopsd.nano.bootstrap import BootstrapConfig, bootstrap

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_zimage_path(tmp_path_factory):
    return str(build_tiny_zimage(tmp_path_factory.mktemp("tiny_zimage")))


@pytest.fixture(scope="session")
def tiny_klein_path(tmp_path_factory):
    return str(build_tiny_flux2_klein(tmp_path_factory.mktemp("tiny_klein")))


def nano_judge():
    """The bootstrap's curation judge, as `dopsd nano bootstrap` builds it: the nano detector and the GenEval rules."""
    from evaluation.nano.detector import NanoDetector
    from evaluation.nano.geneval_nano import rules_judge

    return rules_judge(NanoDetector.load())


def tiny_bootstrap_config(workdir, **overrides) -> BootstrapConfig:
    """Every bootstrap stage at a budget of a few steps: the code paths run, the weights barely move."""
    values = dict(
        workdir=str(workdir),
        vae_steps=2,
        vae_batch=4,
        vision_steps=2,
        vision_batch=2,
        pretrain_steps=2,
        pretrain_batch=4,
        pool_size=16,
        pool_refresh=2,
        distill_steps=2,
        distill_batch=2,
        teacher_steps=4,
        teacher_pairs=4,
        refresh_every=2,
        checkpoint_every=1,
        threads=1,
        compile=False,
        pretrain_decay_steps=1,
        distill_decay_steps=1,
        distill_on_policy_steps=2,
        distill_on_policy_decay_steps=1,
        rollout_draws=1,
        rollout_refresh_every=1,
    )
    return BootstrapConfig(**{**values, **overrides})


@pytest.fixture(scope="session")
def tiny_nano_bootstrap(tmp_path_factory) -> BootstrapConfig:
    """A nano model bootstrapped through every stage at the tiny budget."""
    config = tiny_bootstrap_config(tmp_path_factory.mktemp("nano") / "boot")
    bootstrap(config, log=lambda line: None, judge=nano_judge())
    torch.set_num_threads(2)  # the bootstrap set its own thread count
    return config


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A nano world folder at a tiny size: one base prompt per task, two packs of 4 images with 2 prompts each."""
    from dopsd.nano.packs import PACKS, write_pack, write_pack_prompts
    from dopsd.nano.scenes import prompt_set, write_jsonl
    from dopsd.nano.world import Vocabulary

    folder = tmp_path_factory.mktemp("world")
    write_jsonl(prompt_set(Vocabulary(), per_task=1, seed=0), folder / "base_prompts.jsonl")
    for pack in PACKS[:2]:
        write_pack(pack, folder / "packs" / pack.name, count=4)
        write_pack_prompts(pack, folder / "packs" / f"{pack.name}_prompts.jsonl", count=2)
    return folder


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
