"""The families over the real pipelines: conventions, teacher contexts, loading errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen3Model

from dopsd.models import Flux2KleinModel, ZImageModel, detect_family, load_model
from dopsd.models.tiny import transplant_text_weights
from dopsd.sampling import euler_sample

PROMPTS = ["a red circle", "two blue squares"]


def random_image(seed=0, size=32):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def pipeline_and_euler(model, output_type, guidance=0.0):
    """The real pipeline's 4-step output and the project's Euler loop over `velocity`, same seed and prompts."""
    reference = model.pipeline(
        prompt=list(PROMPTS),  # the pipeline rewrites its prompt list in place
        height=32,
        width=32,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
        **{**model.pipeline_kwargs(), **({"guidance_scale": guidance} if guidance else {})},
    ).images
    noise = model.noise(2, 32, 32, torch.Generator().manual_seed(0))
    sigmas = model.schedule(4, 32, 32)
    return reference, euler_sample(model, noise, sigmas, model.encode_student(PROMPTS), guidance)


def test_zimage_velocity_and_euler_reproduce_the_pipeline(tiny_zimage_path):
    model = ZImageModel.load(tiny_zimage_path)
    assert model.schedule(4, 32, 32).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])  # Turbo's shift 3
    reference, ours = pipeline_and_euler(model, "latent")
    torch.testing.assert_close(ours, reference.float(), rtol=1e-4, atol=1e-4)


def test_guided_euler_reproduces_the_pipelines_classifier_free_guidance(tiny_zimage_path):
    model = ZImageModel.load(tiny_zimage_path)
    reference, ours = pipeline_and_euler(model, "latent", guidance=3.0)
    torch.testing.assert_close(ours, reference.float(), rtol=1e-4, atol=1e-4)
    _, unguided = pipeline_and_euler(model, "latent")
    assert not torch.allclose(ours, unguided, atol=1e-3)  # the guidance did something


def test_klein_velocity_and_euler_reproduce_the_pipeline(tiny_klein_path):
    model = load_model(tiny_klein_path, text_encoder_layers=(1, 2, 3))
    assert isinstance(model, Flux2KleinModel)
    reference, ours = pipeline_and_euler(model, "np")  # klein's latent output is unpatchified: compare pixels
    decoded = np.stack([np.asarray(im) for im in model.to_images(ours)]) / 255.0
    assert np.abs(decoded - reference).max() <= 1 / 255 + 1e-6  # PIL rounding only


def test_klein_teacher_adds_reference_tokens(tiny_klein_path):
    model = load_model(tiny_klein_path, text_encoder_layers=(1, 2, 3))
    student = model.encode_student(PROMPTS[:1])[0]
    teacher = model.encode_teacher(PROMPTS[:1], [random_image()])[0]
    assert teacher["reference_latents"].shape == model.latent_shape(32, 32)
    assert not torch.equal(teacher["prompt_embeds"], student["prompt_embeds"])  # consistency suffix
    x = model.noise(1, 32, 32, torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5])
    v_with, v_without = model.velocity(x, sigma, [teacher]), model.velocity(x, sigma, [student])
    assert v_with.shape == v_without.shape == x.shape and not torch.allclose(v_with, v_without)


def test_qwen3_to_qwen3vl_transplant_keeps_text_hidden_states(tiny_zimage_path):
    model = ZImageModel.load(tiny_zimage_path)
    text_encoder, vl = model.pipeline.text_encoder, model.teacher_encoder
    ids = model.pipeline.tokenizer(["a red circle left of a blue square"], return_tensors="pt").input_ids
    with torch.no_grad():
        text = text_encoder(input_ids=ids, output_hidden_states=True).hidden_states
        multi = vl(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(text) == len(multi)
    for a, b in zip(text, multi, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_transplant_rejects_a_mismatched_encoder(tiny_zimage_path):
    model = ZImageModel.load(tiny_zimage_path)
    config = model.pipeline.text_encoder.config
    other = Qwen3Model(type(config)(**{**config.to_dict(), "num_hidden_layers": 3, "layer_types": None}))
    with pytest.raises(ValueError, match="transplant does not match"):
        transplant_text_weights(other, model.teacher_encoder)


def test_zimage_teacher_context_carries_the_image(tiny_zimage_path):
    model = ZImageModel.load(tiny_zimage_path)
    student = model.encode_student(PROMPTS[:1])[0]["cap_feats"]
    a = model.encode_teacher(PROMPTS[:1], [random_image(0)])[0]["cap_feats"]
    b = model.encode_teacher(PROMPTS[:1], [random_image(1)])[0]["cap_feats"]
    assert a.shape[1] == student.shape[1] and a.shape[0] > student.shape[0]
    assert not torch.allclose(a, b)  # a different image gives a different context


def test_latents_round_trip_shapes(tiny_zimage_path):
    model = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False)
    latents = model.to_latents([random_image()], 32, 32)
    assert latents.shape == (1, *model.latent_shape(32, 32))
    assert model.to_images(latents)[0].size == (32, 32)


def test_bad_model_paths_and_resolutions(tmp_path, tiny_zimage_path):
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        detect_family(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionPipeline, which dopsd does not support"):
        detect_family(str(tmp_path))
    model = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False)
    with pytest.raises(ValueError, match="multiples of 4"):
        model.check_resolution(30, 32)
    with pytest.raises(ValueError, match="no such folder"):
        load_model(str(tmp_path / "missing"))


def test_teacher_batch_matches_single_samples_and_fits_large_images(tiny_zimage_path):
    model = ZImageModel.load(tiny_zimage_path)
    prompts = ["a red circle", "two blue squares left of a big yellow triangle"]
    batch = model.encode_teacher(prompts, [random_image(0), random_image(1, size=48)])
    for i, prompt in enumerate(prompts):
        single = model.encode_teacher([prompt], [random_image(i, size=32 if i == 0 else 48)])[0]["cap_feats"]
        torch.testing.assert_close(batch[i]["cap_feats"], single, rtol=1e-4, atol=1e-5)
    model.max_teacher_tokens = 40
    big = model.encode_teacher(["a red circle"], [random_image(2, size=256)])[0]["cap_feats"]
    assert big.shape[0] <= 40  # the processor downscaled the image into the token budget
