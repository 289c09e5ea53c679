"""On-policy distillation (benchmarks/distill_on_policy.py): its examples are the student's own rollout states with
the teacher's endpoint from each, and the program trains the model folder of a (tiny) bootstrap's copy."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from dopsd.nano.bootstrap import BootstrapConfig, load_training_model, teacher_sample, undistilled_teacher

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "distill_on_policy.py"


def load_script():
    spec = importlib.util.spec_from_file_location("distill_on_policy", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_examples_are_the_students_states_with_the_teachers_endpoint_from_each(tiny_nano_bootstrap):
    config = BootstrapConfig.from_workdir(tiny_nano_bootstrap.workdir)
    model = load_training_model(config)
    teacher = undistilled_teacher(model.pipeline.transformer, config)
    examples = load_script().RolloutTargets(model, teacher, config, 1, 1, torch.Generator().manual_seed(0))
    contexts, states, sigmas, targets = examples.draws[0]
    batch = config.distill_batch
    assert len(contexts) == len(states) == len(targets) == 4 * batch
    assert sigmas.view(4, batch)[:, 0].tolist() == examples.student_sigmas[:-1].tolist()
    # Each state is the previous one moved by the student's own velocity, not a point on a straight line.
    first, second = states[:batch], states[batch : 2 * batch]
    t = torch.full((batch,), sigmas[0].item())
    with torch.no_grad():
        step = (sigmas[batch] - sigmas[0]) * model.velocity(first, t, contexts[:batch])
    torch.testing.assert_close(second, first + step)
    last = slice(3 * batch, 4 * batch)
    sigma = sigmas[3 * batch].item()
    remaining = torch.cat([torch.tensor([sigma]), examples.teacher_sigmas[examples.teacher_sigmas < sigma]])
    expected = teacher_sample(model, teacher, states[last], remaining, contexts[last], config.guidance)
    torch.testing.assert_close(targets[last], expected)


def test_program_trains_the_copys_model_and_leaves_the_teacher(tmp_path, tiny_nano_bootstrap):
    workdir = tmp_path / "copy"
    shutil.copytree(tiny_nano_bootstrap.workdir, workdir)
    transformer = workdir / "model" / "transformer" / "diffusion_pytorch_model.safetensors"
    teacher = workdir / "checkpoints" / "pretrain" / "transformer.safetensors"
    before, teacher_before = load_file(str(transformer)), teacher.read_bytes()
    command = [sys.executable, str(SCRIPT), f"--workdir={workdir}", "--steps=2", "--pool-draws=1", "--refresh-every=1"]
    run = subprocess.run([*command, "--threads=1", "--lr=1e-2"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((workdir / "checkpoints" / "distill_on_policy" / "step.json").read_text())["step"] == 2
    after = load_file(str(transformer))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert teacher.read_bytes() == teacher_before
