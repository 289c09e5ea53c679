"""One fine-tuning round: the training loop (accelerate), its cache, its checkpoints.

Everything that can fail on bad input (data folders, model, LoRA targets, resolution, the adapter to start from)
is checked before the first step. Contexts and latents are computed once per sample and cached on disk: the
teacher's VLM encoding is the expensive part, and a resumed round reuses them. A checkpoint holds everything needed
to continue exactly: both adapters, the learnt words, the optimizer, the step, and the random generators.

A round that learns words (`learn_words`) encodes the drawn captions that name them afresh each step instead (any other
caption's context is the cached one, bit for bit): their contexts enter the loss as leaves, and what the loss sends them
is carried back through the text encoder into the words once the roll-out is done (`carry_into_words`), so the per-step
backwards of the roll-out stay as they are.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from dopsd import adapters
from dopsd.config import TrainConfig, comma_separated
from dopsd.data import DatasetError, Example, caption_negatives, read_dataset
from dopsd.models import Context, FewStepModel, load_model
from dopsd.objective import TeacherKind, dopsd_loss, sample_training_sigmas, sft_loss
from dopsd.words import (
    IMAGE_START,
    WORD_EMBEDDINGS,
    WordEmbeddings,
    holds_words,
    salient_token_mean,
    save_words,
    spells_any,
    word_token_ids,
)

MetricsCallback = Callable[[int, dict[str, float]], None]
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
FRESH_ADAPTER = "adapter-fresh"
"""Under init_adapter_fused: the round's own LoRA, trained over the fused init_adapter (adapter/ holds their sum)."""
ROUND_CONFIG = "config.json"
"""The round's config, beside its checkpoints: what a resume must match."""
METRICS_LOG = "metrics.jsonl"
"""The round's logged metrics, one JSON object per logged step ({"step", "loss", "grad_norm"}), kept beside the
adapter so a round's curve can be read (and compared across seeds) after the process is gone."""
RUN_CONTROL_FIELDS = frozenset({"steps", "checkpoint_every", "keep_checkpoints", "log_every", "gradient_checkpointing"})
"""Fields a resumed round may change: how long it runs and how it saves and logs, not what it learns."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


ROLES = ("student", "teacher")
"""Whose contexts a sample cache holds."""


@dataclass
class SampleCache:
    """Per-sample tensors computed once: student and teacher contexts and target latents. The teacher's list may be
    shorter than the others: it holds the first samples, those that the round's teacher teaches."""

    student: list[Context]
    teacher: list[Context]
    latents: torch.Tensor

    def save(self, path: Path) -> None:
        flat = {"latents": self.latents.contiguous()}
        for role, contexts in zip(ROLES, (self.student, self.teacher), strict=True):
            for i, context in enumerate(contexts):
                flat.update({f"{role}.{i}.{k}": v.contiguous().cpu() for k, v in context.items()})
        save_file(flat, str(path))

    @classmethod
    def load(cls, path: Path, device: torch.device) -> SampleCache:
        flat = {k: v.to(device) for k, v in load_file(str(path)).items()}
        # Every sample has a student context; the teacher's covers the samples it teaches (see build_cache).
        counts = {role: len({k.split(".")[1] for k in flat if k.startswith(f"{role}.")}) for role in ROLES}
        contexts: dict[str, list[Context]] = {role: [{} for _ in range(n)] for role, n in counts.items()}
        for key, value in flat.items():
            if key != "latents":
                role, index, name = key.split(".", 2)
                contexts[role][int(index)][name] = value
        return cls(contexts["student"], contexts["teacher"], flat["latents"])


def build_model(config: TrainConfig, device: torch.device) -> FewStepModel:
    dtype = torch.bfloat16 if config.weights_dtype == "bfloat16" else torch.float32
    layers = tuple(int(x) for x in comma_separated(config.text_encoder_layers))
    return load_model(
        config.model,
        config.family,
        device=device,
        dtype=dtype,
        teacher_encoder=config.teacher_encoder,
        max_caption_tokens=config.max_caption_tokens,
        text_encoder_layers=layers,
    )


def cache_path(config: TrainConfig, examples: list[Example]) -> Path:
    """Where this data's encodings live: keyed by what they depend on, so changed data is encoded afresh."""
    key = [
        config.model,
        config.teacher_encoder,
        config.method,
        config.replay_teacher,
        config.resolution,
        config.max_caption_tokens,
    ]
    for e in examples:
        stat = e.image_path.stat()
        key.append((e.image_path.name, stat.st_size, stat.st_mtime_ns, e.caption))
    if config.learn_words:
        # So do the learnt words' starts, for the contexts the round does not encode afresh (the previous weights').
        key.append(config.learn_words)
    if config.init_adapter and holds_words(config.init_adapter):
        # The starting adapter's words change the captions' contexts.
        key.append(hashlib.sha256((Path(config.init_adapter) / WORD_EMBEDDINGS).read_bytes()).hexdigest())
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    return Path(config.output) / "cache" / f"{config.method}-{digest}.safetensors"


def build_cache(
    model: FewStepModel, config: TrainConfig, examples: list[Example], taught: int, device: torch.device
) -> SampleCache:
    """Encode every sample once (reused when it exists: a resumed round skips the encoders). The image context
    is encoded only for the first `taught` samples, those the round's teacher teaches (the starting weights read the
    captions of the others alone)."""
    path = cache_path(config, examples)
    if path.is_file():
        return SampleCache.load(path, device)
    student, teacher, latents = [], [], []
    for i, example in enumerate(tqdm(examples, desc="encoding samples", leave=False)):
        image = example.load_image()
        student += model.encode_student([example.caption])
        if config.method == "dopsd" and i < taught:
            teacher += model.encode_teacher([example.caption], [image])
        latents.append(model.to_latents([image], config.resolution, config.resolution))
    cache = SampleCache(student, teacher, torch.cat(latents))
    path.parent.mkdir(parents=True, exist_ok=True)
    cache.save(path)
    return cache


def read_replay(config: TrainConfig) -> list[Example]:
    """The replay examples (none when the round replays nothing), checked like the data, with the settings that
    need them."""
    if not 0 <= config.replay_ratio < 1:
        raise ValueError(f"replay_ratio must be in [0, 1), got {config.replay_ratio}")
    if bool(config.replay_data) != (config.replay_ratio > 0):
        raise ValueError(
            f"replay_data ({config.replay_data!r}) and replay_ratio ({config.replay_ratio}) go together: "
            "give a replay folder and a ratio above 0, or neither"
        )
    replay = [example for folder in config.replay_folders() for example in read_dataset(folder)]
    if config.replay_teacher == "previous" and not (config.method == "dopsd" and replay):
        raise ValueError(
            "replay_teacher=previous distils the replayed samples from the weights the round starts from: it needs "
            f"method=dopsd (got {config.method}) and replay data"
        )
    return replay


def read_negatives(config: TrainConfig, examples: list[Example]) -> list[Example]:
    """The data's caption negatives (none unless asked for), with the settings that need them."""
    pairs = config.negative_pairs()
    if not 0 <= config.negative_ratio < 1 or config.replay_ratio + config.negative_ratio >= 1:
        raise ValueError(
            f"negative_ratio must be in [0, 1) and below 1 added to replay_ratio ({config.replay_ratio}), "
            f"got {config.negative_ratio}"
        )
    if bool(pairs) != (config.negative_ratio > 0):
        raise ValueError(
            f"caption_negatives ({config.caption_negatives!r}) and negative_ratio ({config.negative_ratio}) go "
            "together: give word pairs and a ratio above 0, or neither"
        )
    if pairs and config.method != "dopsd":
        raise ValueError(
            "caption negatives are distilled from the weights the round starts from: they need method=dopsd "
            f"(got {config.method})"
        )
    negatives = caption_negatives(examples, pairs)
    if pairs and not negatives:
        raise DatasetError(
            f"data folder {config.data}: no caption names {', '.join(sorted(pairs))}, so caption_negatives makes no "
            "sample; give the words the data's captions teach"
        )
    return negatives


def draw_batch(
    n_data: int, sources: Sequence[tuple[int, float]], batch_size: int, generator: torch.Generator
) -> list[int]:
    """Indices into the sample pool [data..., then each source's samples in turn]: the data's first. A source of
    (size, ratio) gets floor(batch_size * ratio) samples plus one more with the probability of the remainder, so a
    batch of 1 still draws it at its rate on average; should those extras overflow a small batch, the later sources
    give theirs up. The data fill the rest."""
    counts: list[int] = []
    for _, ratio in sources:
        count = math.floor(batch_size * ratio)
        remainder = batch_size * ratio - count
        # A source without a remainder draws nothing extra: the data order stays that of rounds without it.
        if remainder > 0 and float(torch.rand((), generator=generator)) < remainder:
            count += 1
        counts.append(min(count, batch_size - sum(counts)))
    index = torch.randint(n_data, (batch_size - sum(counts),), generator=generator).tolist()
    start = n_data
    for (size, _), count in zip(sources, counts, strict=True):
        if count:
            index += (start + torch.randint(size, (count,), generator=generator)).tolist()
        start += size
    return index


def read_init_adapter(folder: str) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        return adapters.read_adapter(folder)
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"init_adapter: {error}; give the adapter/ folder a round wrote") from error


def fuse_init_adapter(transformer: torch.nn.Module, folder: str, targets: list[str]) -> None:
    """Fuse the saved adapter into the base weights (init_adapter_fused), once its targets are checked to be this
    round's: the two adapters are summed when the round ends, which needs the same layers."""
    _, saved = read_init_adapter(folder)
    if sorted(saved.get("target_modules") or []) != sorted(targets):
        raise ValueError(
            f"init_adapter {folder} adapts {sorted(saved.get('target_modules') or [])}, this round {sorted(targets)}: "
            "a fused init_adapter needs this round's targets, so that the two adapters sum into one"
        )
    adapters.fuse_adapter(transformer, folder)


def init_lora(config: TrainConfig) -> bool:
    """Whether the round starts from a saved LoRA: init_adapter holds one (it may hold only words). A round without a
    LoRA of its own cannot carry one on."""
    if not config.init_adapter:
        return False
    adapters.check_adapter_folder(config.init_adapter)
    if not adapters.holds_lora(config.init_adapter):
        return False
    if config.lora_rank == 0:
        raise ValueError(
            f"init_adapter {config.init_adapter} holds a LoRA, and a round with lora_rank 0 would drop it: give the "
            "round a LoRA (its rank, alpha and targets)"
        )
    return True


def attach_words(
    model: FewStepModel, config: TrainConfig, examples: list[Example]
) -> tuple[WordEmbeddings | None, list[WordEmbeddings]]:
    """The round's learnt words (None unless learn_words) and every word embedding attached: the starting adapter's
    first (frozen, as they were), then the round's, which start from what the encoder reads for their start word, or
    from the teacher's view of the data's images that name them (`IMAGE_START`)."""
    attached = []
    embedding, tokenizer = model.pipeline.text_encoder.get_input_embeddings(), model.pipeline.tokenizer
    if config.init_adapter and holds_words(config.init_adapter):
        starting = WordEmbeddings.load(config.init_adapter, embedding, tokenizer)
        starting.vectors.requires_grad_(False)
        attached.append(starting)
    words = config.words_to_learn()
    if not words:
        return None, attached
    ids = word_token_ids(tokenizer, list(words))
    start_ids = word_token_ids(tokenizer, [start for start in words.values() if start != IMAGE_START])
    starts = []
    for word, start in words.items():
        if start == IMAGE_START:
            starts.append(image_start(model, word, ids[word], examples))
        else:
            with torch.no_grad():  # through the hooks: a starting adapter's word starts as that adapter left it
                starts.append(embedding(torch.tensor([start_ids[start]], device=embedding.weight.device))[0].float())
    learnt = WordEmbeddings(embedding, ids, torch.stack(starts))
    attached.append(learnt)
    return learnt, attached


def image_start(model: FewStepModel, word: str, token_id: int, examples: list[Example]) -> torch.Tensor:
    """A word's start from the data's images whose captions name it, as the teacher's vision encoder sees them."""
    naming = [e for e in examples if spells_any(model.pipeline.tokenizer, e.caption, [token_id])]
    if not naming:
        raise ValueError(
            f"learn_words {word}={IMAGE_START}: no caption of the data names {word!r}, no image to start from"
        )
    weight = model.pipeline.text_encoder.get_input_embeddings().weight
    norm = float(weight.detach().float().norm(dim=-1).median())
    try:
        return salient_token_mean(model.vision_tokens([e.load_image() for e in naming]), norm).to(weight.device)
    except ValueError as error:
        raise ValueError(f"learn_words {word}={IMAGE_START}: {error}") from None


def carry_into_words(encoded: list[Context], leaves: list[Context]) -> None:
    """Backward from the contexts the loss was given (`leaves`, detached copies of `encoded`) through the text
    encoder into the learnt words."""
    pairs = [
        (e[k], leaf[k].grad) for e, leaf in zip(encoded, leaves, strict=True) for k in e if leaf[k].grad is not None
    ]
    if pairs:
        torch.autograd.backward([tensor for tensor, _ in pairs], [grad for _, grad in pairs])


def load_init_adapter(transformer: torch.nn.Module, folder: str) -> None:
    """Start every adapter (student, teacher, previous) from a saved one, once its LoRA layout is checked to be this
    round's."""
    weights, saved = read_init_adapter(folder)
    ours = adapters.adapter_metadata(transformer, adapters.STUDENT)
    layout = {
        "rank": (saved.get("r"), ours["r"]),
        "alpha": (saved.get("lora_alpha"), ours["lora_alpha"]),
        "targets": (sorted(saved.get("target_modules") or []), sorted(ours["target_modules"])),
    }
    mismatched = [f"{name} {theirs} (this round: {mine})" for name, (theirs, mine) in layout.items() if theirs != mine]
    if mismatched:
        raise ValueError(f"init_adapter {folder} does not fit this round's LoRA: it has {'; '.join(mismatched)}")
    # diffusers files prefix every key with the pipeline component the LoRA belongs to.
    state = {key.removeprefix("transformer."): value for key, value in weights.items()}
    for name in adapters.adapter_names(transformer):
        adapters.load_adapter_state(transformer, name, state)


def check_resumable(output: Path, config: TrainConfig) -> None:
    """A round resumes only the run that wrote its checkpoints: resuming another recipe from them would mix two runs
    and label the result with the second's config."""
    saved = output / ROUND_CONFIG
    if not checkpoint_dirs(output) or not saved.is_file():
        return
    changed = config.changes_since(json.loads(saved.read_text()), ignore=RUN_CONTROL_FIELDS)
    if changed:
        raise ValueError(
            f"{output} holds checkpoints of a round with another config ({'; '.join(changed)}): run it unchanged to "
            "resume it, or give this one another output folder"
        )


def checkpoint_dirs(output: Path) -> list[Path]:
    complete = [p for p in (output / CHECKPOINTS).glob("step-*") if p.name[len("step-") :].isdigit()]
    return sorted(complete, key=lambda p: int(p.name[len("step-") :]))


def trained_adapters(transformer: torch.nn.Module) -> tuple[str, ...]:
    """The LoRA adapters a checkpoint holds: student and teacher, or none in a round that learns only words."""
    return (adapters.STUDENT, adapters.TEACHER) if adapters.adapter_names(transformer) else ()


def save_checkpoint(
    accelerator: Accelerator,
    output: Path,
    step: int,
    transformer,
    words: WordEmbeddings | None,
    optimizer,
    generators: dict,
    keep: int,
) -> None:
    """Write step-N into a temp folder, renamed when complete, then drop all but the newest `keep`.
    Adapters and optimizer are the same on every process; each process adds its own random generators."""
    final = output / CHECKPOINTS / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in trained_adapters(transformer):
            save_file(adapters.adapter_state_dict(transformer, name), str(tmp / f"{name}.safetensors"))
        if words is not None:
            save_words(tmp, [words])
        # Plain tensors and numbers: torch.load(weights_only=True) reads them back without unpickling code.
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "step.json").write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()
    rng = {k: g.get_state() for k, g in generators.items()}
    torch.save(rng, tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(output)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def keep_logged_until(output: Path, step: int) -> None:
    """Drop the metrics logged after `step`: a resumed round trains those steps again and logs them anew. A line torn
    by a crash mid-write goes too."""
    log = output / METRICS_LOG
    if not log.is_file():
        return
    kept = []
    for line in log.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    log.write_text("".join(kept))


def load_checkpoint(
    accelerator: Accelerator, folder: Path, transformer, words: WordEmbeddings | None, optimizer, generators: dict
) -> int:
    for name in trained_adapters(transformer):
        adapters.load_adapter_state(transformer, name, load_file(str(folder / f"{name}.safetensors")))
    if words is not None:
        words.set_vectors(load_file(str(folder / WORD_EMBEDDINGS)))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    rng = torch.load(folder / f"rng-{accelerator.process_index}.pt", weights_only=True)
    for key, generator in generators.items():
        generator.set_state(rng[key])
    return int(json.loads((folder / "step.json").read_text())["step"])


def first_caption_taught(config: TrainConfig, n_data: int, n_replay: int) -> int:
    """Where, in the sample pool [data..., replay..., caption negatives...], the samples taught by the starting
    weights from the caption begin: at the replay under replay_teacher=previous, else at the caption negatives. The
    round's teacher teaches those before, seeing the image."""
    return n_data if config.replay_teacher == "previous" else n_data + n_replay


def teachers_of(
    config: TrainConfig, cache: SampleCache, index: list[int], taught: int
) -> tuple[list[TeacherKind], list[Context]]:
    """Each drawn sample's teacher and its context: the round's teacher with the image context for the first `taught`
    samples of the pool, the starting weights with the caption for the rest (`first_caption_taught`)."""
    previous = [i >= taught for i in index]
    teachers: list[TeacherKind] = ["previous" if p else config.teacher for p in previous]
    contexts = [cache.student[i] if p else cache.teacher[i] for i, p in zip(index, previous, strict=True)]
    return teachers, contexts


def rollout_sigmas(model: FewStepModel, config: TrainConfig) -> torch.Tensor:
    if config.rollout == "model":
        return model.schedule(config.rollout_steps, config.resolution, config.resolution)
    return torch.tensor(config.sigmas_list())


def train(config: TrainConfig, on_metrics: MetricsCallback | None = None) -> Path:
    """Run (or resume) a round; returns the folder of the final student adapter (diffusers LoRA format)."""
    # A process may run several rounds (flows, tests): each gets its own precision setting, while the
    # distributed process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    output = Path(config.output)
    check_resumable(output, config)
    device = accelerator.device
    examples = read_dataset(config.data)  # every data problem surfaces before a model is loaded
    replay = read_replay(config)
    negatives = read_negatives(config, examples)
    pool = examples + replay + negatives
    taught = first_caption_taught(config, len(examples), len(replay))
    if config.anchor_layout > 0 and (config.method != "dopsd" or taught == len(pool)):
        raise ValueError(
            "anchor_layout holds the samples taught by the starting weights from the caption at the top roll-out "
            "states: it needs method=dopsd and such samples (replay_data with replay_teacher=previous, or "
            f"caption_negatives); got method={config.method} and {len(pool) - taught} such samples"
        )
    if config.top_state_means > 0 and config.method != "dopsd":
        raise ValueError(
            f"top_state_means is a loss toward the D-OPSD teacher: it needs method=dopsd, got {config.method}"
        )
    model = build_model(config, device)
    model.check_resolution(config.resolution, config.resolution)
    transformer = model.pipeline.transformer
    targets = config.targets_list() or list(model.default_lora_targets)
    starts_from_lora = init_lora(config)
    if starts_from_lora and config.init_adapter_fused:
        fuse_init_adapter(transformer, config.init_adapter, targets)
    torch.manual_seed(config.seed)  # LoRA A init: identical on every process
    if config.lora_rank > 0:
        adapters.add_student_teacher(
            transformer,
            config.lora_rank,
            config.lora_alpha,
            targets,
            with_previous=taught < len(pool),
        )
    if starts_from_lora and not config.init_adapter_fused:
        load_init_adapter(transformer, config.init_adapter)
    # Attached before the cache is built: the cached contexts (the caption-only teacher's) read the words as the round
    # starts, with the starting adapter's.
    words, attached_words = attach_words(model, config, examples)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    lora_params = [p for p in transformer.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": lora_params}] if lora_params else []
    if words is not None:
        groups.append({"params": [words.vectors], "lr": config.word_lr})
    trainable = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay
    )
    if lora_params:
        model.transformer, optimizer = accelerator.prepare(transformer, optimizer)
    else:
        # Nothing of the transformer learns: no distributed wrapper for it (the words' gradients are reduced by hand).
        optimizer = accelerator.prepare(optimizer)
    pairs = adapters.adapter_pairs(transformer)

    with accelerator.main_process_first():
        cache = build_cache(model, config, pool, taught, device)
    names_learnt = [words is not None and words.named_in(model.pipeline.tokenizer, e.caption) for e in pool]
    if device.type == "cuda":
        # Everything the round needs from the encoders is cached (but the text encoder's, when it learns words): give
        # their memory to the transformer.
        for module in model.encoder_modules():
            if words is None or module is not model.pipeline.text_encoder:
                module.to("cpu")
    sigmas = rollout_sigmas(model, config)
    rank_seed = config.seed * 1000 + accelerator.process_index
    generators = {
        "data": torch.Generator().manual_seed(rank_seed),
        "noise": torch.Generator().manual_seed(rank_seed + 1),
    }

    step = 0
    existing = checkpoint_dirs(output)
    if existing:
        step = load_checkpoint(accelerator, existing[-1], transformer, words, optimizer, generators)
        accelerator.print(f"resuming from {existing[-1]} (step {step})")
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / ROUND_CONFIG).write_text(config.to_json())
        keep_logged_until(output, step)

    def backward(loss: torch.Tensor, sync: bool) -> None:
        # Gradients are all-reduced once per optimizer step, on its last backward.
        context = contextlib.nullcontext() if sync else accelerator.no_sync(model.transformer)
        with context:
            accelerator.backward(loss)

    def backward_share(loss: torch.Tensor, last_rollout_step: bool, final_micro: bool) -> None:
        backward(loss / config.grad_accum, last_rollout_step and final_micro)

    progress = tqdm(
        total=config.steps,
        initial=step,
        desc=f"{config.method} round",
        disable=not accelerator.is_main_process,
    )
    while step < config.steps:
        step_loss = 0.0
        for micro in range(config.grad_accum):
            last_micro = micro == config.grad_accum - 1
            sources = [(len(replay), config.replay_ratio), (len(negatives), config.negative_ratio)]
            index = draw_batch(len(examples), sources, config.batch_size, generators["data"])
            latents = cache.latents[index]
            noise = torch.randn(latents.shape, generator=generators["noise"]).to(device)
            student = [cache.student[i] for i in index]
            # Only a caption naming a learnt word has a context that moves with the words: the cache holds the rest.
            naming = [p for p, i in enumerate(index) if names_learnt[i]]
            encoded = (
                model.encode_student([pool[index[p]].caption for p in naming], differentiable=True) if naming else []
            )
            for p, context in zip(naming, encoded, strict=True):
                student[p] = context
            if words is not None:
                # Every context a leaf, so that a batch naming no learnt word still has a loss to backward (with no
                # LoRA, nothing else of it learns).
                student = [{k: v.detach().requires_grad_() for k, v in c.items()} for c in student]
            with accelerator.autocast():
                if config.method == "dopsd":
                    teachers, teacher_contexts = teachers_of(config, cache, index, taught)
                    out = dopsd_loss(
                        model,
                        student,
                        teacher_contexts,
                        noise,
                        sigmas,
                        target=config.target,
                        teacher=teachers,
                        grad_steps=config.grad_steps,
                        loss_max_sigma=config.loss_max_sigma,
                        anchor_layout=config.anchor_layout,
                        anchor_min_sigma=config.anchor_min_sigma,
                        top_state_means=config.top_state_means,
                        teacher_guidance=config.teacher_guidance,
                        generator=generators["noise"],
                        backward=functools.partial(backward_share, final_micro=last_micro)
                        if config.backward_per_step
                        else None,
                    )
                    loss = out.loss
                else:
                    sigma = sample_training_sigmas(config.batch_size, generators["noise"], device)
                    loss = sft_loss(model, student, latents, noise, sigma)
            if config.method == "sft" or not config.backward_per_step:
                backward(loss / config.grad_accum, last_micro)
            carry_into_words(encoded, [student[p] for p in naming])
            step_loss += float(loss.detach()) / config.grad_accum
        if not math.isfinite(step_loss):
            kept = checkpoint_dirs(output)
            raise TrainingDiverged(
                f"loss became {step_loss} at step {step + 1}; the round stopped. Last good checkpoint: "
                f"{kept[-1] if kept else 'none (no checkpoint was written yet)'}. Lower --lr or check the data."
            )
        if words is not None and accelerator.num_processes > 1:
            # Every process joins the reduction, one whose captions named no learnt word with a zero gradient.
            grad = words.vectors.grad if words.vectors.grad is not None else torch.zeros_like(words.vectors)
            words.vectors.grad = accelerator.reduce(grad, reduction="mean")
        grad_norm = accelerator.clip_grad_norm_(trainable, config.grad_clip) if config.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        adapters.ema_update(pairs, config.ema_decay)
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}")
        if accelerator.is_main_process and (step % config.log_every == 0 or step == config.steps):
            metrics = {"loss": step_loss}
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            with (output / METRICS_LOG).open("a") as log:
                log.write(json.dumps({"step": step, **metrics}) + "\n")
            if on_metrics:
                on_metrics(step, metrics)
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_checkpoint(
                accelerator, output, step, transformer, words, optimizer, generators, config.keep_checkpoints
            )
    progress.close()
    accelerator.wait_for_everyone()
    adapter_dir = output / ADAPTER
    if accelerator.is_main_process and starts_from_lora and config.init_adapter_fused:
        fresh = adapters.save_adapter(model, adapters.STUDENT, output / FRESH_ADAPTER)
        adapters.compose_adapters([config.init_adapter, fresh], adapter_dir)
    elif accelerator.is_main_process and config.lora_rank > 0:
        adapters.save_adapter(model, adapters.STUDENT, adapter_dir)
    if accelerator.is_main_process and attached_words:
        save_words(adapter_dir, attached_words)
    accelerator.end_training()
    return adapter_dir
