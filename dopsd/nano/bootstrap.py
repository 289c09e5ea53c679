"""Bootstrap of the nano model: VAE, the teacher's vision tower, pretraining, then step distillation to 4 steps
(from the teacher's straight paths, then at the student's own states).

Each stage is one resumable loop (`run_stage`) that checkpoints every few hundred steps into the work folder,
so a long CPU run can be stopped and continued by a later session. The finished model is a plain ZImagePipeline
folder with its Qwen3-VL teacher encoder.

Pretraining mixes two contexts: the caption alone (the student's) and [reference image + caption] through the
Qwen3-VL encoder (the teacher's). The reference is the same content at other positions (`relayout`), never the
target itself, so an image-conditioned model must still follow its own noise; and the world draws shapes,
colours and textures that captions never name, so the image has to carry what the words cannot. The vision
tower learns to see the world first, on its own, and stays frozen while the transformer learns to read it, as
Z-Image's Qwen3-VL would arrive pretrained.
"""

from __future__ import annotations

import copy
import itertools
import json
import platform
import shutil
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ModelMixin
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from dopsd.models.tiny import TEACHER_ENCODER_FOLDER
from dopsd.models.zimage import ZImageModel
from dopsd.nano.model import NANO_CAPTION_TOKENS, NANO_RESOLUTION, build_nano_pipeline
from dopsd.nano.packs import write_landing_folder
from dopsd.nano.scenes import TASKS, TRAINING_LEADS, SceneSampler
from dopsd.nano.world import COLOURS, SHAPES, SIZES, TEXTURES, Scene, Vocabulary, relayout, render
from dopsd.sampling import euler_sample


@dataclass
class BootstrapConfig:
    workdir: str = "runs/nano-bootstrap"
    """Checkpoints and the model being built."""
    seed: int = 0
    """Seed of initialisation and data."""
    threads: int = 2
    """CPU threads for torch."""
    device: str = ""
    """Where to train: cuda, cpu (empty: cuda when one is available)."""
    checkpoint_every: int = 200
    """Steps between checkpoints of every stage."""
    compile: bool = True
    """Compile the transformer's repeated blocks (diffusers' regional `torch.compile`) for pretraining and
    distillation. On 2 CPU cores a pretraining step took 1.42 s instead of 1.78 s, after ~95 s of compiling at
    the start of each sitting."""
    vae_steps: int = 4000
    """VAE training steps. The first layout's 8x VAE, read back by the detector on round trips of 200 held-out
    renders: shape 77% at 1000 steps, 94% at 3200, 96% at 4000 (colour and texture 99.8%)."""
    vae_batch: int = 32
    """VAE batch size."""
    vae_lr: float = 1e-3
    """VAE learning rate."""
    vae_kl: float = 1e-6
    """Weight of the KL term (small: the latents only need to be smooth enough to model)."""
    vision_steps: int = 3000
    """Steps of the teacher's vision tower learning to see the world before pretraining. Shape read by the heads
    from held-out renders' tokens: 0.76 at 1000 steps, 0.97 at 3000 (star 1.00; colour 1.00, texture 0.999)."""
    vision_batch: int = 64
    """Vision batch size (images)."""
    vision_lr: float = 1e-3
    """Vision learning rate."""
    pretrain_steps: int = 20000
    """Flow-matching pretraining steps."""
    pretrain_batch: int = 64
    """Pretraining batch size."""
    pretrain_lr: float = 1e-3
    """Pretraining learning rate (of the transformer; the vision tower stays as its stage left it). On the
    word-learning diagnostic (one object, centres on the grid, batch 64) 1e-3 made samples show the named shape
    0.29 of the time at step 500, where 3e-4 reached 0.15 (and 0.23 at step 1000)."""
    pretrain_decay_steps: int = 2000
    """Final pretraining steps over which the learning rate falls linearly to zero."""
    pool_size: int = 8192
    """Pretraining items kept encoded in memory."""
    pool_refresh: int = 8
    """Pool items replaced by fresh ones each step."""
    data_workers: int = 0
    """Worker processes preparing pretraining batches on their CPU (rendering, the VL processor, the frozen
    encoders), each with its own share of the pool and its own stream. 0: prepared in the training process on its
    device, as the committed base was. On an H200 with 16 cores, 14 workers took a batch of 64 from 0.33 s a step
    to 0.12 s (8.1 steps/s; 2 CPU cores: ~1 s); `benchmarks/pretrain_step_cost.py`."""
    task_weights: tuple[float, ...] | None = None
    """Relative frequency of each GenEval task family (single_object, two_object, counting, colors, position,
    color_attr) among the task scenes of pretraining and distillation (half their items; the rest are free
    scenes). None: equal. Continuing the finished pretraining with position weighted up (4x, or alone) did not
    teach position (0.17 -> 0.20 at 32 steps; `benchmarks/nano_task_mix.py`)."""
    image_context_prob: float = 0.5
    """Share of pretraining samples conditioned on [reference image + caption] instead of the caption."""
    caption_dropout: float = 0.1
    """Share of caption-only pretraining samples given the empty prompt instead, so that the model also learns
    the unconditional velocity that classifier-free guidance extrapolates from."""
    distill_steps: int = 2000
    """Distillation steps. At the defaults the stage draws ~6000 teacher endpoints (`teacher_pairs`, then one batch
    every `refresh_every` steps) and learns each ~20 times, at random student states."""
    distill_batch: int = 64
    """Distillation batch size."""
    distill_lr: float = 1e-4
    """Distillation learning rate."""
    distill_decay_steps: int = 500
    """Final distillation steps over which the learning rate falls linearly to zero."""
    teacher_steps: int = 32
    """Euler steps of the undistilled teacher whose endpoints the 4-step student learns."""
    guidance: float = 3.0
    """Classifier-free guidance of the undistilled model's sampler (ZImagePipeline's guidance_scale): its
    endpoints teach the 4-step student, which then samples without guidance, as Z-Image-Turbo does; the base
    report and probes score the undistilled model with it."""
    teacher_pairs: int = 2048
    """Teacher endpoints kept for distillation."""
    refresh_every: int = 32
    """Distillation steps between two fresh batches of teacher endpoints. A batch of 64 endpoints (32 steps, with
    guidance) took 23.5 s on 2 CPU cores, where a student step takes ~1.3 s: refreshing every 8 steps would make
    the stage ~3x slower, every 32 ~1.5x."""
    distill_on_policy_steps: int = 320
    """Steps of distillation continued at the student's own 4-step states (`distill_on_policy`). The straight-line
    student kept its first guess at its own Euler states (x0 error 0.50 at sigmas .9 to .5, against 0.05-0.01 on the
    line; `benchmarks/distill_state_error.py`). 320 on-policy steps (3016 s on 2 CPU cores) lifted GenEval-nano at 4
    steps 0.484 -> 0.512 and the 4-step teacher's star premise 0.698 -> 0.729, where 1400 more straight-line steps
    had given 0.470; 640 gave 0.500 (data/nano/bootstrap/README.md, item 14)."""
    distill_on_policy_lr: float = 1e-4
    """On-policy distillation learning rate."""
    distill_on_policy_decay_steps: int = 100
    """Final on-policy steps over which the learning rate falls linearly to zero."""
    curate_distill: bool = False
    """Keep a straight-line teacher endpoint of a GenEval-family caption only where the judge finds it right, as
    `curate_on_policy` does for the on-policy examples (free captions are always kept). The straight-line student
    then scored GenEval-nano 0.520 at 4 steps against 0.484, but after the curated on-policy stage 0.545 against
    0.556, within the prompts' draw (data/nano/bootstrap/README.md, item 16): off by default."""
    curate_on_policy: bool = True
    """Keep an on-policy example of a GenEval-family caption only where the teacher's endpoint from its state draws
    the caption right (judged by the nano detector and the GenEval rules; free captions are always kept). The
    teacher gets about four in ten family captions wrong, and uncurated the student learned those drawings too.
    Curated, the 320 steps scored GenEval-nano 0.556 at 4 steps against 0.509 uncurated on the same machine, every
    task family higher (data/nano/bootstrap/README.md, item 15)."""
    rollout_draws: int = 4
    """Batches of the student's rollouts kept as on-policy examples (each item gives one per student step: 1024
    examples at the defaults)."""
    rollout_refresh_every: int = 8
    """On-policy steps between two fresh batches of rollouts by the current student. A batch of 64 rollouts with
    the teacher's endpoints from their 256 states took ~60 s on 2 CPU cores, a student step ~1.8 s: the refreshes
    are most of the stage's time, and what keeps its examples the current student's."""

    @classmethod
    def from_workdir(cls, workdir: str | Path, **overrides) -> BootstrapConfig:
        """The config the bootstrap in `workdir` ran with (its config.json), with `overrides` (workdir is always
        `workdir`, so a copied work folder reads as itself)."""
        saved_config = Path(workdir) / "config.json"
        if not saved_config.is_file():
            raise FileNotFoundError(f"{workdir}: no config.json there, so not a bootstrap work folder")
        saved = json.loads(saved_config.read_text())
        if saved.get("task_weights") is not None:
            saved["task_weights"] = tuple(saved["task_weights"])
        return cls(**{**saved, "workdir": str(workdir), **overrides})

    @property
    def model_dir(self) -> Path:
        return Path(self.workdir) / "model"

    def stage_dir(self, stage: str) -> Path:
        """The folder of a stage's newest checkpoint."""
        return Path(self.workdir) / "checkpoints" / stage

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device) if self.device else default_device()


def stage_progress(config: BootstrapConfig, stage: str) -> dict:
    """A stage's newest checkpoint's `step` and `seconds` (summed over sittings); empty when it has none."""
    progress = config.stage_dir(stage) / "step.json"
    return json.loads(progress.read_text()) if progress.is_file() else {}


def sitting_seed(config: BootstrapConfig, stage: str, offset: int) -> np.random.SeedSequence:
    """The seed of a stage's world stream for this sitting: `config.seed + offset`, and the step the stage resumes
    at. The checkpoint keeps the noise generator but not the stream (its pool holds thousands of latents), so a
    stream seeded as at step 0 showed every sitting of a stage resumed over several sessions the first sitting's
    scenes again. A first sitting draws as before, as the committed base's stages did."""
    step = stage_progress(config, stage).get("step", 0)
    return np.random.SeedSequence(config.seed + offset if step == 0 else [config.seed + offset, step])


def learning_rate(lr: float, step: int, steps: int, decay_steps: int, warmup_steps: int = 200) -> float:
    """Linear warm-up, constant, then a linear decay to zero over the final `decay_steps`. Only the decay depends
    on the total, so a long run can be extended (or cut short) while it is still at the constant rate."""
    scale = min(1.0, (step + 1) / warmup_steps)
    if decay_steps:
        scale = min(scale, (steps - step) / decay_steps)
    return lr * scale


def run_stage(
    name: str,
    config: BootstrapConfig,
    modules: dict[str, torch.nn.Module],
    steps: int,
    lr: float,
    loss_fn: Callable[[torch.Generator], torch.Tensor],
    log: Callable[[str], None] = print,
    decay_steps: int = 0,
) -> None:
    """The one training loop of every stage: AdamW over `modules`, resumable from its newest checkpoint."""
    folder = config.stage_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    progress_so_far = stage_progress(config, name)
    step, seconds = progress_so_far.get("step", 0), progress_so_far.get("seconds", 0.0)
    if progress_so_far:
        for key, module in modules.items():
            module.load_state_dict(load_file(str(folder / f"{key}.safetensors")))
        state = torch.load(folder / "state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        log(f"{name}: resuming at step {step}")
    start, losses = time.time(), []
    progress = tqdm(total=steps, initial=step, desc=name, mininterval=10)
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(lr, step, steps, decay_steps)
        loss = loss_fn(generator)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{name}: loss {loss.item()} at step {step + 1}; last checkpoint kept in {folder}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss.item())
        progress.update(1)
        if step % config.checkpoint_every == 0 or step == steps:
            for key, module in modules.items():
                save_file(
                    {k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / f"{key}.safetensors")
                )
            torch.save({"optimizer": optimizer.state_dict(), "generator": generator.get_state()}, folder / "state.pt")
            # Training time summed over every sitting, so a stage resumed across sessions reports its whole cost.
            total = round(seconds + time.time() - start)
            (folder / "step.json").write_text(json.dumps({"step": step, "seconds": total}))
            rate = len(losses) / (time.time() - start)
            log(f"{name}: step {step}/{steps} loss {np.mean(losses[-50:]):.4f} ({rate:.2f} steps/s)")
    progress.close()


def task_probabilities(weights: tuple[float, ...]) -> np.ndarray:
    """Relative weights of the GenEval task families (in `TASKS` order) as probabilities."""
    probs = np.asarray(weights, dtype=np.float64)
    if probs.shape != (len(TASKS),) or (probs < 0).any() or probs.sum() <= 0:
        raise ValueError(
            f"task weights must be {len(TASKS)} non-negative numbers, not all zero ({', '.join(TASKS)}); got {weights}"
        )
    return probs / probs.sum()


class WorldStream:
    """Training items drawn on the fly: GenEval-family scenes (half) and free scenes with free captions (half),
    with training phrasing only ("a photo of" is kept for held-out prompts). `task_weights` (one per family of
    `TASKS`, relative) sets how often each family's scenes are drawn; equal by default."""

    def __init__(self, seed: int | np.random.SeedSequence, task_weights: tuple[float, ...] | None = None):
        self.rng = np.random.default_rng(seed)
        self.sampler = SceneSampler(Vocabulary(), self.rng)
        self.task_probs = None if task_weights is None else task_probabilities(task_weights)

    def batch(self, size: int) -> list[tuple[Scene, str]]:
        return [(scene, caption) for scene, caption, _ in self.labelled_batch(size)]

    def labelled_batch(self, size: int) -> list[tuple[Scene, str, dict | None]]:
        """`batch`'s items, each with the GenEval record of its caption (None for a free scene's caption), by which
        a drawing of the caption can be judged."""
        items: list[tuple[Scene, str, dict | None]] = []
        for _ in range(size):
            if self.rng.random() < 0.5:
                # Equal weights draw as the committed base and reports did (one integer per item).
                if self.task_probs is None:
                    task = int(self.rng.integers(len(TASKS)))
                else:
                    task = int(self.rng.choice(len(TASKS), p=self.task_probs))
                item = self.sampler.sample(TASKS[task])
                lead = TRAINING_LEADS[int(self.rng.integers(len(TRAINING_LEADS)))]
                caption = item.caption.replace("a photo of ", lead, 1)
                items.append((item.scene, caption, {**item.metadata, "prompt": caption}))
            else:
                scene = self.sampler.random_scene()
                items.append((scene, self.sampler.describe(scene), None))
        return items

    def reference(self, scene: Scene) -> Image.Image:
        return render(relayout(scene, self.rng))


def write_world_replay(folder: str | Path, images: int = 64, task_weights: tuple[float, ...] | None = None) -> Path:
    """Base-world renders with training captions (never the held-out prompts) as a landing folder: what a round
    replays to keep what the base draws. Always the same renders (one seed), so rounds that replay them agree;
    `task_weights` as `WorldStream`'s (its GenEval-family half). Written into a temporary sibling and renamed when
    complete: an existing folder is reused as is, so a render cut short must never be left under the final name."""
    folder = Path(folder)
    if not folder.is_dir():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_landing_folder(partial, WorldStream(seed=777, task_weights=task_weights).batch(images), "world")
        partial.rename(folder)
    return folder


class LatentPool:
    """Training items with their encoded target latents, a few refreshed per step: rendering and VAE-encoding a
    whole batch every step would cost as much as the transformer's own step on a CPU."""

    def __init__(self, model: ZImageModel, stream: WorldStream, size: int, refresh: int):
        self.model, self.stream, self.refresh = model, stream, refresh
        self.items = stream.batch(size)
        self.latents = torch.cat([encode_targets(model, self.items[i : i + 256]) for i in range(0, size, 256)])

    def batch(self, size: int) -> tuple[list[tuple[Scene, str]], torch.Tensor]:
        rng = self.stream.rng
        fresh = rng.choice(len(self.items), self.refresh, replace=False)
        new_items = self.stream.batch(self.refresh)
        self.latents[torch.from_numpy(fresh)] = encode_targets(self.model, new_items)
        for index, item in zip(fresh.tolist(), new_items, strict=True):
            self.items[index] = item
        chosen = rng.choice(len(self.items), size, replace=False)
        return [self.items[i] for i in chosen.tolist()], self.latents[torch.from_numpy(chosen)]


def pixels(images: list[Image.Image]) -> torch.Tensor:
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def train_vae(config: BootstrapConfig, log: Callable[[str], None] = print) -> None:
    device = config.torch_device
    vae = AutoencoderKL.from_pretrained(config.model_dir / "vae").to(device)
    vae.train()
    stream = WorldStream(sitting_seed(config, "vae", 1))

    def loss_fn(generator: torch.Generator) -> torch.Tensor:
        x = pixels([render(scene) for scene, _ in stream.batch(config.vae_batch)]).to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        return F.mse_loss(recon, x) + config.vae_kl * posterior.kl().mean()

    run_stage("vae", config, {"vae": vae}, config.vae_steps, config.vae_lr, loss_fn, log)
    # Normalise latents to unit scale, as the pipeline expects: x_latent = (z - shift) * scale.
    vae.eval()
    with torch.no_grad():
        x = pixels([render(scene) for scene, _ in stream.batch(256)]).to(device)
        z = vae.encode(x).latent_dist.mode()
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(config.model_dir / "vae")
    log(f"vae: latent shift {float(z.mean()):.4f}, scale {float(1.0 / z.std()):.4f}")


class VisionHeads(torch.nn.Module):
    """Linear read-outs from each merged vision token of the object whose centre falls in the token's cell: its
    shape (or none), colour, texture and size."""

    def __init__(self, width: int):
        super().__init__()
        self.shape = torch.nn.Linear(width, len(SHAPES) + 1)
        self.colour = torch.nn.Linear(width, len(COLOURS))
        self.texture = torch.nn.Linear(width, len(TEXTURES))
        self.size = torch.nn.Linear(width, len(SIZES))

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        heads = (self.shape, self.colour, self.texture, self.size)
        losses = [F.cross_entropy(head(tokens), labels[:, k], ignore_index=-1) for k, head in enumerate(heads)]
        return torch.stack(losses).sum()


def cell_labels(scene: Scene, cell: int) -> torch.Tensor:
    """(cells, 4) labels in raster order of the `cell`-pixel grid: shape index + 1 (0: no object centre in the
    cell), colour, texture and size index (-1 where there is no object)."""
    side = scene.size // cell
    labels = torch.full((side * side, 4), -1, dtype=torch.long)
    labels[:, 0] = 0
    for obj in scene.objects:
        index = min(int(obj.y) // cell, side - 1) * side + min(int(obj.x) // cell, side - 1)
        attributes = (SHAPES.index(obj.shape) + 1, list(COLOURS).index(obj.colour), TEXTURES.index(obj.texture))
        labels[index] = torch.tensor([*attributes, list(SIZES).index(obj.size)])
    return labels


def train_vision(config: BootstrapConfig, log: Callable[[str], None] = print) -> None:
    """Teach the Qwen3-VL vision tower to see every shape, colour, texture and size the world draws, words or not,
    as a real VLM's tower arrives having seen far more than the diffusion model's captions name. Trained only
    through the diffusion loss, its image tokens carried colour and texture but not shape: a linear probe read
    an object's shape from them 24% of the time at pretraining step 5000 (10 shapes), no better than at init."""
    model = load_training_model(config)
    assert model.teacher_encoder is not None and model.teacher_processor is not None
    encoder, processor = model.teacher_encoder, model.teacher_processor
    vision = encoder.model.visual.train().requires_grad_(True)
    vision_config = encoder.config.vision_config
    heads = VisionHeads(vision_config.out_hidden_size).to(model.device)
    cell = vision_config.patch_size * vision_config.spatial_merge_size
    stream = WorldStream(sitting_seed(config, "vision", 4))

    def loss_fn(generator: torch.Generator) -> torch.Tensor:
        scenes = [stream.sampler.random_scene() for _ in range(config.vision_batch)]
        inputs = processor(images=[render(scene) for scene in scenes], return_tensors="pt")
        grid = inputs["image_grid_thw"].to(model.device)
        tokens = vision(inputs["pixel_values"].to(model.device, encoder.dtype), grid_thw=grid).pooler_output
        labels = torch.cat([cell_labels(scene, cell) for scene in scenes]).to(model.device)
        return heads.loss(tokens.float(), labels)

    run_stage("vision", config, {"vision": vision, "heads": heads}, config.vision_steps, config.vision_lr, loss_fn, log)
    encoder.save_pretrained(config.model_dir / TEACHER_ENCODER_FOLDER)


def shifted_sigmas(batch: int, generator: torch.Generator, shift: float = 3.0) -> torch.Tensor:
    """Logit-normal sigmas pushed toward noise by the scheduler's shift, matching where the sampler spends steps."""
    s = torch.sigmoid(torch.randn(batch, generator=generator))
    return shift * s / (1 + (shift - 1) * s)


def flow_matching_loss(
    model: ZImageModel, latents: torch.Tensor, contexts: list[dict[str, torch.Tensor]], generator: torch.Generator
) -> torch.Tensor:
    """Rectified flow: the velocity (noise - x0) at a shifted random sigma on the straight path from x0 to noise."""
    # Drawn on the CPU generator whatever the device, so a run resumes identically anywhere.
    noise = torch.randn(latents.shape, generator=generator).to(model.device)
    sigma = shifted_sigmas(len(latents), generator).to(model.device)
    s = sigma.view(-1, 1, 1, 1)
    return F.mse_loss(model.velocity((1 - s) * latents + s * noise, sigma, contexts), noise - latents)


def contexts_for(
    model: ZImageModel,
    items: list[tuple[Scene, str]],
    stream: WorldStream,
    image_prob: float,
    rng,
    caption_dropout: float = 0.0,
) -> list[dict[str, torch.Tensor]]:
    """Per sample: the caption alone (the empty prompt with probability `caption_dropout`), or [reference image +
    caption] through the VL encoder (its tower frozen: trained by its own stage)."""
    use_image = [bool(rng.random() < image_prob) for _ in items]
    contexts: list[dict[str, torch.Tensor]] = [{} for _ in items]
    text_idx = [i for i, u in enumerate(use_image) if not u]
    image_idx = [i for i, u in enumerate(use_image) if u]
    if text_idx:
        captions = ["" if rng.random() < caption_dropout else items[i][1] for i in text_idx]
        for i, c in zip(text_idx, model.encode_student(captions), strict=True):
            contexts[i] = c
    if image_idx:
        inputs = model.teacher_inputs(
            [items[i][1] for i in image_idx], [stream.reference(items[i][0]) for i in image_idx]
        )
        for i, feats in zip(image_idx, model.teacher_features(inputs), strict=True):
            contexts[i] = {"cap_feats": feats}
    return contexts


def encode_targets(model: ZImageModel, items: list[tuple[Scene, str]]) -> torch.Tensor:
    return model.to_latents([render(scene) for scene, _ in items], NANO_RESOLUTION, NANO_RESOLUTION)


def load_training_model(config: BootstrapConfig) -> ZImageModel:
    model = ZImageModel.load(str(config.model_dir), device=config.torch_device, max_caption_tokens=NANO_CAPTION_TOKENS)
    model.pipeline.transformer.train()
    return model


def compile_blocks(transformer: ModelMixin, config: BootstrapConfig) -> None:
    """Compile the repeated blocks in place (state-dict keys unchanged); dynamic, as caption lengths vary."""
    if config.compile:
        transformer.compile_repeated_blocks(dynamic=True)


def pretraining_batch(
    model: ZImageModel, pool: LatentPool, config: BootstrapConfig, size: int
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """A pretraining batch from the pool: its target latents and each item's context (caption, empty prompt, or
    [reference + caption])."""
    items, latents = pool.batch(size)
    stream = pool.stream
    return latents, contexts_for(model, items, stream, config.image_context_prob, stream.rng, config.caption_dropout)


class WorkerBatches(torch.utils.data.IterableDataset):
    """Endless pretraining batches made in a DataLoader worker, from the worker's own CPU copy of the model (its
    frozen encoders and VAE), its share of the pool and its own stream. A batch's caption features travel as one
    tensor and their lengths: one shared-memory handle instead of one per item."""

    def __init__(self, config: BootstrapConfig, size: int):
        self.config, self.size = config, size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        if worker is None:
            raise RuntimeError("WorkerBatches runs in DataLoader workers (data_workers > 0)")
        torch.set_num_threads(1)
        config = self.config
        model = ZImageModel.load(str(config.model_dir), max_caption_tokens=NANO_CAPTION_TOKENS)
        seed = sitting_seed(config, "pretrain", 2).spawn(worker.num_workers)[worker.id]
        stream = WorldStream(seed, config.task_weights)
        pool = LatentPool(model, stream, config.pool_size // worker.num_workers, config.pool_refresh)
        while True:
            latents, contexts = pretraining_batch(model, pool, config, self.size)
            features = [c["cap_feats"] for c in contexts]
            yield latents, torch.cat(features), torch.tensor([len(f) for f in features])


def pretraining_batches(
    model: ZImageModel, config: BootstrapConfig, size: int
) -> Generator[tuple[torch.Tensor, list[dict[str, torch.Tensor]]]]:
    """Endless pretraining batches on the model's device: from the training process's own pool (built now, so a bad
    task mix fails before training), or from `config.data_workers` worker processes (started now; `close()` stops
    them)."""
    if config.data_workers == 0:
        pool = LatentPool(
            model,
            WorldStream(sitting_seed(config, "pretrain", 2), config.task_weights),
            config.pool_size,
            config.pool_refresh,
        )
        return (pretraining_batch(model, pool, config, size) for _ in itertools.count())
    share = config.pool_size // config.data_workers
    if share < size:
        raise ValueError(
            f"pool_size {config.pool_size} over {config.data_workers} data workers leaves {share} items each, fewer "
            f"than a batch of {size}: raise pool_size to at least {size * config.data_workers}"
        )
    loader = torch.utils.data.DataLoader(
        WorkerBatches(config, size), batch_size=None, num_workers=config.data_workers, prefetch_factor=4
    )
    return (unpack_worker_batch(model, *packed) for packed in loader)


def unpack_worker_batch(
    model: ZImageModel, latents: torch.Tensor, features: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """A worker's batch on the model's device, one context per item."""
    return latents.to(model.device), [{"cap_feats": f} for f in features.to(model.device).split(lengths.tolist())]


def pretrain(config: BootstrapConfig, log: Callable[[str], None] = print) -> None:
    model = load_training_model(config)
    transformer = model.pipeline.transformer
    transformer.requires_grad_(True)
    compile_blocks(transformer, config)
    batches = pretraining_batches(model, config, config.pretrain_batch)

    def loss_fn(generator: torch.Generator) -> torch.Tensor:
        latents, contexts = next(batches)
        return flow_matching_loss(model, latents, contexts, generator)

    run_stage(
        "pretrain",
        config,
        {"transformer": transformer},
        config.pretrain_steps,
        config.pretrain_lr,
        loss_fn,
        log,
        config.pretrain_decay_steps,
    )
    save_model(model, config)


def distillation_inputs(
    model: ZImageModel, stream: WorldStream, config: BootstrapConfig, generator: torch.Generator
) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor, list[dict | None]]:
    """A batch of fresh world items as distillation meets them: their contexts (caption or [reference + caption]),
    a noise each, and each caption's GenEval record (None for a free caption)."""
    labelled = stream.labelled_batch(config.distill_batch)
    items = [(scene, caption) for scene, caption, _ in labelled]
    contexts = contexts_for(model, items, stream, config.image_context_prob, stream.rng)
    shape = (len(items), *model.latent_shape(NANO_RESOLUTION, NANO_RESOLUTION))
    return contexts, torch.randn(shape, generator=generator).to(model.device), [record for _, _, record in labelled]


@torch.no_grad()
def teacher_sample(
    model: ZImageModel,
    teacher: ModelMixin,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    contexts: list[dict[str, torch.Tensor]],
    guidance: float,
) -> torch.Tensor:
    """`euler_sample` with the frozen teacher's weights in place of the student's (same code)."""
    student, model.transformer = model.transformer, teacher
    try:
        return euler_sample(model, noise, sigmas, contexts, guidance)
    finally:
        model.transformer = student


Judge = Callable[[list[Image.Image], list[dict]], list[bool]]
"""Whether each image draws its GenEval record right (for the nano world: its detector and the GenEval rules,
`evaluation.nano.geneval_nano.rules_judge`)."""


def judged_right(
    judge: Judge | None, model: ZImageModel, targets: torch.Tensor, records: list[dict | None]
) -> list[int]:
    """Indices of the teacher endpoints to learn: those the judge finds right for their caption's GenEval record,
    and every free caption's (no record to judge by); all of them without a judge. The teacher gets about four in
    ten family captions wrong (a count, a colour, a place), and the student would learn those drawings too."""
    graded = {i: record for i, record in enumerate(records) if record is not None}
    if judge is None or not graded:
        return list(range(len(records)))
    verdicts = judge(model.to_images(targets[list(graded)]), list(graded.values()))
    wrong = {i for i, right in zip(graded, verdicts, strict=True) if not right}
    return [i for i in range(len(records)) if i not in wrong]


class TeacherPairs:
    """(context, noise, teacher endpoint) triples of the undistilled teacher, a batch of them replaced every
    `refresh_every` steps: a `teacher_steps`-step sample per training example would cost ~10x the student step.
    With a `judge`, only the endpoints it finds right (`judged_right`)."""

    def __init__(
        self,
        model: ZImageModel,
        teacher: ModelMixin,
        stream: WorldStream,
        config: BootstrapConfig,
        generator: torch.Generator,
        judge: Judge | None = None,
    ):
        self.model, self.teacher, self.stream, self.config, self.judge = model, teacher, stream, config, judge
        self.sigmas = model.schedule(config.teacher_steps, NANO_RESOLUTION, NANO_RESOLUTION)
        self.contexts: list[dict[str, torch.Tensor]] = []
        noise, targets = [], []
        while len(self.contexts) < config.teacher_pairs:
            contexts, n, t = self._draw(generator)
            self.contexts += contexts
            noise.append(n)
            targets.append(t)
        kept = config.teacher_pairs  # a curated draw keeps fewer than a batch: the last one overshoots
        self.contexts, self.noise, self.targets = (
            self.contexts[:kept],
            torch.cat(noise)[:kept],
            torch.cat(targets)[:kept],
        )
        self.step = 0

    @torch.no_grad()
    def _draw(self, generator) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor, torch.Tensor]:
        contexts, noise, records = distillation_inputs(self.model, self.stream, self.config, generator)
        target = teacher_sample(self.model, self.teacher, noise, self.sigmas, contexts, self.config.guidance)
        kept = judged_right(self.judge, self.model, target, records)
        index = torch.tensor(kept, dtype=torch.long)
        return [contexts[i] for i in kept], noise[index], target[index]

    def batch(self, generator) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor, torch.Tensor]:
        self.step += 1
        if self.step % self.config.refresh_every == 0:
            contexts, noise, target = self._draw(generator)
            slots = torch.randperm(len(self.contexts), generator=generator)[: len(contexts)]
            for slot, context in zip(slots.tolist(), contexts, strict=True):
                self.contexts[slot] = context
            self.noise[slots], self.targets[slots] = noise, target
        chosen = torch.randperm(len(self.contexts), generator=generator)[: self.config.distill_batch]
        return [self.contexts[i] for i in chosen.tolist()], self.noise[chosen], self.targets[chosen]


def distill(config: BootstrapConfig, log: Callable[[str], None] = print, judge: Judge | None = None) -> None:
    """Teach the 4-step schedule: at each of the student's states on the straight path between a noise and the
    undistilled teacher's `teacher_steps`-step sample from it, predict that sample; with `curate_distill`, only
    where `judge` finds that sample right."""
    require_judge(config, judge, "distill")
    model = load_training_model(config)
    transformer = model.pipeline.transformer
    teacher = undistilled_teacher(transformer, config)
    transformer.load_state_dict(teacher.state_dict())  # the student starts from it (or resumes from its checkpoint)
    transformer.requires_grad_(True)
    compile_blocks(transformer, config)
    compile_blocks(teacher, config)
    student_sigmas = model.schedule(4, NANO_RESOLUTION, NANO_RESOLUTION)[:-1]
    pairs = TeacherPairs(
        model,
        teacher,
        WorldStream(sitting_seed(config, "distill", 3), config.task_weights),
        config,
        torch.Generator().manual_seed(7),
        judge if config.curate_distill else None,
    )

    def loss_fn(generator: torch.Generator) -> torch.Tensor:
        contexts, noise, target = pairs.batch(generator)
        k = torch.randint(len(student_sigmas), (len(contexts),), generator=generator)
        sigma = student_sigmas[k].to(model.device)
        s = sigma.view(-1, 1, 1, 1)
        state = (1 - s) * target + s * noise
        return F.mse_loss(model.predicted_x0(state, sigma, contexts), target)

    run_stage(
        "distill",
        config,
        {"transformer": transformer},
        config.distill_steps,
        config.distill_lr,
        loss_fn,
        log,
        config.distill_decay_steps,
    )
    save_model(model, config)


class Rollouts(NamedTuple):
    """A batch of the student's rollouts as examples, one per (item, student step), step-major."""

    contexts: list[dict[str, torch.Tensor]]
    states: torch.Tensor
    sigmas: torch.Tensor
    targets: torch.Tensor
    """The undistilled teacher's endpoint from each state."""


class RolloutTargets:
    """(context, state, sigma, teacher endpoint) examples at the student's own 4-step states, from fresh noise; the
    examples of `rollout_draws` batches kept, one batch replaced every `rollout_refresh_every` steps by the current
    student's rollouts. With a `judge`, only the examples whose teacher endpoint it finds right (`judged_right`)."""

    def __init__(
        self,
        model: ZImageModel,
        teacher: ModelMixin,
        config: BootstrapConfig,
        generator: torch.Generator,
        judge: Judge | None = None,
    ):
        self.model, self.teacher, self.config, self.judge = model, teacher, config, judge
        # Apart from the straight-line stage's stream.
        self.stream = WorldStream(sitting_seed(config, "distill_on_policy", 4), config.task_weights)
        self.student_sigmas = model.schedule(4, NANO_RESOLUTION, NANO_RESOLUTION)
        self.teacher_sigmas = model.schedule(config.teacher_steps, NANO_RESOLUTION, NANO_RESOLUTION)
        self.draws = [self._draw(generator) for _ in range(config.rollout_draws)]
        self.step = 0

    @torch.no_grad()
    def _draw(self, generator: torch.Generator) -> Rollouts:
        contexts, x, records = distillation_inputs(self.model, self.stream, self.config, generator)
        states, sigmas, targets = [], [], []
        for sigma, sigma_next in zip(self.student_sigmas[:-1].tolist(), self.student_sigmas[1:].tolist(), strict=True):
            # The teacher finishes from the student's state on its own grid, from that sigma down.
            remaining = torch.cat([torch.tensor([sigma]), self.teacher_sigmas[self.teacher_sigmas < sigma]])
            t = torch.full((len(contexts),), sigma, device=x.device)
            states.append(x)
            sigmas.append(t)
            targets.append(teacher_sample(self.model, self.teacher, x, remaining, contexts, self.config.guidance))
            x = x + (sigma_next - sigma) * self.model.velocity(x, t, contexts)
        every = Rollouts(contexts * len(states), torch.cat(states), torch.cat(sigmas), torch.cat(targets))
        kept = judged_right(self.judge, self.model, every.targets, records * len(states))
        index = torch.tensor(kept, dtype=torch.long)
        return Rollouts(
            [every.contexts[i] for i in kept], every.states[index], every.sigmas[index], every.targets[index]
        )

    def batch(self, generator: torch.Generator) -> Rollouts:
        self.step += 1
        if self.step % self.config.rollout_refresh_every == 0:
            self.draws[int(torch.randint(len(self.draws), (1,), generator=generator))] = self._draw(generator)
        contexts = [c for draw in self.draws for c in draw.contexts]
        states = torch.cat([draw.states for draw in self.draws])
        sigmas = torch.cat([draw.sigmas for draw in self.draws])
        targets = torch.cat([draw.targets for draw in self.draws])
        chosen = torch.randperm(len(contexts), generator=generator)[: self.config.distill_batch]
        return Rollouts([contexts[i] for i in chosen.tolist()], states[chosen], sigmas[chosen], targets[chosen])


CURATION_FLAGS = {"distill": "curate_distill", "distill_on_policy": "curate_on_policy"}
"""The config flag by which each distillation stage keeps only the teacher endpoints its judge finds right."""


def require_judge(config: BootstrapConfig, judge: Judge | None, stage: str) -> None:
    """Refuse a curated distillation stage without the judge of its teacher's endpoints."""
    flag = CURATION_FLAGS.get(stage)
    if flag and getattr(config, flag) and judge is None:
        raise ValueError(
            f"{flag} needs a judge of the teacher's endpoints (dopsd nano bootstrap passes the nano detector's "
            f"rules_judge); set {flag}=False to distil every endpoint"
        )


def distill_on_policy(config: BootstrapConfig, log: Callable[[str], None] = print, judge: Judge | None = None) -> None:
    """Continue distillation where the student goes: at each state of its own 4-step rollout from fresh noise
    (detached, as D-OPSD rolls out), predict the undistilled teacher's endpoint from that very state, so the later
    steps learn to finish the student's own guesses as the teacher would; with `curate_on_policy`, only where
    `judge` finds that endpoint right."""
    require_judge(config, judge, "distill_on_policy")
    model = load_training_model(config)
    transformer = model.pipeline.transformer
    teacher = undistilled_teacher(transformer, config)
    transformer.load_state_dict(checkpoint_transformer(config, "distill"))  # or resumes from its own checkpoint
    transformer.requires_grad_(True)
    compile_blocks(transformer, config)
    compile_blocks(teacher, config)
    examples = RolloutTargets(
        model, teacher, config, torch.Generator().manual_seed(11), judge if config.curate_on_policy else None
    )

    def loss_fn(generator: torch.Generator) -> torch.Tensor:
        contexts, state, sigma, target = examples.batch(generator)
        return F.mse_loss(model.predicted_x0(state, sigma, contexts), target)

    run_stage(
        "distill_on_policy",
        config,
        {"transformer": transformer},
        config.distill_on_policy_steps,
        config.distill_on_policy_lr,
        loss_fn,
        log,
        config.distill_on_policy_decay_steps,
    )
    save_model(model, config)


def checkpoint_transformer(config: BootstrapConfig, stage: str) -> dict[str, torch.Tensor]:
    """The transformer weights of `stage`'s newest checkpoint, which the stages after it start from."""
    weights = config.stage_dir(stage) / "transformer.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: the later stages need the {stage} stage's checkpoint; run it first")
    return load_file(str(weights))


def undistilled_teacher(transformer: ModelMixin, config: BootstrapConfig) -> ModelMixin:
    """A frozen copy of `transformer` with the pretraining stage's weights. From its checkpoint, not the model
    folder: once distillation has finished the folder holds the distilled weights, and a distillation extended to
    more steps must still learn the undistilled sampler."""
    teacher = copy.deepcopy(transformer).eval().requires_grad_(False)
    teacher.load_state_dict(checkpoint_transformer(config, "pretrain"))
    return teacher


def save_model(model: ZImageModel, config: BootstrapConfig) -> None:
    assert model.teacher_encoder is not None
    model.pipeline.transformer.eval()
    model.pipeline.save_pretrained(config.model_dir)
    model.teacher_encoder.save_pretrained(config.model_dir / TEACHER_ENCODER_FOLDER)


Stage = Callable[[BootstrapConfig, Callable[[str], None]], None]

# In the order they build on each other: each stage starts from the previous one's result.
STAGE_FUNCTIONS: dict[str, Stage] = {
    "vae": train_vae,
    "vision": train_vision,
    "pretrain": pretrain,
    "distill": distill,
    "distill_on_policy": distill_on_policy,
}
STAGES = tuple(STAGE_FUNCTIONS)


def bootstrap(
    config: BootstrapConfig,
    stages: tuple[str, ...] | None = None,
    log: Callable[[str], None] = print,
    judge: Judge | None = None,
) -> Path:
    """Run every stage in order, skipping finished ones; stages named explicitly run even when finished, from
    their newest checkpoint (raise their step count to train them further). A stage that runs makes the later ones
    stale: they are run again from scratch, their checkpoints set aside in `checkpoints/superseded/`. `judge`: the
    distillation stages' curation (`curate_distill`, `curate_on_policy`). Returns the model folder."""
    stage_functions: dict[str, Stage] = {
        **STAGE_FUNCTIONS,
        "distill": partial(distill, judge=judge),
        "distill_on_policy": partial(distill_on_policy, judge=judge),
    }
    torch.set_num_threads(config.threads)
    done_file = Path(config.workdir) / "done.json"
    done: dict[str, dict] = json.loads(done_file.read_text()) if done_file.is_file() else {}
    for stage in stages or tuple(s for s in STAGES if s not in done):
        require_judge(config, judge, stage)  # before the stages ahead of it spend hours
    if not (config.model_dir / "model_index.json").is_file():
        build_nano_pipeline(config.model_dir, seed=config.seed)
    (Path(config.workdir) / "config.json").write_text(json.dumps(asdict(config), indent=2))
    for stage in stages or STAGES:
        if stages is None and stage in done:
            continue
        stage_functions[stage](config, log)
        done[stage] = {
            "seconds": stage_progress(config, stage).get("seconds"),
            "machine": machine_description(config.torch_device, config.threads),
        }
        for later in STAGES[STAGES.index(stage) + 1 :]:
            # Built on what this stage just changed: to be run again from scratch, not resumed from its checkpoint.
            done.pop(later, None)
            stale = config.stage_dir(later)
            if stale.is_dir():
                superseded = stale.parent / "superseded" / later
                shutil.rmtree(superseded, ignore_errors=True)
                superseded.parent.mkdir(exist_ok=True)
                stale.replace(superseded)
                log(f"{later}: checkpoint moved to {superseded} (built on the {stage} stage just trained)")
        done_file.write_text(json.dumps(done, indent=2))
        log(f"{stage}: finished in {done[stage]['seconds']} s")
    return config.model_dir


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine_description(device: torch.device, threads: int) -> str:
    """The hardware a run's figures were measured on."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} torch threads"
    return f"{device_name}; {platform.processor() or platform.machine()}; torch {torch.__version__}"


def export(config: BootstrapConfig, destination: str | Path) -> Path:
    """Copy the built model (safetensors and configs only) to `destination`."""
    destination = Path(destination)
    shutil.rmtree(destination, ignore_errors=True)
    shutil.copytree(config.model_dir, destination)
    return destination
