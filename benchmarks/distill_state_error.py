"""Where the distilled nano student's error sits across its four sampling states.

Distillation (`dopsd.nano.bootstrap.distill`) teaches the 4-step student at points on the straight line between a
noise and the undistilled teacher's endpoint from it; when sampling, the student meets its own Euler states
instead. On fresh (context, noise, endpoint) triples of the undistilled teacher (its `teacher_steps`-step samples,
with its guidance) this measures, at each student sigma, the mean squared error in latent space of the student's
predicted x0 against the endpoint, at the straight-line state and at the student's own state, and how far apart
the two states are; then the error of the student's 4-step sample. A rollout error well above the straight-line
error says the states it learnt at are not the ones it samples from.

    .venv/bin/python benchmarks/distill_state_error.py --workdir data/nano/bootstrap --pairs 128
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dopsd.nano.bootstrap import BootstrapConfig, TeacherPairs, WorldStream, load_training_model, undistilled_teacher
from dopsd.nano.model import NANO_RESOLUTION


@torch.no_grad()
def state_errors(config: BootstrapConfig, pairs: int, seed: int = 99) -> dict:
    """One row per student sigma, the error of the finished 4-step sample, and the endpoints' variance (the error
    of predicting their mean, the scale of the errors); averaged over `pairs` triples drawn from a world stream
    seeded apart from the bootstrap's."""
    config = dataclasses.replace(config, teacher_pairs=pairs)
    model = load_training_model(config)
    model.pipeline.transformer.eval()
    teacher = undistilled_teacher(model.pipeline.transformer, config)
    triples = TeacherPairs(
        model, teacher, WorldStream(seed, config.task_weights), config, torch.Generator().manual_seed(seed)
    )
    sigmas = model.schedule(4, NANO_RESOLUTION, NANO_RESOLUTION).tolist()
    totals = [{"sigma": s, "line_error": 0.0, "rollout_error": 0.0, "state_distance": 0.0} for s in sigmas[:-1]]
    sample_error = 0.0
    for start in range(0, len(triples.contexts), config.distill_batch):
        contexts = triples.contexts[start : start + config.distill_batch]
        noise = triples.noise[start : start + len(contexts)]
        target = triples.targets[start : start + len(contexts)]
        weight = len(contexts)  # rows are means over all triples; batches may differ in size
        x = noise.clone()
        for row, sigma, sigma_next in zip(totals, sigmas[:-1], sigmas[1:], strict=True):
            t = torch.full((weight,), sigma, device=x.device)
            line = (1 - sigma) * target + sigma * noise
            x0_line = model.predicted_x0(line, t, contexts)
            v = model.velocity(x, t, contexts)
            row["line_error"] += F.mse_loss(x0_line, target).item() * weight
            row["rollout_error"] += F.mse_loss(x - sigma * v, target).item() * weight
            row["state_distance"] += F.mse_loss(x, line).item() * weight
            x = x + (sigma_next - sigma) * v
        sample_error += F.mse_loss(x, target).item() * weight
    count = len(triples.contexts)
    return {
        "states": [{k: v if k == "sigma" else v / count for k, v in row.items()} for row in totals],
        "sample_error": sample_error / count,
        "endpoint_variance": triples.targets.var(dim=0, unbiased=False).mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="data/nano/bootstrap", help="A finished bootstrap's work folder.")
    parser.add_argument("--pairs", type=int, default=128, help="Teacher triples to measure on.")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads.")
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = BootstrapConfig.from_workdir(args.workdir, threads=args.threads, compile=False)
    result = state_errors(config, args.pairs)
    print(
        f"{args.pairs} teacher triples ({config.teacher_steps} steps, guidance {config.guidance}) from {args.workdir}"
    )
    print("| sigma | x0 error, straight-line state | x0 error, own state | own state vs line (MSE) |")
    print("| --- | --- | --- | --- |")
    for row in result["states"]:
        errors = " | ".join(f"{row[key]:.4f}" for key in ("line_error", "rollout_error", "state_distance"))
        print(f"| {row['sigma']:.3f} | {errors} |")
    print(f"| 0 (4-step sample) | - | {result['sample_error']:.4f} | - |")
    print(f"Endpoint variance (the error of predicting their mean): {result['endpoint_variance']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
