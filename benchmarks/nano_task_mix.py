"""Does more of a task family in the data teach the pretrained nano base that family? A screen for the recipe.

The finished base reads GenEval-nano 0.637 at 32 steps, held down by position (0.17) and counting (0.39)
(`reports/nano_base.md`); through 20000 pretraining steps position never rose above chance. This continues the
pretraining stage from its final checkpoint, in a copy of the bootstrap's work folder, with the task families
drawn at other relative frequencies (`--task-weights`, in the order single_object, two_object, counting, colors,
position, color_attr; pretraining draws them equally), then scores the result as `dopsd nano probe` does
(GenEval-nano at 32 and 4 steps with the bootstrap's guidance, teacher premise per pack):

    python benchmarks/nano_task_mix.py --task-weights 0.5,1,2,0.5,4,1 --steps 1000 --lr 5e-4

The same probe on an unchanged copy (`--steps 0`) gives the starting point. Before the probe, the script counts
where the position prompts' samples (20 prompts x 8 seeds, 32 steps) put the named object relative to the other.

Measured (2-core CPU, stop 20: 35 and 18 minutes of training; probe: 104 held-out prompts x 3 seeds, guidance 3):

| continued pretraining | GenEval@32 | two obj. | counting | position | colour attr. | @4 |
|---|---|---|---|---|---|---|
| none (step 20000, the committed base; `reports/nano_base.md`) | 0.637 | 0.45 | 0.39 | 0.17 | 0.83 | 0.502 |
| `--task-weights 0.5,1,2,0.5,4,1 --steps 1000 --lr 5e-4` | 0.640 | 0.58 | 0.37 | 0.20 | 0.82 | 0.529 |
| `--task-weights 0,0,0,0,1,0 --steps 600 --lr 1e-3 --decay-steps 200` | 0.638 | 0.58 | 0.43 | 0.20 | 0.63 | 0.490 |
| stop 24: position 3/8, image context 0.25, 3500 steps (below) | 0.689 | 0.55 | 0.31 | 0.48 | 0.78 | 0.591 |

Position samples (`--steps 0 --probe false` on each work folder), named side / opposite side / elsewhere / an
object missing, of 160: 18 / 30 / 18 / 94; 26 / 35 / 19 / 80; 31 / 26 / 27 / 76. Even with half of every batch
position scenes (the other half free scenes), the model puts the named object on the named side no more often than
on the opposite one: it does not learn the relation words from more of the same data, at these budgets.

That reading was wrong: those screens gave position 110-150 caption-only batches' worth, and
`benchmarks/nano_word_learning.py` found the full world's relation needs about 1000. Stop 24 gave it that, position
3/8 of each batch and three quarters of it caption-only, in 5717 s of training here (`--workdir
runs/nano-task-mix-pos`):

    python benchmarks/nano_task_mix.py --task-weights 0,1,0,0,3,0 --lr 1e-3 --steps 3500 --image-context-prob 0.25

Position samples: named side 69, opposite 22, elsewhere 6, an object missing 63 (0.71 of those with both objects on
the named side), on the held-out phrasing "a photo of". Position at 32 steps 0.17 -> 0.48 and two objects up; counting
(0.39 -> 0.31) and colour attribution (0.83 -> 0.78), drawn in none of the 3500 steps' task scenes, fell a little. The
teacher premise held: each pack's concept shown 0.86 / 1.00 / 0.83 (star / teal / striped), copies at most 0.03.
Distilled with the bootstrap's distill stage (stop 25) it read 0.584 at 4 steps, the committed base 0.589, and its
4-step teacher showed the star 0.64 of the time (committed 0.76): not adopted (`data/nano/bootstrap/README.md`,
item 10).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from dopsd.config import parse_dataclass_args
from dopsd.models.zimage import ZImageModel
from dopsd.nano.bootstrap import BootstrapConfig, pretrain, stage_progress, task_probabilities
from dopsd.nano.model import NANO_RESOLUTION
from dopsd.preview import parse_seeds
from dopsd.sampling import sample_images
from evaluation.geneval.rules import read_metadata, relation_outcome
from evaluation.nano.base_report import checkpoint_model, probe_checkpoint, probe_lines
from evaluation.nano.detector import NanoDetector


@dataclass
class TaskMixConfig:
    bootstrap: str = "data/nano/bootstrap"
    """The finished bootstrap whose pretraining is continued; left untouched (the run works on a copy)."""
    workdir: str = "runs/nano-task-mix"
    """The copy (model folder, pretraining checkpoint, config) and the continued run, its recipe in
    `continuation.json`; an interrupted run resumes."""
    task_weights: str = "0.5,1,2,0.5,4,1"
    """Relative frequency of each task family, comma-separated, in the order of `dopsd.nano.scenes.TASKS`."""
    steps: int = 1000
    """Pretraining steps added after the bootstrap's last."""
    lr: float = 5e-4
    """Learning rate of the added steps (AdamW, its state continued from the checkpoint; no warm-up)."""
    decay_steps: int = 400
    """Final added steps over which the learning rate falls linearly to zero."""
    image_context_prob: float = 0.5
    """Share of samples conditioned on [reference + caption] instead of the caption alone (the bootstrap's recipe:
    0.5). Relation words are learned from caption-only samples, so a lower share teaches them in fewer steps."""
    prompts: str = "data/nano/world/base_prompts.jsonl"
    """Held-out GenEval-nano prompts."""
    probe: bool = True
    """Score the result as `dopsd nano probe` does (about 5 minutes on 2 CPU cores)."""
    limit: int = 100
    """Held-out prompts per task family to score (the world has 17-18 per family)."""
    seeds: str = "0-2"
    """Seeds per prompt of the probe."""
    relation_seeds: str = "0-7"
    """Seeds per position prompt of the relation count (32 steps, the bootstrap's guidance)."""


def relation_counts(
    model: ZImageModel, records: list[dict], seeds: list[int], guidance: float, detector: NanoDetector
) -> Counter:
    """`relation_outcome` of every position prompt's samples (32 steps), counted."""
    records = [r for r in records if r["tag"] == "position"]
    images = sample_images(
        model, model.encode_student([r["prompt"] for r in records]), seeds, 32, NANO_RESOLUTION, guidance=guidance
    )
    detections = detector.detect(images)
    paired = zip([r for r in records for _ in seeds], detections, strict=True)
    return Counter(relation_outcome(found, record) for record, found in paired)


def main(config: TaskMixConfig) -> dict:
    source = BootstrapConfig.from_workdir(config.bootstrap)
    continuation = replace(source, workdir=config.workdir)
    task_weights = tuple(float(w) for w in config.task_weights.split(","))
    task_probabilities(task_weights)  # refused before the work folder is made
    start = stage_progress(source, "pretrain").get("step")
    if start is None:
        raise SystemExit(f"{config.bootstrap}: no pretraining checkpoint to continue from")
    workdir = Path(continuation.workdir)
    if not workdir.exists():
        shutil.copytree(source.model_dir, continuation.model_dir)
        shutil.copytree(source.stage_dir("pretrain"), continuation.stage_dir("pretrain"))
        shutil.copy(Path(source.workdir) / "config.json", workdir / "config.json")
    torch.set_num_threads(source.threads)
    if config.steps:
        # The bootstrap's own recipe (batch, pool, contexts, ...), with only the continuation's fields changed.
        recipe = replace(
            continuation,
            pretrain_steps=start + config.steps,
            pretrain_lr=config.lr,
            pretrain_decay_steps=config.decay_steps,
            image_context_prob=config.image_context_prob,
            task_weights=task_weights,
        )
        (workdir / "continuation.json").write_text(json.dumps(asdict(recipe), indent=2))
        pretrain(recipe)
    detector = NanoDetector.load()
    model = checkpoint_model(workdir, "pretrain")
    records = read_metadata(config.prompts)
    counts = relation_counts(model, records, parse_seeds(config.relation_seeds), source.guidance, detector)
    print(
        f"position samples at 32 steps, {sum(counts.values())}: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    )
    if not config.probe:
        return dict(counts)
    seeds = parse_seeds(config.seeds)
    result = probe_checkpoint(workdir, "pretrain", config.prompts, detector, seeds, config.limit)
    print("\n".join(probe_lines(result, len(seeds))))
    return result | {"relations": dict(counts)}


if __name__ == "__main__":
    main(parse_dataclass_args(TaskMixConfig, sys.argv[1:], __doc__.split("\n\n")[0]))
