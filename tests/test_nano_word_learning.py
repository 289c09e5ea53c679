"""The word-learning diagnostic runs as a program at a tiny budget and measures what it says it measures."""

import subprocess
import sys
from pathlib import Path

import pytest

from dopsd.config import parse_dataclass_args
from dopsd.nano.world import GRID
from evaluation.geneval.rules import RELATION_OUTCOMES

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "nano_word_learning.py"
sys.path.insert(0, str(SCRIPT.parent))  # the script's functions are imported by name below


def run(*options):
    return subprocess.run([sys.executable, str(SCRIPT), *options], capture_output=True, text=True, timeout=600)


def test_word_learning_diagnostic_at_a_tiny_budget(tmp_path, tiny_nano_bootstrap):
    common = [f"--model={tiny_nano_bootstrap.model_dir}", f"--out={tmp_path}", "--batch=4", "--pool=8"]
    shown = run(*common, "--world=grid", "--steps=3", "--every=2", "--sample-steps=2")
    assert shown.returncode == 0, shown.stderr
    lines = [line for line in shown.stdout.splitlines() if line.startswith("grid step")]
    assert [line.split(":")[0] for line in lines] == ["grid step 2", "grid step 3"]  # every 2 steps and the last
    hit = float(lines[-1].split("shape hit ")[1].split()[0])
    assert 0.0 <= hit <= 1.0
    assert (tmp_path / "grid" / "step_3.png").is_file()

    # The other worlds and options through the program's entry point, without a new interpreter's start each.
    from nano_word_learning import WordLearningConfig, main

    def config(*options):
        return parse_dataclass_args(WordLearningConfig, [*common, *options], "")

    options = ["--world=position", "--init=fresh", "--train-text-encoder=true", "--steps=2", "--every=2"]
    (row,) = main(config(*options, "--sample-steps=2"))
    assert row["step"] == 2
    assert abs(sum(row[outcome] for outcome in RELATION_OUTCOMES) - 1.0) < 1e-6  # the outcomes split every sample
    (row,) = main(config("--world=position", "--image-context-prob=0.5", "--steps=1", "--sample-steps=2"))
    assert row["step"] == 1
    with pytest.raises(ValueError, match="config field 'world'"):
        config("--world=anywhere")
    with pytest.raises(ValueError, match="go one at a time"):
        main(config("--world=position", "--image-context-prob=0.5", "--train-text-encoder=true"))


def test_reduced_worlds_place_objects_as_named():
    import numpy as np
    from nano_word_learning import reduced_world

    rng = np.random.default_rng(0)
    fixed = reduced_world("fixed", 8, rng)
    assert {caption for _, caption in fixed} == {
        f"a picture of a red {s}" for s in ("circle", "square", "triangle", "diamond")
    }
    assert all((s.objects[0].x, s.objects[0].y) == (32.0, 32.0) for s, _ in fixed)
    grid = reduced_world("grid", 50, rng)
    assert all(o.x % GRID == 0 and o.y % GRID == 0 for s, _ in grid for o in s.objects)
    assert all(caption.endswith(s.objects[0].shape) for s, caption in grid)
    free = reduced_world("free", 50, rng)
    assert any(o.x % GRID for s, _ in free for o in s.objects)


def test_position_world_is_read_as_captioned_on_clean_renders():
    import numpy as np
    from nano_word_learning import measure, measured_captions, reduced_world

    from dopsd.nano.world import render
    from evaluation.nano.detector import NanoDetector

    detector = NanoDetector.load()
    full = reduced_world("position-full", 48, np.random.default_rng(1))
    assert measure("position-full", [c for _, c in full], [render(s) for s, _ in full], detector)["named side"] > 0.95
    mix = reduced_world("position-mix", 96, np.random.default_rng(1))
    shown = measured_captions("position-mix", sorted({c for _, c in mix}))
    assert 0 < len(shown) < len(mix) / 2  # position captions in one of three phrasings; free captions left out
    scenes = {c: s for s, c in mix}
    assert measure("position-mix", shown, [render(scenes[c]) for c in shown], detector)["named side"] > 0.95
    items = reduced_world("position", 48, np.random.default_rng(1))
    assert {caption.split()[4] for _, caption in items} == {"circle", "square", "triangle"}
    measured = measure("position", [c for _, c in items], [render(s) for s, _ in items], detector)
    assert measured["named side"] > 0.95 and measured["named | both"] > 0.95
    swapped = [
        c.replace("left of", "right of") if "left of" in c else c.replace("right of", "left of") for _, c in items
    ]
    flipped = measure("position", swapped, [render(s) for s, _ in items], detector)
    horizontal = sum("left of" in c or "right of" in c for _, c in items) / len(items)
    assert abs(flipped["opposite side"] - horizontal) < 0.05  # the horizontal captions now name the wrong side
