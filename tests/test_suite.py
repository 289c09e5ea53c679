"""The evaluation suite end to end: real sampling, the nano world's networks, the report and `dopsd eval`."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dopsd import adapters
from dopsd.cli import app
from dopsd.data import DatasetError
from dopsd.models import ZImageModel
from dopsd.words import WordEmbeddings, save_words, word_token_ids
from evaluation.networks import NetworkPaths, load_networks
from evaluation.prompt_sets import concept_sets, first_per_task, read_images, read_prompts, retention_set
from evaluation.suite import SuiteConfig, SuiteReport, run_suite

WORLD = Path(__file__).parents[1] / "data" / "nano" / "world"
CONFIG = SuiteConfig(steps=2, images_per_prompt=2, resolution=64, batch=4, grid_prompts=2, baseline="base")


@pytest.fixture(scope="module")
def networks():
    return load_networks(NetworkPaths.nano())


@pytest.fixture(scope="module")
def prompt_sets(tmp_path_factory):
    references = tmp_path_factory.mktemp("references")
    for i, path in enumerate(sorted((WORLD / "packs" / "teal").glob("*.png"))[:4]):
        Image.open(path).save(references / f"{i}.png")
    return [
        retention_set(WORLD / "base_prompts.jsonl", references, limit=1),
        *concept_sets(WORLD / "packs" / "star", WORLD / "packs" / "star_prompts.jsonl", limit=1),
    ]


@pytest.fixture(scope="module")
def candidate_adapter(tiny_zimage_path, tmp_path_factory):
    """A LoRA that changes the model: random up-projections instead of zeros."""
    model = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False)
    adapters.add_student_teacher(model.pipeline.transformer, 4, 8.0, model.default_lora_targets)
    torch.manual_seed(0)
    with torch.no_grad():
        for _, student in adapters.adapter_pairs(model.pipeline.transformer):
            student.normal_(std=0.2)
    return str(adapters.save_adapter(model, adapters.STUDENT, tmp_path_factory.mktemp("candidate")))


def suite(tiny_zimage_path, models, prompt_sets, networks, out):
    model = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False)
    return run_suite(model, models, prompt_sets, networks, CONFIG, out)


def test_the_base_against_itself_has_zero_deltas_and_the_report_round_trips(
    tiny_zimage_path, prompt_sets, networks, tmp_path
):
    report = suite(tiny_zimage_path, {"base": None, "again": None}, prompt_sets, networks, tmp_path)
    metrics = report.metrics["again"]
    for name in (
        "retention/geneval/overall",
        "retention/clipscore",
        "retention/fid/reference",
        "retention/fid/baseline",
    ):
        assert metrics[name] is not None, name
    assert metrics["concept_new/geneval/overall"] is not None
    assert metrics["concept_rewrite/fidelity/clip"] is not None
    assert "concept_rewrite/geneval/overall" not in metrics  # captions carry no GenEval metadata
    assert metrics == report.metrics["base"]
    assert all(delta == 0 for delta in report.deltas["again"].values() if delta is not None)
    assert report.intervals["again"] == {f"{s}/geneval/overall": [0.0, 0.0] for s in ("retention", "concept_new")}
    assert abs(metrics["retention/fid/baseline"]) < 1e-3
    no_dino = "no fidelity/dino network configured"
    assert report.unavailable == {"concept_rewrite/fidelity/dino": no_dino, "concept_new/fidelity/dino": no_dino}

    assert SuiteReport.read(tmp_path / "report.json") == report
    grid = Image.open(tmp_path / report.grids["retention"])
    assert grid.width == 2 * 64 and grid.height > 2 * 64  # a column per model, a row per shown prompt, a header
    verdicts = (tmp_path / report.verdicts["retention/base"]).read_text().splitlines()
    assert len(verdicts) == 6 * 2  # one prompt of each of the six tasks, two seeds
    assert {json.loads(line)["seed"] for line in verdicts} == {0, 1}


def test_a_candidate_adapter_moves_its_own_metrics_only(
    tiny_zimage_path, candidate_adapter, prompt_sets, networks, tmp_path
):
    report = suite(tiny_zimage_path, {"base": None, "candidate": candidate_adapter}, prompt_sets, networks, tmp_path)
    assert report.models["candidate"] == candidate_adapter
    assert report.metrics["candidate"]["retention/fid/baseline"] > 1e-3
    assert report.deltas["candidate"]["retention/clipscore"] != 0
    low, high = report.intervals["candidate"]["retention/geneval/overall"]
    assert low <= report.deltas["candidate"]["retention/geneval/overall"] <= high
    assert all(delta == 0 for delta in report.deltas["base"].values() if delta is not None)


def test_a_words_adapter_moves_only_the_prompts_naming_its_words(tiny_zimage_path, prompt_sets, networks, tmp_path):
    model = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False)
    embedding, tokenizer = model.pipeline.text_encoder.get_input_embeddings(), model.pipeline.tokenizer
    star = WordEmbeddings(embedding, word_token_ids(tokenizer, ["star"]))
    with torch.no_grad():
        star.vectors.normal_(std=1.0, generator=torch.Generator().manual_seed(0))
    folder = save_words(tmp_path / "words", [star]).parent
    star.detach_from_encoder()
    report = suite(tiny_zimage_path, {"base": None, "words": str(folder)}, prompt_sets, networks, tmp_path / "eval")
    retention = {k: v for k, v in report.metrics["words"].items() if k.startswith("retention/")}
    # No base prompt names the star: the words adapter samples them exactly as the base does.
    assert retention == {k: v for k, v in report.metrics["base"].items() if k.startswith("retention/")}
    assert abs(retention["retention/fid/baseline"]) < 1e-3
    assert report.metrics["words"]["concept_new/fid/baseline"] > 1e-3  # every star prompt names it
    with pytest.raises(FileNotFoundError, match="neither pytorch_lora_weights.safetensors nor word_embeddings"):
        suite(tiny_zimage_path, {"base": None, "empty": str(tmp_path)}, prompt_sets, networks, tmp_path / "e2")


def test_missing_networks_are_reported_with_reasons_never_as_numbers(tiny_zimage_path, prompt_sets, tmp_path):
    missing = tmp_path / "no-such-clip.safetensors"
    networks = load_networks(NetworkPaths(clip=str(missing), clip_arch="ViT-B-32"))
    report = suite(tiny_zimage_path, {"base": None}, prompt_sets[:1], networks, tmp_path / "out")
    assert report.metrics["base"]["retention/clipscore"] is None
    assert str(missing) in report.unavailable["retention/clipscore"]
    assert report.metrics["base"]["retention/geneval/overall"] is None
    assert "detector" in report.unavailable["retention/geneval/overall"]
    assert report.metrics["base"]["retention/fid/baseline"] is None


def test_dopsd_eval_runs_the_suite_from_the_command_line(tiny_zimage_path, candidate_adapter, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        app,
        [
            "eval", "--model", tiny_zimage_path, "--candidate", candidate_adapter, "--nano",
            "--geneval", str(WORLD / "base_prompts.jsonl"), "--concept", str(WORLD / "packs" / "star"),
            "--limit", "2", "--steps", "2", "--images-per-prompt", "2", "--resolution", "64", "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = SuiteReport.read(out / "report.json")
    assert set(report.models) == {"base", "candidate"} and report.config.baseline == "base"
    assert report.metrics["candidate"]["retention/geneval/overall"] is not None
    assert "candidate:" in result.output
    assert "candidate - base retention/geneval/overall: " in result.output and "95% over prompts" in result.output


def test_prompt_and_image_files_fail_with_the_file_named(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n")
    assert read_prompts(tmp_path / "prompts.txt") == [{"prompt": "a red circle"}, {"prompt": "a blue square"}]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"tag": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: each line needs a string `prompt`"):
        read_prompts(tmp_path / "bad.jsonl")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16)).save(images / "a.png")
    (images / "b.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"b.png: unreadable image"):
        read_images(images)


def test_limit_keeps_the_first_prompts_of_every_task():
    records = [{"tag": t, "prompt": f"{t} {i}"} for i in range(3) for t in ("counting", "position")]
    assert [r["prompt"] for r in first_per_task(records, 2)] == ["counting 0", "position 0", "counting 1", "position 1"]
    assert first_per_task(records, 0) == records
