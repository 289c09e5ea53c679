"""The nano bootstrap runs every stage end to end at a tiny budget, resumes, and yields a real ZImagePipeline."""

import json

import torch
from diffusers import ZImagePipeline
from safetensors.torch import load_file

from dopsd.models import load_model
from dopsd.nano.bootstrap import BootstrapConfig, bootstrap
from dopsd.nano.model import NANO_RESOLUTION


def tiny_budget(workdir, **overrides):
    values = dict(
        workdir=str(workdir),
        vae_steps=2,
        vae_batch=4,
        pretrain_steps=2,
        pretrain_batch=4,
        pool_size=16,
        pool_refresh=2,
        distill_steps=2,
        distill_batch=2,
        teacher_steps=4,
        checkpoint_every=1,
        threads=1,
    )
    return BootstrapConfig(**{**values, **overrides})


def test_bootstrap_stages_resume_and_produce_a_pipeline(tmp_path):
    config = tiny_budget(tmp_path / "boot")
    logs = []
    bootstrap(config, stages=("vae", "pretrain"), log=logs.append)
    assert json.loads((tmp_path / "boot" / "done.json").read_text()) == ["vae", "pretrain"]
    vae_config = json.loads((config.model_dir / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 1.0  # latents normalised from the trained encoder
    pretrained = load_file(str(tmp_path / "boot" / "checkpoints" / "pretrain" / "transformer.safetensors"))

    more = tiny_budget(tmp_path / "boot", distill_steps=3)
    bootstrap(more, log=logs.append)  # skips finished stages, runs distill
    assert any(line.startswith("distill: step 3/3") for line in logs)
    assert not any(line.startswith("pretrain: resuming") for line in logs)
    before = len(logs)
    bootstrap(tiny_budget(tmp_path / "boot", pretrain_steps=3), stages=("pretrain",), log=logs.append)
    assert len(logs) == before  # a finished stage is not run again

    distilled = load_file(str(tmp_path / "boot" / "checkpoints" / "distill" / "transformer.safetensors"))
    assert any(not torch.equal(pretrained[k], distilled[k]) for k in pretrained)
    pipe = ZImagePipeline.from_pretrained(config.model_dir)
    images = pipe(
        prompt=["a photo of a red circle"],
        height=NANO_RESOLUTION,
        width=NANO_RESOLUTION,
        num_inference_steps=4,
        guidance_scale=0.0,
    ).images
    assert images[0].size == (NANO_RESOLUTION, NANO_RESOLUTION)
    model = load_model(str(config.model_dir))  # with its Qwen3-VL teacher encoder
    assert model.teacher_encoder is not None
