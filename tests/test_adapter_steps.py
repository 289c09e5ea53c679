"""The adapter-steps benchmark: an adapter switched on only up to a sigma cut, run as a program on the nano base."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dopsd import adapters
from dopsd.models import ZImageModel, load_model
from dopsd.nano.model import NANO_CAPTION_TOKENS

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from adapter_steps import AdapterStepsConfig, AdapterUpToSigma  # noqa: E402

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "adapter_steps.py"


def with_random_student(model) -> None:
    """A student adapter far from the base, so that whether it is on shows in every output."""
    adapters.add_student_teacher(model.pipeline.transformer, 4, 8.0, model.default_lora_targets)
    with torch.no_grad():
        for _, student in adapters.adapter_pairs(model.pipeline.transformer):
            student.normal_(0, 0.3)


def test_the_adapter_is_on_only_at_states_up_to_the_cut(tiny_zimage_path):
    model = ZImageModel.load(tiny_zimage_path, with_teacher_encoder=False)
    with_random_student(model)
    transformer = model.pipeline.transformer
    contexts = model.encode_student(["a red circle", "two blue squares"])
    latents = model.noise(2, 32, 32, torch.Generator().manual_seed(0))
    stepped = AdapterUpToSigma(model, adapters.STUDENT, 0.9)
    with torch.no_grad():
        for sigma, adapter in ((1.0, None), (0.9, adapters.STUDENT), (0.5, adapters.STUDENT)):
            t = torch.full((2,), sigma)
            with adapters.use_adapter(transformer, adapter):
                expected = model.velocity(latents, t, contexts)
            assert torch.equal(stepped.velocity(latents, t, contexts), expected), sigma
        with adapters.use_adapter(transformer, None):
            base = model.velocity(latents, torch.full((2,), 0.5), contexts)
        assert not torch.allclose(stepped.velocity(latents, torch.full((2,), 0.5), contexts), base)
    assert adapters.active_adapter(transformer) == adapters.STUDENT  # restored after every call
    assert stepped.schedule(4, 32, 32).tolist() == model.schedule(4, 32, 32).tolist()  # the rest is the model's


def test_bad_adapter_lists_and_cuts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="name=folder pairs"):
        AdapterStepsConfig(adapters=str(tmp_path))
    with pytest.raises(ValueError, match="adapter name 'lr0.5': no '.'"):
        AdapterStepsConfig(adapters=f"lr0.5={tmp_path}")
    with pytest.raises(ValueError, match="chain: .* is not a folder"):
        AdapterStepsConfig(adapters=f"chain={tmp_path / 'missing'}")
    with pytest.raises(ValueError, match=r"cuts must lie in \(0, 1\]"):
        AdapterStepsConfig(adapters=f"chain={tmp_path}", cuts="1.0,0")


def test_an_adapter_cut_below_every_state_samples_as_the_base(tmp_path):
    model = load_model("data/nano/model", max_caption_tokens=NANO_CAPTION_TOKENS, with_teacher_encoder=False)
    with_random_student(model)
    adapters.save_adapter(model, adapters.STUDENT, tmp_path / "adapter")
    out = tmp_path / "steps.md"
    options = [f"--adapters=random={tmp_path / 'adapter'}", "--cuts=1.0,0.4", "--packs=star", "--prompt-limit=1"]
    run = subprocess.run(
        [sys.executable, str(SCRIPT), *options, "--images=1", f"--out={out}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {(row["model"], row["cut"]): row for row in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert list(rows) == [("base", 1.0), ("random", 1.0), ("random", 0.4)]
    metrics = ("retention", "blank", "concept-star")
    # At 4 steps the states are at sigma 1, .9, .75 and .5: a cut at 0.4 never switches the adapter on.
    assert all(rows[("random", 0.4)][m] == rows[("base", 1.0)][m] for m in metrics)
    assert all(0 <= rows[key][m] <= 1 for key in rows for m in metrics)
    assert rows[("random", 1.0)] != {**rows[("base", 1.0)], "model": "random"}
    assert "| model | adapter at sigma <= | retention | blank | concept-star |" in out.read_text()
    assert "| random | 0.40 |" in out.read_text()
