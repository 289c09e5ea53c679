"""The training round: bad input stops early, resume is exact, divergence keeps the last checkpoint, a round can
start from an earlier adapter and replay a second dataset, and the real program runs (CLI, accelerate with two
processes)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dopsd.adapters import LORA_WEIGHTS, read_adapter
from dopsd.cli import app
from dopsd.config import TrainConfig, make_config
from dopsd.data import DatasetError, Example, caption_negatives, read_dataset
from dopsd.models import load_model
from dopsd.preview import pipeline_images, sample_grid
from dopsd.train import (
    FRESH_ADAPTER,
    METRICS_LOG,
    SampleCache,
    TrainingDiverged,
    cache_path,
    checkpoint_dirs,
    draw_batch,
    first_caption_taught,
    teachers_of,
    train,
)
from dopsd.words import WORD_EMBEDDINGS, salient_token_mean
from tests.conftest import write_dataset

BIN = Path(sys.executable).parent


def tiny_config(model, data, output, **overrides):
    return make_config("tiny", model=model, data=str(data), output=str(output), **overrides)


def write_replay(folder, count=2, size=32):
    """A second dataset unlike `write_dataset`'s: red circles with their own captions."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), (0, 0, 0))
        ImageDraw.Draw(image).ellipse((4, 4 + i, 20, 20 + i), fill=(220, 30, 30))
        image.save(folder / f"old_{i}.png")
        (folder / f"old_{i}.txt").write_text(f"a red circle number {i}")
    return folder


def lora_weights(folder):
    """An adapter file's tensors under PEFT's adapter-free names (as checkpoints hold them)."""
    return {key.removeprefix("transformer."): value for key, value in load_file(str(folder / LORA_WEIGHTS)).items()}


def test_data_problems_are_named_before_training(tmp_path, tiny_zimage_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        train(tiny_config(tiny_zimage_path, empty, tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing started

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    (bad / "broken.txt").write_text("a caption")
    from PIL import Image

    Image.new("RGB", (32, 32)).save(bad / "uncaptioned.png")
    outside = tmp_path / "secret.png"
    Image.new("RGB", (32, 32)).save(outside)
    (bad / "link.png").symlink_to(outside)
    with pytest.raises(DatasetError) as error:
        read_dataset(bad)
    message = str(error.value)
    assert "3 problem(s)" in message
    assert "broken.png: unreadable image" in message
    assert "uncaptioned.png: no caption; write one in uncaptioned.txt" in message
    assert "link.png: links outside the data folder" in message


@pytest.mark.parametrize("replay_ratio", [0.0, 0.3])
def test_resume_matches_an_uninterrupted_round(tmp_path, tiny_zimage_path, dataset, replay_ratio):
    # With a batch of 2, a ratio of 0.3 replays one sample with probability 0.6: the draw is part of the state.
    replay = (
        {"replay_data": str(write_replay(tmp_path / "replay")), "replay_ratio": replay_ratio} if replay_ratio else {}
    )
    run = {"checkpoint_every": 3, "log_every": 1, **replay}
    straight = train(tiny_config(tiny_zimage_path, dataset, tmp_path / "a", steps=6, **run))
    half = tmp_path / "b"
    train(tiny_config(tiny_zimage_path, dataset, half, steps=3, **run))
    assert [p.name for p in checkpoint_dirs(half)] == ["step-000003"]
    # A crash after step 4 was logged (and step 5 half) but before either was saved: the resume logs them anew.
    with (half / METRICS_LOG).open("a") as log:
        log.write(json.dumps({"step": 4, "loss": 123.0}) + '\n{"step": 5, "lo')
    resumed = train(tiny_config(tiny_zimage_path, dataset, half, steps=6, **run))
    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    logged = [
        [json.loads(line) for line in (folder.parent / METRICS_LOG).read_text().splitlines()]
        for folder in (straight, resumed)
    ]
    assert [row["step"] for row in logged[1]] == [1, 2, 3, 4, 5, 6]
    for row_a, row_b in zip(*logged, strict=True):
        assert row_a["loss"] > 0 and row_a["loss"] == pytest.approx(row_b["loss"], rel=1e-4)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it did learn something
    # Another recipe does not resume from these checkpoints: it would mix two runs under the second's name.
    with pytest.raises(ValueError, match=r"another config \(lr 0\.001 -> 0\.002\)"):
        train(tiny_config(tiny_zimage_path, dataset, half, steps=6, checkpoint_every=3, lr=2e-3, **replay))


def test_a_field_added_since_a_round_was_saved_counts_as_its_default():
    config = TrainConfig(model="m", lr=1e-3)
    saved = json.loads(config.to_json())
    del saved["teacher_guidance"]  # a round saved before the field existed
    assert config.changes_since(saved) == []
    guided = dataclasses.replace(config, teacher_guidance=1.0)
    assert guided.changes_since(saved) == ["teacher_guidance 0.0 -> 1.0"]
    assert dataclasses.replace(config, lr=2e-3).changes_since(saved, ignore=frozenset({"lr"})) == []


def test_sft_round_and_grad_steps_run(tmp_path, tiny_zimage_path, dataset):
    metrics = []
    adapter = train(
        tiny_config(tiny_zimage_path, dataset, tmp_path / "sft", method="sft", steps=4, log_every=1),
        on_metrics=lambda step, m: metrics.append((step, m)),
    )
    assert [s for s, _ in metrics] == [1, 2, 3, 4] and all(m["loss"] > 0 for _, m in metrics)
    assert (adapter / "pytorch_lora_weights.safetensors").is_file()
    train(tiny_config(tiny_zimage_path, dataset, tmp_path / "sub", steps=2, grad_steps=2, backward_per_step=False))


def test_a_round_starts_from_its_init_adapter(tmp_path, tiny_zimage_path, dataset):
    first = train(tiny_config(tiny_zimage_path, dataset, tmp_path / "first", steps=2))
    start = lora_weights(first)
    assert any(start[k].abs().sum() > 0 for k in start if "lora_B" in k)  # not the base
    # At lr 0 the round cannot move: what it ends with, student and EMA teacher alike, is what it started from.
    still = tmp_path / "still"
    train(tiny_config(tiny_zimage_path, dataset, still, steps=1, lr=0.0, init_adapter=str(first)))
    teacher = load_file(str(checkpoint_dirs(still)[-1] / "teacher.safetensors"))
    for ended in (lora_weights(still / "adapter"), teacher):
        assert ended.keys() == start.keys()
        for key in start:
            torch.testing.assert_close(ended[key], start[key], rtol=0, atol=0)

    with pytest.raises(
        ValueError, match=r"does not fit .*rank 4 \(this round: 2\); .*targets .*'w3'.*this round: \['to_q'\]"
    ):
        train(
            tiny_config(
                tiny_zimage_path, dataset, tmp_path / "r2", lora_rank=2, lora_targets="to_q", init_adapter=str(first)
            )
        )
    with pytest.raises(
        FileNotFoundError, match=f"first: not an adapter .*neither {LORA_WEIGHTS} nor {WORD_EMBEDDINGS}"
    ):
        train(tiny_config(tiny_zimage_path, dataset, tmp_path / "r3", init_adapter=str(tmp_path / "first")))


def base_embedding(model_path: str, word: str) -> torch.Tensor:
    model = load_model(model_path, with_teacher_encoder=False)
    token = model.pipeline.tokenizer(" " + word, add_special_tokens=False).input_ids[0]
    return model.pipeline.text_encoder.get_input_embeddings().weight[token].detach()


def test_a_words_round_learns_only_its_words_and_resumes_exactly(tmp_path, tiny_zimage_path, dataset):
    words = {"lora_rank": 0, "learn_words": "blue", "checkpoint_every": 2, "log_every": 1}
    straight = train(tiny_config(tiny_zimage_path, dataset, tmp_path / "a", steps=4, **words))
    assert sorted(p.name for p in straight.iterdir()) == [WORD_EMBEDDINGS]  # no LoRA: the transformer is the base
    learnt = load_file(str(straight / WORD_EMBEDDINGS))
    assert list(learnt) == ["blue"] and not torch.allclose(learnt["blue"], base_embedding(tiny_zimage_path, "blue"))
    half = tmp_path / "b"
    train(tiny_config(tiny_zimage_path, dataset, half, steps=2, **words))
    resumed = load_file(str(train(tiny_config(tiny_zimage_path, dataset, half, steps=4, **words)) / WORD_EMBEDDINGS))
    torch.testing.assert_close(resumed["blue"], learnt["blue"], rtol=1e-5, atol=1e-7)
    grid = sample_grid(tiny_zimage_path, ["a blue box", "a red circle"], [0], 2, 32, adapter=str(straight))
    base = sample_grid(tiny_zimage_path, ["a blue box", "a red circle"], [0], 2, 32)
    # Rows are prompts: the words change the first, naming "blue", and leave the second as the base drew it.
    crops = [(g.crop((0, 0, 32, 32)).tobytes(), g.crop((0, 32, 32, 64)).tobytes()) for g in (grid, base)]
    assert crops[0][0] != crops[1][0] and crops[0][1] == crops[1][1]
    with pytest.raises(ValueError, match="lora_rank.*0 with learn_words"):
        tiny_config(tiny_zimage_path, dataset, tmp_path / "c", lora_rank=0)
    with pytest.raises(ValueError, match="'blue box' is 2 tokens|'box' is"):
        train(tiny_config(tiny_zimage_path, dataset, tmp_path / "d", lora_rank=0, learn_words="box"))


def test_a_round_keeps_its_starting_words_and_adds_its_own(tmp_path, tiny_zimage_path, dataset):
    first = train(tiny_config(tiny_zimage_path, dataset, tmp_path / "first", steps=2, learn_words="blue"))
    assert {p.name for p in first.iterdir()} == {LORA_WEIGHTS, WORD_EMBEDDINGS}  # words beside a LoRA
    blue = load_file(str(first / WORD_EMBEDDINGS))["blue"]
    circles = write_replay(tmp_path / "circles")
    only_words = {"lora_rank": 0, "learn_words": "red", "steps": 2}
    with pytest.raises(ValueError, match="holds a LoRA, and a round with lora_rank 0 would drop it"):
        train(tiny_config(tiny_zimage_path, circles, tmp_path / "x", init_adapter=str(first), **only_words))
    words_only = train(tiny_config(tiny_zimage_path, dataset, tmp_path / "w", lora_rank=0, learn_words="blue", steps=2))
    second = train(
        tiny_config(tiny_zimage_path, circles, tmp_path / "second", init_adapter=str(words_only), **only_words)
    )
    saved = load_file(str(second / WORD_EMBEDDINGS))
    assert sorted(saved) == ["blue", "red"]
    torch.testing.assert_close(saved["blue"], load_file(str(words_only / WORD_EMBEDDINGS))["blue"], rtol=0, atol=0)
    assert not torch.allclose(saved["red"], base_embedding(tiny_zimage_path, "red"))
    # Relearning a starting word starts from the starting adapter's vector: at lr 0 it ends there.
    again = train(
        tiny_config(
            tiny_zimage_path,
            dataset,
            tmp_path / "again",
            init_adapter=str(first),
            learn_words="blue",
            steps=1,
            word_lr=0.0,
        )
    )
    torch.testing.assert_close(load_file(str(again / WORD_EMBEDDINGS))["blue"], blue, rtol=0, atol=0)
    # A word may start from another's embedding: at lr 0, "red" ends as the base's "blue".
    from_blue = train(
        tiny_config(tiny_zimage_path, circles, tmp_path / "from-blue", learn_words="red=blue", steps=1, word_lr=0.0)
    )
    red = load_file(str(from_blue / WORD_EMBEDDINGS))["red"]
    torch.testing.assert_close(red, base_embedding(tiny_zimage_path, "blue"), rtol=0, atol=0)
    # Or from the teacher's vision tokens of the data's images that name it.
    from_images = train(
        tiny_config(tiny_zimage_path, dataset, tmp_path / "from-images", learn_words="blue=@images", steps=1, word_lr=0)
    )
    model = load_model(tiny_zimage_path)
    norm = float(model.pipeline.text_encoder.get_input_embeddings().weight.norm(dim=-1).median())
    expected = salient_token_mean(model.vision_tokens([e.load_image() for e in read_dataset(dataset)]), norm)
    torch.testing.assert_close(load_file(str(from_images / WORD_EMBEDDINGS))["blue"], expected)
    with pytest.raises(ValueError, match="red=@images: no caption of the data names 'red'"):
        train(tiny_config(tiny_zimage_path, dataset, tmp_path / "z", learn_words="red=@images", steps=1))
    with pytest.raises(ValueError, match="learn_words: 'red=dark blue' is not a word or a `word=start` pair"):
        tiny_config(tiny_zimage_path, circles, tmp_path / "y", learn_words="red=dark blue")


def test_a_fused_round_trains_a_fresh_lora_over_its_init_adapter_and_writes_their_sum(
    tmp_path, tiny_zimage_path, dataset
):
    first = train(tiny_config(tiny_zimage_path, dataset, tmp_path / "first", steps=2))

    def velocity(adapter):
        model = load_model(tiny_zimage_path, with_teacher_encoder=False)
        model.pipeline.load_lora_weights(str(adapter))
        x = torch.randn(1, *model.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return model.velocity(x, torch.tensor([0.5]), model.encode_student(["a red circle"]))

    # At lr 0 the fresh LoRA stays at B = 0: the round's sum does what the adapter it started from does.
    still = train(
        tiny_config(
            tiny_zimage_path,
            dataset,
            tmp_path / "still",
            steps=1,
            lr=0.0,
            init_adapter=str(first),
            init_adapter_fused=True,
        )
    )
    fresh = lora_weights(tmp_path / "still" / FRESH_ADAPTER)
    assert all(fresh[k].abs().sum() == 0 for k in fresh if ".lora_B." in k)
    assert read_adapter(still)[1]["r"] == 2 * read_adapter(first)[1]["r"]
    torch.testing.assert_close(velocity(still), velocity(first), atol=1e-5, rtol=1e-4)
    # Trained, it moves away from there; the next fused round takes the stacked rank as its start.
    moved = train(
        tiny_config(
            tiny_zimage_path, dataset, tmp_path / "moved", steps=2, init_adapter=str(still), init_adapter_fused=True
        )
    )
    assert read_adapter(moved)[1]["r"] == 3 * read_adapter(first)[1]["r"]
    assert not torch.allclose(velocity(moved), velocity(first), atol=1e-4)

    with pytest.raises(ValueError, match=r"adapts .*'w3'.*this round \['to_q'\]: a fused init_adapter needs"):
        train(
            tiny_config(
                tiny_zimage_path,
                dataset,
                tmp_path / "narrow",
                lora_targets="to_q",
                init_adapter=str(first),
                init_adapter_fused=True,
            )
        )
    with pytest.raises(ValueError, match="'init_adapter_fused': fuses init_adapter, which is empty"):
        tiny_config(tiny_zimage_path, dataset, tmp_path / "none", init_adapter_fused=True)


def test_replay_takes_its_share_of_every_batch():
    generator = torch.Generator().manual_seed(0)
    batches = [draw_batch(10, [(5, 0.25)], 8, generator) for _ in range(50)]
    assert all(len(b) == 8 and sum(i >= 10 for i in b) == 2 for b in batches)
    assert {i for b in batches for i in b} == set(range(15))  # every sample of both sets comes up
    singles = [draw_batch(10, [(5, 0.25)], 1, generator)[0] >= 10 for _ in range(2000)]
    assert 0.2 < sum(singles) / len(singles) < 0.3  # a batch of 1 replays at the ratio on average (5 sigma)
    plain, unused = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    # No replay draws nothing extra: rounds without replay see the data in the order they always did.
    assert [draw_batch(10, [(0, 0.0), (0, 0.0)], 8, unused) for _ in range(5)] == [
        torch.randint(10, (8,), generator=plain).tolist() for _ in range(5)
    ]


def test_each_source_takes_its_own_share_of_a_batch():
    generator = torch.Generator().manual_seed(0)
    batches = [draw_batch(10, [(5, 0.25), (3, 0.5)], 8, generator) for _ in range(50)]
    assert all(sum(10 <= i < 15 for i in b) == 2 and sum(i >= 15 for i in b) == 4 for b in batches)
    assert {i for b in batches for i in b} == set(range(18))
    # A batch of 1 cannot hold both extras: the later source gives its up, and the batch keeps its size.
    singles = [draw_batch(10, [(5, 0.5), (3, 0.4)], 1, generator) for _ in range(2000)]
    assert all(len(b) == 1 for b in singles)
    replayed, negative = (sum(lo <= b[0] < hi for b in singles) / len(singles) for lo, hi in [(10, 15), (15, 18)])
    assert 0.45 < replayed < 0.55 and 0.15 < negative < 0.25  # 0.4 of the half the replay left (5 sigma)


def test_caption_negatives_replace_whole_words_in_the_data_captions():
    examples = [
        Example(Path("a.png"), "a Teal star, beside a red circle"),
        Example(Path("b.png"), "three stars"),
        Example(Path("c.png"), "a striped teal square"),
        Example(Path("d.png"), "a starfish"),
    ]
    negatives = caption_negatives(examples, {"teal": "blue", "star": "square", "striped": ""})
    assert negatives == [
        Example(Path("a.png"), "a blue square, beside a red circle"),
        Example(Path("c.png"), "a blue square"),
    ]
    assert caption_negatives(examples, {}) == []
    assert TrainConfig(caption_negatives="Star=square, striped=").negative_pairs() == {"star": "square", "striped": ""}
    for bad in ["star", "=square", "red star=square"]:
        with pytest.raises(ValueError, match=f"caption_negatives: {bad!r} is not a `word=replacement` pair"):
            TrainConfig(caption_negatives=bad).negative_pairs()


def test_a_round_distils_caption_negatives_from_its_starting_weights(tmp_path, tiny_zimage_path, dataset):
    negatives = {"caption_negatives": "blue=red", "negative_ratio": 0.5}
    refusals = [
        ({"negative_ratio": 0.5}, ValueError, "go together"),
        ({**negatives, "method": "sft"}, ValueError, "need method=dopsd"),
        ({**negatives, "replay_ratio": 0.5, "replay_data": str(dataset)}, ValueError, "below 1 added to replay_ratio"),
        ({"caption_negatives": "green=red", "negative_ratio": 0.5}, DatasetError, f"data folder {dataset}: .* green"),
        ({"anchor_layout": 1.0}, ValueError, "anchor_layout holds .* got method=dopsd and 0 such samples"),
        ({**negatives, "anchor_layout": -1.0}, ValueError, "'anchor_layout': must be >= 0"),
        ({"top_state_means": -0.5}, ValueError, "'top_state_means': must be >= 0"),
        ({"top_state_means": 1.0, "method": "sft"}, ValueError, "top_state_means .* needs method=dopsd, got sft"),
    ]
    for overrides, error, message in refusals:
        with pytest.raises(error, match=message):
            train(tiny_config(tiny_zimage_path, dataset, tmp_path / "refused", **overrides))
    assert not (tmp_path / "refused").exists()  # stopped before anything started
    plain = train(tiny_config(tiny_zimage_path, dataset, tmp_path / "plain", steps=2))
    config = tiny_config(tiny_zimage_path, dataset, tmp_path / "negatives", steps=2, **negatives)
    negative = train(config)
    examples = read_dataset(dataset)
    written = caption_negatives(examples, {"blue": "red"})
    assert [e.caption for e in written][:2] == ["a red box number 0", "a red box number 1"]
    assert cache_path(config, examples + written).is_file()  # the negatives were encoded beside the data
    cache = SampleCache.load(cache_path(config, examples + written), torch.device("cpu"))
    assert len(cache.student) == 2 * len(examples) and len(cache.teacher) == len(examples)  # no image context
    teachers, _ = teachers_of(config, cache, [0, len(examples)], first_caption_taught(config, len(examples), 0))
    assert teachers == [config.teacher, "previous"]
    a, b = lora_weights(plain), lora_weights(negative)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # With a loss only at sigma <= 0.75, holding the negatives at the top states too (anchor_layout) trains other
    # weights than leaving those states alone.
    top = {"steps": 2, "loss_max_sigma": 0.75, **negatives}
    free = lora_weights(train(tiny_config(tiny_zimage_path, dataset, tmp_path / "free", **top)))
    held = lora_weights(train(tiny_config(tiny_zimage_path, dataset, tmp_path / "held", anchor_layout=1.0, **top)))
    assert any(not torch.equal(free[k], held[k]) for k in free)


def test_a_round_trains_on_its_replay_data(tmp_path, tiny_zimage_path, dataset):
    replay = write_replay(tmp_path / "replay")
    with pytest.raises(ValueError, match="go together"):
        train(tiny_config(tiny_zimage_path, dataset, tmp_path / "none", replay_ratio=0.5))
    assert not (tmp_path / "none").exists()  # stopped before anything started
    plain = train(tiny_config(tiny_zimage_path, dataset, tmp_path / "plain", steps=2))
    config = tiny_config(
        tiny_zimage_path, dataset, tmp_path / "mixed", steps=2, replay_data=str(replay), replay_ratio=0.5
    )
    mixed = train(config)
    assert cache_path(config, read_dataset(dataset) + read_dataset(replay)).is_file()  # both sets were encoded
    second = write_replay(tmp_path / "second", count=1)
    pooled = dataclasses.replace(config, replay_data=f"{replay}, {second}", output=str(tmp_path / "pooled"))
    train(pooled)
    assert cache_path(pooled, read_dataset(dataset) + read_dataset(replay) + read_dataset(second)).is_file()
    a, b = lora_weights(plain), lora_weights(mixed)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_the_starting_weights_can_teach_the_replayed_samples(tmp_path, tiny_zimage_path, dataset):
    replay = write_replay(tmp_path / "replay")
    first = train(tiny_config(tiny_zimage_path, dataset, tmp_path / "first", steps=2))
    lwf = {"replay_data": str(replay), "replay_ratio": 0.5}
    # Without D-OPSD or without replay data there is nothing for it to do.
    for refused in [{**lwf, "method": "sft"}, {}]:
        with pytest.raises(ValueError, match="replay_teacher=previous distils the replayed samples"):
            train(tiny_config(tiny_zimage_path, dataset, tmp_path / "refused", replay_teacher="previous", **refused))
    assert not (tmp_path / "refused").exists()

    config = tiny_config(tiny_zimage_path, dataset, tmp_path / "unused", **lwf, replay_teacher="previous")
    cache = SampleCache(
        student=[{"cap_feats": torch.zeros(2, 8)} for _ in range(4)],
        teacher=[{"cap_feats": torch.zeros(5, 8)} for _ in range(4)],
        latents=torch.zeros(4, 4, 4, 4),
    )
    teachers, contexts = teachers_of(config, cache, [0, 3, 1, 2], first_caption_taught(config, 3, 1))
    assert teachers == ["ema", "previous", "ema", "ema"]  # only index 3 is a replayed sample
    assert contexts[1] is cache.student[3] and contexts[0] is cache.teacher[0]

    # A resumed round restores the previous adapter from init_adapter: it ends as the uninterrupted one.
    rounds = {}
    for name, steps in [("straight", [4]), ("resumed", [2, 4]), ("round-teacher", [4])]:
        teacher = "round" if name == "round-teacher" else "previous"
        for total in steps:
            train(
                tiny_config(
                    tiny_zimage_path,
                    dataset,
                    tmp_path / name,
                    steps=total,
                    checkpoint_every=2,
                    init_adapter=str(first),
                    replay_teacher=teacher,
                    **lwf,
                )
            )
        rounds[name] = lora_weights(tmp_path / name / "adapter")
    # Only the samples the round's teacher teaches are read by the VLM: under previous, not the replayed ones.
    n_data, n_replay = len(read_dataset(dataset)), len(read_dataset(replay))
    for name, taught in [("straight", n_data), ("round-teacher", n_data + n_replay)]:
        (cached,) = (tmp_path / name / "cache").glob("*.safetensors")
        cache = SampleCache.load(cached, torch.device("cpu"))
        assert (len(cache.student), len(cache.teacher)) == (n_data + n_replay, taught)
    for key in rounds["straight"]:
        torch.testing.assert_close(rounds["resumed"][key], rounds["straight"][key], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(rounds["straight"][k], rounds["round-teacher"][k]) for k in rounds["straight"])
    # From the base, the base itself teaches the replayed captions.
    from_base = {
        teacher: lora_weights(
            train(tiny_config(tiny_zimage_path, dataset, tmp_path / teacher, steps=2, **lwf, replay_teacher=teacher))
        )
        for teacher in ("previous", "round")
    }
    assert any(not torch.equal(from_base["previous"][k], from_base["round"][k]) for k in from_base["round"])


def test_gradient_accumulation_matches_a_larger_batch(tmp_path, tiny_zimage_path):
    # One image, D-OPSD (no random sigmas): two micro-batches of 1 see exactly what one batch of 2 sees.
    data = write_dataset(tmp_path / "one", count=1)
    big = train(tiny_config(tiny_zimage_path, data, tmp_path / "big", steps=2, batch_size=2, grad_accum=1))
    acc = train(tiny_config(tiny_zimage_path, data, tmp_path / "acc", steps=2, batch_size=1, grad_accum=2))
    a = load_file(str(big / "pytorch_lora_weights.safetensors"))
    b = load_file(str(acc / "pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)  # Adam amplifies float noise
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_zimage_path, dataset):
    config = tiny_config(
        tiny_zimage_path, dataset, tmp_path / "nan", steps=10, lr=1e30, grad_clip=0.0, checkpoint_every=1, method="sft"
    )
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf).*Last good checkpoint: .*step-0000"):
        train(config)
    kept = checkpoint_dirs(tmp_path / "nan")
    assert kept and not (tmp_path / "nan" / "adapter").exists()


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="config field 'method': bad value 'ppo'"):
        make_config(method="ppo")
    with pytest.raises(ValueError, match="preset 'nope' not found"):
        make_config("nope")
    with pytest.raises(ValueError, match="'teacher_guidance': must be >= 0"):
        make_config(teacher_guidance=-1.0)
    assert TrainConfig().sigmas_list() == [1.0, 0.9, 0.75, 0.5, 0.0]
    assert make_config("nano").resolution == 64  # every preset parses into the typed config
    for name in ("zimage-turbo", "flux2-klein-4b", "flux2-klein-9b", "tiny"):
        make_config(name)


def run(args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, **kwargs)


def train_args(model, data, output):
    return ["train", "--preset", "tiny", "--model", model, "--data", str(data), "--output", str(output)]


def test_cli_help_lists_every_config_field():
    result = run([str(BIN / "dopsd"), "train", "--help"], cwd=None)
    assert result.returncode == 0
    flat = " ".join(result.stdout.split())
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in flat, name
    assert "Teacher EMA decay" in flat


def test_cli_train_then_sample(tmp_path, tiny_zimage_path, dataset):
    out = tmp_path / "round"
    result = run(
        [
            str(BIN / "dopsd"),
            *train_args(tiny_zimage_path, dataset, out),
            "--steps",
            "3",
            "--teacher",
            "base",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"step": 3' in result.stdout
    grid = tmp_path / "grid.png"
    result = run(
        [
            str(BIN / "dopsd"),
            "sample",
            "--model",
            tiny_zimage_path,
            "--adapter",
            str(out / "adapter"),
            "--prompt",
            "a blue box",
            "--prompt",
            "a red box",
            "--seeds",
            "0-2",
            "--resolution",
            "32",
            "--out",
            str(grid),
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    from PIL import Image

    assert Image.open(grid).size == (3 * 32, 2 * 32)
    bad = CliRunner().invoke(app, [*train_args(tiny_zimage_path, dataset, tmp_path / "r2"), "--resolution", "30"])
    assert bad.exit_code != 0 and "resolution 30x30 is not supported" in str(bad.exception)


def test_accelerate_launch_two_processes(tmp_path, tiny_zimage_path, dataset):
    out = tmp_path / "ddp"
    result = run(
        [
            str(BIN / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "dopsd.cli",
            *train_args(tiny_zimage_path, dataset, out),
            "--steps",
            "2",
            "--checkpoint-every",
            "2",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    final = checkpoint_dirs(out)[-1]
    assert (final / "rng-0.pt").is_file() and (final / "rng-1.pt").is_file()
    assert (out / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    # Words alone: no distributed wrapper around a transformer that learns nothing, the words' gradient reduced by hand.
    # Half the drawn captions (the circles') do not name the word: a process may draw none that does.
    circles = write_replay(tmp_path / "circles")
    words = run(
        [
            *result.args,
            *("--output", str(tmp_path / "words"), "--lora-rank", "0", "--learn-words", "blue"),
            *("--replay-data", str(circles), "--replay-ratio", "0.5", "--batch-size", "1", "--steps", "4"),
        ]
    )
    assert words.returncode == 0, words.stderr[-3000:]
    learnt = load_file(str(tmp_path / "words" / "adapter" / WORD_EMBEDDINGS))["blue"]
    assert not torch.allclose(learnt, base_embedding(tiny_zimage_path, "blue"))


def test_klein_round_writes_an_adapter_its_pipeline_loads(tmp_path, tiny_klein_path, dataset):
    from diffusers import Flux2KleinPipeline

    adapter = train(
        tiny_config(tiny_klein_path, dataset, tmp_path / "klein", steps=2, text_encoder_layers="1,2,3", family="auto")
    )
    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein_path)
    kwargs = {"output_type": "np", "text_encoder_out_layers": (1, 2, 3)}
    before = pipeline_images(pipe, ["a blue box"], [0], 4, 32, kwargs)[0]
    pipe.load_lora_weights(str(adapter))
    after = pipeline_images(pipe, ["a blue box"], [0], 4, 32, kwargs)[0]
    assert abs(after - before).max() > 1e-4
    # A round of words alone on FLUX.2-klein: its Qwen3 text encoder takes them as Z-Image's does.
    words = train(
        tiny_config(
            tiny_klein_path,
            dataset,
            tmp_path / "words",
            steps=2,
            text_encoder_layers="1,2,3",
            lora_rank=0,
            learn_words="blue",
            family="auto",
        )
    )
    assert sorted(p.name for p in words.iterdir()) == [WORD_EMBEDDINGS]
    grid = sample_grid(tiny_klein_path, ["a blue box"], [0], 4, 32, adapter=str(words), text_encoder_layers="1,2,3")
    base = sample_grid(tiny_klein_path, ["a blue box"], [0], 4, 32, text_encoder_layers="1,2,3")
    assert grid.tobytes() != base.tobytes()


def test_bf16_autocast_and_gradient_checkpointing(tmp_path, tiny_zimage_path, dataset):
    metrics = []
    train(
        tiny_config(
            tiny_zimage_path,
            dataset,
            tmp_path / "bf16",
            steps=2,
            log_every=1,
            mixed_precision="bf16",
            gradient_checkpointing=True,
        ),
        on_metrics=lambda step, m: metrics.append(m["loss"]),
    )
    assert len(metrics) == 2 and all(0 < loss < 10 for loss in metrics)


def test_cache_follows_the_data(tmp_path, tiny_zimage_path, dataset):
    config = tiny_config(tiny_zimage_path, dataset, tmp_path / "c", steps=1)
    before = cache_path(config, read_dataset(dataset))
    train(config)
    assert before.is_file()
    (dataset / "img_0.txt").write_text("a new caption")
    assert cache_path(config, read_dataset(dataset)) != before
