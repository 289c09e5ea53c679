"""Where a nano pretraining step spends its time, per batch size: the data (pool refresh, references rendered,
captions and [reference + caption] encoded) and the whole step (data, flow-matching loss, backward, AdamW).

Measured (stop 35; 2 warm-up then 5 timed steps per row, from the committed base):

    NVIDIA H200, torch 2.11.0+cu130, 8 CPU threads (--batches 64,256,1024 --steps 5 --device cuda):
    | batch | data s/step | step s/step | steps/s | samples/s |
    | 64    | 0.240       | 0.381       | 2.63    | 168       |
    | 256   | 0.834       | 1.269       | 0.79    | 202       |
    | 1024  | 2.835       | 4.286       | 0.23    | 239       |
    2 CPU cores, torch 2.14.1 (--batches 64,256 --steps 5 --device cpu --threads 2):
    | 64    | 0.189       | 1.058       | 0.95    | 61        |
    | 256   | 0.511       | 6.263       | 0.16    | 41        |

On the GPU both parts grow with the batch: the cost is per item, not per step. Two thirds is the data (rendering
the references, the VL processor's per-image Python, the encoders), the rest mostly the Z-Image transformer's
per-item Python (it takes a list of latents), so a larger batch buys ~1.4x samples/s at 16x the batch. A
15-minute lease holds ~2000 pretraining steps (the CPU run took 20000): using a GPU for the nano bootstrap needs
the data prepared in worker processes first.

    .venv/bin/python benchmarks/pretrain_step_cost.py --batches 8,32 --device cpu
    python benchmarks/pretrain_step_cost.py --batches 64,256,1024 --device cuda      # on a GPU machine
"""

from __future__ import annotations

import argparse
import time

import torch

from dopsd.nano.bootstrap import (
    BootstrapConfig,
    LatentPool,
    WorldStream,
    flow_matching_loss,
    load_training_model,
    machine_description,
    pretraining_batch,
)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="data/nano/bootstrap", help="A bootstrap work folder (its model).")
    parser.add_argument("--batches", default="64,256", help="Batch sizes, comma-separated.")
    parser.add_argument("--steps", type=int, default=8, help="Timed steps per batch size (after 2 warm-up steps).")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = BootstrapConfig.from_workdir(args.workdir, device=args.device, compile=False)
    device = config.torch_device
    model = load_training_model(config)
    transformer = model.pipeline.transformer.requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-5)
    batches = [int(b) for b in args.batches.split(",")]
    stream = WorldStream(config.seed + 2, config.task_weights)
    pool = LatentPool(model, stream, max(max(batches) * 2, 512), config.pool_refresh)
    generator = torch.Generator().manual_seed(0)

    def data(batch: int):
        return pretraining_batch(model, pool, config, batch)

    def step(batch: int) -> None:
        latents, contexts = data(batch)
        flow_matching_loss(model, latents, contexts, generator).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    print(machine_description(device, args.threads))
    print("| batch | data s/step | step s/step | steps/s | samples/s |")
    print("| --- | --- | --- | --- | --- |")
    for batch in batches:
        timings = {}
        for name, fn in (("data", data), ("step", step)):
            for _ in range(2):
                fn(batch)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                fn(batch)
            synchronize(device)
            timings[name] = (time.perf_counter() - start) / args.steps
        rate = 1 / timings["step"]
        row = f"| {batch} | {timings['data']:.3f} | {timings['step']:.3f} | {rate:.2f} | {rate * batch:.0f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
