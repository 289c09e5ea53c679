"""The README's main job, run as the program: a D-OPSD round on the nano world scored before and after."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from dopsd.config import make_config
from dopsd.demo import KEEP_THE_BASE, keep_the_base
from dopsd.train import read_replay

DOPSD = Path(sys.executable).parent / "dopsd"


def demo(*options):
    return subprocess.run([str(DOPSD), "demo", *options], capture_output=True, text=True, check=True).stdout


def demo_error(*options) -> str:
    """The demo's error message; a wide terminal, so the error box does not wrap it."""
    run = subprocess.run(
        [str(DOPSD), "demo", *options], capture_output=True, text=True, env={**os.environ, "COLUMNS": "1000"}
    )
    assert run.returncode != 0
    return run.stderr


def test_demo_teaches_the_nano_base_a_pack_and_scores_it(tmp_path, tiny_nano_bootstrap, tiny_world):
    options = [f"--model={tiny_nano_bootstrap.model_dir}", f"--world={tiny_world}", "--steps=5", "--set=lr=2e-4"]
    shown = demo(*options, f"--workdir={tmp_path}", "--pack=teal", "--set", "teacher=base", "--set=steps=2")
    keeping = "caption negatives teal= (0.375), world replay (0.125), layout anchor 0.5"
    assert f"D-OPSD round on {tiny_world / 'packs' / 'teal'}: 2 steps, {keeping}" in shown
    for name in ("base", "dopsd"):
        line = next(line for line in shown.splitlines() if line.startswith(f"{name} at 4 steps: teal accuracy "))
        drawn = float(line.split("teal drawn on ")[1].split()[0])
        assert 0 <= drawn <= 1 and line.endswith("of the base prompts' samples")
    # The retention difference with its interval over the demo's prompts (up to 3 of each of the six task families).
    against = next(line for line in shown.splitlines() if line.startswith("dopsd - base retention "))
    delta, low, high = (float(v) for v in re.findall(r"[+-]\d\.\d{3}", against))
    assert re.search(r"95% over the \d+ prompts", against) and low <= delta <= high
    assert (tmp_path / "round" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    trained = json.loads((tmp_path / "round" / "config.json").read_text())
    assert (trained["lr"], trained["teacher"], trained["ema_decay"]) == (2e-4, "base", make_config("nano").ema_decay)
    assert (trained["caption_negatives"], trained["negative_ratio"]) == ("teal=", 0.375)
    assert (trained["replay_data"], trained["replay_ratio"]) == (str(tmp_path / "replay"), 0.125)
    assert (trained["replay_teacher"], trained["anchor_layout"]) == ("previous", 0.5)
    assert len(list((tmp_path / "replay").glob("world_*.png"))) == 64
    assert (tmp_path / "eval" / "grids" / "concept.png").is_file() and (tmp_path / "eval" / "report.json").is_file()


def test_demo_names_a_missing_nano_model_and_how_to_build_it(tmp_path):
    missing = tmp_path / "none"
    error = demo_error(f"--model={missing}", f"--workdir={tmp_path}")
    assert f"{missing} holds no pipeline" in error and "dopsd nano bootstrap --export-to" in error
    assert not (tmp_path / "round").exists()


def test_demo_names_a_bad_override(tmp_path):
    assert "config field 'lr': bad value 'fast'" in demo_error(f"--workdir={tmp_path}", "--set", "lr=fast")
    assert "bad override 'speed=2'" in demo_error(f"--workdir={tmp_path}", "--set", "speed=2")


def test_turning_off_a_way_of_keeping_the_base_takes_its_data_with_it(tmp_path):
    kept = keep_the_base("star=,stars=", tmp_path, {})
    assert kept == {"caption_negatives": "star=,stars=", "replay_data": str(tmp_path), **KEEP_THE_BASE}
    no_replay = keep_the_base("star=,stars=", tmp_path, {"replay_ratio": 0.0})
    assert set(no_replay) == {"caption_negatives", "negative_ratio", "anchor_layout"}
    overrides = {"replay_ratio": 0.0, "negative_ratio": 0.0, "anchor_layout": 0.0}
    assert keep_the_base("star=,stars=", tmp_path, overrides) == {}
    # What is left is a round train() accepts: a replay ratio of 0 with no replay folder, no teacher that needs one.
    read_replay(make_config("nano", data=str(tmp_path), **(no_replay | {"replay_ratio": 0.0})))
    assert keep_the_base("star=,stars=", tmp_path, {"lora_rank": 0, "learn_words": "star"}) == {}
