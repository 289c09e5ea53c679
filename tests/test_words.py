"""Learnt word embeddings: only prompts naming the word change, only the word's vectors learn, files round-trip."""

import pytest
import torch
from safetensors.torch import save_file

from dopsd.models import ZImageModel
from dopsd.preview import pipeline_images
from dopsd.words import (
    WORD_EMBEDDINGS,
    WordEmbeddings,
    salient_token_mean,
    save_words,
    word_token_ids,
    words_attached,
)

WITHOUT = ["a red circle left of a blue square", "two green triangles"]


def attach_star(model: ZImageModel, seed: int = 0) -> WordEmbeddings:
    words = WordEmbeddings(
        model.pipeline.text_encoder.get_input_embeddings(), word_token_ids(model.pipeline.tokenizer, ["star"])
    )
    with torch.no_grad():
        words.vectors.copy_(torch.randn(words.vectors.shape, generator=torch.Generator().manual_seed(seed)))
    return words


def features(model: ZImageModel, prompts: list[str]) -> list[torch.Tensor]:
    return [context["cap_feats"] for context in model.encode_student(prompts)]


def test_only_prompts_naming_the_word_change_and_only_from_the_word_on(tiny_zimage_path):
    model = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False)
    prompt = "a red circle and a yellow star on a white background"
    base = features(model, [*WITHOUT, prompt])
    words = attach_star(model)
    attached = features(model, [*WITHOUT, prompt])
    assert all(torch.equal(a, b) for a, b in zip(attached[:2], base[:2], strict=True))
    tokens = model.pipeline.tokenizer(prompt, add_special_tokens=False).input_ids
    star = tokens.index(words.token_ids.item())
    # The context holds the chat turn: find where the caption's tokens start in it.
    turn = model.pipeline.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    turn_ids = model.pipeline.tokenizer(turn).input_ids
    at = next(i for i in range(len(turn_ids)) if turn_ids[i : i + len(tokens)] == tokens) + star
    changed = (attached[2] != base[2]).any(dim=-1)
    assert not changed[:at].any() and changed[at:].all()
    words.detach_from_encoder()
    assert torch.equal(features(model, [prompt])[0], base[2])


def test_a_caption_is_named_exactly_when_its_context_depends_on_the_words(tiny_zimage_path):
    # A round reuses the cached context of a caption the words do not name: that is exact only if the two agree.
    model = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False)
    captions = [*WITHOUT, "a yellow star", "star on the left", "two stars", "a starfish", "a star, a star"]
    base = features(model, captions)
    words = attach_star(model)
    moved = [not torch.equal(a, b) for a, b in zip(features(model, captions), base, strict=True)]
    named = [words.named_in(model.pipeline.tokenizer, caption) for caption in captions]
    assert named == moved and named[2] and not named[0]


def test_gradient_reaches_only_the_words_vectors(tiny_zimage_path):
    model = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False)
    words = attach_star(model)
    embedding = model.pipeline.text_encoder.get_input_embeddings()
    without = model.encode_student(WITHOUT, differentiable=True)
    torch.stack([c["cap_feats"].square().sum() for c in without]).sum().backward()
    assert words.vectors.grad is not None and not words.vectors.grad.any()
    words.vectors.grad = None
    with_word = model.encode_student(["a yellow star"], differentiable=True)
    with_word[0]["cap_feats"].square().sum().backward()
    assert words.vectors.grad is not None and words.vectors.grad.abs().sum() > 0
    assert embedding.weight.grad is None
    assert all(p.grad is None for p in model.pipeline.text_encoder.parameters())
    frozen = model.encode_student(["a yellow star"])
    assert not frozen[0]["cap_feats"].requires_grad


def test_saved_words_load_into_another_model_and_bad_files_are_refused(tmp_path, tiny_zimage_path):
    model = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False)
    save_words(tmp_path / "adapter", [attach_star(model, seed=3)])
    expected = features(model, ["a yellow star"])[0]
    fresh = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False)
    embedding, tokenizer = fresh.pipeline.text_encoder.get_input_embeddings(), fresh.pipeline.tokenizer
    assert not torch.equal(features(fresh, ["a yellow star"])[0], expected)
    loaded = WordEmbeddings.load(tmp_path / "adapter", embedding, tokenizer)
    assert loaded.words == ["star"] and torch.equal(features(fresh, ["a yellow star"])[0], expected)
    loaded.detach_from_encoder()
    with pytest.raises(FileNotFoundError, match=WORD_EMBEDDINGS):
        WordEmbeddings.load(tmp_path / "nothing", embedding, tokenizer)
    save_file({"star": torch.zeros(3)}, tmp_path / WORD_EMBEDDINGS)
    with pytest.raises(ValueError, match=r"another width .*\[32\]: star \[3\]"):
        WordEmbeddings.load(tmp_path, embedding, tokenizer)


def test_a_word_without_a_token_of_its_own_is_refused(tiny_zimage_path):
    tokenizer = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False).pipeline.tokenizer
    assert set(word_token_ids(tokenizer, ["star", "circle"])) == {"star", "circle"}
    with pytest.raises(ValueError, match="'zanzibarquux' is .* tokens"):
        word_token_ids(tokenizer, ["zanzibarquux"])


def test_a_start_from_images_is_the_mean_of_what_stands_out_at_the_norm_asked():
    generator = torch.Generator().manual_seed(0)
    background, concept = torch.randn(8, generator=generator), torch.randn(8, generator=generator) * 5
    images, objects = [], []
    for _ in range(3):
        tokens = background + 0.01 * torch.randn(6, 8, generator=generator)
        tokens[2] = concept + torch.randn(8, generator=generator)  # the concept, seen a little differently each time
        images.append(tokens)
        objects.append(tokens[2])
    start = salient_token_mean(images, norm=0.5)
    expected = torch.stack(objects).mean(0)
    torch.testing.assert_close(start, expected * (0.5 / expected.norm()))
    for nothing in ([], [torch.ones(6, 8)]):
        with pytest.raises(ValueError, match="no token stands out"):
            salient_token_mean(nothing, norm=1.0)


def test_vision_tokens_are_in_the_text_encoders_input_space(tiny_zimage_path, tiny_klein_path):
    from PIL import Image

    from dopsd.models import load_model

    model = ZImageModel.load(tiny_zimage_path)
    tokens = model.vision_tokens([Image.new("RGB", (32, 32), "white"), Image.new("RGB", (64, 32), "red")])
    width = model.pipeline.text_encoder.get_input_embeddings().weight.shape[1]
    assert [t.shape[1] for t in tokens] == [width, width] and tokens[1].shape[0] == 2 * tokens[0].shape[0]
    klein = load_model(tiny_klein_path, "auto", text_encoder_layers=(1, 2, 3))
    with pytest.raises(ValueError, match="flux2-klein family .* cannot start from images"):
        klein.vision_tokens([Image.new("RGB", (32, 32))])


def test_saved_words_attach_to_a_plain_diffusers_pipeline(tmp_path, tiny_zimage_path):
    # How a user outside dopsd samples a words adapter: diffusers' load_lora_weights does not read the words.
    model = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False)
    save_words(tmp_path / "adapter", [attach_star(model, seed=5)])
    pipeline = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False).pipeline
    kwargs = {**model.pipeline_kwargs(), "output_type": "np"}
    prompts = ["a yellow star", WITHOUT[0]]
    base = pipeline_images(pipeline, prompts, [0], 4, 32, kwargs)
    with words_attached(pipeline, tmp_path / "adapter") as words:
        assert words is not None and words.words == ["star"]
        attached = pipeline_images(pipeline, prompts, [0], 4, 32, kwargs)
    assert abs(attached[0] - base[0]).max() > 1e-3 and (attached[1] == base[1]).all()
    after = pipeline_images(pipeline, prompts, [0], 4, 32, kwargs)
    assert all((a == b).all() for a, b in zip(after, base, strict=True))
