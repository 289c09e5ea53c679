"""The nano science benchmark: does D-OPSD learn a new concept at few steps while keeping what the base knew, where
ordinary fine-tuning (SFT) loses few-step quality?

For each concept pack, from the nano base, every arm trains one round per seed with identical budgets (the `nano`
preset's steps, batch and LoRA rank, the lr and adapted layers of the nano preset's first recipe unless the arm names
its own; optional replay of base-world renders). By default the arms are the preset's recipe, the text path at lr 2e-3
(`sft-text-path-lr2e-3`, `dopsd-text-path-lr2e-3`, `dopsd-base-teacher-text-path-lr2e-3`,
`dopsd-text-path-lr2e-3-grad1`); the names below, without `-text-path-lr2e-3`, are the first recipe's:
- `sft`: flow-matching fine-tuning on the pack;
- `dopsd`: D-OPSD with the EMA teacher (the method);
- `dopsd-base-teacher`: the frozen base as teacher (ablation);
- `dopsd-grad1`: loss and backward at one random roll-out state per step instead of every trained one (ablation);
  `dopsd-base-teacher-grad1` both (for continual rounds, where the frozen base teaches).
- `dopsd-reference-guided`: the teacher with reference guidance w = 1 (`teacher_guidance`; variant);
  `dopsd-base-teacher-reference-guided` the frozen base so guided (for continual rounds).
Each adapter and the base are sampled at 1, 2, 4 and 8 steps on the same prompts and noise (the evaluation
suite): new-concept accuracy (GenEval-nano on the pack's held-out prompts), retention (GenEval-nano on held-out
base prompts), FID-nano of the base prompts' samples against world renders, and CLIPScore-nano. Then, given
`--continual-arms`, the continual run: the packs applied one after another as rounds, each starting from the previous
adapter (an arm suffixed `+replay` also replays the earlier packs; `+lwf` replays them taught by the previous adapter;
`+compose` instead learns each pack from the base and deploys the sum of the adapters so far; `+joint` learns every
pack so far at once from the base, the mark for the others), with every pack's accuracy tracked after every round,
and the teacher premise under every adapter: can the next round's teacher still draw each concept from its
reference? Spreads are across training seeds.

Everything lands in a work folder and is reused when present: a crashed run resumes where it stopped (a round from
its last checkpoint). A work folder belongs to the base and the sampling noise it was started with (`base.json`):
another base, or another noise scheme, needs another.
The report is Markdown with a JSON twin, PNG plots and the suite's sample grids.

    .venv/bin/python benchmarks/nano_science.py                          # all packs, arms, seeds; hours on a CPU
    .venv/bin/dvc repro nano_science                                     # that, then the recommended chain
    .venv/bin/python benchmarks/nano_science.py --seeds 0 --packs star    # one pack, one seed
    .venv/bin/python benchmarks/nano_science.py --arms '' --eval-steps 4 --continual-arms dopsd,dopsd-base-teacher
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

from dopsd.adapters import LORA_WEIGHTS, adapter_digest, compose_adapters, load_lora_if_any, use_adapter
from dopsd.config import TrainConfig, comma_separated, make_config, parse_dataclass_args
from dopsd.data import Example, image_files, read_dataset
from dopsd.models import load_model
from dopsd.models.zimage import ZImageModel
from dopsd.nano.bootstrap import default_device, machine_description, task_probabilities, write_world_replay
from dopsd.nano.model import NANO_CAPTION_TOKENS, NANO_RESOLUTION
from dopsd.nano.packs import (
    COUNTERFACTUAL_VALUE,
    PACK_BY_NAME,
    ConceptPack,
    NegativeWords,
    caption_negatives,
    counterfactual_words,
    training_items,
    write_counterfactuals,
)
from dopsd.nano.scenes import NEUTRAL_WORD, iterate_items, plural, read_jsonl
from dopsd.nano.world import Vocabulary, render
from dopsd.sampling import NOISE_SCHEME
from dopsd.train import train
from dopsd.words import IMAGE_START, words_attached
from evaluation.geneval.intervals import DifferenceInterval, family_differences
from evaluation.nano.detector import NanoDetector
from evaluation.nano.premise import (
    blank_share,
    concept_shown,
    lost_to_concept,
    teacher_example_accuracy,
    teacher_premise,
)
from evaluation.networks import NetworkPaths, load_networks
from evaluation.prompt_sets import read_images, read_prompts, retention_set
from evaluation.suite import Evaluators, PromptSet, SuiteConfig, SuiteReport, run_suite
from evaluation.unavailable import file_digest

# The nano transformer's text path: the caption embedder and the refiner that reads the caption alone, before the
# joint blocks. An adapter there can change only what the words mean, not how any image is drawn from them.
TEXT_PATH = ",".join(
    [f"context_refiner.0.attention.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0")]
    + [f"context_refiner.0.feed_forward.{m}" for m in ("w1", "w2", "w3")]
    + ["cap_embedder.1"]
)
# Its layers that act on each caption token alone: the embedder and the refiner's feed-forward, not the refiner's
# attention, which mixes the tokens (how "a circle and a square" binds its words).
TEXT_PATH_PER_TOKEN = ",".join(t for t in TEXT_PATH.split(",") if ".attention." not in t)
EVERY_LAYER = ",".join(ZImageModel.default_lora_targets)
ADAPTER_PLACES = {
    EVERY_LAYER: "every attention and feed-forward layer",
    TEXT_PATH: "the text path",
    TEXT_PATH_PER_TOKEN: "the text path's per-token layers (caption embedder, refiner feed-forward)",
}
TEXT_PATH_DOPSD = {"method": "dopsd", "teacher": "ema", "lora_targets": TEXT_PATH, "lr": 2e-3}
"""The nano preset's recipe as an arm: D-OPSD, EMA teacher, the text path at lr 2e-3 (its variants add to it)."""
PACK_WORDS = "<the pack's words>"
"""`learn_words` of an arm that learns the words a pack teaches (its word, and a shape's plural), filled in per pack."""
PACK_WORDS_FROM_KIN = "<the pack's words, each from a base word of its kind>"
"""`learn_words` as PACK_WORDS, but starting from the embedding of a word the base knows for the same kind of thing,
as textual inversion starts from a coarse class word: a shape's from the base world's word for shapes it does not
name (`NEUTRAL_WORD`, "object": the base learnt it on unnamed shapes, the star among them), a colour's from the base
colour its counterfactuals put in its place ("blue"); a texture's from its own (the base names no texture)."""
PACK_WORDS_FROM_IMAGES = "<the pack's words, each from its images>"
"""`learn_words` as PACK_WORDS, each word starting from the teacher's vision tokens of the pack's images whose captions
name it (`word=@images`, `dopsd.words.salient_token_mean`): a start for a concept no base word is a kind of."""
PACK_WORDS_DOPSD = {"method": "dopsd", "teacher": "base", "lora_rank": 0, "learn_words": PACK_WORDS}
"""D-OPSD on the pack's word embeddings alone. No LoRA: the base itself is the teacher, and a prompt without the
pack's words is the base's bit for bit."""
ARMS: dict[str, dict] = {
    name: {"lora_targets": EVERY_LAYER, "lr": 5e-4, **overrides}
    for name, overrides in {
        "sft": {"method": "sft"},
        "sft-text-path-lr2e-3": {"method": "sft", "lora_targets": TEXT_PATH, "lr": 2e-3},
        "dopsd": {"method": "dopsd", "teacher": "ema"},
        "dopsd-base-teacher": {"method": "dopsd", "teacher": "base"},
        "dopsd-grad1": {"method": "dopsd", "grad_steps": 1},
        "dopsd-base-teacher-grad1": {"method": "dopsd", "teacher": "base", "grad_steps": 1},
        "dopsd-reference-guided": {"method": "dopsd", "teacher_guidance": 1.0},
        "dopsd-base-teacher-reference-guided": {"method": "dopsd", "teacher": "base", "teacher_guidance": 1.0},
        "dopsd-base-teacher-anchored": {"method": "dopsd", "teacher": "base", "anchor_layout": 1.0},
        "dopsd-base-teacher-anchored-half": {"method": "dopsd", "teacher": "base", "anchor_layout": 0.5},
        "dopsd-base-teacher-anchored-quarter": {"method": "dopsd", "teacher": "base", "anchor_layout": 0.25},
        "dopsd-base-teacher-anchored-top": {
            "method": "dopsd",
            "teacher": "base",
            "anchor_layout": 1.0,
            "anchor_min_sigma": 0.95,
        },
        "dopsd-text-path-lr2e-3": TEXT_PATH_DOPSD,
        "dopsd-text-path-lr2e-3-grad1": TEXT_PATH_DOPSD | {"grad_steps": 1},
        "dopsd-text-path-lr2e-3-anchored": TEXT_PATH_DOPSD | {"anchor_layout": 1.0},
        "dopsd-text-path-lr2e-3-anchored-half": TEXT_PATH_DOPSD | {"anchor_layout": 0.5},
        "dopsd-text-path-lr2e-3-anchored-top": TEXT_PATH_DOPSD | {"anchor_layout": 1.0, "anchor_min_sigma": 0.95},
        "dopsd-text-path-per-token-lr2e-3": TEXT_PATH_DOPSD | {"lora_targets": TEXT_PATH_PER_TOKEN},
        "dopsd-text-path-lr2e-3-rank16": TEXT_PATH_DOPSD
        | {"lora_rank": 16, "lora_alpha": 32.0},  # the preset's alpha / rank: a rank-16 update starts at the same scale
        "dopsd-base-teacher-text-path": {"method": "dopsd", "teacher": "base", "lora_targets": TEXT_PATH},
        "dopsd-base-teacher-text-path-lr2e-3": TEXT_PATH_DOPSD | {"teacher": "base"},
        "dopsd-base-teacher-top-means": {"method": "dopsd", "teacher": "base", "top_state_means": 1.0},
        "dopsd-base-teacher-top-means4": {"method": "dopsd", "teacher": "base", "top_state_means": 4.0},
        "dopsd-pack-words": PACK_WORDS_DOPSD,
        "dopsd-pack-words-lr3e-2": PACK_WORDS_DOPSD | {"word_lr": 3e-2},
        "dopsd-pack-words-from-kin": PACK_WORDS_DOPSD | {"learn_words": PACK_WORDS_FROM_KIN},
        "dopsd-pack-words-from-kin-lr1e-3": PACK_WORDS_DOPSD | {"learn_words": PACK_WORDS_FROM_KIN, "word_lr": 1e-3},
        "dopsd-pack-words-from-kin-600-steps": PACK_WORDS_DOPSD | {"learn_words": PACK_WORDS_FROM_KIN, "steps": 600},
        "dopsd-pack-words-from-kin-max-sigma0.9": PACK_WORDS_DOPSD
        | {"learn_words": PACK_WORDS_FROM_KIN, "loss_max_sigma": 0.9},
        # Textual inversion as it is usually trained: the flow-matching loss on the pack's images.
        "sft-pack-words-from-kin": PACK_WORDS_DOPSD | {"method": "sft", "learn_words": PACK_WORDS_FROM_KIN},
        "sft-pack-words-from-images-lr1e-3": PACK_WORDS_DOPSD
        | {"method": "sft", "learn_words": PACK_WORDS_FROM_IMAGES, "word_lr": 1e-3},
        "dopsd-pack-words-from-images": PACK_WORDS_DOPSD | {"learn_words": PACK_WORDS_FROM_IMAGES},
        "dopsd-pack-words-from-images-lr1e-3": PACK_WORDS_DOPSD
        | {"learn_words": PACK_WORDS_FROM_IMAGES, "word_lr": 1e-3},
        "dopsd-pack-words-from-images-lr1e-3-600-steps": PACK_WORDS_DOPSD
        | {"learn_words": PACK_WORDS_FROM_IMAGES, "word_lr": 1e-3, "steps": 600},
        # The starts alone: at lr 0 the round's words end where they began.
        "dopsd-pack-words-from-images-lr0": PACK_WORDS_DOPSD | {"learn_words": PACK_WORDS_FROM_IMAGES, "word_lr": 0.0},
        "dopsd-pack-words-from-kin-lr0": PACK_WORDS_DOPSD | {"learn_words": PACK_WORDS_FROM_KIN, "word_lr": 0.0},
    }.items()
}
"""Training overrides of each arm on top of the preset: everything else (budget, LoRA rank, seed) is shared, but for an
arm that names its rank (`-rank16`: the adapter's capacity, screened in the continual run). Every arm names where its
adapter sits and its lr; those without their own keep the nano preset's first recipe (every layer, lr 5e-4), so a
report's command measures the same thing whatever the preset becomes."""
REPLAY_SUFFIXES: dict[str, dict] = {"+replay": {}, "+lwf": {"replay_teacher": "previous"}}
"""An arm `<arm><suffix>` trains as <arm>; in the continual run its later rounds also replay the earlier packs' data.
The suffix says who teaches what a round replays (those packs, the base-world renders of `replay_ratio`, the
counterfactuals of `counterfactual_ratio`):
`+replay` the round's teacher, seeing each image, as for the new pack; `+lwf` the weights the round starts from
(the previous adapter, or the base in a first round), from the caption alone (learning without forgetting)."""
COMPOSE_SUFFIX = "+compose"
"""A continual arm `<arm>+compose` chains no rounds: each pack is learnt from the base (the pack study's round of
<arm>), and the model deployed after a pack is the sum of every adapter so far (`dopsd.adapters.compose_adapters`)."""
JOINT_SUFFIX = "+joint"
"""A continual arm `<arm>+joint` chains no rounds either: after each pack one round from the base learns every pack so
far at once (their images pooled into one dataset, each pack's word in the caption negatives, the first round's steps
times the packs so that each is seen as often as in a round of its own), what it replays taught as under `+lwf`. Not
continual learning: what one adapter learns of the packs together, the mark a chain's later rounds are measured
against."""
UNCHAINED_SUFFIXES = (COMPOSE_SUFFIX, JOINT_SUFFIX)
"""Suffixes whose continual arm learns from the base after every pack instead of chaining rounds."""
SUFFIXES = (*REPLAY_SUFFIXES, *UNCHAINED_SUFFIXES)

METRICS = {
    "concept": "concept/geneval/overall",
    "retention": "retention/geneval/overall",
    "fid": "retention/fid/reference",
    "clipscore": "retention/clipscore",
}
"""Reported metric -> the suite's name for it."""
BASE = "base"
BASE_RECORD = "base.json"
"""In the work folder: the base its rounds were trained from and its scores measured on."""
PREMISE_METRICS = ("teacher_concept", "teacher_accuracy")
"""Teacher-premise figures tracked through the continual run: the concept drawn, the whole prompt right."""
ARMS_ANCHOR = -1.0
"""`continual_anchor_layout` when later rounds keep the arm's own anchor: 0 is a value of its own (the anchor off)."""


@dataclass
class ScienceConfig:
    model: str = "data/nano/model"
    """The nano base: a Z-Image pipeline folder with its teacher encoder (`dopsd nano bootstrap --export-to`)."""
    world: str = "data/nano/world"
    """World folder (`dopsd nano world`): base_prompts.jsonl, packs/<pack>/ and packs/<pack>_prompts.jsonl."""
    packs: str = "star,teal,striped"
    """Comma-separated concept packs, in the continual run's order."""
    arms: str = ",".join(
        [
            "sft-text-path-lr2e-3",
            "dopsd-text-path-lr2e-3",
            "dopsd-base-teacher-text-path-lr2e-3",
            "dopsd-text-path-lr2e-3-grad1",
        ]
    )
    """Comma-separated arms (see ARMS), each optionally suffixed `+lwf`: what it replays (the base-world renders of
    `replay_ratio`, the counterfactuals of `counterfactual_ratio`) is then taught by the base from the captions. The
    default is the `nano` preset's recipe (the text path at lr 2e-3) under SFT, D-OPSD and its two ablations (frozen
    base as teacher, one roll-out state per step); until 2026-12-06 it was the same four on every layer at lr 5e-4."""
    seeds: str = "0,1,2"
    """Comma-separated training seeds: every arm trains once per seed, and spreads are taken across them."""
    preset: str = "nano"
    """Training preset every round starts from."""
    round_steps: int = 0
    """Training steps of every round (0: the preset's)."""
    round_batch: int = 0
    """Batch size of every round (0: the preset's)."""
    replay_ratio: float = 0.0
    """Share of each training batch replaying base-world renders (0: no replay)."""
    replay_images: int = 64
    """Base-world renders written for replay (with training phrasing, never the held-out prompts)."""
    replay_task_weights: str = ""
    """Comma-separated relative weights of the GenEval task families (`dopsd.nano.scenes.TASKS` order) in the replay
    renders' GenEval-family half, e.g. `0,1,0,0,1,0` for two objects and position only ("": equal, the default
    renders). Two objects and position only kept no more of two objects than equal weights (reports/README.md)."""
    eval_steps: str = "1,2,4,8"
    """Comma-separated sampling step counts every model is evaluated at."""
    eval_images: int = 2
    """Images per prompt (noise seeds 0..N-1, the same for every model)."""
    prompt_limit: int = 0
    """Keep the first N base prompts of each GenEval task for retention (0: all)."""
    reference_images: int = 512
    """World renders that FID-nano compares the base prompts' samples against."""
    continual_arms: str = ""
    """Comma-separated arms of the continual run, each optionally suffixed `+replay`, `+lwf`, `+compose` or `+joint`
    (empty: no continual run). The recommended chain (`dvc.yaml`, stage `nano_science`) takes more than an arm: its
    replay shares, caption negatives and later-round lr, which would change the pack study's rounds too, so it runs as
    a command of its own; until 2026-12-06 the default was `sft,dopsd,dopsd-base-teacher`."""
    counterfactual_ratio: float = 0.0
    """Share of each batch a pack's round draws from counterfactuals of that pack (fresh pack scenes with the concept
    swapped for a base attribute, captions without the word; `dopsd.nano.packs.counterfactual`): negatives against the
    concept's leak (0: none). Added to the replay ratio; where a round replays other folders too, they are pooled
    (`replay_shares`). Taught as the pack is (the teacher sees each image), or under a `+lwf` arm by the weights
    the round starts from, from the caption alone (the image unused, as a user without a renderer would have it)."""
    caption_negative_ratio: float = 0.0
    """Share of each batch a pack's round draws from caption negatives (`TrainConfig.caption_negatives`): the pack's
    own captions with its word swapped or dropped (`caption_negative_words`), taught by the weights the round starts
    from, from the caption alone; what a user without a renderer can do (0: none). Its own share, not pooled with
    replay."""
    caption_negative_words: NegativeWords = "swap"
    """What a caption negative puts where the pack's word was: `swap` the base attribute its counterfactuals swap to
    (`counterfactual_words`: star -> square, teal -> blue), `drop` nothing, the caption minus the word (a texture's
    swap already drops it), `neutral` the base world's word for an unnamed shape (star -> object), a colour or
    texture dropped."""
    continual_replay: float = 0.375
    """Share of each batch a `+replay` or `+lwf` continual round draws from the earlier packs' data, added to the
    replay ratio; pooled with the round's other replay folders (world renders, counterfactuals: `replay_shares`)."""
    continual_lr: float = 0.0
    """Learning rate of the continual run's later rounds, those that start from an earlier adapter (0: the
    arm's, as the first round)."""
    continual_steps: int = 0
    """Training steps of the continual run's later rounds (0: the first round's). A later round's pack is a smaller
    share of each batch (the earlier packs' replay takes its part), so more steps show it its own data as often."""
    continual_anchor_layout: float = ARMS_ANCHOR
    """Layout anchor of the continual run's later rounds (`TrainConfig.anchor_layout`; -1: the arm's, as the first
    round). 0 anchors the first round alone, leaving later rounds free to lay out a new shape (an anchor on the
    previous adapter's layouts held one back: reports/nano_continual_text_path_anchored_half_teal_first.md); after
    three rounds that kept no more of the base than no anchor (reports/nano_continual_text_path_anchored_first.md)."""
    continual_fused: bool = False
    """Whether the continual run's later rounds fuse the previous adapter into the base and train a fresh LoRA over
    it (`TrainConfig.init_adapter_fused`; the model after a round is the sum of every round's LoRA), instead of going
    on with the previous adapter's own weights."""
    deployed_steps: int = 4
    """Step count of the continual run's evaluation and of the headline figures."""
    teacher_curation: float = 0.0
    """Train each pack's rounds only on the images whose caption the base's teacher, shown the image as a round's
    teacher is, draws right (the whole caption: counts, colours, positions) in at least this share of its samples
    (`evaluation.nano.premise.teacher_example_accuracy` over `curation_seeds` noises at `deployed_steps`; 0: every
    image). A round distils the teacher's drawing, right or wrong. At 0.5 (star 23, teal 26, striped 32 of 48 kept:
    single objects and two objects, few counts or positions) no pack learnt more beyond the prompts' noise, each kept
    less, and the star leaked more (0.236 against 0.151; reports/README.md, "Teacher curation"): not adopted."""
    curation_seeds: int = 4
    """Noises per pack image that `teacher_curation` samples the teacher from."""
    continual_premise: int = 12
    """Pack prompts on which the teacher premise is measured under the base and every continual adapter: does the
    teacher of a later round, which starts from the previous adapter, still draw each concept from its reference?
    (0: not measured)"""
    workdir: str = "runs/nano-science"
    """Rounds, evaluations and generated data; reused when present."""
    out: str = "reports/nano_science.md"
    """The Markdown report (JSON beside it, plots in a folder of the same name)."""

    def names(self, field: str) -> list[str]:
        return comma_separated(getattr(self, field))

    def numbers(self, field: str) -> list[int]:
        return [int(v) for v in self.names(field)]

    def replay_weights(self) -> tuple[float, ...] | None:
        """`replay_task_weights` as numbers (None: equal)."""
        return tuple(float(v) for v in self.names("replay_task_weights")) or None


def check(config: ScienceConfig) -> dict:
    """Every input problem, named before hours of training start; returns the base record the work folder
    belongs to (`base_record`)."""
    problems = [
        f"unknown arm {a!r} (arms: {', '.join(ARMS)})"
        for a, _ in map(split_arm, config.names("arms") + config.names("continual_arms"))
        if a not in ARMS
    ]
    problems += [
        f"arm {a!r} learns word embeddings alone: {split_arm(a)[1]} sums or pools LoRAs; its chain (no suffix) keeps "
        "every earlier round's words as they were"
        for a in config.names("continual_arms")
        if split_arm(a)[0] in ARMS and learns_words_only(a) and split_arm(a)[1] in UNCHAINED_SUFFIXES
    ]
    problems += [
        f"arm {a!r}: {split_arm(a)[1]} goes through the continual run's packs, not one pack (--continual-arms)"
        for a in config.names("arms")
        if split_arm(a)[1] in UNCHAINED_SUFFIXES
    ]
    problems += [
        f"arm {a!r} distils what a round replays, but --replay-ratio and --counterfactual-ratio are 0"
        for a in config.names("arms")
        if split_arm(a)[1] == "+lwf" and config.replay_ratio <= 0 and config.counterfactual_ratio <= 0
    ]
    # The shares one round can draw together: the rest of its batch is the pack's.
    shares = {"replay_ratio": config.replay_ratio}
    if any(split_arm(a)[1] in REPLAY_SUFFIXES for a in config.names("continual_arms")):
        shares["continual_replay"] = config.continual_replay
    shares["counterfactual_ratio"] = config.counterfactual_ratio
    if config.caption_negative_ratio != 0:
        shares["caption_negative_ratio"] = config.caption_negative_ratio
    if min(shares.values()) < 0 or sum(shares.values()) >= 1:
        names = list(shares)
        problems.append(
            f"{', '.join(names[:-1])} and {names[-1]} must be >= 0 and sum to less than 1, got "
            + " + ".join(map(str, shares.values()))
        )
    try:
        weights = config.replay_weights()
        if weights is not None:
            task_probabilities(weights)
    except ValueError as error:
        problems.append(f"replay_task_weights: {error}")
    if config.continual_lr < 0:
        problems.append(f"continual_lr must be >= 0 (0: the arm's), got {config.continual_lr}")
    if config.continual_anchor_layout < 0 and config.continual_anchor_layout != ARMS_ANCHOR:
        problems.append(f"continual_anchor_layout must be >= 0 (-1: the arm's), got {config.continual_anchor_layout}")
    if not 0 <= config.teacher_curation <= 1 or config.curation_seeds < 1:
        problems.append(
            f"teacher_curation must be in [0, 1] and curation_seeds >= 1, got {config.teacher_curation} and "
            f"{config.curation_seeds}"
        )
    if config.continual_steps < 0:
        problems.append(f"continual_steps must be >= 0 (0: the first round's), got {config.continual_steps}")
    world = Path(config.world)
    for required in ["base_prompts.jsonl"] + [f"packs/{p}_prompts.jsonl" for p in config.names("packs")]:
        if not (world / required).is_file():
            problems.append(f"{world / required} is missing (write the world with `dopsd nano world`)")
    problems += [
        f"{world / 'packs' / p} is not a folder" for p in config.names("packs") if not (world / "packs" / p).is_dir()
    ]
    base: dict = {}
    if not (Path(config.model) / "model_index.json").is_file():
        problems.append(f"{config.model} holds no pipeline (build it with `dopsd nano bootstrap --export-to`)")
    else:
        base = base_record(config.model)
        recorded = Path(config.workdir) / BASE_RECORD
        if recorded.is_file() and json.loads(recorded.read_text()) != base:
            problems.append(
                f"{config.workdir} holds rounds and scores of another base than {config.model}, or sampled with "
                f"other noise than {NOISE_SCHEME} (see {recorded}): give a new --workdir, or remove that one"
            )
    if config.deployed_steps not in config.numbers("eval_steps"):
        problems.append(f"deployed_steps {config.deployed_steps} is not among eval_steps {config.eval_steps}")
    if problems:
        raise SystemExit("nano_science: " + "; ".join(problems))
    return base


def base_record(model: str) -> dict:
    """What a work folder's rounds and scores hold for: this base's transformer weights, sampled this way."""
    digest = file_digest(Path(model) / "transformer" / SAFETENSORS_WEIGHTS_NAME)
    return {"model": model, "transformer": digest, "noise": NOISE_SCHEME}


def split_arm(arm: str) -> tuple[str, str]:
    """An arm's training arm and its suffix ('' when it has none)."""
    for suffix in SUFFIXES:
        if arm.endswith(suffix):
            return arm.removesuffix(suffix), suffix
    return arm, ""


def learns_words_only(arm: str) -> bool:
    return ARMS[split_arm(arm)[0]].get("lora_rank") == 0


def arm_recipe(arm: str) -> str:
    """Where an arm's adapter sits, its lr, any rank and any step count of its own, in words."""
    overrides = ARMS[split_arm(arm)[0]]
    steps = f", {overrides['steps']} steps" if "steps" in overrides else ""
    if learns_words_only(arm):
        return f"{arm} lr {overrides.get('word_lr', TrainConfig.word_lr):g} on the pack's word embeddings alone{steps}"
    rank = f", LoRA rank {overrides['lora_rank']}" if "lora_rank" in overrides else ""
    return f"{arm} lr {overrides['lr']:g} on {ADAPTER_PLACES[overrides['lora_targets']]}{rank}{steps}"


def replay_folder(config: ScienceConfig) -> str:
    if config.replay_ratio <= 0:
        return ""
    weights = config.replay_weights()
    if weights is None:
        return str(write_world_replay(Path(config.workdir) / "replay", config.replay_images))
    folder = Path(config.workdir) / f"replay-tasks-{'-'.join(f'{w:g}' for w in weights)}"
    return str(write_world_replay(folder, config.replay_images, weights))


def counterfactual_folder(config: ScienceConfig, pack: str) -> str:
    folder = Path(config.workdir) / "counterfactual" / pack
    if not folder.is_dir():
        write_counterfactuals(PACK_BY_NAME[pack], folder)
    return str(folder)


def pack_folder(config: ScienceConfig, pack: str) -> str:
    """The folder a pack's rounds train on: the world's, or the part of it its teacher draws right
    (`teacher_curation`), written once into the work folder."""
    world = Path(config.world) / "packs" / pack
    if config.teacher_curation <= 0:
        return str(world)
    folder = Path(config.workdir) / "curated" / f"{pack}-{config.teacher_curation:g}-of-{config.curation_seeds}"
    if not folder.is_dir():
        examples = read_dataset(world)
        write_curated_pack(examples, pack_teacher_accuracy(config, pack, examples), config.teacher_curation, folder)
    return str(folder)


def pack_teacher_accuracy(config: ScienceConfig, pack: str, examples: list[Example]) -> list[float]:
    """`teacher_example_accuracy` of the base on the world's pack images."""
    # The pack folder holds no GenEval records: they are rebuilt from the seed `dopsd nano world` wrote it with, and
    # checked against the captions on disk.
    items = training_items(PACK_BY_NAME[pack], len(examples), seed=0)
    if [e.caption for e in examples] != [item.caption for item in items]:
        raise SystemExit(
            f"nano_science: {examples[0].image_path.parent} was not written by `dopsd nano world` with its default "
            "seed and captions, so its images' GenEval records are unknown and --teacher-curation cannot score the "
            "teacher on them"
        )
    return teacher_example_accuracy(
        ZImageModel.load(config.model, max_caption_tokens=NANO_CAPTION_TOKENS),
        [e.load_image() for e in examples],
        [item.metadata for item in items],
        NanoDetector.load(),
        seeds=range(config.curation_seeds),
        steps=config.deployed_steps,
        resolution=NANO_RESOLUTION,
    )


def curation_scores(folder: str | Path) -> Path:
    """Where a curated folder's record of every image's teacher accuracy sits (beside it: not training data)."""
    return Path(folder).with_name(Path(folder).name + ".json")


def write_curated_pack(examples: list[Example], accuracy: list[float], threshold: float, folder: Path) -> None:
    """The examples whose teacher accuracy reaches `threshold`, as a landing folder, and every one's accuracy
    beside it (`curation_scores`)."""
    kept = [example for example, share in zip(examples, accuracy, strict=True) if share >= threshold]
    if not kept:
        raise SystemExit(
            f"nano_science: the base's teacher draws none of the {len(examples)} images of "
            f"{examples[0].image_path.parent} right in {threshold:g} of its samples: lower --teacher-curation"
        )
    scores = {e.image_path.name: share for e, share in zip(examples, accuracy, strict=True)}
    folder.parent.mkdir(parents=True, exist_ok=True)
    curation_scores(folder).write_text(json.dumps(scores, indent=1))
    copied_folder(folder, [path for e in kept for path in (e.image_path, e.image_path.with_suffix(".txt"))])


def copied_folder(folder: Path, paths: Sequence[Path]) -> None:
    """`folder` holding copies of `paths`, written into a temporary sibling and renamed when complete: a folder found
    is reused as is, so a copy cut short must never sit under its name."""
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    for path in paths:
        shutil.copy2(path, temporary / path.name)
    temporary.rename(folder)


def curation_record(config: ScienceConfig) -> dict[str, dict[str, float]]:
    """pack -> images kept, images in the world's pack, the teacher's mean accuracy on them (empty: no curation)."""
    if config.teacher_curation <= 0:
        return {}
    record = {}
    for pack in config.names("packs"):
        accuracy = json.loads(curation_scores(pack_folder(config, pack)).read_text())
        kept = sum(share >= config.teacher_curation for share in accuracy.values())
        record[pack] = {
            "kept": kept,
            "images": len(accuracy),
            "teacher_accuracy": float(np.mean(list(accuracy.values()))),
        }
    return record


def joint_round(config: ScienceConfig, arm: str, packs: Sequence[str], seed: int, output: Path) -> TrainConfig:
    """The `+joint` round after the last of `packs`: the `+lwf` first round of <arm> on all of them pooled, with what
    each pack's own round replays and its caption negatives."""
    alone = [round_config(config, arm + "+lwf", p, seed, output) for p in packs]
    if len(packs) == 1:
        return alone[0]
    pooled = Path(config.workdir) / "joint" / "+".join(packs)
    if not pooled.is_dir():  # a pack's files are named after it, so the packs' names never clash
        copied_folder(pooled, [path for pack in packs for path in Path(pack_folder(config, pack)).iterdir()])
    return dataclasses.replace(
        alone[0],
        data=str(pooled),
        steps=alone[0].steps * len(packs),
        replay_data=",".join(dict.fromkeys(f for c in alone for f in c.replay_folders())),
        caption_negatives=",".join(c.caption_negatives for c in alone if c.caption_negatives),
    )


def round_config(
    config: ScienceConfig,
    arm: str,
    pack: str,
    seed: int,
    output: Path,
    init_adapter: str = "",
    earlier: Sequence[str] = (),
) -> TrainConfig:
    """`earlier`: the packs of the continual run's earlier rounds, replayed by a `+replay` or `+lwf` arm."""
    world = replay_folder(config)
    replay, ratio = [world] if world else [], config.replay_ratio if world else 0.0
    arm, suffix = split_arm(arm)
    if suffix and earlier:
        replay += [pack_folder(config, p) for p in earlier]
        ratio += config.continual_replay
    if config.counterfactual_ratio > 0:
        replay.append(counterfactual_folder(config, pack))
        ratio += config.counterfactual_ratio
    replay_overrides = REPLAY_SUFFIXES[suffix] if suffix and replay else {}
    pack_words = {"learn_words": arm_words(ARMS[arm].get("learn_words", ""), PACK_BY_NAME[pack])}
    negatives = (
        caption_negatives(PACK_BY_NAME[pack], config.caption_negative_words)
        if config.caption_negative_ratio > 0
        else ""
    )
    # A round that starts from an earlier adapter takes the continual run's own lr, steps, fusing and anchor where set.
    continual_fields = {
        "lr": config.continual_lr,
        "steps": config.continual_steps,
        "init_adapter_fused": config.continual_fused,
    }
    later_round = {field: value for field, value in continual_fields.items() if init_adapter and value}
    if init_adapter and config.continual_anchor_layout != ARMS_ANCHOR:
        later_round["anchor_layout"] = config.continual_anchor_layout
    return make_config(
        config.preset,
        model=config.model,
        data=pack_folder(config, pack),
        output=str(output),
        seed=seed,
        batch_size=config.round_batch or None,
        replay_data=",".join(replay),
        replay_ratio=ratio,
        init_adapter=init_adapter,
        caption_negatives=negatives,
        negative_ratio=config.caption_negative_ratio,
        **({"steps": config.round_steps or None} | ARMS[arm] | pack_words | replay_overrides | later_round),
    )


def arm_words(learn_words: str, pack: ConceptPack) -> str:
    """An arm's `learn_words` for a pack's round: the pack's words where the arm says so (`PACK_WORDS`,
    `PACK_WORDS_FROM_KIN`, `PACK_WORDS_FROM_IMAGES`), else as the arm gives it."""
    words = list(counterfactual_words(pack))
    if learn_words == PACK_WORDS:
        return ",".join(words)
    if learn_words == PACK_WORDS_FROM_IMAGES:
        return ",".join(f"{word}={IMAGE_START}" for word in words)
    if learn_words == PACK_WORDS_FROM_KIN:
        kin = {
            "shape": {pack.word: NEUTRAL_WORD, plural(pack.word): plural(NEUTRAL_WORD)},
            "colour": {pack.word: COUNTERFACTUAL_VALUE["colour"]},
        }.get(pack.kind, {})
        return ",".join(f"{word}={kin[word]}" if word in kin else word for word in words)
    return learn_words


def replay_shares(train_config: TrainConfig) -> dict[str, float]:
    """Each replay source's expected share of a batch. A round pools its replay folders and draws each replayed
    sample uniformly from the pool, so a folder's share is its part of the pooled images times the summed ratio;
    caption negatives have their own share."""
    sizes = {Path(f): len(image_files(Path(f))) for f in train_config.replay_folders()}
    total = sum(sizes.values())
    sources = {"packs": "pack", "counterfactual": "counterfactuals"}
    shares = {
        f"{folder.name} {sources[folder.parent.name]}" if folder.parent.name in sources else "world renders": round(
            train_config.replay_ratio * n / total, 3
        )
        for folder, n in sizes.items()
    }
    return shares | ({"caption negatives": train_config.negative_ratio} if train_config.negative_ratio > 0 else {})


def replay_plan(config: ScienceConfig) -> dict[str, dict[str, dict[str, float]]]:
    """arm -> pack -> replay source -> share of a batch, for every round that replays: the pack study's (arm as
    named) and the continual run's (`continual <arm>`)."""
    packs = config.names("packs")
    plan: dict[str, dict[str, dict[str, float]]] = {}
    for arm in config.names("arms"):
        plan[arm] = {pack: replay_shares(pack_round(config, arm, pack, 0)) for pack in packs}
    for arm in config.names("continual_arms"):
        if split_arm(arm)[1] not in UNCHAINED_SUFFIXES:
            plan[f"continual {arm}"] = {
                pack: replay_shares(round_config(config, arm, pack, 0, Path(config.workdir), earlier=packs[:i]))
                for i, pack in enumerate(packs)
            }
    return {arm: {pack: shares for pack, shares in rounds.items() if shares} for arm, rounds in plan.items()}


def pack_round(config: ScienceConfig, arm: str, pack: str, seed: int) -> TrainConfig:
    """The pack study's round of an arm: one pack, from the base."""
    return round_config(config, arm, pack, seed, Path(config.workdir) / "rounds" / pack / f"{arm}-s{seed}")


def run_round(train_config: TrainConfig) -> tuple[str, float]:
    """Train (or resume, or reuse) one round; returns its adapter folder and its training seconds."""
    output = Path(train_config.output)
    record = output / "round.json"
    done = json.loads(record.read_text()) if record.is_file() else None
    if done is not None and not train_config.changes_since(done["config"]):
        return done["adapter"], done["seconds"]
    if done is not None:
        shutil.rmtree(output)  # a finished round of another recipe (say another --continual-lr): train this one anew
    start = time.time()
    adapter = train(train_config)
    seconds = time.time() - start
    record.write_text(
        json.dumps({"adapter": str(adapter), "seconds": seconds, "config": dataclasses.asdict(train_config)})
    )
    return str(adapter), seconds


class Evaluation:
    """The suite runs of the benchmark: every network loaded once, the prompt sets read once, reports reused."""

    def __init__(self, config: ScienceConfig):
        self.config = config
        workdir = Path(config.workdir)
        self.evaluators: Evaluators = load_networks(NetworkPaths.nano(fid_cache=str(workdir / "fid_cache")))
        world = Path(config.world)
        self.retention = retention_set(world / "base_prompts.jsonl", limit=config.prompt_limit)
        # The retention prompts' task families (GenEval tags): each is scored on its own as well.
        self.retention_tags = sorted({record["tag"] for record in self.retention.records})
        items = itertools.islice(iterate_items(Vocabulary(), seed=4321), config.reference_images)
        self.retention.references = [render(item.scene) for item in items]
        self.concepts = {
            pack: PromptSet(
                f"concept-{pack}",
                read_prompts(world / "packs" / f"{pack}_prompts.jsonl"),
                targets=read_images(world / "packs" / pack),
            )
            for pack in config.names("packs")
        }

    def folder(self, name: str, steps: int) -> Path:
        """Where the suite run `name` at `steps` writes its report and grids."""
        return Path(self.config.workdir) / "eval" / name / f"steps-{steps}"

    def grids(self, name: str, report: SuiteReport, steps: int) -> dict[str, Path]:
        """The suite run's sample grids (prompt set -> PNG in the work folder)."""
        return {prompt_set: self.folder(name, steps) / grid for prompt_set, grid in report.grids.items()}

    def run(self, name: str, adapters: dict[str, str | None], prompt_sets: list[PromptSet], steps: int) -> SuiteReport:
        out = self.folder(name, steps)
        report_file, digests_file = out / "report.json", out / "adapter-digests.json"
        suite = SuiteConfig(steps, self.config.eval_images, 0, NANO_RESOLUTION, 64, baseline=BASE)
        digests = adapter_digests(adapters)
        if report_file.is_file() and digests_file.is_file():
            report = SuiteReport.read(report_file)
            same = report.models == adapters and report.config == suite
            if same and json.loads(digests_file.read_text()) == digests and verdicts_record_objects(out, report):
                return report
        model = load_model(self.config.model, max_caption_tokens=NANO_CAPTION_TOKENS, with_teacher_encoder=False)
        report = run_suite(model, adapters, prompt_sets, self.evaluators, suite, out)
        digests_file.write_text(json.dumps(digests, indent=1))
        return report

    def verdict_rows(self, name: str, report: SuiteReport, steps: int, prompt_set: str, model: str) -> list[dict]:
        """The model's verdicts on one prompt set of the suite run (none when the run did not sample that set)."""
        verdicts = report.verdicts.get(f"{prompt_set}/{model}")
        return read_jsonl(self.folder(name, steps) / verdicts) if verdicts else []

    def found_metrics(self, name: str, report: SuiteReport, steps: int, model: str) -> dict[str, float | None]:
        """What the objects found in the model's samples say, read from the suite run's verdicts: on the retention
        set (base prompts, none naming a pack's concept) `leak-<pack>` for every pack, the share showing the pack's
        concept (`concept_shown`), and `blank`, the share showing no object at all (`blank_share`); on each pack's
        own prompts the run sampled, `drawn-<pack>`, the share showing its concept whatever else the prompt asks
        (concept accuracy also needs the counts, colours and positions right)."""
        rows = self.verdict_rows(name, report, steps, self.retention.name, model)
        found = {f"leak-{pack}": concept_shown(PACK_BY_NAME[pack], rows) for pack in self.config.names("packs")}
        for pack, prompt_set in self.concepts.items():
            if f"{prompt_set.name}/{model}" in report.verdicts:
                own = self.verdict_rows(name, report, steps, prompt_set.name, model)
                found[f"drawn-{pack}"] = concept_shown(PACK_BY_NAME[pack], own)
        return found | {"blank": blank_share(rows)}

    def pack_metrics(self, pack: str, report: SuiteReport, steps: int, model: str) -> dict[str, float | None]:
        """The reported metrics of one model in a pack's suite run (the concept set is named after its pack)."""
        values = report.metrics[model]
        metrics = {key: values.get(name.replace("concept/", f"concept-{pack}/")) for key, name in METRICS.items()}
        found = self.found_metrics(pack, report, steps, model)
        families = {
            f"retention-{tag}": values.get(f"{self.retention.name}/geneval/{tag}") for tag in self.retention_tags
        }
        found_here = {"drawn": found[f"drawn-{pack}"], "leak": found[f"leak-{pack}"], "blank": found["blank"]}
        rows = self.verdict_rows(pack, report, steps, self.retention.name, model)
        lost = {
            f"lost-{tag}": lost_to_concept(PACK_BY_NAME[pack], [row for row in rows if row["tag"] == tag])
            for tag in self.retention_tags
        }
        return metrics | found_here | families | lost

    def retention_against_base(self, name: str, report: SuiteReport, steps: int, models: list[str]) -> dict[str, dict]:
        """`overall` and each task family -> the models' retention accuracy (their seeds pooled prompt by prompt)
        minus the base's, with its 95% interval over the retention prompts (a `DifferenceInterval` as a dict)."""
        base = self.verdict_rows(name, report, steps, self.retention.name, BASE)
        runs = [self.verdict_rows(name, report, steps, self.retention.name, model) for model in models]
        return {family: dataclasses.asdict(found) for family, found in family_differences([base], runs).items()}


def verdicts_record_objects(folder: Path, report: SuiteReport) -> bool:
    """Whether the suite run's verdicts record the objects they found: older ones do not, and cannot give a leak, so
    their run is sampled again."""
    firsts = [(folder / path).read_text().partition("\n")[0] for path in report.verdicts.values()]
    return all("found" in json.loads(line) for line in firsts if line)


def composed_adapter(folders: list[str], output: Path) -> str:
    """The sum of the adapters (one adapter: itself), written once under a name drawn from their weights, so a rerun
    reuses it and a retrained round gets a new one."""
    if len(folders) == 1:
        return folders[0]
    digest = hashlib.sha256(" ".join(adapter_digest(f) for f in folders).encode()).hexdigest()
    target = output / f"adapter-{digest[:16]}"
    if not (target / LORA_WEIGHTS).is_file():
        compose_adapters(folders, target)
    return str(target)


def adapter_digests(adapters: dict[str, str | None]) -> dict[str, str | None]:
    """Each adapter's weights digest (None for the base): a cached score stands only for the weights it measured,
    so a round retrained in place (another --continual-lr, say) is scored again."""
    return {name: None if path is None else adapter_digest(path) for name, path in adapters.items()}


def spread(values: list[float | None]) -> dict:
    """Mean and standard deviation across seeds; a metric missing for any seed is missing."""
    if not values or any(v is None for v in values):
        return {"mean": None, "std": None, "n": len(values)}
    array = np.array(values, dtype=float)
    return {"mean": float(array.mean()), "std": float(array.std()), "n": len(values)}


def pack_study(config: ScienceConfig, evaluation: Evaluation, pack: str, log) -> dict:
    """Every arm x seed on one pack, evaluated at every step count: metric -> arm -> steps -> spread."""
    adapters: dict[str, str | None] = {BASE: None}
    seconds: dict[str, list[float]] = {}
    for arm in config.names("arms"):
        for seed in config.numbers("seeds"):
            adapter, took = run_round(pack_round(config, arm, pack, seed))
            adapters[f"{arm}-s{seed}"] = adapter
            seconds.setdefault(arm, []).append(took)
            log(f"{pack}: {arm} seed {seed} trained ({took:.0f} s)")
    results: dict = {"metrics": {}, "round_seconds": {arm: spread(s) for arm, s in seconds.items()}}
    sets = [evaluation.retention, evaluation.concepts[pack]]
    # What a word the base already knows scores in the task families of the pack's prompts: concept accuracy counts
    # the rest of the prompt too (counts, positions, other objects), which no round teaches.
    tags = sorted({record["tag"] for record in evaluation.concepts[pack].records})
    results["known_word_tags"], results["known_word"] = tags, {}
    for steps in config.numbers("eval_steps"):
        report = evaluation.run(pack, adapters, sets, steps)
        log(f"{pack}: evaluated at {steps} steps")
        by_tag = [report.metrics[BASE].get(f"{evaluation.retention.name}/geneval/{tag}") for tag in tags]
        results["known_word"][steps] = spread([None if None in by_tag else float(np.mean(by_tag))])
        if steps == config.deployed_steps:
            results["grids"], results["against_base"] = evaluation.grids(pack, report, steps), {}
        for arm in [BASE, *config.names("arms")]:
            models = [BASE] if arm == BASE else [f"{arm}-s{seed}" for seed in config.numbers("seeds")]
            per_seed = [evaluation.pack_metrics(pack, report, steps, m) for m in models]
            for key in per_seed[0]:
                results["metrics"].setdefault(key, {}).setdefault(arm, {})[steps] = spread([v[key] for v in per_seed])
            if steps == config.deployed_steps and arm != BASE:
                results["against_base"][arm] = evaluation.retention_against_base(pack, report, steps, models)
    return results


def continual_study(
    config: ScienceConfig, evaluation: Evaluation, log
) -> tuple[dict, dict, dict[str, Path], dict[str, str | None]]:
    """Packs as successive rounds, each from the previous adapter: arm -> after pack -> metric -> spread; arm ->
    after pack -> retention against the base (`Evaluation.retention_against_base`); the sample grids; and every
    model evaluated (name -> adapter folder, None for the base)."""
    packs, seeds = config.names("packs"), config.numbers("seeds")
    adapters: dict[str, str | None] = {BASE: None}
    for arm in config.names("continual_arms"):
        trained, suffix = split_arm(arm)
        for seed in seeds:
            previous = ""
            learnt: list[str] = []
            for i, pack in enumerate(packs):
                output = Path(config.workdir) / "continual" / f"{arm}-s{seed}" / pack
                study = pack_round(config, trained, pack, seed)
                if suffix == COMPOSE_SUFFIX:
                    learnt.append(run_round(study)[0])
                    previous = composed_adapter(learnt, output)
                elif suffix == JOINT_SUFFIX:
                    previous, _ = run_round(joint_round(config, trained, packs[: i + 1], seed, output))
                else:
                    train_config = round_config(config, arm, pack, seed, output, previous, earlier=packs[:i])
                    # The first pack's round, from the base, is the pack study's round whenever the recipes agree.
                    same_as_study = dataclasses.replace(train_config, output=study.output) == study
                    previous, _ = run_round(study if same_as_study else train_config)
                adapters[f"{arm}-s{seed}-after-{pack}"] = previous
            log(f"continual: {arm} seed {seed} through {', '.join(packs)}")
    sets = [evaluation.retention, *evaluation.concepts.values()]
    report = evaluation.run("continual", adapters, sets, config.deployed_steps)
    grids = evaluation.grids("continual", report, config.deployed_steps)
    tracked = (
        [f"concept-{p}/geneval/overall" for p in packs]
        + [f"drawn-{p}" for p in packs]
        + [METRICS["retention"]]
        + [f"leak-{p}" for p in packs]
        + ["blank"]
    )
    steps = config.deployed_steps
    metrics = {
        name: report.metrics[name] | evaluation.found_metrics("continual", report, steps, name) for name in adapters
    }
    results: dict = {BASE: {after: {m: spread([metrics[BASE][m]]) for m in tracked} for after in packs}}
    for arm in config.names("continual_arms"):
        results[arm] = {
            after: {m: spread([metrics[f"{arm}-s{s}-after-{after}"][m] for s in seeds]) for m in tracked}
            for after in packs
        }
    against: dict = {arm: {} for arm in config.names("continual_arms")}
    for arm, after in itertools.product(against, packs):
        models = [f"{arm}-s{s}-after-{after}" for s in seeds]
        against[arm][after] = evaluation.retention_against_base("continual", report, steps, models)
    return results, against, grids, adapters


def premise_under(config: ScienceConfig, evaluation: Evaluation, adapters: dict[str, str | None]):
    """Yield (model name, pack -> PremiseResult) for each adapter given (None: the base), one model at a time so the
    caller can keep what is done. The model, with its teacher encoder, is loaded only if there is work."""
    if not adapters:
        return
    model = ZImageModel.load(config.model, max_caption_tokens=NANO_CAPTION_TOKENS)
    for name, path in adapters.items():
        lora = path is not None and load_lora_if_any(model.pipeline, path, name)
        with use_adapter(model.transformer, name if lora else None), words_attached(model.pipeline, path):
            premise = {
                pack: teacher_premise(
                    model,
                    PACK_BY_NAME[pack],
                    evaluation.evaluators.detector,
                    seeds=range(config.eval_images),
                    prompts=config.continual_premise,
                )
                for pack in config.names("packs")
            }
        yield name, premise


def continual_premise(config: ScienceConfig, evaluation: Evaluation, adapters: dict[str, str | None]) -> dict:
    """The teacher premise (evaluation/nano/premise.py) of every pack under the base and every continual adapter:
    arm -> after pack -> premise pack -> {teacher_concept, teacher_accuracy} -> spread across seeds."""
    cache = Path(config.workdir) / "eval" / "continual-premise.json"
    measured = json.loads(cache.read_text()) if cache.is_file() else {}

    digests = adapter_digests(adapters)

    def key(name: str) -> str:
        return f"{name} {digests[name]} {config.continual_premise} {config.eval_images}"

    missing = {name: path for name, path in adapters.items() if key(name) not in measured}
    for name, premise in premise_under(config, evaluation, missing):
        measured[key(name)] = {pack: {k: getattr(r, k) for k in PREMISE_METRICS} for pack, r in premise.items()}
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(measured, indent=1))

    def across(models: list[str], pack: str) -> dict:
        rows = [measured[key(m)][pack] for m in models]
        return {k: spread([row[k] for row in rows]) for k in PREMISE_METRICS}

    packs, seeds = config.names("packs"), config.numbers("seeds")
    results: dict = {BASE: {after: {p: across([BASE], p) for p in packs} for after in packs}}
    for arm in config.names("continual_arms"):
        results[arm] = {
            after: {p: across([f"{arm}-s{s}-after-{after}" for s in seeds], p) for p in packs} for after in packs
        }
    return results


def shown(value: dict, digits: int = 3) -> str:
    if value["mean"] is None:
        return "missing"
    return (
        f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}" if value["n"] > 1 else f"{value['mean']:.{digits}f}"
    )


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> Path:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot().close(figure)
    return path


def errorbars(axis, xs: list, values: list[dict], label: str) -> None:
    shown_at = [(x, v) for x, v in zip(xs, values, strict=True) if v["mean"] is not None]
    axis.errorbar(
        [x for x, _ in shown_at],
        [v["mean"] for _, v in shown_at],
        yerr=[v["std"] for _, v in shown_at],
        marker="o",
        capsize=3,
        label=label,
    )


def plot_pack(pack: str, study: dict, path: Path) -> Path:
    """Concept accuracy and retention against sampling steps, one line per arm."""
    figure, axes = pyplot().subplots(1, 2, figsize=(9, 3.5))
    for axis, key, title in zip(axes, ("concept", "retention"), (f"new concept: {pack}", "retention"), strict=True):
        steps = list(study["metrics"][key][BASE])
        for arm, by_steps in study["metrics"][key].items():
            errorbars(axis, steps, [by_steps[s] for s in steps], arm)
        axis.set(xscale="log", xlabel="sampling steps", ylabel="GenEval-nano accuracy", title=title, ylim=(-0.02, 1.02))
        axis.minorticks_off()
        axis.set_xticks(steps, labels=[str(s) for s in steps])
    axes[1].legend(fontsize=7)
    return save_figure(figure, path)


def later_anchor(anchor_layout: float) -> str:
    """The report's words for `continual_anchor_layout` (reports rendered before it existed hold none: the arm's)."""
    if anchor_layout == ARMS_ANCHOR:
        return ""
    return f", layout anchor {anchor_layout}" if anchor_layout else ", no layout anchor"


def plot_continual(continual: dict, path: Path) -> Path:
    """Every pack's accuracy and retention from the base through each round, one panel per arm."""
    arms = [arm for arm in continual if arm != BASE]
    figure, axes = pyplot().subplots(1, len(arms), figsize=(4.5 * len(arms), 3.5), squeeze=False)
    for axis, arm in zip(axes[0], arms, strict=True):
        rounds = list(continual[arm])
        for metric in continual[arm][rounds[0]]:
            values = [continual[BASE][rounds[0]][metric]] + [continual[arm][r][metric] for r in rounds]
            errorbars(axis, list(range(len(values))), values, metric.split("/")[0])
        axis.set_xticks(range(len(rounds) + 1), labels=[BASE] + [f"after {r}" for r in rounds])
        axis.set(ylabel="share of samples", title=f"continual: {arm}", ylim=(-0.02, 1.02))
        axis.legend(fontsize=7)
    return save_figure(figure, path)


def replay_lines(plan: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The replay of each round that replays, as the share of a batch each source has (see `replay_shares`)."""
    rounds = [(arm, pack, shares) for arm, packs in plan.items() for pack, shares in packs.items()]
    if not rounds:
        return []
    return [
        "",
        "Replay pools its folders (each replayed sample is drawn uniformly from all of them), so each source's share "
        "of a batch is its part of the pooled images times the summed ratio (caption negatives have their own share):",
        "",
        *(
            f"- `{arm}`, {pack}: " + ", ".join(f"{s} {v:.3f}" for s, v in shares.items())
            for arm, pack, shares in rounds
        ),
    ]


def render_markdown(results: dict) -> str:
    config, deployed = results["config"], results["config"]["deployed_steps"]
    arms = [BASE, *ScienceConfig(**config).names("arms")]
    lines = [
        "# Nano science benchmark",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}; {results['seconds']:.0f} s in this run (reused work not counted); "
        f"{results['date']}.  ",
        f"Base: `{results['base']['model']}` (transformer sha256 {results['base']['transformer'][:12]}).",
        "",
        f"Rounds: preset `{config['preset']}` ({results['round']}), identical for every arm but for its adapter: "
        f"{'; '.join(results['arms'])}; training seeds "
        f"{config['seeds']} (± is their standard deviation); replay ratio {config['replay_ratio']}, "
        f"counterfactual ratio {config['counterfactual_ratio']}, caption negative ratio "
        f"{config['caption_negative_ratio']}"
        + {"drop": " (the word dropped)", "neutral": " (the word made neutral)"}.get(
            config["caption_negative_words"], ""
        )
        + ". Evaluation: "
        f"{config['eval_images']} image(s) per prompt, each from its own noise, the same for every model; retention on "
        f"{results['prompts']['retention']} held-out base prompts, concept accuracy on each pack's held-out prompts "
        f"({', '.join(f'{p}: {n}' for p, n in results['prompts']['concepts'].items())}); FID-nano against "
        f"{config['reference_images']} world renders. Leak: share of the retention samples showing a pack's concept "
        "(no base prompt names it); blank: share of the retention samples showing no object at all; drawn: share of "
        "a pack's own prompts' samples showing its concept, whatever else the prompt asks (concept accuracy also "
        "needs the counts, colours and positions right).",
        *curation_lines(results.get("curation", {}), config),
        *replay_lines(results.get("replay_plan", {})),
        "",
        f"## At {deployed} steps (the deployed setting)",
        "",
        "| pack | model | concept accuracy | drawn | leak | blank | retention | FID-nano | CLIPScore-nano | round "
        "seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for pack, study in results["packs"].items():
        for arm in arms:
            keys = ("concept", "drawn", "leak", "blank", "retention")
            values = [shown(study["metrics"][key][arm][deployed]) for key in keys]
            values += [
                shown(study["metrics"]["fid"][arm][deployed], 1),
                shown(study["metrics"]["clipscore"][arm][deployed]),
            ]
            took = shown(study["round_seconds"][arm], 0) if arm in study["round_seconds"] else "-"
            lines.append(f"| {pack} | {arm} | {' | '.join(values)} | {took} |")
    lines += family_table(
        results,
        arms,
        "retention-",
        f"Retention by task family at {deployed} steps",
        "GenEval-nano on the held-out base prompts of each family alone (what a round loses, and where).",
    )
    lines += family_table(
        results,
        arms,
        "lost-",
        f"Retention lost to the concept by task family at {deployed} steps",
        "Share of each family's samples judged wrong that show the pack's concept (no base prompt names it): what its "
        "leak cost, beside the family's accuracy above.",
    )
    against = {pack: study["against_base"] for pack, study in results["packs"].items() if study["against_base"]}
    if against:
        lines += against_base_table(against, ("pack", "model"), results["prompts"]["retention_families"])
    for pack, study in results["packs"].items():
        steps = list(study["metrics"]["concept"][BASE])
        lines += [
            "",
            f"## {pack}: accuracy by sampling steps",
            "",
            "| model | "
            + " | ".join(f"concept @{s}" for s in steps)
            + " | "
            + " | ".join(f"retention @{s}" for s in steps)
            + " |",
            "| --- |" + " --- |" * (2 * len(steps)),
        ]
        for arm in arms:
            cells = [shown(study["metrics"][key][arm][s]) for key in ("concept", "retention") for s in steps]
            lines.append(f"| {arm} | {' | '.join(cells)} |")
        known, tags = ", ".join(f"@{s} {shown(study['known_word'][s])}" for s in steps), study["known_word_tags"]
        lines += [
            "",
            f"A word the base knows, in the task families of the {pack} prompts ({', '.join(tags)}: "
            f"the base's retention accuracy on them, mean over the families): {known}. Concept accuracy also needs "
            "the rest of each prompt right, which no round teaches; this is what it would read if the new word were "
            "learnt as well as the base's own.",
        ]
        lines += ["", f"![{pack}]({study['plot']})", "", grid_links(study["grids"], deployed)]
    if results.get("continual"):
        continual = results["continual"]
        tracked = list(next(iter(next(iter(continual.values())).values())))
        later_steps = config["continual_steps"] or "the first round's"
        lines += [
            "",
            f"## Continual run (packs in order, each from the previous adapter unless composed; at {deployed} steps)",
            "",
            f"Later rounds train at lr {config['continual_lr'] or 'of the arm'} for {later_steps} steps"
            f"{', a fresh LoRA over the previous adapter fused into the base' if config.get('continual_fused') else ''}"
            f"{later_anchor(config.get('continual_anchor_layout', ARMS_ANCHOR))}"
            "; a "
            f"`+replay` arm adds {config['continual_replay']} to its replay ratio for the earlier packs' data (each "
            "source's share is listed above; `+lwf`: taught by the previous adapter from their captions); a "
            f"`{COMPOSE_SUFFIX}` arm learns each pack from the base and deploys the sum of the adapters so far; a "
            f"`{JOINT_SUFFIX}` arm learns every pack so far at once from the base, each as often as in its own round.",
            "",
            "| model | after round | " + " | ".join(m.split("/")[0] for m in tracked) + " |",
            "| --- | --- |" + " --- |" * len(tracked),
        ]
        for arm, rounds in continual.items():
            shown_rounds = list(rounds)[:1] if arm == BASE else list(rounds)
            for after in shown_rounds:
                label = "-" if arm == BASE else after
                lines.append(f"| {arm} | {label} | " + " | ".join(shown(rounds[after][m]) for m in tracked) + " |")
        lines += against_base_table(
            results["continual_against_base"], ("model", "after round"), results["prompts"]["retention_families"]
        )
        lines += [
            "",
            f"![continual]({results['continual_plot']})",
            "",
            grid_links(results["continual_grids"], deployed),
        ]
    if results.get("continual_premise"):
        lines += premise_table(results["continual_premise"], config["continual_premise"], deployed)
    lines.append("")
    return "\n".join(lines)


def against_base_table(against: dict, labels: tuple[str, str], families: dict[str, int]) -> list[str]:
    """Retention minus the base's, overall and by task family, with 95% intervals: one row per entry of the two-level
    `against` (pack -> arm, or arm -> after round), its two keys under `labels`."""
    columns = ["overall", *families]
    lines = [
        "",
        "Retention against the base: each model's seeds pooled prompt by prompt, minus the base's accuracy on the "
        "same prompts and noise, with its 95% interval over the prompts (paired bootstrap within each task family, "
        "`evaluation/geneval/intervals.py`; the number of prompts under each family). An interval that holds 0 is "
        "within what another draw of prompts would move.",
        "",
        f"| {' | '.join(labels)} | overall | " + " | ".join(f"{f} ({n})" for f, n in families.items()) + " |",
        "| --- | --- |" + " --- |" * len(columns),
    ]
    for first, rows in against.items():
        for second, by_family in rows.items():
            cells = [str(DifferenceInterval(**by_family[c])) for c in columns]
            lines.append(f"| {first} | {second} | " + " | ".join(cells) + " |")
    return lines


def family_table(results: dict, arms: list[str], prefix: str, title: str, caption: str) -> list[str]:
    """A table of the per-family metrics named `<prefix><family>`, every pack and arm at the deployed steps."""
    deployed = results["config"]["deployed_steps"]
    keys = sorted(key for key in next(iter(results["packs"].values()))["metrics"] if key.startswith(prefix))
    lines = [
        "",
        f"### {title}",
        "",
        caption,
        "",
        "| pack | model | " + " | ".join(key.removeprefix(prefix) for key in keys) + " |",
        "| --- | --- |" + " --- |" * len(keys),
    ]
    for pack, study in results["packs"].items():
        for arm in arms:
            cells = [shown(study["metrics"][key][arm][deployed]) for key in keys]
            lines.append(f"| {pack} | {arm} | " + " | ".join(cells) + " |")
    return lines


def curation_lines(curation: dict, config: dict) -> list[str]:
    if not curation:
        return []
    kept = ", ".join(
        f"{p} {r['kept']} of {r['images']} (teacher {r['teacher_accuracy']:.3f})" for p, r in curation.items()
    )
    return [
        "",
        f"Teacher curation: each pack's rounds train on the images whose caption the base's teacher, shown the image, "
        f"draws right in at least {config['teacher_curation']:g} of {config['curation_seeds']} samples at "
        f"{config['deployed_steps']} steps: {kept} (mean share of its samples right on all of a pack's images).",
    ]


def premise_table(premise: dict, prompts: int, steps: int) -> list[str]:
    packs = list(premise[BASE])
    lines = [
        "",
        "### The teacher through the continual run",
        "",
        f"Teacher premise (reports/nano_base.md) under each model: [reference + caption] at {steps} steps on {prompts} "
        "prompts of each pack; share of samples showing the pack's concept / share the GenEval rules accept whole. "
        "An EMA arm's next round starts its teacher from this adapter; a base-teacher arm always distils from the "
        "base.",
        "",
        "| model | after round | " + " | ".join(f"teacher: {p}" for p in packs) + " |",
        "| --- | --- |" + " --- |" * len(packs),
    ]
    for arm, rounds in premise.items():
        for after in list(rounds)[:1] if arm == BASE else list(rounds):
            cells = [" / ".join(shown(rounds[after][p][k], 2) for k in PREMISE_METRICS) for p in packs]
            lines.append(f"| {arm} | {'-' if arm == BASE else after} | " + " | ".join(cells) + " |")
    return lines


def grid_links(grids: dict[str, str], steps: int) -> str:
    return f"Samples at {steps} steps (first noise seed of each prompt, one column per model): " + ", ".join(
        f"[{prompt_set}]({path})" for prompt_set, path in grids.items()
    )


def keep_grids(grids: dict[str, Path], folder: Path, prefix: str, report_dir: Path) -> dict[str, str]:
    """Copy a suite run's grids beside the report (the work folder is not kept); links relative to the report."""
    folder.mkdir(parents=True, exist_ok=True)
    kept = {}
    for prompt_set, grid in grids.items():
        copy = Path(shutil.copy(grid, folder / f"{prefix}_{prompt_set}.png"))
        kept[prompt_set] = str(copy.relative_to(report_dir))
    return kept


def run(config: ScienceConfig, command: str, log=print) -> dict:
    base = check(config)
    start = time.time()
    Path(config.workdir).mkdir(parents=True, exist_ok=True)
    (Path(config.workdir) / BASE_RECORD).write_text(json.dumps(base, indent=1))
    out = Path(config.out)
    plots = out.with_suffix("")
    evaluation = Evaluation(config)
    preset = make_config(config.preset, steps=config.round_steps or None, batch_size=config.round_batch or None)
    arms = list(dict.fromkeys(config.names("arms") + config.names("continual_arms")))
    results: dict = {
        "command": command,
        "machine": machine_description(default_device(), torch.get_num_threads()),
        "date": time.strftime("%Y-%m-%d"),
        "config": dataclasses.asdict(config),
        "base": base,
        "round": f"{preset.steps} steps, batch {preset.batch_size}"
        + ("" if all(map(learns_words_only, arms)) else f", LoRA rank {preset.lora_rank}"),
        "arms": [arm_recipe(a) for a in arms],
        "prompts": {
            "retention": len(evaluation.retention.records),
            "retention_families": {
                tag: sum(r["tag"] == tag for r in evaluation.retention.records) for tag in evaluation.retention_tags
            },
            "concepts": {p: len(s.records) for p, s in evaluation.concepts.items()},
        },
        "packs": {},
    }
    results["replay_plan"] = replay_plan(config)
    results["curation"] = curation_record(config)
    for pack in config.names("packs"):
        study = pack_study(config, evaluation, pack, log)
        study["plot"] = str(plot_pack(pack, study, plots / f"{pack}.png").relative_to(out.parent))
        study["grids"] = keep_grids(study["grids"], plots, pack, out.parent)
        results["packs"][pack] = study
    if config.names("continual_arms"):
        results["continual"], results["continual_against_base"], grids, adapters = continual_study(
            config, evaluation, log
        )
        if config.continual_premise > 0:
            results["continual_premise"] = continual_premise(config, evaluation, adapters)
            log("continual: teacher premise measured")
        results["continual_grids"] = keep_grids(grids, plots, "continual", out.parent)
        plot = plot_continual(results["continual"], plots / "continual.png")
        results["continual_plot"] = str(plot.relative_to(out.parent))
    results["seconds"] = time.time() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(results))
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def parse_args(argv: list[str]) -> ScienceConfig:
    return parse_dataclass_args(ScienceConfig, argv, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    arguments = sys.argv[1:]
    run(parse_args(arguments), "python benchmarks/nano_science.py " + shlex.join(arguments))
