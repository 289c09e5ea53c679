"""The distillation state-error benchmark runs as a program on a finished (tiny) bootstrap."""

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "distill_state_error.py"


def test_state_errors_along_the_line_and_the_students_own_states(tmp_path, tiny_nano_bootstrap):
    out = tmp_path / "errors.json"
    command = [sys.executable, str(SCRIPT), f"--workdir={tiny_nano_bootstrap.workdir}", "--pairs=2", "--threads=1"]
    run = subprocess.run([*command, f"--json={out}"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| 0 (4-step sample) |" in run.stdout
    result = json.loads(out.read_text())
    states = result["states"]
    assert round(states[0]["sigma"], 3) == 1.0 and len(states) == 4
    assert [row["sigma"] for row in states] == sorted((row["sigma"] for row in states), reverse=True)
    # At sigma 1 both states are the noise itself; after the first step the student's own state leaves the line.
    assert states[0]["state_distance"] == 0.0 and states[0]["line_error"] == states[0]["rollout_error"]
    assert states[1]["state_distance"] > 0.0
    values = [v for row in states for v in row.values()] + [result["sample_error"], result["endpoint_variance"]]
    assert all(math.isfinite(v) and v >= 0 for v in values) and result["endpoint_variance"] > 0
