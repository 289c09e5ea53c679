"""The base comparison benchmark runs as a program on a finished (tiny) bootstrap."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.geneval.rules import read_metadata
from evaluation.nano.detector import NanoDetector

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "nano_base_compare.py"
sys.path.insert(0, str(SCRIPT.parent))
import nano_base_compare  # noqa: E402  (a script, not a package)

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
    blanks = re.findall(r"; no object drawn (\d\.\d{3})$", run.stdout, re.M)  # each side's empty canvases
    assert len(blanks) == 2 and blanks[0] == blanks[1]


def test_teachers_are_compared_at_their_own_steps_and_guidance(tiny_nano_bootstrap, tiny_world):
    pretrained = f"{tiny_nano_bootstrap.workdir}:pretrain"
    records, detector = read_metadata(tiny_world / "base_prompts.jsonl"), NanoDetector.load()
    lines = nano_base_compare.comparison_lines(pretrained, pretrained, records, [0, 1], detector, steps=3, guidance=3)
    assert lines[0].startswith("GenEval-nano @3, guidance 3, ")
    # Guided sampling draws its noise per (prompt, seed) like unguided: the same teacher twice gives the same images.
    differences = DIFFERENCE.findall("\n".join(lines))
    assert differences and all(float(value) == 0.0 for _, *values in differences for value in values)


def test_a_side_that_names_no_model_is_refused_before_anything_is_sampled(
    tiny_nano_bootstrap, tiny_world, tmp_path, monkeypatch
):
    workdir = tiny_nano_bootstrap.workdir
    command = [str(SCRIPT), f"--baseline={workdir}:distill", f"--candidate={tiny_world}", "--seeds=1"]
    monkeypatch.setattr(sys, "argv", [*command, f"--prompts={tiny_world / 'base_prompts.jsonl'}"])
    with pytest.raises(SystemExit, match="no model_index.json"):  # sampling the good baseline first would not
        nano_base_compare.main()
    (tmp_path / "untrained").mkdir()
    (tmp_path / "untrained" / "config.json").write_bytes((Path(workdir) / "config.json").read_bytes())
    refusals = {
        f"{workdir}:vae": "stage 'vae' has no model to score",
        f"{tmp_path}:pretrain": f"{tmp_path}: no config.json there",
        f"{tmp_path / 'untrained'}:pretrain": "no pretrain checkpoint in",
        f"{workdir}:distill": None,
        str(Path(workdir) / "model"): None,
    }
    for spec, refusal in refusals.items():
        if refusal is None:
            nano_base_compare.check_side(spec)
        else:
            with pytest.raises(SystemExit, match=refusal):
                nano_base_compare.check_side(spec)
