"""Where a nano pretraining step spends its time, per batch size and number of data workers: the time a step waits
for its data (pool refresh, references rendered, captions and [reference + caption] encoded) and the whole step
(data, flow-matching loss, backward, AdamW). `--profile` then lists the operators of one step without its data.

Measured (stop 36; 2 warm-up then 8 timed steps per row, from the committed base):

    NVIDIA H200, 16 cores, torch 2.11.0+cu130, 8 torch threads
    (--batches 64,256,1024 --workers 14,0 --steps 8 --device cuda --profile):
    | batch | workers | first batch s | data wait s/step | step s/step | steps/s | samples/s |
    | 64    | 14      | 5.0           | 0.013            | 0.123       | 8.11    | 519       |
    | 256   | 14      | 7.0           | 0.004            | 0.345       | 2.90    | 742       |
    | 1024  | 14      | 25.7          | 0.009            | 1.109       | 0.90    | 923       |
    | 64    | 0       | 6.2           | 0.224            | 0.329       | 3.04    | 195       |
    | 256   | 0       | 2.5           | 0.743            | 1.061       | 0.94    | 241       |
    | 1024  | 0       | 8.7           | 2.479            | 3.540       | 0.28    | 289       |
    2 CPU cores, torch 2.14.1 (stop 35, data timed apart from the step; --device cpu --threads 2):
    | 64    | 0       |               | 0.189            | 1.058       | 0.95    | 61        |
    | 256   | 0       |               | 0.511            | 6.263       | 0.16    | 41        |

Prepared in the training process, the data is two thirds of a GPU step; 14 worker processes hide it (the wait falls
to ~0.01 s), 2.7-3.2x the samples/s. What is left still grows with the batch: in the profile of one batch-1024 step
the GPU was busy 0.245 s of the host's 1.9 s, in 38899 kernel launches, 22380 `arange` and 3057 `meshgrid` calls
(three per item): the Z-Image transformer builds each item's patches and position ids in a Python loop
(diffusers' `patchify_and_embed`). At 8 steps/s the committed 20000-step pretraining would take ~41 minutes on an
H200.

    .venv/bin/python benchmarks/pretrain_step_cost.py --batches 8,32 --workers 0,2 --device cpu
    python benchmarks/pretrain_step_cost.py --batches 64,256,1024 --workers 14,0 --device cuda --profile   # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from dopsd.nano.bootstrap import (
    BootstrapConfig,
    flow_matching_loss,
    load_training_model,
    machine_description,
    pretraining_batches,
)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="data/nano/bootstrap", help="A bootstrap work folder (its model).")
    parser.add_argument("--batches", default="64,256", help="Batch sizes, comma-separated.")
    parser.add_argument("--workers", default="0", help="Data worker processes to try (0: in the training process).")
    parser.add_argument("--steps", type=int, default=8, help="Timed steps per row (after 2 warm-up steps).")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="Then profile one step without its data.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = BootstrapConfig.from_workdir(args.workdir, device=args.device, compile=False)
    device = config.torch_device
    model = load_training_model(config)
    transformer = model.pipeline.transformer.requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)

    def train_step(latents: torch.Tensor, contexts: list[dict[str, torch.Tensor]]) -> None:
        flow_matching_loss(model, latents, contexts, generator).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    print(machine_description(device, args.threads))
    print("| batch | workers | first batch s | data wait s/step | step s/step | steps/s | samples/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for workers in [int(w) for w in args.workers.split(",")]:
        for batch in [int(b) for b in args.batches.split(",")]:
            # Each worker keeps its own share of the pool, which must hold a batch twice over.
            pool_size = max(2 * batch, 512) * max(workers, 1)
            row_config = dataclasses.replace(config, data_workers=workers, pool_size=pool_size)
            start = time.perf_counter()
            batches = pretraining_batches(model, row_config, batch)
            first = next(batches)
            first_seconds = time.perf_counter() - start
            waited = 0.0
            for step in range(2 + args.steps):
                if step == 2:
                    synchronize(device)
                    start, waited = time.perf_counter(), 0.0
                data_start = time.perf_counter()
                latents, contexts = first if step == 0 else next(batches)
                waited += time.perf_counter() - data_start
                train_step(latents, contexts)
            synchronize(device)
            seconds = (time.perf_counter() - start) / args.steps
            batches.close()  # stops the workers
            rate = 1 / seconds
            print(
                f"| {batch} | {workers} | {first_seconds:.1f} | {waited / args.steps:.3f} | {seconds:.3f} | "
                f"{rate:.2f} | {rate * batch:.0f} |",
                flush=True,
            )
    if args.profile:
        # Where the step's own time goes (the operators called most, by the host's time in them).
        with torch.profiler.profile() as profile:
            train_step(*first)
            synchronize(device)
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
