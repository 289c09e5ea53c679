"""The README's main job, run as the program: a D-OPSD round on the nano world scored before and after, and the
tiny stand-in while no nano model is built."""

import subprocess
import sys
from pathlib import Path

DOPSD = Path(sys.executable).parent / "dopsd"


def demo(*options):
    return subprocess.run([str(DOPSD), "demo", *options], capture_output=True, text=True, check=True).stdout


def test_demo_teaches_the_nano_base_a_pack_and_scores_it(tmp_path, tiny_nano_bootstrap, tiny_world):
    options = [f"--model={tiny_nano_bootstrap.model_dir}", f"--world={tiny_world}", "--steps=2"]
    shown = demo(*options, f"--workdir={tmp_path}", "--pack=teal")
    assert f"D-OPSD round on {tiny_world / 'packs' / 'teal'}: 2 steps" in shown
    for name in ("base", "dopsd"):
        assert f"{name} at 4 steps: teal accuracy " in shown
    assert (tmp_path / "round" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "eval" / "grids" / "concept.png").is_file() and (tmp_path / "eval" / "report.json").is_file()


def test_demo_stands_in_with_a_tiny_model_until_the_nano_model_is_built(tmp_path):
    shown = demo(f"--model={tmp_path / 'none'}", f"--workdir={tmp_path}", "--steps=2")
    assert "a tiny random model stands in" in shown and "D-OPSD round: 2 steps" in shown
    assert (tmp_path / "samples_before.png").is_file() and (tmp_path / "samples_after.png").is_file()
