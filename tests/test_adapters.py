"""Student/teacher adapters: EMA, switching, files that the real pipelines load."""

import json

import pytest
import torch

from dopsd import adapters
from dopsd.models import ZImageModel, load_model
from dopsd.preview import parse_seeds, pipeline_images
from dopsd.words import WordEmbeddings, save_words, word_token_ids


@pytest.fixture
def model(tiny_zimage_path):
    torch.manual_seed(0)
    m = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False)
    adapters.add_student_teacher(m.pipeline.transformer, 4, 8.0, m.default_lora_targets)
    return m


def test_adapters_start_equal_and_only_student_trains(model):
    transformer = model.pipeline.transformer
    pairs = adapters.adapter_pairs(transformer)
    assert pairs and all(torch.equal(t, s) for t, s in pairs)
    assert all(s.requires_grad and not t.requires_grad for t, s in pairs)
    assert all(not p.requires_grad for n, p in transformer.named_parameters() if "lora" not in n)
    assert adapters.active_adapter(transformer) == adapters.STUDENT


def test_ema_update_matches_the_formula(model):
    pairs = adapters.adapter_pairs(model.pipeline.transformer)
    with torch.no_grad():
        for t, s in pairs:
            t.normal_()
            s.normal_()
    before = [(t.clone(), s.clone()) for t, s in pairs]
    adapters.ema_update(pairs, 0.9)
    for (t, s), (t0, s0) in zip(pairs, before, strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s0)
        assert torch.equal(s, s0)


def test_use_adapter_switches_and_restores_without_touching_grads(model):
    transformer = model.pipeline.transformer
    with torch.no_grad():
        for _, s in adapters.adapter_pairs(transformer):
            s.normal_()
    ctx = model.encode_student(["a red circle"])
    x, sigma = torch.randn(1, *model.latent_shape(32, 32)), torch.tensor([0.5])
    outs = {}
    for name in (adapters.STUDENT, adapters.TEACHER, None):
        with adapters.use_adapter(transformer, name), torch.no_grad():
            outs[name] = model.velocity(x, sigma, ctx)
    assert adapters.active_adapter(transformer) == adapters.STUDENT
    assert torch.equal(outs[adapters.TEACHER], outs[None])  # teacher still at the base
    assert not torch.allclose(outs[adapters.STUDENT], outs[None])
    assert all(s.requires_grad and not t.requires_grad for t, s in adapters.adapter_pairs(transformer))


def test_saved_adapter_reproduces_samples_in_the_real_pipeline(model, tiny_zimage_path, tmp_path):
    transformer = model.pipeline.transformer
    with torch.no_grad():
        for _, s in adapters.adapter_pairs(transformer):
            s.normal_(0, 0.3)
    adapters.save_adapter(model, adapters.STUDENT, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    kwargs = {**model.pipeline_kwargs(), "output_type": "np"}
    with adapters.use_adapter(transformer, adapters.STUDENT):
        trained = pipeline_images(model.pipeline, ["a red circle"], [0, 1], 4, 32, kwargs)
    fresh = load_model(tiny_zimage_path, with_teacher_encoder=False)
    base = pipeline_images(fresh.pipeline, ["a red circle"], [0, 1], 4, 32, kwargs)
    fresh.pipeline.load_lora_weights(str(tmp_path / "adapter"))
    loaded = pipeline_images(fresh.pipeline, ["a red circle"], [0, 1], 4, 32, kwargs)
    for a, b, c in zip(trained, loaded, base, strict=True):
        assert abs(a - b).max() < 1e-5
        assert abs(a - c).max() > 1e-3  # the adapter changes the samples


def test_lora_target_matching_nothing_is_refused(tiny_zimage_path):
    model = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False)
    with pytest.raises(ValueError, match=r"\['qkv_typo'\] match no linear layer.*to_q"):
        adapters.add_student_teacher(model.pipeline.transformer, 4, 8.0, ["to_q", "qkv_typo"])


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("5,1,2-3") == [5, 1, 2, 3]
    with pytest.raises(ValueError, match="expected e.g. 0-7"):
        parse_seeds("a-b")


def test_adapters_stay_float32_on_a_bf16_base_so_the_ema_moves(tiny_zimage_path):
    model = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False, dtype=torch.bfloat16)
    adapters.add_student_teacher(model.pipeline.transformer, 4, 8.0, model.default_lora_targets)
    pairs = adapters.adapter_pairs(model.pipeline.transformer)
    assert all(t.dtype == s.dtype == torch.float32 for t, s in pairs)
    with torch.no_grad():
        for t, s in pairs:
            t.fill_(0.5)
            s.fill_(0.505)
    for _ in range(100):
        adapters.ema_update(pairs, 0.99)
    assert all(0.5 < float(t.flatten()[0]) < 0.505 for t, _ in pairs)
    x = torch.randn(1, *model.latent_shape(32, 32))
    out = model.velocity(x, torch.tensor([0.37]), model.encode_student(["a red circle"]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_composed_adapter_is_the_sum_of_its_parts_in_the_real_pipeline(model, tiny_zimage_path, tmp_path):
    transformer = model.pipeline.transformer
    with torch.no_grad():
        for t, s in adapters.adapter_pairs(transformer):
            t.normal_(0, 0.2)
            s.normal_(0, 0.2)
    for name in (adapters.STUDENT, adapters.TEACHER):
        adapters.save_adapter(model, name, tmp_path / name)
    ctx = model.encode_student(["a red circle"])
    x, sigma = torch.randn(1, *model.latent_shape(32, 32)), torch.tensor([0.5])
    with torch.no_grad():
        with adapters.use_adapter(transformer, adapters.STUDENT):
            student = model.velocity(x, sigma, ctx)
        for layer in adapters.lora_layers(transformer):
            layer._active_adapter = [adapters.STUDENT, adapters.TEACHER]  # PEFT adds the updates of active adapters
        both = model.velocity(x, sigma, ctx)
    folders = [tmp_path / adapters.STUDENT, tmp_path / adapters.TEACHER]
    composed = {
        "sum": adapters.compose_adapters(folders, tmp_path / "sum"),
        "halves": adapters.compose_adapters([folders[0], folders[0]], tmp_path / "halves", weights=[0.5, 0.5]),
    }
    for name, expected in (("sum", both), ("halves", student)):
        fresh = load_model(tiny_zimage_path, with_teacher_encoder=False)
        fresh.pipeline.load_lora_weights(str(composed[name]))
        with torch.no_grad():
            torch.testing.assert_close(fresh.velocity(x, sigma, ctx), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(both, student, atol=1e-3)


def test_a_fused_adapter_computes_what_the_loaded_one_does(model, tiny_zimage_path, tmp_path):
    with torch.no_grad():
        for _, s in adapters.adapter_pairs(model.pipeline.transformer):
            s.normal_(0, 0.2)
    adapters.save_adapter(model, adapters.STUDENT, tmp_path / "saved")
    ctx = model.encode_student(["a red circle"])
    x, sigma = torch.randn(1, *model.latent_shape(32, 32)), torch.tensor([0.5])
    with torch.no_grad():
        loaded = model.velocity(x, sigma, ctx)
        fused = load_model(tiny_zimage_path, with_teacher_encoder=False)
        base = fused.velocity(x, sigma, ctx)
        adapters.fuse_adapter(fused.pipeline.transformer, tmp_path / "saved")
        torch.testing.assert_close(fused.velocity(x, sigma, ctx), loaded, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(base, loaded, atol=1e-3)


def test_adapters_of_other_layers_or_missing_files_do_not_compose(model, tmp_path):
    adapters.save_adapter(model, adapters.STUDENT, tmp_path / "full")
    transformer = model.pipeline.transformer
    transformer.add_adapter(adapters.lora_config(4, 8.0, ["to_q"]), adapter_name="narrow")
    adapters.save_adapter(model, "narrow", tmp_path / "narrow")
    with pytest.raises(ValueError, match=r"narrow: its LoRA covers other layers than .*full"):
        adapters.compose_adapters([tmp_path / "full", tmp_path / "narrow"], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"missing/pytorch_lora_weights.safetensors: no LoRA weights file"):
        adapters.compose_adapters([tmp_path / "full", tmp_path / "missing"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_digest_names_the_weights_not_the_file_bytes(model, tmp_path):
    """safetensors writes its header's metadata in a per-process order: the same adapter saved twice can differ byte
    for byte (a flaky cache count in the science test came from this), and must keep its digest."""
    with torch.no_grad():
        for _, s in adapters.adapter_pairs(model.pipeline.transformer):
            s.normal_(0, 0.3)
    saved = adapters.save_adapter(model, adapters.STUDENT, tmp_path / "adapter") / adapters.LORA_WEIGHTS
    raw = saved.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header["__metadata__"] = dict(reversed(header["__metadata__"].items()))
    # Padded to the header's length, so the data offsets stand.
    reordered = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    (tmp_path / "reordered").mkdir()
    (tmp_path / "reordered" / adapters.LORA_WEIGHTS).write_bytes(raw[:8] + reordered + raw[8 + length :])
    assert (tmp_path / "reordered" / adapters.LORA_WEIGHTS).read_bytes() != raw
    assert adapters.adapter_digest(tmp_path / "reordered") == adapters.adapter_digest(saved.parent)

    changed = bytearray(raw)
    changed[-1] ^= 1  # one bit of the last weight
    saved.write_bytes(bytes(changed))
    assert adapters.adapter_digest(saved.parent) != adapters.adapter_digest(tmp_path / "reordered")


def test_adapter_digest_covers_learnt_words(model, tmp_path):
    embedding, tokenizer = model.pipeline.text_encoder.get_input_embeddings(), model.pipeline.tokenizer
    star = WordEmbeddings(embedding, word_token_ids(tokenizer, ["star"]))
    save_words(tmp_path / "words", [star])
    unchanged = adapters.adapter_digest(tmp_path / "words")
    save_words(tmp_path / "words", [star])
    assert adapters.adapter_digest(tmp_path / "words") == unchanged
    with torch.no_grad():
        star.vectors[0, 0] += 1e-3
    save_words(tmp_path / "words", [star])
    assert adapters.adapter_digest(tmp_path / "words") != unchanged
    star.detach_from_encoder()
    # Beside a LoRA, the words count too.
    lora = adapters.save_adapter(model, adapters.STUDENT, tmp_path / "both")
    without_words = adapters.adapter_digest(lora)
    save_words(lora, [star])
    assert adapters.adapter_digest(lora) != without_words
    with pytest.raises(FileNotFoundError, match="not an adapter folder"):
        adapters.adapter_digest(tmp_path)
