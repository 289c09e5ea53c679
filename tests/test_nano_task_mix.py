"""The task-mix screen continues a bootstrap's pretraining in a copy, as a program at a tiny budget."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dopsd.nano.scenes import prompt_set, write_jsonl
from dopsd.nano.world import Vocabulary

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "nano_task_mix.py"
sys.path.insert(0, str(SCRIPT.parent))
import nano_task_mix  # noqa: E402  (a script, not a package)
from nano_task_mix import TaskMixConfig  # noqa: E402


def test_task_mix_screen_continues_pretraining_in_a_copy(tmp_path, tiny_nano_bootstrap):
    source = Path(tiny_nano_bootstrap.workdir)
    before = (source / "checkpoints" / "pretrain" / "transformer.safetensors").read_bytes()
    prompts = write_jsonl(prompt_set(Vocabulary(), per_task=2, seed=0), tmp_path / "prompts.jsonl")
    command = [sys.executable, str(SCRIPT), f"--bootstrap={source}", f"--workdir={tmp_path / 'mix'}"]
    command += [f"--prompts={prompts}", "--task-weights=0,0,0,0,1,0", "--image-context-prob=0.25", "--steps=2"]
    command += ["--relation-seeds=0-1"]
    shown = subprocess.run([*command, "--probe=false"], capture_output=True, text=True, timeout=600)
    assert shown.returncode == 0, shown.stderr
    step = json.loads((tmp_path / "mix" / "checkpoints" / "pretrain" / "step.json").read_text())["step"]
    assert step == tiny_nano_bootstrap.pretrain_steps + 2
    recipe = json.loads((tmp_path / "mix" / "continuation.json").read_text())
    assert recipe["task_weights"] == [0, 0, 0, 0, 1, 0] and recipe["image_context_prob"] == 0.25
    assert recipe["pretrain_steps"] == step and recipe["workdir"] == str(tmp_path / "mix")
    assert (source / "checkpoints" / "pretrain" / "transformer.safetensors").read_bytes() == before
    # two position prompts x two seeds, each counted once
    line = next(x for x in shown.stdout.splitlines() if x.startswith("position samples at 32 steps, 4:"))
    assert sum(int(part.rsplit(" ", 1)[1]) for part in line.split(": ")[1].split(", ")) == 4
    refused = TaskMixConfig(bootstrap=str(source), workdir=str(tmp_path / "refused"), task_weights="1,1", steps=1)
    with pytest.raises(ValueError, match="task weights must be 6 non-negative numbers"):
        nano_task_mix.main(refused)
    assert not (tmp_path / "refused").exists()
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "config.json").write_bytes((source / "config.json").read_bytes())
    refused = TaskMixConfig(bootstrap=str(untrained), workdir=str(tmp_path / "refused"), steps=1)
    with pytest.raises(SystemExit, match=f"{untrained}: no pretraining checkpoint"):
        nano_task_mix.main(refused)
    assert not (tmp_path / "refused").exists()
