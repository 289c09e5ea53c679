"""Student and teacher LoRA adapters on one transformer, the EMA that ties them, and their files.

Both adapters live side by side in the same PEFT layers. The active one is switched by `use_adapter` without
PEFT's `set_adapter`, which also flips `requires_grad` (it would make the teacher trainable and detach the
student between its forward and its backward).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LoraBaseMixin
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file

from dopsd.words import WORD_EMBEDDINGS, holds_words

STUDENT = "student"
TEACHER = "teacher"
PREVIOUS = "previous"
"""A frozen copy of the adapter a round starts from (B = 0, the base, when it starts from the base): the teacher of
replayed samples under replay_teacher=previous."""


def lora_config(rank: int, alpha: float, targets: Sequence[str]) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)


def check_targets(transformer: torch.nn.Module, targets: Sequence[str]) -> None:
    """Fail before training when a LoRA target names no linear layer of the transformer."""
    linear = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        parts = [n.split(".") for n in linear]
        examples = sorted({".".join(p[-2:]) if p[-1].isdigit() else p[-1] for p in parts})
        raise ValueError(
            f"LoRA target(s) {missing} match no linear layer of {type(transformer).__name__}; "
            f"module-name suffixes it has: {examples[:20]}"
        )


def add_student_teacher(
    transformer, rank: int, alpha: float, targets: Sequence[str], with_previous: bool = False
) -> None:
    """Add `student` (trainable) and `teacher` (frozen) LoRA adapters, both starting equal (B = 0: the base), and
    with `with_previous` a third frozen one, `previous`, equal to them too until a starting adapter is loaded."""
    check_targets(transformer, targets)
    config = lora_config(rank, alpha, targets)
    frozen = [TEACHER, PREVIOUS] if with_previous else [TEACHER]
    transformer.add_adapter(config, adapter_name=STUDENT)
    with warnings.catch_warnings():
        # More than one adapter on one model is the design here, not the accident PEFT warns about.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name in frozen:
            transformer.add_adapter(config, adapter_name=name)
    for name in frozen:
        set_peft_model_state_dict(transformer, get_peft_model_state_dict(transformer, adapter_name=STUDENT), name)
    # add_adapter activates (and makes trainable) the adapter it adds: only the student learns.
    for name, param in transformer.named_parameters():
        param.requires_grad_(f".{STUDENT}." in name)
        if any(f".{adapter}." in name for adapter in (STUDENT, *frozen)):
            # Adapters stay float32 on a bf16 base: optimizer steps and EMA updates below bf16's resolution
            # would otherwise be lost (the EMA teacher would never move).
            param.data = param.data.float()
    set_active_adapter(transformer, STUDENT)


def lora_layers(transformer: torch.nn.Module) -> list[BaseTunerLayer]:
    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


def set_active_adapter(transformer: torch.nn.Module, name: str | None) -> None:
    """Route every LoRA layer through adapter `name` (None: the base weights alone). Leaves requires_grad alone."""
    for layer in lora_layers(transformer):
        layer._active_adapter = [name] if name else []


def active_adapter(transformer: torch.nn.Module) -> str | None:
    layers = lora_layers(transformer)
    names = layers[0].active_adapters if layers else []
    return names[0] if names else None


@contextmanager
def use_adapter(transformer: torch.nn.Module, name: str | None) -> Iterator[None]:
    previous = active_adapter(transformer)
    set_active_adapter(transformer, name)
    try:
        yield
    finally:
        set_active_adapter(transformer, previous)


def adapter_pairs(transformer: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """(teacher, student) parameter pairs, matched by name."""
    params = dict(transformer.named_parameters())
    pairs = []
    for name, student in params.items():
        if f".{STUDENT}." in name:
            pairs.append((params[name.replace(f".{STUDENT}.", f".{TEACHER}.")], student))
    return pairs


@torch.no_grad()
def ema_update(pairs: Sequence[tuple[torch.nn.Parameter, torch.nn.Parameter]], decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student (nothing to do in a round without a LoRA)."""
    if not pairs:
        return
    teachers: list[torch.Tensor] = [t for t, _ in pairs]
    students = [s.detach().to(t.dtype) for t, s in pairs]
    torch._foreach_lerp_(teachers, students, 1.0 - decay)


def adapter_state_dict(transformer: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights under PEFT's adapter-free key names (what diffusers' LoRA files hold)."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(transformer, adapter_name=name).items()}


def load_adapter_state(transformer: torch.nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(transformer, state, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter state for {name!r} has keys the model lacks: {unexpected[:5]}")


def adapter_names(transformer: Any) -> list[str]:
    """The adapters on the transformer, in the order they were added."""
    return list(getattr(transformer, "peft_config", {}))


def adapter_metadata(transformer: Any, name: str) -> dict:
    """The LoRA config (rank, alpha, targets) stored beside the weights, so loaders rebuild it exactly."""
    return transformer.peft_config[name].to_dict()


def save_adapter(model, name: str, directory: str | Path) -> Path:
    """Write adapter `name` as a diffusers-format LoRA (`pytorch_lora_weights.safetensors`) in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    transformer = model.pipeline.transformer
    state = adapter_state_dict(transformer, name)
    model.save_lora(directory, state, _jsonable(adapter_metadata(transformer, name)))
    return directory


def _jsonable(config: dict) -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, set):
            value = sorted(value)
        if isinstance(value, (str, int, float, bool, list, dict)) or value is None:
            out[key] = value
    return out


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
"""The weights file of an adapter folder (diffusers' name: `pipe.load_lora_weights(folder)` finds it)."""


def read_adapter(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """An adapter folder's weights, keyed as in the file (with diffusers' `transformer.` prefix), and its LoRA config
    (PEFT's field names: the header's `transformer.` prefix stripped)."""
    path = Path(folder) / LORA_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no LoRA weights file (an adapter folder holds {LORA_WEIGHTS})")
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    weights = load_file(str(path))
    if LORA_ADAPTER_METADATA_KEY not in header:
        raise ValueError(f"{path}: no LoRA config ({LORA_ADAPTER_METADATA_KEY!r}) in the file's header")
    prefixed = json.loads(header[LORA_ADAPTER_METADATA_KEY])
    return weights, {key.split(".", 1)[1]: value for key, value in prefixed.items()}


def holds_lora(folder: str | Path) -> bool:
    return (Path(folder) / LORA_WEIGHTS).is_file()


def check_adapter_folder(folder: str | Path) -> None:
    """An adapter folder holds a LoRA, learnt words (`dopsd.words`), or both."""
    if not holds_lora(folder) and not holds_words(folder):
        raise FileNotFoundError(
            f"{folder}: not an adapter folder (it holds neither {LORA_WEIGHTS} nor {WORD_EMBEDDINGS}); give the "
            "adapter/ folder a round wrote"
        )


def load_lora_if_any(pipeline, folder: str | Path, adapter_name: str | None = None) -> bool:
    """Load an adapter folder's LoRA into the pipeline (under `adapter_name`), if it holds one: it may hold learnt
    words alone (attached with `dopsd.words.words_attached`). Whether it did."""
    check_adapter_folder(folder)
    if not holds_lora(folder):
        return False
    pipeline.load_lora_weights(str(folder), **({"adapter_name": adapter_name} if adapter_name else {}))
    return True


def adapter_digest(folder: str | Path) -> str:
    """SHA-256 of an adapter's weights, LoRA config and learnt words: the identity of what it does, not of its files'
    bytes. safetensors writes the header's metadata in an order that changes from process to process, so the same
    weights saved twice can differ byte for byte."""
    check_adapter_folder(folder)
    digest = hashlib.sha256()
    if holds_lora(folder):
        weights, config = read_adapter(folder)
        digest.update(json.dumps(config, sort_keys=True).encode())
        tensors = sorted(weights.items())
    else:
        tensors = []
    if holds_words(folder):
        tensors += [(f"word {word}", v) for word, v in sorted(load_file(str(Path(folder) / WORD_EMBEDDINGS)).items())]
    for key, tensor in tensors:
        tensor = tensor.contiguous()
        digest.update(f"{key} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_plain_lora(folder: str | Path, config: dict, use: str) -> None:
    """Only a plain LoRA's update is (alpha / r) B A in every layer; `use` says what needs that."""
    plain = not config.get("use_dora") and not config.get("use_rslora")
    if not plain or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{folder}: only plain LoRA {use} (no DoRA, rsLoRA or per-layer rank/alpha patterns)")


@torch.no_grad()
def fuse_adapter(transformer: torch.nn.Module, folder: str | Path) -> None:
    """Add a saved LoRA's update, (alpha / r) B A, into the weights of the linear layers it adapts, before any adapter
    is attached: the transformer then computes what the base with that adapter computed."""
    weights, config = read_adapter(folder)
    check_plain_lora(folder, config, "fuses")
    scale = float(config["lora_alpha"]) / int(config["r"])
    layers = dict(transformer.named_modules())
    for key, down in weights.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("transformer.").split(".lora_A.")[0]
        layer = layers.get(name)
        if not isinstance(layer, torch.nn.Linear):
            raise ValueError(f"{folder}: {name} is not a linear layer of {type(transformer).__name__}")
        up = weights[key.replace(".lora_A.", ".lora_B.")]
        layer.weight += (scale * up.float() @ down.float()).to(layer.weight.dtype)


def compose_adapters(folders: Sequence[str | Path], output: str | Path, weights: Sequence[float] | None = None) -> Path:
    """Write one LoRA whose update is the weighted sum of the adapters' updates: sum_i w_i (alpha_i / r_i) B_i A_i.

    The ranks stack (A's rows, B's columns) and alpha equals the stacked rank, so the file loads as an ordinary
    diffusers LoRA and a model that serves one adapter serves the composition unchanged.
    """
    if not folders:
        raise ValueError("no adapters to compose")
    weights = list(weights) if weights is not None else [1.0] * len(folders)
    if len(weights) != len(folders):
        raise ValueError(f"{len(weights)} weights for {len(folders)} adapters")
    parts = [read_adapter(folder) for folder in folders]
    first_keys = set(parts[0][0])
    for folder, (tensors, config) in zip(folders, parts, strict=True):
        if set(tensors) != first_keys:
            raise ValueError(f"{folder}: its LoRA covers other layers than {folders[0]}'s; only such adapters compose")
        check_plain_lora(folder, config, "composes")
    rank = sum(int(config["r"]) for _, config in parts)
    composed = {}
    for key in sorted(first_keys):
        if ".lora_A." in key:
            scales = [w * float(c["lora_alpha"]) / int(c["r"]) for w, (_, c) in zip(weights, parts, strict=True)]
            composed[key] = torch.cat([t[key].float() * s for s, (t, _) in zip(scales, parts, strict=True)], dim=0)
        else:
            composed[key] = torch.cat([t[key].float() for t, _ in parts], dim=1)
    config = {**parts[0][1], "r": rank, "lora_alpha": float(rank)}
    LoraBaseMixin.write_lora_layers(
        state_dict={key: value.contiguous() for key, value in composed.items()},
        save_directory=str(output),
        is_main_process=True,
        weight_name=LORA_WEIGHTS,
        save_function=None,
        safe_serialization=True,
        lora_adapter_metadata={f"transformer.{k}": v for k, v in config.items()},
    )
    return Path(output)
