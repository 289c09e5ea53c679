"""The nano bootstrap runs every stage end to end at a tiny budget, resumes, and yields a real ZImagePipeline."""

import json

import pytest
import torch
from diffusers import ZImagePipeline
from PIL import Image
from safetensors.torch import load_file

from dopsd.models import load_model
from dopsd.nano.bootstrap import (
    BootstrapConfig,
    RolloutTargets,
    TeacherPairs,
    WorldStream,
    bootstrap,
    load_training_model,
    machine_description,
    require_judge,
    sitting_seed,
    teacher_sample,
    undistilled_teacher,
)
from dopsd.nano.model import NANO_RESOLUTION
from tests.conftest import nano_judge, tiny_bootstrap_config


def test_bootstrap_stages_resume_and_produce_a_pipeline(tmp_path):
    config = tiny_bootstrap_config(tmp_path / "boot")
    logs = []
    bootstrap(config, stages=("vae",), log=logs.append)
    initial_tower = load_file(str(config.model_dir / "teacher_encoder" / "model.safetensors"))
    bootstrap(config, stages=("vision", "pretrain"), log=logs.append)
    done = json.loads((tmp_path / "boot" / "done.json").read_text())
    assert list(done) == ["vae", "vision", "pretrain"]
    assert done["vae"]["machine"] == machine_description(config.torch_device, config.threads)  # CPU or GPU
    tower = load_file(str(config.model_dir / "teacher_encoder" / "model.safetensors"))
    assert any(not torch.equal(initial_tower[k], tower[k]) for k in tower if ".visual." in k)  # the vision stage
    vae_config = json.loads((config.model_dir / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 1.0  # latents normalised from the trained encoder
    pretrained = load_file(str(tmp_path / "boot" / "checkpoints" / "pretrain" / "transformer.safetensors"))

    more = tiny_bootstrap_config(tmp_path / "boot", distill_steps=3)
    with pytest.raises(ValueError, match="curate_on_policy needs a judge"):
        bootstrap(more, log=logs.append)  # the on-policy stage curates its examples: it needs their judge
    assert not any(line.startswith("distill:") for line in logs)  # refused before any stage ran
    bootstrap(more, log=logs.append, judge=nano_judge())  # skips finished stages, runs the on-policy distillation
    assert any(line.startswith("distill: step 3/3") for line in logs)
    assert any(line.startswith("distill_on_policy: step 2/2") for line in logs)
    assert not any(line.startswith("pretrain: resuming") for line in logs)
    checkpoints = tmp_path / "boot" / "checkpoints"
    distilled = load_file(str(checkpoints / "distill" / "transformer.safetensors"))
    assert any(not torch.equal(pretrained[k], distilled[k]) for k in pretrained)
    on_policy = load_file(str(checkpoints / "distill_on_policy" / "transformer.safetensors"))
    assert any(not torch.equal(distilled[k], on_policy[k]) for k in distilled)

    # Distillation extended after it finished: the model folder now holds the on-policy weights, the teacher must
    # still be the pretrained model.
    folder_weights = load_training_model(more).pipeline.transformer
    assert all(torch.equal(on_policy[k], v) for k, v in folder_weights.state_dict().items())
    teacher = undistilled_teacher(folder_weights, more)
    assert all(torch.equal(pretrained[k], v) for k, v in teacher.state_dict().items())
    bootstrap(tiny_bootstrap_config(tmp_path / "boot", distill_steps=4), stages=("distill",), log=logs.append)
    assert "distill: resuming at step 3" in logs and "distill: step 4/4" in " ".join(logs)
    # The on-policy stage was built on the shorter distillation: run again from the longer one's weights.
    assert not (checkpoints / "distill_on_policy").exists()
    before = len(logs)
    bootstrap(tiny_bootstrap_config(tmp_path / "boot", distill_steps=4), log=logs.append, judge=nano_judge())
    assert any(line.startswith("distill_on_policy: step 2/2") for line in logs[before:])
    assert not any("resuming" in line for line in logs[before:])

    before = len(logs)
    bootstrap(tiny_bootstrap_config(tmp_path / "boot", pretrain_steps=3), log=logs.append)
    assert len(logs) == before  # finished stages are not run again
    bootstrap(tiny_bootstrap_config(tmp_path / "boot", pretrain_steps=3), stages=("pretrain",), log=logs.append)
    assert "pretrain: resuming at step 2" in logs and "pretrain: step 3/3" in " ".join(logs)
    assert list(json.loads((tmp_path / "boot" / "done.json").read_text())) == ["vae", "vision", "pretrain"]
    # The distillations were built on the old pretraining: set aside, so the next run distils afresh.
    assert not (checkpoints / "distill").exists() and not (checkpoints / "distill_on_policy").exists()
    assert json.loads((checkpoints / "superseded" / "distill" / "step.json").read_text())["step"] == 4
    before = len(logs)
    bootstrap(tiny_bootstrap_config(tmp_path / "boot", pretrain_steps=3), log=logs.append, judge=nano_judge())
    assert any(line.startswith("distill: step 2/2") for line in logs[before:])
    assert not any("resuming" in line for line in logs[before:])
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
    frozen = load_file(str(config.model_dir / "teacher_encoder" / "model.safetensors"))
    assert all(torch.equal(tower[k], frozen[k]) for k in tower if ".visual." in k)  # pretraining only reads it


def test_on_policy_examples_are_the_students_states_with_the_teachers_endpoint_from_each(tiny_nano_bootstrap):
    config = BootstrapConfig.from_workdir(tiny_nano_bootstrap.workdir)
    model = load_training_model(config)
    teacher = undistilled_teacher(model.pipeline.transformer, config)
    examples = RolloutTargets(model, teacher, config, torch.Generator().manual_seed(0))
    contexts, states, sigmas, targets = examples.draws[0]
    batch = config.distill_batch
    assert len(contexts) == len(states) == len(targets) == 4 * batch
    assert sigmas.view(4, batch)[:, 0].tolist() == examples.student_sigmas[:-1].tolist()
    # Each state is the previous one moved by the student's own velocity, not a point on a straight line.
    first, second = states[:batch], states[batch : 2 * batch]
    with torch.no_grad():
        step = (sigmas[batch] - sigmas[0]) * model.velocity(first, sigmas[:batch], contexts[:batch])
    torch.testing.assert_close(second, first + step)
    last = slice(3 * batch, 4 * batch)
    sigma = sigmas[3 * batch].item()
    remaining = torch.cat([torch.tensor([sigma]), examples.teacher_sigmas[examples.teacher_sigmas < sigma]])
    expected = teacher_sample(model, teacher, states[last], remaining, contexts[last], config.guidance)
    torch.testing.assert_close(targets[last], expected)


def test_curated_on_policy_examples_are_those_the_judge_finds_right_and_every_free_caption(tiny_nano_bootstrap):
    config = BootstrapConfig.from_workdir(tiny_nano_bootstrap.workdir, distill_batch=8)
    model = load_training_model(config)
    teacher = undistilled_teacher(model.pipeline.transformer, config)
    every = RolloutTargets(model, teacher, config, torch.Generator().manual_seed(0)).draws[0]
    judged_records = []

    def reject_one_in_two(images, records):
        judged_records.extend(records)
        return [i % 2 == 0 for i in range(len(images))]

    curated = RolloutTargets(model, teacher, config, torch.Generator().manual_seed(0), reject_one_in_two).draws[0]
    # The same stream as the stage's: which items are GenEval-family captions (judged) and which free ones (kept).
    items = WorldStream(sitting_seed(config, "distill_on_policy", 4), config.task_weights).labelled_batch(
        config.distill_batch
    )
    family = [i for i, (_, _, record) in enumerate(items) if record is not None]
    assert 0 < len(family) < len(items)
    assert [r["prompt"] for r in judged_records] == [items[i][1] for _ in range(4) for i in family]
    graded = [step * len(items) + i for step in range(4) for i in family]  # step-major, as the examples
    rejected = set(graded[1::2])
    kept = [i for i in range(4 * len(items)) if i not in rejected]
    torch.testing.assert_close(curated.states, every.states[kept])
    torch.testing.assert_close(curated.targets, every.targets[kept])
    assert curated.sigmas.tolist() == every.sigmas[kept].tolist()
    assert len(curated.contexts) == len(kept)


def test_curated_teacher_pairs_are_those_the_judge_finds_right_and_every_free_caption(tiny_nano_bootstrap):
    config = BootstrapConfig.from_workdir(tiny_nano_bootstrap.workdir, distill_batch=8, teacher_pairs=8)
    model = load_training_model(config)
    teacher = undistilled_teacher(model.pipeline.transformer, config)

    def pairs(judge=None) -> TeacherPairs:
        stream = WorldStream(config.seed + 3, config.task_weights)
        return TeacherPairs(model, teacher, stream, config, torch.Generator().manual_seed(0), judge)

    judged_records = []

    def reject_one_in_two(images, records):
        judged_records.extend(records)
        return [i % 2 == 0 for i in range(len(images))]

    every, curated = pairs(), pairs(reject_one_in_two)
    items = WorldStream(config.seed + 3, config.task_weights).labelled_batch(config.distill_batch)
    family = [i for i, (_, _, record) in enumerate(items) if record is not None]
    assert 0 < len(family) < len(items)
    assert [r["prompt"] for r in judged_records[: len(family)]] == [items[i][1] for i in family]
    rejected = set(family[1::2])
    kept = [i for i in range(len(items)) if i not in rejected]
    # The first draw's kept pairs lead the pool; later draws fill it up to `teacher_pairs`.
    assert len(curated.contexts) == config.teacher_pairs and len(judged_records) > len(family)
    torch.testing.assert_close(curated.targets[: len(kept)], every.targets[kept])
    torch.testing.assert_close(curated.noise[: len(kept)], every.noise[kept])
    for n, i in enumerate(kept):
        assert all(torch.equal(curated.contexts[n][key], every.contexts[i][key]) for key in every.contexts[i])


def test_a_curated_distillation_stage_needs_a_judge(tmp_path):
    for stage, flag in (("distill", "curate_distill"), ("distill_on_policy", "curate_on_policy")):
        config = tiny_bootstrap_config(tmp_path, curate_distill=True, curate_on_policy=True)
        with pytest.raises(ValueError, match=f"{flag} needs a judge"):
            require_judge(config, None, stage)
        require_judge(tiny_bootstrap_config(tmp_path, **{flag: False}), None, stage)  # uncurated: no judge needed
    require_judge(tiny_bootstrap_config(tmp_path, curate_distill=True), None, "pretrain")


def test_worker_processes_prepare_the_batches_their_own_stream_draws(tmp_path, tiny_nano_bootstrap):
    import shutil

    from dopsd.nano.bootstrap import LatentPool, WorldStream, pretraining_batch, pretraining_batches

    # On the CPU, where the workers compute: the same kernels, so the same numbers.
    config = BootstrapConfig.from_workdir(tiny_nano_bootstrap.workdir, data_workers=1, device="cpu")
    model = load_training_model(config)
    batches = pretraining_batches(model, config, 4)
    from_worker = [next(batches) for _ in range(2)]
    batches.close()
    # The worker's batches are those of its stream, unpacked into one context per item on the model's device.
    stream = WorldStream(sitting_seed(config, "pretrain", 2).spawn(1)[0], config.task_weights)
    pool = LatentPool(model, stream, config.pool_size, config.pool_refresh)
    for latents, contexts in from_worker:
        expected_latents, expected_contexts = pretraining_batch(model, pool, config, 4)
        torch.testing.assert_close(latents, expected_latents)
        assert len(contexts) == 4
        for context, expected in zip(contexts, expected_contexts, strict=True):
            torch.testing.assert_close(context["cap_feats"], expected["cap_feats"])

    # Two workers draw from two streams, and the pretraining stage runs on their batches (in a copy of the folder).
    shutil.copytree(config.workdir, tmp_path / "boot")
    two = BootstrapConfig.from_workdir(tmp_path / "boot", data_workers=2, pretrain_steps=config.pretrain_steps + 1)
    batches = pretraining_batches(model, two, 4)
    first, second = next(batches)[0], next(batches)[0]
    batches.close()
    assert not torch.allclose(first, second)
    with pytest.raises(ValueError, match="leaves 8 items each, fewer than a batch of 9"):
        pretraining_batches(model, two, 9)
    logs: list[str] = []
    bootstrap(two, stages=("pretrain",), log=logs.append)
    assert f"pretrain: step {two.pretrain_steps}/{two.pretrain_steps}" in " ".join(logs)


def test_caption_dropout_gives_the_empty_prompt_to_caption_only_samples(tiny_nano_bootstrap):
    import numpy as np

    from dopsd.models.zimage import ZImageModel
    from dopsd.nano.bootstrap import WorldStream, contexts_for
    from dopsd.nano.model import NANO_CAPTION_TOKENS

    model = ZImageModel.load(str(tiny_nano_bootstrap.model_dir), max_caption_tokens=NANO_CAPTION_TOKENS)
    stream = WorldStream(0)
    items = stream.batch(4)
    empty = model.encode_student([""])[0]["cap_feats"]
    dropped = contexts_for(model, items, stream, 0.0, np.random.default_rng(0), caption_dropout=1.0)
    assert all(torch.equal(c["cap_feats"], empty) for c in dropped)
    kept = contexts_for(model, items, stream, 0.0, np.random.default_rng(0), caption_dropout=0.0)
    captions = model.encode_student([caption for _, caption in items])
    assert all(torch.equal(c["cap_feats"], d["cap_feats"]) for c, d in zip(kept, captions, strict=True))


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
    assert metrics["undistilled_guidance"] == tiny_nano_bootstrap.guidance
    assert [p["pack"] for p in metrics["premise"]] == ["star", "teal", "striped"]
    assert all(p["samples"] == 24 for p in metrics["premise"])
    text = out.read_text()
    assert 0 <= metrics["vae_reconstruction"]["all_attributes"] <= 1
    assert (
        "| distilled | 4 |" in text
        and "VAE round trip" in text
        and "| star |" in text
        and "distilled@4 >= 0.75" in text
        and f"classifier-free guidance {tiny_nano_bootstrap.guidance}" in text
    )
    assert (tmp_path / "reports" / "nano_base.json").is_file()
    # one row per prompt: reference, teacher, student (one seed); under a 12-px header of names
    assert "[grid](nano_base_grids/premise_star.png)" in text
    grid = Image.open(tmp_path / "reports" / "nano_base_grids" / "premise_star.png")
    assert grid.size == (3 * NANO_RESOLUTION, 12 + 24 * NANO_RESOLUTION)


def test_probe_scores_a_checkpoint_and_keeps_the_trend(tiny_nano_bootstrap, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from dopsd.nano.scenes import prompt_set, write_jsonl
    from dopsd.nano.world import Vocabulary
    from evaluation.nano.base_report import probe_checkpoint
    from evaluation.nano.detector import NanoDetector

    prompts = write_jsonl(prompt_set(Vocabulary(), per_task=2, seed=0), tmp_path / "prompts.jsonl")
    dopsd = Path(sys.executable).parent / "dopsd"
    command = [str(dopsd), "nano", "probe", "--workdir", tiny_nano_bootstrap.workdir, "--prompts", str(prompts)]
    command += ["--premise-prompts", "2"]
    shown = subprocess.run([*command, "--limit", "1", "--seeds", "0"], capture_output=True, text=True, check=True)
    assert "pretrain step 2 (6 prompts x 1 seeds, guidance 3.0)" in shown.stdout and "GenEval-nano @32:" in shown.stdout
    detector = NanoDetector.load()
    probe_checkpoint(tiny_nano_bootstrap.workdir, "distill", prompts, detector, [0, 1], limit=2, premise_prompts=2)
    probes = [
        json.loads(line) for line in (Path(tiny_nano_bootstrap.workdir) / "probes.jsonl").read_text().splitlines()
    ]
    # the undistilled model is scored with the bootstrap's guidance, the distilled one without
    assert [(p["stage"], p["step"], p["prompts"], p["guidance"]) for p in probes] == [
        ("pretrain", 2, 6, 3.0),
        ("distill", 2, 12, 0.0),
    ]
    assert all(0 <= p["geneval_nano@4"]["overall"] <= 1 for p in probes)
    assert [r["pack"] for r in probes[1]["premise"]] == ["star", "teal", "striped"]
    assert probes[1]["premise"][0]["samples"] == 2 * 2
    grids = Path(tiny_nano_bootstrap.workdir) / "probes"
    assert Image.open(grids / "pretrain_2_star.png").size == (3 * NANO_RESOLUTION, 12 + 2 * NANO_RESOLUTION)
    assert Image.open(grids / "distill_2_teal.png").size == (5 * NANO_RESOLUTION, 12 + 2 * NANO_RESOLUTION)
    # GenEval samples: one row per prompt, a column per step count and seed
    assert Image.open(grids / "pretrain_2_geneval.png").size == (2 * NANO_RESOLUTION, 12 + 6 * NANO_RESOLUTION)
    assert Image.open(grids / "distill_2_geneval.png").size == (4 * NANO_RESOLUTION, 12 + 12 * NANO_RESOLUTION)
    with pytest.raises(ValueError, match="stage 'vae' has no model to score"):
        probe_checkpoint(tiny_nano_bootstrap.workdir, "vae", prompts, detector)


def test_learning_rate_warms_up_holds_then_decays_to_zero():
    from dopsd.nano.bootstrap import learning_rate

    rates = [learning_rate(1.0, step, 1000, decay_steps=100, warmup_steps=10) for step in range(1000)]
    assert rates[0] == 0.1 and rates[9] == 1.0
    assert all(r == 1.0 for r in rates[9:900])
    assert rates[950] == 0.5 and rates[-1] == 0.01
    assert all(a > b for a, b in zip(rates[900:], rates[901:], strict=False))
    assert learning_rate(1.0, 500, 1000, decay_steps=0, warmup_steps=10) == 1.0


def test_cell_labels_put_each_object_in_the_vision_token_over_its_centre():
    from dopsd.nano.bootstrap import cell_labels
    from dopsd.nano.world import COLOURS, SHAPES, TEXTURES, Scene, WorldObject

    star = WorldObject("star", "teal", "striped", "small", 7.0, x=16, y=8)
    circle = WorldObject("circle", "red", "plain", "large", 11.0, x=48, y=48)
    labels = cell_labels(Scene((star, circle), size=64), cell=16)
    assert labels.shape == (16, 4)
    colours = list(COLOURS)
    assert labels[1].tolist() == [SHAPES.index("star") + 1, colours.index("teal"), TEXTURES.index("striped"), 0]
    assert labels[15].tolist() == [SHAPES.index("circle") + 1, colours.index("red"), TEXTURES.index("plain"), 1]
    empty = [i for i in range(16) if i not in (1, 15)]
    assert all(labels[i].tolist() == [0, -1, -1, -1] for i in empty)


def test_task_weights_set_how_often_each_family_is_drawn():
    import pytest

    from dopsd.nano.bootstrap import WorldStream
    from dopsd.nano.scenes import RELATIONS

    def relation_share(stream: WorldStream) -> float:
        captions = [caption for _, caption in stream.batch(400)]
        return sum(any(f" {r} " in c for r in RELATIONS) for c in captions) / len(captions)

    # Half the items are task scenes: all of them position scenes here, a sixth of them by default.
    assert relation_share(WorldStream(0, (0, 0, 0, 0, 1, 0))) > 0.4
    assert relation_share(WorldStream(0)) < 0.15
    assert relation_share(WorldStream(0, (1, 1, 1, 1, 0, 1))) == 0
    with pytest.raises(ValueError, match="6 non-negative numbers"):
        WorldStream(0, (1, 1))


def test_config_of_a_copied_work_folder_reads_as_the_copy(tmp_path):
    from dataclasses import asdict, replace

    from dopsd.nano.bootstrap import BootstrapConfig

    config = tiny_bootstrap_config(tmp_path / "boot", task_weights=(1.0, 1.0, 1.0, 1.0, 4.0, 1.0))
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.json").write_text(json.dumps(asdict(config)))  # as bootstrap() writes it: weights as a list
    read = BootstrapConfig.from_workdir(copy, threads=2)
    assert read == replace(config, workdir=str(copy), threads=2)
    assert read.stage_dir("distill") == copy / "checkpoints" / "distill"


def test_each_sitting_of_a_resumed_stage_draws_scenes_of_its_own(tmp_path):
    config = BootstrapConfig(workdir=str(tmp_path))

    def captions(seed) -> list[str]:
        return [caption for _, caption in WorldStream(seed).batch(8)]

    first = captions(sitting_seed(config, "pretrain", 2))
    assert first == captions(config.seed + 2)  # a first sitting draws as the committed base's stages did
    config.stage_dir("pretrain").mkdir(parents=True)
    (config.stage_dir("pretrain") / "step.json").write_text(json.dumps({"step": 200, "seconds": 400}))
    resumed = captions(sitting_seed(config, "pretrain", 2))
    assert resumed != first
    assert resumed == captions(sitting_seed(config, "pretrain", 2))  # still reproducible from the checkpoint
    assert captions(sitting_seed(config, "distill", 2)) == first  # another stage's progress is not this one's
