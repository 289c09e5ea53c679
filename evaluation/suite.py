"""The evaluation suite: candidate, baseline and base compared on the same prompts and seeds, at the deployed step
count, in one typed report (JSON, per-image verdicts as JSONL, side-by-side PNG grids).

Every (model, prompt, seed) is sampled once and the images serve every metric; every network is loaded once per
run (`Evaluators`). Metric names are `<prompt set>/<metric>`: `geneval/overall`, `geneval/<task>`, `clipscore`,
`fid/reference` (against the set's real images), `fid/baseline` (against the baseline's samples of the same
prompts and seeds) and `fidelity/<backbone>` (against the set's concept targets). A metric that cannot be
computed is None in the report, with its reason in `unavailable`; it never becomes a number. Each GenEval delta has
its interval over prompts (`intervals`), as a task of a hundred prompts moves by several points with another draw.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from dopsd.adapters import load_lora_if_any, use_adapter
from dopsd.models.base import FewStepModel
from dopsd.sampling import image_grid, sample_images
from dopsd.words import words_attached
from evaluation.clip import ClipModel, clip_score
from evaluation.fid import FrechetDistance
from evaluation.fidelity import ImageEmbedder, target_similarity
from evaluation.geneval.detection import Detection, Detector
from evaluation.geneval.intervals import overall_difference
from evaluation.geneval.rules import (
    ColourClassifier,
    GenevalScore,
    Verdict,
    aggregate,
    detector_colours,
    evaluate_image,
    keep_detections,
)


@dataclass
class SuiteConfig:
    steps: int = 4
    """Sampling steps: the step count the model is served with."""
    images_per_prompt: int = 4
    """Images per prompt; image j of every prompt starts from seed `seed + j`, for every model."""
    seed: int = 0
    """First seed."""
    resolution: int = 1024
    """Square image size."""
    batch: int = 16
    """Images per sampling batch."""
    grid_prompts: int = 8
    """Prompts per side-by-side grid (first seed, one column per model)."""
    baseline: str = "baseline"
    """The model the deltas are taken against (usually the champion; the base when there is none)."""

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.images_per_prompt))


@dataclass
class PromptSet:
    name: str
    """Prefix of this set's metrics, e.g. `retention` or `concept`."""
    records: list[dict]
    """One dict per prompt with a `prompt` key; GenEval scores the set when every record carries `tag` and
    `include` (the official metadata format)."""
    references: list[Image.Image] = field(default_factory=list)
    """Real images of what the set's samples should look like, for `fid/reference` (none: not computed)."""
    targets: list[Image.Image] = field(default_factory=list)
    """The concept's target images, for `fidelity/<backbone>` (none: not computed)."""

    @property
    def is_geneval(self) -> bool:
        return all("tag" in r and "include" in r for r in self.records)


@dataclass
class Evaluators:
    """The networks of one suite run, each loaded once; a missing one is named in `unavailable` with why."""

    detector: Detector | None = None
    colour_classifier: ColourClassifier = detector_colours
    """GenEval's colour check: CLIP zero-shot for real images, the detector's own reading in the nano world."""
    clip: ClipModel | None = None
    fid: FrechetDistance | None = None
    embedders: dict[str, ImageEmbedder] = field(default_factory=dict)
    """Concept-fidelity backbones by name (e.g. `clip`, `dino`)."""
    unavailable: dict[str, str] = field(default_factory=dict)
    """Network name (`detector`, `clip`, `fid`, `fidelity/<backbone>`) -> why it is missing."""


@dataclass
class SuiteReport:
    config: SuiteConfig
    models: dict[str, str | None]
    """Model name -> adapter folder (None: the base model alone)."""
    metrics: dict[str, dict[str, float | None]]
    """Model -> metric -> value (None when unavailable)."""
    deltas: dict[str, dict[str, float | None]]
    """Model -> metric -> its value minus the baseline's (None when either is missing)."""
    unavailable: dict[str, str]
    """Metric -> why it was not computed."""
    grids: dict[str, str] = field(default_factory=dict)
    """Prompt set -> PNG grid file (relative to the report's folder)."""
    verdicts: dict[str, str] = field(default_factory=dict)
    """`<set>/<model>` -> JSONL of per-image GenEval verdicts (`verdict_row`), relative to the report's folder."""
    intervals: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """Model -> `<set>/geneval/overall` -> [low, high]: the 95% interval of its delta over the set's prompts (paired
    bootstrap, `overall_difference`): a delta whose interval holds 0 is within what another draw of prompts moves."""

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, path: str | Path) -> SuiteReport:
        raw = json.loads(Path(path).read_text())
        return cls(**{**raw, "config": SuiteConfig(**raw["config"])})


@dataclass
class SampleScores:
    """What one model's samples of one prompt set leave behind once scored, batch by batch: per-image results
    and features, never the images (a real GenEval run is thousands of 1024px images per model)."""

    verdicts: list[dict] = field(default_factory=list)
    clip_scores: list[float] = field(default_factory=list)
    fid_features: list[torch.Tensor] = field(default_factory=list)
    fidelity: dict[str, list[float]] = field(default_factory=dict)
    """Backbone -> each sample's mean cosine similarity to the targets."""
    shown: list[Image.Image] = field(default_factory=list)
    """First-seed samples of the prompts the grid shows."""


def verdict_row(
    image: Image.Image, detections: Sequence[Detection], record: dict, seed: int, classify_colour: ColourClassifier
) -> dict:
    """One image's line in the verdicts JSONL: its prompt and seed, the GenEval verdict, and the objects the rules
    kept (`found`: class, and the colour and texture the detector read, None where it reads none)."""
    verdict = evaluate_image(image, detections, record, classify_colour)
    kept = keep_detections(detections, record["tag"]).values()
    found = [{"cls": d.cls, "colour": d.colour, "texture": d.texture} for group in kept for d in group]
    return {"prompt": record["prompt"], "seed": seed, **dataclasses.asdict(verdict), "found": found}


def verdict_rows(
    detector: Detector,
    images: list[Image.Image],
    records: Sequence[dict],
    seeds: Sequence[int],
    classify_colour: ColourClassifier,
) -> list[dict]:
    """`verdict_row` of each image (records[i] and seeds[i] are what images[i] was made for), detected as one batch."""
    return [
        verdict_row(image, detections, record, seed, classify_colour)
        for image, detections, record, seed in zip(images, detector.detect(images), records, seeds, strict=True)
    ]


def sampled_verdict_rows(
    model: FewStepModel,
    records: Sequence[dict],
    seeds: Sequence[int],
    steps: int,
    resolution: int,
    detector: Detector,
    classify_colour: ColourClassifier,
    guidance: float = 0.0,
) -> list[dict]:
    """Sample every record's prompt alone (the deployed setting) at every seed and give each image's `verdict_row`,
    record-major as sampled. `guidance`: classifier-free guidance, for an undistilled model (see euler_sample)."""
    contexts = model.encode_student([r["prompt"] for r in records])
    images = sample_images(model, contexts, seeds, steps, resolution, guidance=guidance)
    shown = [record for record in records for _ in seeds]
    return verdict_rows(detector, images, shown, [seed for _ in records for seed in seeds], classify_colour)


def rows_score(rows: Sequence[dict]) -> GenevalScore:
    """The GenEval score of verdict rows (`verdict_row`), read back as verdicts."""
    return aggregate([Verdict(row["tag"], row["correct"], row["reason"]) for row in rows])


def score_batch(
    scores: SampleScores,
    images: list[Image.Image],
    records: list[dict],
    seeds: list[int],
    evaluators: Evaluators,
    target_features: dict[str, torch.Tensor],
    geneval: bool,
) -> None:
    """Add one batch of samples (records[i] is what images[i] was made for, from seeds[i]) to `scores`."""
    if geneval and evaluators.detector is not None:
        scores.verdicts += verdict_rows(evaluators.detector, images, records, seeds, evaluators.colour_classifier)
    if evaluators.clip is not None:
        scores.clip_scores += clip_score(evaluators.clip, images, [r["prompt"] for r in records]).tolist()
    if evaluators.fid is not None:
        scores.fid_features.append(evaluators.fid.features(images))
    for backbone, targets in target_features.items():
        similarity = target_similarity(evaluators.embedders[backbone].image_features(images), targets)
        scores.fidelity.setdefault(backbone, []).extend(similarity.tolist())


def set_metrics(
    prompt_set: PromptSet,
    scores: dict[str, SampleScores],
    evaluators: Evaluators,
    baseline: str,
) -> tuple[dict[str, dict[str, float | None]], dict[str, str]]:
    """Every model's metrics on one prompt set (unprefixed), and the reason for each one not computed."""
    metrics: dict[str, dict[str, float | None]] = {name: {} for name in scores}
    unavailable: dict[str, str] = {}

    def missing(metric: str, network: str) -> None:
        if network == "fid" and evaluators.fid is not None:
            unavailable[metric] = "FID needs at least 2 images per model to estimate a covariance"
        else:
            unavailable[metric] = evaluators.unavailable.get(network, f"no {network} network was given")
        for values in metrics.values():
            values[metric] = None

    if prompt_set.is_geneval and evaluators.detector is None:
        missing("geneval/overall", "detector")
    elif prompt_set.is_geneval:
        for name, s in scores.items():
            score = rows_score(s.verdicts)
            metrics[name]["geneval/overall"] = score.overall
            metrics[name].update({f"geneval/{task}": value for task, value in sorted(score.tasks.items())})
    if evaluators.clip is None:
        missing("clipscore", "clip")
    else:
        for name, s in scores.items():
            metrics[name]["clipscore"] = float(np.mean(s.clip_scores))
    fid_metrics = ["fid/baseline"] + (["fid/reference"] if prompt_set.references else [])
    if evaluators.fid is None or min(sum(len(f) for f in s.fid_features) for s in scores.values()) < 2:
        for metric in fid_metrics:
            missing(metric, "fid")
    else:
        fid = evaluators.fid
        baseline_statistics = fid.statistics(torch.cat(scores[baseline].fid_features))
        reference = fid.reference_statistics(prompt_set.references) if prompt_set.references else None
        for name, s in scores.items():
            features = torch.cat(s.fid_features)
            metrics[name]["fid/baseline"] = fid.distance(baseline_statistics, features)
            if reference is not None:
                metrics[name]["fid/reference"] = fid.distance(reference, features)
    if prompt_set.targets:
        for name, s in scores.items():
            metrics[name].update({f"fidelity/{b}": float(np.mean(v)) for b, v in s.fidelity.items()})
        for network in evaluators.unavailable:
            if network.startswith("fidelity/"):
                missing(network, network)
    return metrics, unavailable


def seed_columns(name: str, images: Sequence[Image.Image], seeds: Sequence[int]) -> dict[str, list[Image.Image]]:
    """Samples in `sample_images` order (prompt-major, then seed) as one grid column per seed, `<name> <seed>`."""
    return {f"{name} {seed}": list(images[k :: len(seeds)]) for k, seed in enumerate(seeds)}


def labelled_grid(columns: dict[str, list[Image.Image]]) -> Image.Image:
    """One column per model (its name on top), one row per prompt."""
    names = list(columns)
    rows = len(columns[names[0]])
    cells = [columns[name][row] for row in range(rows) for name in names]
    body = image_grid(cells, columns=len(names))
    width = cells[0].width
    header = Image.new("RGB", (body.width, 12), "white")
    draw = ImageDraw.Draw(header)
    for i, name in enumerate(names):
        draw.text((i * width + 2, 0), name[: max(1, width // 6)], fill="black")
    page = Image.new("RGB", (body.width, body.height + header.height), "white")
    page.paste(header, (0, 0))
    page.paste(body, (0, header.height))
    return page


def run_suite(
    model: FewStepModel,
    adapters: dict[str, str | None],
    prompt_sets: Sequence[PromptSet],
    evaluators: Evaluators,
    config: SuiteConfig,
    out: str | Path,
    progress: bool = False,
) -> SuiteReport:
    """Sample every model on every prompt set once, score every metric, write `out/report.json` and the grids.

    `adapters` maps model names to adapter folders (None: the base); the baseline must be one of them. An adapter's
    learnt words (`dopsd.words`) are attached while its prompts are encoded.
    """
    if config.baseline not in adapters:
        raise ValueError(f"baseline {config.baseline!r} is not among the models compared: {sorted(adapters)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loras = set()
    for name, path in adapters.items():
        if path is not None and load_lora_if_any(model.pipeline, path, name):
            loras.add(name)
    total = len(adapters) * sum(len(s.records) for s in prompt_sets) * config.images_per_prompt
    bar = tqdm(total=total, desc="sampling and scoring", unit="img", disable=not progress)
    per_batch = max(1, config.batch // config.images_per_prompt)
    metrics: dict[str, dict[str, float | None]] = {name: {} for name in adapters}
    unavailable: dict[str, str] = {}
    grids, verdict_files = {}, {}
    intervals: dict[str, dict[str, list[float]]] = {name: {} for name in adapters}
    for prompt_set in prompt_sets:
        prompts = [r["prompt"] for r in prompt_set.records]
        base_contexts = model.encode_student(prompts)
        target_features = (
            {b: e.image_features(prompt_set.targets) for b, e in evaluators.embedders.items()}
            if prompt_set.targets
            else {}
        )
        shown = min(config.grid_prompts, len(prompt_set.records))
        scores = {name: SampleScores() for name in adapters}
        for name, path in adapters.items():
            with words_attached(model.pipeline, path) as words:
                contexts = base_contexts if words is None else model.encode_student(prompts)
            with use_adapter(model.transformer, name if name in loras else None):
                for start in range(0, len(contexts), per_batch):
                    records = prompt_set.records[start : start + per_batch]
                    images = sample_images(
                        model, contexts[start : start + per_batch], config.seeds, config.steps, config.resolution
                    )
                    expanded = [r for r in records for _ in config.seeds]
                    seeds = config.seeds * len(records)
                    score_batch(
                        scores[name], images, expanded, seeds, evaluators, target_features, prompt_set.is_geneval
                    )
                    first_seed = images[:: config.images_per_prompt]
                    scores[name].shown += first_seed[: max(0, shown - len(scores[name].shown))]
                    bar.update(len(images))
        values, missing = set_metrics(prompt_set, scores, evaluators, config.baseline)
        for name in adapters:
            metrics[name].update({f"{prompt_set.name}/{k}": v for k, v in values[name].items()})
            if scores[name].verdicts:
                verdict_path = out / "verdicts" / prompt_set.name / f"{name}.jsonl"
                verdict_path.parent.mkdir(parents=True, exist_ok=True)
                verdict_path.write_text("".join(json.dumps(row) + "\n" for row in scores[name].verdicts))
                verdict_files[f"{prompt_set.name}/{name}"] = str(verdict_path.relative_to(out))
                found = overall_difference([scores[config.baseline].verdicts], [scores[name].verdicts])
                intervals[name][f"{prompt_set.name}/geneval/overall"] = [found.low, found.high]
        unavailable.update({f"{prompt_set.name}/{k}": v for k, v in missing.items()})
        grid_path = out / "grids" / f"{prompt_set.name}.png"
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        labelled_grid({name: s.shown for name, s in scores.items()}).save(grid_path)
        grids[prompt_set.name] = str(grid_path.relative_to(out))
    bar.close()

    baseline = metrics[config.baseline]
    deltas = {
        name: {k: _difference(v, baseline.get(k)) for k, v in model_metrics.items()}
        for name, model_metrics in metrics.items()
    }
    report = SuiteReport(config, dict(adapters), metrics, deltas, unavailable, grids, verdict_files, intervals)
    report.write(out / "report.json")
    return report


def _difference(value: float | None, baseline: float | None) -> float | None:
    return None if value is None or baseline is None else value - baseline
