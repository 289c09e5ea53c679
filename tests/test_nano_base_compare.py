"""The base comparison benchmark runs as a program on a finished (tiny) bootstrap."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "nano_base_compare.py"


DIFFERENCE = re.compile(r"^  (\w+): ([+-]\d\.\d{3}) \[([+-]\d\.\d{3}), ([+-]\d\.\d{3})\]$", re.M)


def compare(baseline: str, candidate: str, prompts: Path, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), f"--baseline={baseline}", f"--candidate={candidate}", *options]
    return subprocess.run(
        [*command, f"--prompts={prompts}", "--seeds=2", "--threads=1"], capture_output=True, text=True, timeout=600
    )


def test_a_model_against_itself_differs_by_nothing(tiny_nano_bootstrap, tiny_world):
    model = str(Path(tiny_nano_bootstrap.workdir) / "model")
    run = compare(model, f"{tiny_nano_bootstrap.workdir}:distill_on_policy", tiny_world / "base_prompts.jsonl")
    assert run.returncode == 0, run.stderr[-2000:]
    # The exported model is the on-policy stage's checkpoint: the same images, so every difference is exactly 0.
    assert run.stdout.startswith("GenEval-nano @4, ")
    differences = DIFFERENCE.findall(run.stdout)
    assert {tag for tag, *_ in differences} >= {"overall", "counting", "position"}
    assert all(float(value) == 0.0 for _, *values in differences for value in values)


def test_teachers_are_compared_at_their_own_steps_and_guidance(tiny_nano_bootstrap, tiny_world):
    pretrained = f"{tiny_nano_bootstrap.workdir}:pretrain"
    run = compare(pretrained, pretrained, tiny_world / "base_prompts.jsonl", "--steps=3", "--guidance=3")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("GenEval-nano @3, guidance 3, ")
    # Guided sampling draws its noise per (prompt, seed) like unguided: the same teacher twice gives the same images.
    differences = DIFFERENCE.findall(run.stdout)
    assert differences and all(float(value) == 0.0 for _, *values in differences for value in values)


def test_a_side_that_names_no_model_is_refused(tiny_nano_bootstrap, tiny_world):
    run = compare(str(tiny_world), f"{tiny_nano_bootstrap.workdir}:distill", tiny_world / "base_prompts.jsonl")
    assert run.returncode != 0 and "no model_index.json" in run.stderr
    run = compare(f"{tiny_nano_bootstrap.workdir}:vae", str(tiny_world), tiny_world / "base_prompts.jsonl")
    assert run.returncode != 0 and "has no model to score" in run.stderr
