"""Continue a finished nano distillation at the student's own states (on-policy), then save the model.

`dopsd.nano.bootstrap.distill` teaches the 4-step student on the straight line between a noise and the undistilled
teacher's endpoint from it; `benchmarks/distill_state_error.py` found that at its own Euler states the student
keeps its first guess (x0 error 0.50 at sigmas .9/.75/.5, against 0.05-0.01 on the line). Here each example is a
state the student itself reaches along its 4-step schedule from fresh noise (detached, as D-OPSD rolls out), and
its target is the undistilled teacher's endpoint from that very state (its `teacher_steps` grid from that sigma
on, with guidance): the later steps learn to finish the student's own guesses as the teacher would. The
examples sit in a pool refreshed with the current student's rollouts every `--refresh-every` steps.

Continuing the committed base 320 steps (3016 s on 2 CPU cores) lifted GenEval-nano at 4 steps 0.484 -> 0.512 and
its 4-step teacher's star premise 0.698 -> 0.729, where 1400 more straight-line steps had given 0.470
(`data/nano/bootstrap/README.md`, item 14).

Run it on a copy of the work folder, then score the copy:

    cp -r data/nano/bootstrap runs/boot-onpolicy
    .venv/bin/python benchmarks/distill_on_policy.py --workdir runs/boot-onpolicy --steps 300
    .venv/bin/python benchmarks/distill_state_error.py --workdir runs/boot-onpolicy --pairs 128
    .venv/bin/dopsd nano report --workdir runs/boot-onpolicy --seeds 0-7
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dopsd.models.zimage import ZImageModel
from dopsd.nano.bootstrap import (
    BootstrapConfig,
    WorldStream,
    compile_blocks,
    distillation_inputs,
    load_training_model,
    run_stage,
    save_model,
    teacher_sample,
    undistilled_teacher,
)
from dopsd.nano.model import NANO_RESOLUTION


class RolloutTargets:
    """(context, state, sigma, teacher endpoint) examples at the student's own 4-step states; `pool_draws` batches
    of rollouts kept, one batch replaced every `refresh_every` steps by the current student's."""

    def __init__(
        self,
        model: ZImageModel,
        teacher: torch.nn.Module,
        config: BootstrapConfig,
        pool_draws: int,
        refresh_every: int,
        generator: torch.Generator,
    ):
        self.model, self.teacher, self.config, self.refresh_every = model, teacher, config, refresh_every
        self.stream = WorldStream(config.seed + 4, config.task_weights)  # apart from distillation's stream
        self.student_sigmas = model.schedule(4, NANO_RESOLUTION, NANO_RESOLUTION)
        self.teacher_sigmas = model.schedule(config.teacher_steps, NANO_RESOLUTION, NANO_RESOLUTION)
        self.draws = [self._draw(generator) for _ in range(pool_draws)]
        self.step = 0

    @torch.no_grad()
    def _draw(
        self, generator: torch.Generator
    ) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor, torch.Tensor, torch.Tensor]:
        contexts, x = distillation_inputs(self.model, self.stream, self.config, generator)
        states, sigmas, targets = [], [], []
        for sigma, sigma_next in zip(self.student_sigmas[:-1].tolist(), self.student_sigmas[1:].tolist(), strict=True):
            remaining = torch.cat([torch.tensor([sigma]), self.teacher_sigmas[self.teacher_sigmas < sigma]])
            states.append(x)
            sigmas.append(torch.full((len(contexts),), sigma))
            targets.append(teacher_sample(self.model, self.teacher, x, remaining, contexts, self.config.guidance))
            t = torch.full((len(contexts),), sigma, device=x.device)
            x = x + (sigma_next - sigma) * self.model.velocity(x, t, contexts)
        return contexts * len(states), torch.cat(states), torch.cat(sigmas), torch.cat(targets)

    def batch(
        self, generator: torch.Generator
    ) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor, torch.Tensor, torch.Tensor]:
        self.step += 1
        if self.step % self.refresh_every == 0:
            self.draws[int(torch.randint(len(self.draws), (1,), generator=generator))] = self._draw(generator)
        contexts = [c for draw in self.draws for c in draw[0]]
        states, sigmas, targets = (torch.cat([draw[i] for draw in self.draws]) for i in (1, 2, 3))
        chosen = torch.randperm(len(contexts), generator=generator)[: self.config.distill_batch]
        return [contexts[i] for i in chosen.tolist()], states[chosen], sigmas[chosen], targets[chosen]


def distill_on_policy(
    config: BootstrapConfig, steps: int, lr: float, pool_draws: int, refresh_every: int, decay_steps: int
) -> None:
    model = load_training_model(config)
    transformer = model.pipeline.transformer  # the distilled student, as the model folder holds it
    teacher = undistilled_teacher(transformer, config)
    transformer.requires_grad_(True)
    compile_blocks(transformer, config)
    compile_blocks(teacher, config)
    examples = RolloutTargets(model, teacher, config, pool_draws, refresh_every, torch.Generator().manual_seed(11))

    def loss_fn(generator: torch.Generator) -> torch.Tensor:
        contexts, state, sigma, target = examples.batch(generator)
        s = sigma.to(model.device).view(-1, 1, 1, 1)
        x0 = state - s * model.velocity(state, sigma.to(model.device), contexts)
        return F.mse_loss(x0, target)

    run_stage("distill_on_policy", config, {"transformer": transformer}, steps, lr, loss_fn, decay_steps=decay_steps)
    save_model(model, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="A copy of a finished bootstrap's work folder (changed).")
    parser.add_argument("--steps", type=int, default=300, help="Training steps.")
    parser.add_argument("--lr", type=float, default=1e-4, help="Learning rate.")
    parser.add_argument("--decay-steps", type=int, default=100, help="Final steps of linear learning-rate decay.")
    parser.add_argument("--pool-draws", type=int, default=4, help="Rollout batches kept (4 examples per item).")
    parser.add_argument("--refresh-every", type=int, default=8, help="Steps between two fresh rollout batches.")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = BootstrapConfig.from_workdir(args.workdir, threads=args.threads)
    distill_on_policy(config, args.steps, args.lr, args.pool_draws, args.refresh_every, args.decay_steps)


if __name__ == "__main__":
    main()
