"""Which sampling steps carry an adapter's effect: the adapter at the states up to a sigma cut, the base above it.

A D-OPSD round's loss reaches only the roll-out states at or below `loss_max_sigma` (0.75 in the nano preset: at
sigma 1 the teacher, seeing the image, lays the scene out anew and the student can only average its layouts). The
states above move all the same, as a side effect of the shared weights, and no loss holds them. This samples each
adapter at the deployed step count with the adapter switched on only at states with sigma <= each cut (1.0: the
adapter as deployed), and scores, on the same noise for every model: GenEval-nano on the base prompts (retention),
the share of those samples without any object (blank, `evaluation.nano.premise.blank_share`), and each pack's concept
accuracy. Whatever changes when the top states are handed back to the base was made there.

    .venv/bin/python benchmarks/adapter_steps.py --adapters chain=runs/x/continual/a-s0/striped/adapter
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dopsd.adapters import use_adapter
from dopsd.config import comma_separated, parse_dataclass_args
from dopsd.models import load_model
from dopsd.models.base import Context, FewStepModel
from dopsd.nano.model import NANO_CAPTION_TOKENS, NANO_RESOLUTION
from evaluation.geneval.rules import detector_colours
from evaluation.nano.detector import NanoDetector
from evaluation.nano.premise import blank_share
from evaluation.prompt_sets import first_per_task, read_prompts, retention_set
from evaluation.suite import rows_score, sampled_verdict_rows

BASE = "base"


@dataclass
class AdapterStepsConfig:
    adapters: str = ""
    """Comma-separated `name=folder` pairs: the adapters (as a round writes them) to take apart."""
    cuts: str = "1.0,0.9,0.75"
    """Comma-separated sigma cuts: each adapter is sampled with itself at states of sigma <= the cut, the base above
    (1.0: at every state, as deployed)."""
    model: str = "data/nano/model"
    """The base: a Z-Image pipeline folder."""
    world: str = "data/nano/world"
    """World folder: base_prompts.jsonl and packs/<pack>_prompts.jsonl."""
    packs: str = "star,teal,striped"
    """Comma-separated packs whose concept accuracy is measured."""
    steps: int = 4
    """Sampling steps (the deployed setting)."""
    images: int = 2
    """Images per prompt (noise seeds 0..N-1, the same for every model and cut)."""
    prompt_limit: int = 0
    """Keep the first N prompts of each GenEval task of every prompt set (0: all)."""
    out: str = "reports/nano_adapter_steps.md"
    """The Markdown report (JSON beside it)."""

    def __post_init__(self):
        pairs = self.adapter_pairs()
        if not pairs or any(not name or not sep or not folder for name, sep, folder in pairs):
            raise ValueError(f"adapters must be name=folder pairs, got {self.adapters!r}")
        for name, _, folder in pairs:
            if "." in name or name == BASE:
                raise ValueError(f"adapter name {name!r}: no '.' (a PEFT adapter name) and not {BASE!r}")
            if not Path(folder).is_dir():
                raise ValueError(f"adapter {name}: {folder} is not a folder")
        if any(not 0 < cut <= 1 for cut in self.cut_values()):
            raise ValueError(f"cuts must lie in (0, 1], got {self.cuts!r}")

    def adapter_pairs(self) -> list[tuple[str, str, str]]:
        """Each `name=folder` item split at its first `=`: (name, "=", folder), the separator empty where missing."""
        return [pair.partition("=") for pair in comma_separated(self.adapters)]

    def adapter_folders(self) -> dict[str, str]:
        return {name: folder for name, _, folder in self.adapter_pairs()}

    def cut_values(self) -> list[float]:
        return [float(cut) for cut in comma_separated(self.cuts)]


class AdapterUpToSigma:
    """`model` with `adapter` active at the states of sigma <= `cut` and the base (no adapter) above; every other
    attribute is the model's, so the usual sampler drives it."""

    def __init__(self, model: FewStepModel, adapter: str | None, cut: float):
        self.model, self.adapter, self.cut = model, adapter, cut

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, contexts: Sequence[Context]) -> torch.Tensor:
        # A sampler's batch shares one sigma; float32 schedules put 0.9 at 0.8999..., inside a cut of 0.9.
        active = self.adapter if float(sigma.max()) <= self.cut + 1e-6 else None
        with use_adapter(self.model.pipeline.transformer, active):
            return self.model.velocity(latents, sigma, contexts)


def score(
    model: AdapterUpToSigma, records: list[dict], config: AdapterStepsConfig, detector: NanoDetector
) -> dict[str, float | None]:
    """GenEval-nano overall and blank share of the model's samples of `records` (context-major, as sampled), both
    read from the suite's verdict rows (each image judged once)."""
    seeds = range(config.images)
    rows = sampled_verdict_rows(model, records, seeds, config.steps, NANO_RESOLUTION, detector, detector_colours)
    return {"overall": rows_score(rows).overall, "blank": blank_share(rows)}


def measure(config: AdapterStepsConfig, log=print) -> dict:
    """Rows of (model, cut) -> retention, blank and each pack's concept accuracy."""
    torch.set_grad_enabled(False)
    model = load_model(config.model, max_caption_tokens=NANO_CAPTION_TOKENS, with_teacher_encoder=False)
    folders = config.adapter_folders()
    for name, folder in folders.items():
        model.pipeline.load_lora_weights(folder, adapter_name=name)
    world = Path(config.world)
    sets = {"retention": retention_set(world / "base_prompts.jsonl", limit=config.prompt_limit).records}
    for pack in comma_separated(config.packs):
        sets[f"concept-{pack}"] = first_per_task(
            read_prompts(world / "packs" / f"{pack}_prompts.jsonl"), config.prompt_limit
        )
    detector = NanoDetector.load()
    rows = []
    for name, cut in [(BASE, 1.0)] + [(name, cut) for name in folders for cut in config.cut_values()]:
        stepped = AdapterUpToSigma(model, None if name == BASE else name, cut)
        scores = {set_name: score(stepped, records, config, detector) for set_name, records in sets.items()}
        row = {"model": name, "cut": cut, "retention": scores["retention"]["overall"]}
        row |= {"blank": scores["retention"]["blank"]}
        row |= {key: s["overall"] for key, s in scores.items() if key != "retention"}
        rows.append(row)
        log(f"{name} at sigma <= {cut}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k not in ("model",)))
    return {"rows": rows, "sigmas": model.schedule(config.steps, NANO_RESOLUTION, NANO_RESOLUTION).tolist()}


def render_markdown(results: dict) -> str:
    rows = results["rows"]
    metrics = [key for key in rows[0] if key not in ("model", "cut")]
    lines = [
        "# Which sampling steps carry an adapter's effect",
        "",
        f"Command: `{results['command']}`  ",
        f"{results['date']}; {results['seconds']:.0f} s. Sampling sigmas: "
        + ", ".join(f"{s:.2f}" for s in results["sigmas"])
        + f"; {results['config']['images']} image(s) per prompt, the same noise for every row.",
        "",
        "Each adapter is switched on at the states of sigma <= the cut and off (the base) above it; 1.0 is the adapter "
        "as deployed. Blank: share of the retention samples showing no object at all.",
        "",
        "| model | adapter at sigma <= | " + " | ".join(metrics) + " |",
        "| --- | --- |" + " --- |" * len(metrics),
    ]
    for row in rows:
        cut = "-" if row["model"] == BASE else f"{row['cut']:.2f}"
        cells = ["missing" if row[m] is None else f"{row[m]:.3f}" for m in metrics]
        lines.append(f"| {row['model']} | {cut} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(config: AdapterStepsConfig, command: str) -> dict:
    start = time.time()
    results = measure(config)
    results |= {"command": command, "config": asdict(config), "date": time.strftime("%Y-%m-%d")}
    results["seconds"] = time.time() - start
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.write_text(render_markdown(results))
    print(out.read_text())
    return results


if __name__ == "__main__":
    arguments = sys.argv[1:]
    parsed = parse_dataclass_args(AdapterStepsConfig, arguments, __doc__.split("\n\n")[0])
    run(parsed, "python benchmarks/adapter_steps.py " + shlex.join(arguments))
