"""benchmarks/nano_reference_guidance.py runs as a program on a tiny nano model: one premise row per weight and pack,
and the guided teacher draws other images than the unguided one."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "nano_reference_guidance.py"


def test_reference_guidance_benchmark_at_a_tiny_budget(tmp_path, tiny_nano_bootstrap):
    out = tmp_path / "guidance.md"
    model = f"--model={tiny_nano_bootstrap.model_dir}"
    options = [model, "--weights=0,2", "--seeds=0,1", "--prompts=2", "--grid-packs=star"]
    subprocess.run([sys.executable, str(SCRIPT), *options, f"--out={out}"], check=True, timeout=600)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["weight"], r["pack"]) for r in rows] == [(w, p) for w in (0.0, 2.0) for p in ("star", "teal", "striped")]
    assert all(r["samples"] == 4 and 0 <= r["teacher_concept"] <= 1 for r in rows)
    text = out.read_text()
    assert "| 2 | teal |" in text and "[star, w 2](guidance/star_w2.png)" in text
    assert sorted(p.name for p in (tmp_path / "guidance").iterdir()) == ["star_w0.png", "star_w2.png"]
    plain, guided = (Image.open(tmp_path / "guidance" / f"star_w{w}.png") for w in (0, 2))
    assert plain.size == guided.size
    # the reference column is the same, the teacher's samples are not
    assert plain.tobytes() != guided.tobytes()
