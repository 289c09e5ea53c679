"""The training configuration: one typed dataclass, a docstring per field, presets as TOML files.

Every field is a command-line option of `dopsd train` (its help is the field's docstring); a preset fills the
defaults of a model family from the recipe of the D-OPSD authors (see dopsd/presets/).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

PRESETS_DIR = Path(__file__).parent / "presets"


def comma_separated(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


@dataclass
class TrainConfig:
    model: str = ""
    """Pipeline folder or hub id (e.g. Tongyi-MAI/Z-Image-Turbo)."""
    family: Literal["auto", "zimage", "flux2-klein"] = "auto"
    """Model family; auto reads the pipeline class from model_index.json."""
    teacher_encoder: str = ""
    """Z-Image only: Qwen3-VL folder or hub id for the teacher context (default: teacher_encoder/ beside the
    pipeline, else Qwen/Qwen3-VL-4B-Instruct)."""
    data: str = ""
    """Dataset folder: images with same-name .txt captions."""
    replay_data: str = ""
    """Dataset folders (comma-separated) mixed into every batch against forgetting, e.g. the earlier rounds' data
    in a continual run, or renders of what the base already knew; pooled (empty: no replay)."""
    replay_ratio: float = 0.0
    """Share of each batch drawn from `replay_data`: floor(batch_size * ratio) samples, plus one more with the
    probability of the remainder, so a batch of 1 still replays at this rate on average."""
    replay_teacher: Literal["round", "previous"] = "round"
    """Who teaches the replayed samples under D-OPSD. round: the round's teacher, seeing each sample's image, as for
    the data. previous: the weights the round starts from (`init_adapter`, else the base), kept frozen, on the caption
    alone, so the student keeps doing on the replayed prompts what it did before the round (learning without
    forgetting, on the student's own roll-outs). On the nano world (star, then teal, half of each batch replaying the
    star pack, 3 seeds) it learned teal 0.193 vs 0.148 for `round` and kept star 0.090 vs 0.076; replaying base-world
    renders in a first round, retention was 0.520 vs 0.358 for `round` (reports/nano_continual_screens.md)."""
    caption_negatives: str = ""
    """Negatives against a new word leaking into prompts that do not name it, made from the data's own captions:
    comma-separated `word=replacement` pairs (whole words, any case; an empty replacement drops the word), e.g.
    `star=square,stars=squares` or `striped=`. Each data caption naming a word gives a sample with the word replaced,
    taught by the weights the round starts from (`init_adapter`, else the base) from that caption alone, so the
    student keeps drawing for it what it drew before the round. Needs method=dopsd and negative_ratio. On the nano
    packs (star, teal, striped; 0.625, 3 seeds) retention was 0.445 / 0.455 / 0.511 against 0.360 / 0.446 / 0.402
    without, the concept's leak into other prompts lower, teal and stripes learnt less
    (reports/nano_science_caption_negatives.md)."""
    negative_ratio: float = 0.0
    """Share of each batch drawn from the caption negatives, as `replay_ratio` draws from the replay (the two added
    stay below 1)."""
    init_adapter: str = ""
    """LoRA folder (as a round writes it) that student and EMA teacher start from, e.g. the previous round's adapter
    in a continual run; its rank, alpha and targets must be this config's (empty: start from the base). On the nano
    world an EMA teacher started from an earlier round's adapter had lost much of its reference-following after two
    rounds, and the third round learned nothing; with teacher=base it learned striped 0.191 (0.238 from the base)
    (reports/nano_continual.md)."""
    init_adapter_fused: bool = False
    """Fuse `init_adapter` into the base weights and train a fresh LoRA over them (student, EMA teacher and the
    starting weights all begin at B = 0 there; teacher=base is the fused weights), instead of going on with the saved
    adapter's own A and B. The round's adapter/ is then the sum of the two (`compose_adapters`, ranks stacked), so it
    still replaces init_adapter; its targets must be this round's, any rank fits."""
    output: str = "runs/round"
    """Where checkpoints, the adapter and metrics go."""
    method: Literal["dopsd", "sft"] = "dopsd"
    """dopsd: on-policy self-distillation; sft: ordinary flow matching on the targets (the baseline)."""
    resolution: int = 1024
    """Training resolution (square; images are resized and centre-cropped)."""
    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 1
    """Samples per process per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-4
    """AdamW learning rate."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision for the transformer (bf16 on GPUs)."""
    weights_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype the frozen networks are loaded in."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward (much less memory, ~40% slower)."""
    lora_rank: int = 64
    """LoRA rank (0: no LoRA; the round then learns only `learn_words`)."""
    lora_alpha: float = 128.0
    """LoRA alpha (scale = alpha / rank)."""
    lora_targets: str = ""
    """Comma-separated module-name suffixes to adapt (empty: the family's attention + feed-forward layers)."""
    learn_words: str = ""
    """Comma-separated caption words whose input embeddings in the text encoder the round learns (textual inversion,
    dopsd/words.py), each a token of its own in the tokenizer, `word=start` to start it from another word's
    embedding (e.g. `star=object`; default: its own), `word=@images` from the teacher's vision tokens of the data's
    images whose captions name it (Z-Image: for a concept no word of the base is a kind of); the round's adapter
    holds them beside its LoRA. The student encodes the captions naming them afresh each step with them; the
    teacher's context is encoded once as the round starts (on Z-Image by the Qwen3-VL encoder, which reads the
    base's embeddings: the concept reaches it through the image). With lora_rank 0 they are all the round learns,
    and a prompt without them is the base's bit for bit: nothing leaks onto other prompts. A starting adapter's
    words stay as they were, those relearnt start from it."""
    word_lr: float = 1e-2
    """Adam learning rate of `learn_words` (the nano text encoder's embeddings have norm ~0.16)."""
    ema_decay: float = 0.9
    """Teacher EMA decay: teacher <- d * teacher + (1 - d) * student after each step."""
    teacher: Literal["ema", "base", "live"] = "ema"
    """Teacher weights: EMA of the student, the frozen base, or the live student (collapses; ablation)."""
    target: Literal["x0", "velocity"] = "x0"
    """Distance between predicted x0 (authors' code) or velocities (paper text)."""
    rollout: Literal["fixed", "model"] = "fixed"
    """Roll-out sigmas: `rollout_sigmas`, or the model's own inference schedule at `rollout_steps`."""
    rollout_sigmas: str = "1.0,0.9,0.75,0.5"
    """Comma-separated roll-out sigmas for rollout=fixed (0 is appended)."""
    rollout_steps: int = 4
    """Roll-out steps for rollout=model."""
    grad_steps: int = 0
    """Train on this many random roll-out states per step, forward-only for the rest (0: all)."""
    loss_max_sigma: float = 1.0
    """Roll-out states above this sigma are visited but get no loss: there the teacher, seeing the image, lays the
    scene out anew rather than following the student's noise, and the student can only average its layouts."""
    anchor_layout: float = 0.0
    """Weight of a loss, at the roll-out states above loss_max_sigma, on the samples taught by the starting weights
    from the caption (replay under replay_teacher=previous, caption negatives); 1 weighs each such state as a trained
    one, 0 turns it off. Those states decide the layout; no other loss reaches them, yet they move with the shared
    weights: on the nano world a chain's samples without any object, and its concepts, are made there
    (reports/nano_adapter_steps.md). Needs such samples."""
    anchor_min_sigma: float = 0.0
    """anchor_layout holds only the roll-out states of sigma >= this (0: every state above loss_max_sigma); say
    0.95 for sigma 1 alone, leaving sigma 0.9 to move with the new concept."""
    top_state_means: float = 0.0
    """Weight of a loss, at the roll-out states above loss_max_sigma, on every other sample (those taught with the
    image), between only the spatial means of each latent channel of the student's and the teacher's predicted x0:
    what the image conveys without its layout (its colours), where the full prediction would average layouts. 1
    weighs each such state as a trained one, 0 turns it off."""
    teacher_guidance: float = 0.0
    """Reference guidance of the teacher: v + w * (v - v_caption), its velocity pushed away from its own
    caption-only prediction, so what only the image conveys (the unnamed concept) weighs w + 1 times. One more
    teacher forward per trained state; 0 is the paper's teacher."""
    backward_per_step: bool = True
    """Backward after each roll-out step (frees its graph; same gradient as one summed backward)."""
    checkpoint_every: int = 250
    """Save a resumable checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 2
    """Keep only the newest N checkpoints."""
    log_every: int = 10
    """Report metrics every N steps."""
    seed: int = 0
    """Seed of noise, data order and LoRA init."""
    deployed_steps: int = 4
    """Steps the model is served with (sampling previews, evaluation)."""
    guidance: float = 0.0
    """Guidance scale it is served with (0 for step-distilled models)."""
    max_caption_tokens: int = 512
    """Caption tokens kept by the text encoder."""
    text_encoder_layers: str = ""
    """FLUX.2-klein only: comma-separated hidden-state layers stacked into the context (empty: 9,18,27)."""

    def __post_init__(self) -> None:
        if self.init_adapter_fused and not self.init_adapter:
            raise ValueError("config field 'init_adapter_fused': fuses init_adapter, which is empty")
        self.words_to_learn()  # a malformed learn_words fails here, not after the model is loaded
        if self.lora_rank < 0 or (self.lora_rank == 0 and not self.learn_words):
            raise ValueError(
                f"config field 'lora_rank': must be > 0, or 0 with learn_words (a round must learn something), "
                f"got {self.lora_rank}"
            )
        for name in ("teacher_guidance", "guidance", "anchor_layout", "anchor_min_sigma", "top_state_means"):
            if getattr(self, name) < 0:
                raise ValueError(f"config field {name!r}: must be >= 0 (0 turns it off), got {getattr(self, name)}")

    def sigmas_list(self) -> list[float]:
        values = [float(s) for s in self.rollout_sigmas.split(",") if s.strip()]
        if not values or values[0] > 1 or any(b >= a for a, b in zip(values, values[1:], strict=False)):
            raise ValueError(f"rollout_sigmas must decrease from <= 1, got {self.rollout_sigmas!r}")
        return [*values, 0.0]

    def targets_list(self) -> list[str]:
        return comma_separated(self.lora_targets)

    def replay_folders(self) -> list[str]:
        return comma_separated(self.replay_data)

    def words_to_learn(self) -> dict[str, str]:
        """`learn_words` as word -> the word its embedding starts from (itself unless named)."""
        pairs = {}
        for item in comma_separated(self.learn_words):
            word, _, start = (part.strip() for part in item.partition("="))
            if not word or " " in word or " " in start:
                raise ValueError(f"learn_words: {item!r} is not a word or a `word=start` pair of words")
            pairs[word] = start or word
        return pairs

    def negative_pairs(self) -> dict[str, str]:
        """`caption_negatives` as word (lower case) -> replacement."""
        pairs = {}
        for item in comma_separated(self.caption_negatives):
            word, equals, replacement = (part.strip() for part in item.partition("="))
            if not equals or not word or " " in word:
                raise ValueError(
                    f"caption_negatives: {item!r} is not a `word=replacement` pair (one word; the replacement may be "
                    "empty to drop the word)"
                )
            pairs[word.lower()] = replacement
        return pairs

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def changes_since(self, earlier: dict, ignore: frozenset[str] = frozenset()) -> list[str]:
        """`field old -> new` for each field (outside `ignore`) that differs from `earlier`, a config saved as JSON.
        A field `earlier` lacks was added to TrainConfig since, with a default that keeps the old behaviour: it
        counts as that default, so a round saved before the field existed still resumes (or is reused)."""
        now, defaults = json.loads(self.to_json()), json.loads(TrainConfig().to_json())
        return [
            f"{name} {earlier.get(name, defaults[name])!r} -> {value!r}"
            for name, value in now.items()
            if name not in ignore and earlier.get(name, defaults[name]) != value
        ]


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal after each field), as cleanrl/tyro read them."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_types(cls: type = TrainConfig) -> dict[str, Any]:
    return get_type_hints(cls)


def coerce(name: str, value: Any, cls: type = TrainConfig) -> Any:
    """Convert a preset or command-line value to the field's type, with an error naming the field."""
    kind = field_types(cls)[name]
    choices = get_args(kind)
    try:
        if choices:
            if value not in choices:
                raise ValueError(f"choose one of {list(choices)}")
            return value
        if kind is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return value.lower() in ("true", "1", "yes")
        return kind(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"config field {name!r}: bad value {value!r} ({error})") from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`field=value` strings (as `dopsd demo --set` takes them) -> TrainConfig overrides of the field's type."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in known:
            raise ValueError(
                f"bad override {pair!r}: expected FIELD=VALUE with FIELD a config field (dopsd train --help)"
            )
        overrides[name] = coerce(name, value)
    return overrides


def parse_dataclass_args(cls: type, argv: list[str], description: str) -> Any:
    """A `--field-name value` option per field of the dataclass `cls`, its docstring as help; values coerced."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        parser.add_argument(f"--{field.name.replace('_', '-')}", default=field.default, help=docs.get(field.name, ""))
    values = vars(parser.parse_args(argv))
    return cls(**{name: coerce(name, value, cls) for name, value in values.items()})


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ValueError(f"preset {name_or_path!r} not found; presets: {', '.join(preset_names())}")
    values = tomllib.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"preset {path}: unknown field(s) {unknown}")
    return values


def make_config(preset: str | None = None, **overrides: Any) -> TrainConfig:
    """Defaults <- preset <- overrides (None values in overrides are ignored)."""
    values = load_preset(preset) if preset else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**{k: coerce(k, v) for k, v in values.items()})
