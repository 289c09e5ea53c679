"""Cost of one D-OPSD training step against one SFT step: same Z-Image model, batch and resolution.

What is measured, per variant, on a ZImageModel built in memory with random weights (the VAE and text encoders
are tiny stand-ins that a step never calls: latents and caption features are random tensors):

- forward: one `model.velocity` call, grad disabled, student adapter;
- SFT step: `sft_loss` forward + backward + AdamW step;
- D-OPSD step: `dopsd_loss` over K=4 fixed sigmas [1, .9, .75, .5, 0], one backward per roll-out step, then the
  AdamW step and the EMA update of the teacher adapter; with `--grad-steps N` also the variant that trains only N
  random roll-out states (the others are forward-only).

Each variant is warmed up, then run once untimed for peak memory, `--repeats` times for wall time (median), and
once under `torch.utils.flop_counter.FlopCounterMode` for its FLOPs (matmuls and attention, backward included).
Peak memory is `torch.cuda.max_memory_allocated` on CUDA (absolute: weights included), and on CPU the increase of
the process RSS over its value before the run (sampled by a thread with psutil, else ru_maxrss, which is the
process-wide high-water mark and only says something when it grows).

H100 anchor numbers (full config, LoRA r64, batch 1, 1024^2, bf16):
    forward 193 ms; SFT step 488 ms / 47.8 GB; D-OPSD step 2764 ms / 48.1 GB;
    with gradient checkpointing: SFT 703 ms / 15.1 GB, D-OPSD 3580 ms / 15.4 GB.
Targets: D-OPSD step <= 1.5 s without checkpointing; its peak memory within 1.05x of SFT's.

    .venv/bin/python benchmarks/step_cost.py --config tiny
    .venv/bin/python benchmarks/step_cost.py --config full --gradient-checkpointing --json out.json   # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import diffusers
import peft
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from transformers import Qwen3Config, Qwen3Model

from dopsd import adapters
from dopsd.models.tiny import TinyConfig
from dopsd.models.zimage import ZImageModel
from dopsd.objective import dopsd_loss, sample_training_sigmas, sft_loss

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is optional
    psutil = None

ROLLOUT_SIGMAS = [1.0, 0.9, 0.75, 0.5, 0.0]
EMA_DECAY = 0.9
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Preset:
    transformer: dict[str, Any]
    """ZImageTransformer2DModel keyword arguments ({} = its defaults: the full 6B Z-Image transformer)."""
    vae_channels: tuple[int, ...]
    """Block widths of the stand-in VAE: only its depth matters (downsampling 2 ** (len - 1))."""
    resolution: int
    caption_tokens: int
    """Student context length (prompt tokens)."""
    image_tokens: int
    """Extra teacher context tokens (the target image as the VLM encodes it)."""
    lora_rank: int
    dtype: str
    repeats: int
    warmup: int


def tiny_transformer(cfg: TinyConfig) -> dict[str, Any]:
    """The transformer `dopsd.models.tiny.build_tiny_zimage` builds for `cfg`."""
    head_dim = cfg.dim // cfg.heads
    axes = [head_dim - 2 * (head_dim * 3 // 8), head_dim * 3 // 8, head_dim * 3 // 8]
    return {
        "in_channels": cfg.latent_channels,
        "dim": cfg.dim,
        "n_layers": cfg.layers,
        "n_refiner_layers": 1,
        "n_heads": cfg.heads,
        "n_kv_heads": cfg.heads,
        "cap_feat_dim": cfg.text_hidden,
        "axes_dims": axes,
        "axes_lens": [256, 64, 64],
    }


SMALL = TinyConfig(dim=256, layers=4, heads=4, text_hidden=128)
PRESETS = {
    "tiny": Preset(tiny_transformer(TinyConfig()), TinyConfig().vae_channels, 32, 32, 32, 4, "float32", 10, 2),
    "small": Preset(tiny_transformer(SMALL), SMALL.vae_channels, 64, 64, 64, 4, "float32", 5, 1),
    # 256 caption tokens; the teacher fills ZImageModel's 1024-token cap with image tokens.
    "full": Preset({}, (8, 8, 8, 8), 1024, 256, 768, 64, "bfloat16", 5, 2),
}


# ----------------------------------------------------------------------------------------------------- model


def build_model(preset: Preset, device: torch.device, dtype: torch.dtype) -> ZImageModel:
    """A ZImageModel around a ZImagePipeline with a random transformer, built directly on `device`."""
    with torch.device(device):
        transformer = ZImageTransformer2DModel(**preset.transformer)
    if dtype != torch.float32:
        transformer.to(dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the float32 copy
    with torch.no_grad():  # diffusers leaves these as torch.empty (checkpoints always set them)
        transformer.x_pad_token.normal_(0, 0.02)
        transformer.cap_pad_token.normal_(0, 0.02)
    channels = int(transformer.config.in_channels)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(preset.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(preset.vae_channels),
        block_out_channels=preset.vae_channels,
        layers_per_block=1,
        latent_channels=channels,
        norm_num_groups=8,
    )
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=16,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            head_dim=16,
        )
    )
    pipeline = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,
        transformer=transformer,
    )
    return ZImageModel(pipeline, teacher_encoder=None, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- measurement


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def limit_malloc_caching() -> None:
    """Make glibc serve large blocks with mmap and give them back on free, so the RSS follows live tensors.
    (Its default threshold grows after each large free, and freed heap memory then stays in the RSS.)"""
    with contextlib.suppress(OSError, AttributeError):
        m_mmap_threshold = -3
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 256 << 10)


class RssSampler:
    """Peak RSS increase during a `with` block: psutil polled in a thread, else ru_maxrss."""

    method = "psutil RSS sampled every 2 ms" if psutil is not None else "ru_maxrss (process-wide high-water mark)"

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak_increase = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        if psutil is not None:
            return int(psutil.Process().memory_info().rss)
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def _poll(self, base: int) -> None:
        while not self._stop.wait(self.interval):
            self.peak_increase = max(self.peak_increase, self._rss() - base)

    def __enter__(self) -> RssSampler:
        self._base = self._rss()
        self._thread = threading.Thread(target=self._poll, args=(self._base,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_increase = max(self.peak_increase, self._rss() - self._base)


def peak_memory(step: Callable[[], None], device: torch.device) -> int:
    """Bytes: absolute peak allocated on CUDA, peak RSS increase on CPU."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    with RssSampler() as sampler:
        step()
    return sampler.peak_increase


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels only; the CPU flash kernel has the same cost.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def count_flops(step: Callable[[], None]) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        step()
    return int(counter.get_total_flops())


@dataclass
class Result:
    variant: str
    times_ms: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    flops: int = 0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def flop_rate(self) -> float:
        return self.flops / (self.median_ms / 1000)


def measure(name: str, step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> Result:
    for _ in range(warmup):
        step()
    result = Result(name)
    result.peak_bytes = peak_memory(step, device)
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        result.times_ms.append((time.perf_counter() - start) * 1000)
    result.flops = count_flops(step)
    print(f"  {name}: {result.median_ms:.1f} ms", file=sys.stderr, flush=True)
    return result


# --------------------------------------------------------------------------------------------------- report


def human(value: float, units: tuple[str, ...], base: float = 1000.0) -> str:
    for unit in units[:-1]:
        if abs(value) < base:
            return f"{value:.3g} {unit}"
        value /= base
    return f"{value:.3g} {units[-1]}"


def flops_text(flops: float) -> str:
    return human(flops, ("FLOP", "kFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP"))


def rate_text(rate: float) -> str:
    return human(rate / 1e9, ("GFLOP/s", "TFLOP/s", "PFLOP/s"))


def bytes_text(n: float) -> str:
    return human(n / 1e6, ("MB", "GB", "TB"))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; load {load})"


def report(args: argparse.Namespace, header: dict[str, str], results: list[Result], memory_note: str) -> str:
    lines = [
        "# D-OPSD vs SFT step cost",
        "",
        "`" + shlex.join([sys.executable, *sys.argv]) + "`",
        "",
        *[f"- {key}: {value}" for key, value in header.items()],
        "",
        f"| variant | time, median of {args.repeats} (min-max) | peak memory | FLOPs | FLOP rate |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        spread = f"({min(r.times_ms):.1f}-{max(r.times_ms):.1f})"
        lines.append(
            f"| {r.variant} | {r.median_ms:.1f} ms {spread} | {bytes_text(r.peak_bytes)} | {flops_text(r.flops)} "
            f"| {rate_text(r.flop_rate)} |"
        )
    lines += ["", f"Peak memory: {memory_note}.", ""]
    sft = next(r for r in results if r.variant == "SFT step")
    for r in results:
        if r.variant.startswith("D-OPSD"):
            lines.append(
                f"- {r.variant} / SFT step: time {r.median_ms / sft.median_ms:.2f}x, "
                f"peak memory {r.peak_bytes / max(sft.peak_bytes, 1):.2f}x, FLOPs {r.flops / sft.flops:.2f}x"
            )
    if args.config == "full":
        dopsd = next(r for r in results if r.variant == "D-OPSD step (K=4)")
        time_ok = "n/a with checkpointing" if args.gradient_checkpointing else dopsd.median_ms <= 1500
        memory_ok = dopsd.peak_bytes <= 1.05 * sft.peak_bytes
        lines.append(f"- targets: D-OPSD step <= 1.5 s: {time_ok}; D-OPSD peak memory <= 1.05x SFT: {memory_ok}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: per config)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, help="timed iterations, median reported (default: per config)")
    parser.add_argument("--warmup", type=int, help="untimed iterations first (default: per config)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: per config)")
    parser.add_argument(
        "--autocast",
        action=argparse.BooleanOptionalAction,
        help="run the step under torch.autocast in --dtype, as train.py's mixed precision does "
        "(default: on when --dtype is not float32)",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--grad-steps", type=int, default=0, help="also time dopsd_loss(grad_steps=N)")
    parser.add_argument("--lora-rank", type=int, help="default: 64 for full, 4 otherwise (alpha = 2 * rank)")
    parser.add_argument("--caption-tokens", type=int, help="student context length (default: per config)")
    parser.add_argument("--image-tokens", type=int, help="extra teacher context tokens (default: per config)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    preset = PRESETS[args.config]
    for name in ("resolution", "repeats", "warmup", "dtype", "lora_rank", "caption_tokens", "image_tokens"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
    if args.autocast is None:
        args.autocast = args.dtype != "float32"
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--repeats and --batch must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    preset = PRESETS[args.config]
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        limit_malloc_caching()
    torch.manual_seed(args.seed)
    print(f"building the {args.config} model on {device} ...", file=sys.stderr, flush=True)
    model = build_model(preset, device, dtype)
    model.check_resolution(args.resolution, args.resolution)
    transformer = model.pipeline.transformer
    adapters.add_student_teacher(transformer, args.lora_rank, 2.0 * args.lora_rank, model.default_lora_targets)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    pairs = adapters.adapter_pairs(transformer)

    # Random stand-ins for cached contexts and latents (what train.py's SampleCache holds).
    cap_dim = int(transformer.config.cap_feat_dim)
    student = [{"cap_feats": torch.randn(args.caption_tokens, cap_dim, device=device, dtype=dtype)}] * args.batch
    teacher_len = args.caption_tokens + args.image_tokens
    teacher = [{"cap_feats": torch.randn(teacher_len, cap_dim, device=device, dtype=dtype)}] * args.batch
    latents = torch.randn(args.batch, *model.latent_shape(args.resolution, args.resolution), device=device)
    noise = torch.randn_like(latents)
    sigmas = torch.tensor(ROLLOUT_SIGMAS)
    generator = torch.Generator().manual_seed(args.seed)

    def autocast() -> contextlib.AbstractContextManager:
        if not args.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def forward() -> None:
        with torch.no_grad(), autocast(), adapters.use_adapter(transformer, adapters.STUDENT):
            model.velocity(noise, torch.full((args.batch,), 0.75, device=device), student)

    def sft_step() -> None:
        with autocast():
            sigma = sample_training_sigmas(args.batch, generator, device)
            loss = sft_loss(model, student, latents, noise, sigma)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def dopsd_step(grad_steps: int) -> Callable[[], None]:
        def step() -> None:
            with autocast():
                dopsd_loss(
                    model,
                    student,
                    teacher,
                    noise,
                    sigmas,
                    grad_steps=grad_steps,
                    generator=generator,
                    backward=lambda loss, last: loss.backward(),
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            adapters.ema_update(pairs, EMA_DECAY)

        return step

    variants: list[tuple[str, Callable[[], None]]] = [
        ("forward (no grad)", forward),
        ("SFT step", sft_step),
        ("D-OPSD step (K=4)", dopsd_step(0)),
    ]
    if args.grad_steps:
        variants.append((f"D-OPSD step (K=4, grad_steps={args.grad_steps})", dopsd_step(args.grad_steps)))

    sft_step()  # creates the optimizer state, so no variant's memory includes it and all include it as baseline
    results = [measure(name, step, device, args.warmup, args.repeats) for name, step in variants]

    n_params = sum(p.numel() for n, p in transformer.named_parameters() if ".lora_" not in n)
    lora_dtype = trainable[0].dtype if trainable else None
    latent_shape = tuple(latents.shape[1:])
    image_seq = latent_shape[1] // 2 * latent_shape[2] // 2
    header = {
        "device": device_name(device),
        "versions": f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
        f"python {platform.python_version()}",
        "model": f"Z-Image transformer ({args.config}): dim {transformer.config.dim}, {transformer.config.n_layers} "
        f"layers, {transformer.config.n_heads} heads, {n_params / 1e6:.1f}M params, random weights, {args.dtype}",
        "training": f"LoRA rank {args.lora_rank} alpha {2 * args.lora_rank} on {', '.join(model.default_lora_targets)} "
        f"({sum(p.numel() for p in trainable) / 1e6:.2f}M trainable, {lora_dtype}); AdamW; autocast "
        f"{'on' if args.autocast else 'off'}; gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}",
        "inputs": f"batch {args.batch}, {args.resolution}x{args.resolution} (latents {latent_shape}, {image_seq} image "
        f"tokens); student context {args.caption_tokens} tokens, teacher context {teacher_len} tokens",
        "D-OPSD": f"roll-out sigmas {ROLLOUT_SIGMAS}, backward per roll-out step, EMA update after the optimizer",
        "timing": f"{args.warmup} warm-up, median of {args.repeats}; FLOPs from one untimed run (FlopCounterMode)",
    }
    memory_note = (
        "torch.cuda.max_memory_allocated over one untimed run (absolute, weights included; 1 GB = 1e9 bytes)"
        if device.type == "cuda"
        else f"increase of the process RSS during one untimed run over its value before it ({RssSampler.method}; "
        "weights and optimizer state are in the baseline)"
    )
    print(report(args, header, results, memory_note))
    if args.json:
        payload = {
            "command": shlex.join([sys.executable, *sys.argv]),
            "args": vars(args),
            "environment": header,
            "memory": memory_note,
            "results": [{**asdict(r), "median_ms": r.median_ms, "flop_rate": r.flop_rate} for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)


if __name__ == "__main__":
    main()
