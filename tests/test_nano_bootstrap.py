"""The nano bootstrap runs every stage end to end at a tiny budget, resumes, and yields a real ZImagePipeline."""

import json

import torch
from diffusers import ZImagePipeline
from safetensors.torch import load_file

from dopsd.models import load_model
from dopsd.nano.bootstrap import bootstrap
from dopsd.nano.model import NANO_RESOLUTION
from tests.conftest import tiny_bootstrap_config


def test_bootstrap_stages_resume_and_produce_a_pipeline(tmp_path):
    config = tiny_bootstrap_config(tmp_path / "boot")
    logs = []
    bootstrap(config, stages=("vae", "pretrain"), log=logs.append)
    done = json.loads((tmp_path / "boot" / "done.json").read_text())
    assert list(done) == ["vae", "pretrain"] and "CPU" in done["vae"]["machine"]
    vae_config = json.loads((config.model_dir / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 1.0  # latents normalised from the trained encoder
    pretrained = load_file(str(tmp_path / "boot" / "checkpoints" / "pretrain" / "transformer.safetensors"))

    more = tiny_bootstrap_config(tmp_path / "boot", distill_steps=3)
    bootstrap(more, log=logs.append)  # skips finished stages, runs distill
    assert any(line.startswith("distill: step 3/3") for line in logs)
    assert not any(line.startswith("pretrain: resuming") for line in logs)
    before = len(logs)
    bootstrap(tiny_bootstrap_config(tmp_path / "boot", pretrain_steps=3), log=logs.append)
    assert len(logs) == before  # finished stages are not run again
    bootstrap(tiny_bootstrap_config(tmp_path / "boot", pretrain_steps=3), stages=("pretrain",), log=logs.append)
    assert "pretrain: resuming at step 2" in logs and "pretrain: step 3/3" in " ".join(logs)
    assert list(json.loads((tmp_path / "boot" / "done.json").read_text())) == ["vae", "pretrain"]  # distill again

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


def test_base_report_from_a_tiny_bootstrap(tmp_path, tiny_nano_bootstrap):
    from evaluation.nano.base_report import write_base_report
    from evaluation.nano.detector import NanoDetector

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}\n'
        '{"tag": "counting", "include": [{"class": "square", "count": 2}], "exclude": [{"class": "square", '
        '"count": 3}], "prompt": "a photo of two squares"}\n'
    )
    out = tmp_path / "reports" / "nano_base.md"
    metrics = write_base_report(tiny_nano_bootstrap.workdir, prompts, NanoDetector.load(), out, "test", seeds=[0])
    assert set(metrics["geneval_nano"]) == {"distilled@4", "undistilled@4", "undistilled@32"}
    assert [p["pack"] for p in metrics["premise"]] == ["star", "teal", "striped"]
    assert all(p["samples"] == 24 for p in metrics["premise"])
    text = out.read_text()
    assert 0 <= metrics["vae_reconstruction"]["all_attributes"] <= 1
    assert (
        "| distilled | 4 |" in text
        and "VAE round trip" in text
        and "| star |" in text
        and "distilled@4 >= 0.75" in text
    )
    assert (tmp_path / "reports" / "nano_base.json").is_file()
