"""The training objectives, as pure functions over a FewStepModel: D-OPSD and the SFT baseline.

Neither touches an optimizer. `dopsd_loss` can run a backward per roll-out step (pass `backward`): each step's
graph is freed before the next is built, so peak memory stays that of one forward+backward, and the summed
gradient is the same as one backward of the mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from dopsd.adapters import PREVIOUS, STUDENT, TEACHER, use_adapter
from dopsd.models.base import Context, FewStepModel
from dopsd.sampling import guided_velocity

TeacherKind = Literal["ema", "base", "live", "previous"]
Target = Literal["x0", "velocity"]

# Adapter each teacher kind evaluates with: the EMA copy, none (the frozen base), the student itself, or the frozen
# adapter the round started from.
TEACHER_ADAPTER: dict[str, str | None] = {"ema": TEACHER, "base": None, "live": STUDENT, "previous": PREVIOUS}


@dataclass
class DopsdOutput:
    loss: torch.Tensor
    """Mean over trained roll-out steps (plus the anchored layout terms); detached when the backward already ran per
    step."""
    step_losses: list[float]
    """Loss of each trained roll-out step, in roll-out order (anchored layout steps included, weighted, over their
    rows' share of the batch)."""
    states: list[torch.Tensor]
    """The detached student states x_k the roll-out visited (one per step of the schedule)."""


def rollout_steps_to_train(
    sigmas: torch.Tensor, grad_steps: int, generator: torch.Generator | None, loss_max_sigma: float = 1.0
) -> list[int]:
    """Indices of the roll-out steps that get a loss and a backward: those whose sigma is at most `loss_max_sigma`,
    of which `grad_steps` drawn at random (grad_steps <= 0, or at least their number, means all of them)."""
    eligible = [k for k in range(len(sigmas) - 1) if float(sigmas[k]) <= loss_max_sigma]
    if not eligible:
        raise ValueError(f"loss_max_sigma {loss_max_sigma} is below every roll-out sigma {sigmas[:-1].tolist()}")
    if grad_steps <= 0 or grad_steps >= len(eligible):
        return eligible
    drawn = torch.randperm(len(eligible), generator=generator)[:grad_steps].tolist()
    return sorted(eligible[i] for i in drawn)


def layout_anchor_rows(teachers: Sequence[TeacherKind]) -> list[int]:
    """The samples whose loss may reach above `loss_max_sigma`: those taught by the previous adapter, which sees the
    caption alone. The reason for the cut, a teacher that sees the image and lays the scene out anew at the top
    states, does not hold for them: that teacher follows the student's noise as the student does. Held there, they
    keep the top states, which decide the layout and which no other loss reaches, where the round found them on the
    prompts it should leave alone (benchmarks/adapter_steps.py: a chain's blank samples are made at those states)."""
    return [i for i, kind in enumerate(teachers) if kind == "previous"]


def prediction_distance(
    v_student, v_teacher, states, sigma, target: Target, spatial_means: bool = False
) -> torch.Tensor:
    """MSE of the predicted x0 (x - sigma * v) or of the velocity itself, per sample averaged. With `spatial_means`,
    of each latent channel's mean over the image instead (latents are (B, C, H, W)): what does not depend on where
    things are, such as the image's colours."""
    if target == "velocity":
        student, teacher = v_student, v_teacher
    else:
        s = sigma.view(-1, *([1] * (states.dim() - 1)))
        student, teacher = states - s * v_student, states - s * v_teacher
    if spatial_means:
        student, teacher = student.mean(dim=(-2, -1)), teacher.mean(dim=(-2, -1))
    return F.mse_loss(student, teacher)


@torch.no_grad()
def teacher_velocity(
    model: FewStepModel,
    state: torch.Tensor,
    sigma: torch.Tensor,
    contexts: Sequence[Context],
    caption_contexts: Sequence[Context],
    teachers: Sequence[TeacherKind],
    guidance: float = 0.0,
) -> torch.Tensor:
    """The teachers' velocities at the student's states: one forward per teacher kind, over its own samples.

    With a `guidance` w > 0 (reference guidance), each teacher also predicts from `caption_contexts` (the caption
    alone) and moves away from it (`guided_velocity`): v + w * (v - v_caption). What the image adds to the caption,
    the concept no word names, is amplified; where the image adds nothing the two agree and nothing changes."""
    transformer = model.pipeline.transformer
    velocity = torch.empty_like(state)
    for kind in dict.fromkeys(teachers):
        rows = [i for i, k in enumerate(teachers) if k == kind]
        with use_adapter(transformer, TEACHER_ADAPTER[kind]):
            v = model.velocity(state[rows], sigma[rows], [contexts[i] for i in rows])
            if guidance > 0:
                v_caption = model.velocity(state[rows], sigma[rows], [caption_contexts[i] for i in rows])
                v = guided_velocity(v, v_caption, guidance)
        velocity[rows] = v
    return velocity


def dopsd_loss(
    model: FewStepModel,
    student_contexts: Sequence[Context],
    teacher_contexts: Sequence[Context],
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    target: Target = "x0",
    teacher: TeacherKind | Sequence[TeacherKind] = "ema",
    grad_steps: int = 0,
    loss_max_sigma: float = 1.0,
    anchor_layout: float = 0.0,
    anchor_min_sigma: float = 0.0,
    top_state_means: float = 0.0,
    teacher_guidance: float = 0.0,
    generator: torch.Generator | None = None,
    backward: Callable[[torch.Tensor, bool], None] | None = None,
) -> DopsdOutput:
    """On-policy self-distillation: roll the student out from `noise` along `sigmas` (ending at 0), and at every
    state it visits pull its prediction toward the teacher's (same network, teacher adapter, image context).
    `teacher` is one kind for the whole batch or one per sample (say, the previous adapter for replayed samples).
    `teacher_guidance` > 0 applies reference guidance to the teacher (`teacher_velocity`), the student's own
    contexts serving as the caption alone. With `anchor_layout` w > 0, the samples taught by the previous adapter also
    get a loss at the states above `loss_max_sigma` (`layout_anchor_rows`) and at or above `anchor_min_sigma`, each
    such step weighing w times a trained one over its share of the batch. With `top_state_means` w > 0, the other
    samples get a loss at every state above `loss_max_sigma`, on the spatial means of the predictions alone
    (`prediction_distance`), weighing w likewise.

    States are detached (no backprop through time). `backward(loss_term, is_last)` if given is called on each
    trained step's share of the mean, so callers can free graphs early and sync gradients once.
    """
    transformer = model.pipeline.transformer
    teachers = [teacher] * len(noise) if isinstance(teacher, str) else list(teacher)
    if len(teachers) != len(noise):
        raise ValueError(f"{len(teachers)} teacher kinds for a batch of {len(noise)}")
    num_steps = len(sigmas) - 1
    trained = rollout_steps_to_train(sigmas, grad_steps, generator, loss_max_sigma)
    anchored = layout_anchor_rows(teachers) if anchor_layout > 0 else []
    pooled = [i for i in range(len(noise)) if i not in anchored] if top_state_means > 0 else []
    top_states = [k for k in range(num_steps) if float(sigmas[k]) > loss_max_sigma]
    x = noise.float()
    states: list[torch.Tensor] = []
    terms: list[torch.Tensor] = []
    for k in range(num_steps):
        state = x.detach()
        states.append(state)
        sigma = torch.full((state.shape[0],), float(sigmas[k]), device=state.device)
        train_here = k in trained
        held = anchored if k in top_states and float(sigmas[k]) >= anchor_min_sigma else []
        top_rows = held + (pooled if k in top_states else [])
        top_here = bool(top_rows)
        if top_here:
            v_top = teacher_velocity(
                model,
                state[top_rows],
                sigma[top_rows],
                [teacher_contexts[i] for i in top_rows],
                [student_contexts[i] for i in top_rows],
                [teachers[i] for i in top_rows],
                teacher_guidance if pooled else 0.0,
            )
        if train_here:
            # Teacher first: its forward then never coexists with the student's stored activations.
            v_teacher = teacher_velocity(
                model, state, sigma, teacher_contexts, student_contexts, teachers, teacher_guidance
            )
        # The backward runs under the student adapter too: gradient checkpointing recomputes with it.
        with use_adapter(transformer, STUDENT), torch.set_grad_enabled(train_here or top_here):
            v_student = model.velocity(state, sigma, student_contexts)
            term = None
            if train_here:
                term = prediction_distance(v_student, v_teacher, state, sigma, target) / len(trained)
            elif top_here:
                # Each row weighs its share of the batch, as in a trained step's mean.
                term = torch.zeros((), device=state.device)
                if held:
                    distance = prediction_distance(
                        v_student[held], v_top[: len(held)], state[held], sigma[held], target
                    )
                    term = term + anchor_layout * len(held) * distance
                if pooled:
                    means = prediction_distance(
                        v_student[pooled], v_top[len(held) :], state[pooled], sigma[pooled], target, True
                    )
                    term = term + top_state_means * len(pooled) * means
                term = term / len(noise) / len(trained)
            if term is not None:
                if backward is not None:
                    backward(term, k == trained[-1])
                    term = term.detach()
                terms.append(term)
        x = state + (float(sigmas[k + 1]) - float(sigmas[k])) * v_student.detach()
    step_losses = (torch.stack([t.detach() for t in terms]) * len(trained)).tolist()  # one device sync
    return DopsdOutput(loss=torch.stack(terms).sum(), step_losses=step_losses, states=states)


def sample_training_sigmas(
    batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Logit-normal(0, 1) sigmas, the usual rectified-flow training density (mass in the middle)."""
    return torch.sigmoid(torch.randn(batch, generator=generator)).to(device)


def sft_loss(
    model: FewStepModel,
    contexts: Sequence[Context],
    latents: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
) -> torch.Tensor:
    """Ordinary flow matching on the targets: the baseline that forgets few-step sampling."""
    s = sigma.view(-1, *([1] * (latents.dim() - 1)))
    noisy = (1 - s) * latents + s * noise
    with use_adapter(model.pipeline.transformer, STUDENT):
        v = model.velocity(noisy, sigma, contexts)
    return F.mse_loss(v, noise - latents)
