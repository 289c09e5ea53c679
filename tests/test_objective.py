"""D-OPSD and SFT objectives on the tiny Z-Image (real classes)."""

import pytest
import torch
from PIL import Image

from dopsd import adapters
from dopsd.models import ZImageModel, load_model
from dopsd.objective import dopsd_loss, prediction_distance, rollout_steps_to_train, sft_loss, teacher_velocity

SIGMAS = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0])
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture
def model(tiny_zimage_path):
    torch.manual_seed(0)
    m = ZImageModel.load(tiny_zimage_path)
    adapters.add_student_teacher(m.pipeline.transformer, 4, 8.0, m.default_lora_targets)
    return m


def perturb_student(model, scale=0.05):
    torch.manual_seed(1)
    with torch.no_grad():
        for _, student in adapters.adapter_pairs(model.pipeline.transformer):
            student.add_(scale * torch.randn_like(student))


def images(n):
    torch.manual_seed(2)
    return [Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()) for _ in range(n)]


def noise(model):
    return model.noise(2, 32, 32, torch.Generator().manual_seed(0))


def test_zero_when_teacher_equals_student(model):
    ctx = model.encode_student(PROMPTS)
    out = dopsd_loss(model, ctx, ctx, noise(model), SIGMAS)
    assert out.loss.item() == 0.0
    assert len(out.states) == 4


def test_positive_with_image_context_or_different_adapters(model):
    student = model.encode_student(PROMPTS)
    teacher = model.encode_teacher(PROMPTS, images(2))
    assert dopsd_loss(model, student, teacher, noise(model), SIGMAS).loss.item() > 0
    perturb_student(model)
    assert dopsd_loss(model, student, student, noise(model), SIGMAS).loss.item() > 0


def test_gradients_reach_student_adapter_only(model):
    perturb_student(model)  # B != 0 so gradients reach both LoRA matrices
    transformer = model.pipeline.transformer
    student = model.encode_student(PROMPTS)
    teacher = model.encode_teacher(PROMPTS, images(2))
    dopsd_loss(model, student, teacher, noise(model), SIGMAS).loss.backward()
    grads = {n: p.grad for n, p in transformer.named_parameters()}
    student_grads = [g for n, g in grads.items() if ".student." in n]
    assert student_grads and all(g is not None and g.abs().sum() > 0 for g in student_grads)
    assert all(g is None for n, g in grads.items() if ".student." not in n)
    for encoder in (model.pipeline.text_encoder, model.teacher_encoder, model.pipeline.vae):
        assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())


def test_teacher_sees_the_students_own_states(model, monkeypatch):
    perturb_student(model)
    calls = []
    real_velocity = model.velocity

    def recording_velocity(latents, sigma, contexts):
        name = adapters.active_adapter(model.pipeline.transformer)
        calls.append((name, latents.detach().clone(), float(sigma[0]), len(contexts[0]["cap_feats"])))
        return real_velocity(latents, sigma, contexts)

    monkeypatch.setattr(model, "velocity", recording_velocity)
    student = model.encode_student(PROMPTS)
    teacher = model.encode_teacher(PROMPTS, images(2))
    out = dopsd_loss(model, student, teacher, noise(model), SIGMAS)
    assert [c[0] for c in calls] == ["teacher", "student"] * 4
    for k in range(4):
        t_call, s_call = calls[2 * k], calls[2 * k + 1]
        assert torch.equal(s_call[1], t_call[1]) and torch.equal(s_call[1], out.states[k])
        assert s_call[2] == t_call[2] == pytest.approx(float(SIGMAS[k]))
        assert t_call[3] > s_call[3]  # the teacher's context carries the image tokens
    # on-policy: each state is the student's own Euler step from the previous one, not a noised target
    assert torch.equal(out.states[0], noise(model))
    assert not torch.equal(out.states[1], out.states[0])


def test_teacher_kinds_use_the_named_weights(model):
    perturb_student(model)
    transformer = model.pipeline.transformer
    student = model.encode_student(PROMPTS)
    # live teacher == student with the same context: nothing to learn
    assert dopsd_loss(model, student, student, noise(model), SIGMAS, teacher="live").loss.item() == 0.0
    # ema teacher still at the base (B = 0), so it matches the base teacher exactly
    ema = dopsd_loss(model, student, student, noise(model), SIGMAS, teacher="ema").loss.item()
    base = dopsd_loss(model, student, student, noise(model), SIGMAS, teacher="base").loss.item()
    assert ema == pytest.approx(base) and ema > 0
    # after an EMA update with decay 0 the teacher equals the student
    adapters.ema_update(adapters.adapter_pairs(transformer), 0.0)
    assert dopsd_loss(model, student, student, noise(model), SIGMAS, teacher="ema").loss.item() == 0.0


def test_reference_guidance_amplifies_what_the_image_adds(model):
    perturb_student(model)
    adapters.ema_update(adapters.adapter_pairs(model.pipeline.transformer), 0.5)  # teacher != student, != base
    student, teacher = model.encode_student(PROMPTS), model.encode_teacher(PROMPTS, images(2))
    state, sigma = noise(model), torch.full((2,), 0.75)
    with adapters.use_adapter(model.pipeline.transformer, adapters.TEACHER), torch.no_grad():
        v_image, v_caption = model.velocity(state, sigma, teacher), model.velocity(state, sigma, student)
    assert not torch.allclose(v_image, v_caption)
    guided = teacher_velocity(model, state, sigma, teacher, student, ["ema", "ema"], guidance=2.0)
    torch.testing.assert_close(guided, v_image + 2.0 * (v_image - v_caption))
    torch.testing.assert_close(teacher_velocity(model, state, sigma, teacher, student, ["ema", "ema"]), v_image)
    # Without an image nothing is amplified: a teacher equal to the student still has nothing to teach.
    adapters.ema_update(adapters.adapter_pairs(model.pipeline.transformer), 0.0)
    assert dopsd_loss(model, student, student, noise(model), SIGMAS, teacher_guidance=2.0).loss.item() == 0.0
    plain = dopsd_loss(model, student, teacher, noise(model), SIGMAS).step_losses
    amplified = dopsd_loss(model, student, teacher, noise(model), SIGMAS, teacher_guidance=2.0).step_losses
    assert amplified[0] == pytest.approx(9 * plain[0], rel=1e-3)  # the first state is shared: (w + 1)^2 the MSE


def test_each_sample_can_have_its_own_teacher(tiny_zimage_path):
    torch.manual_seed(0)
    model = ZImageModel.load(tiny_zimage_path)
    transformer = model.pipeline.transformer
    adapters.add_student_teacher(transformer, 4, 8.0, model.default_lora_targets, with_previous=True)
    previous = [p for n, p in transformer.named_parameters() if f".{adapters.PREVIOUS}." in n]
    assert previous and not any(p.requires_grad for p in previous)
    perturb_student(model)
    # The previous adapter becomes the perturbed student: as a teacher it then has nothing to teach.
    adapters.load_adapter_state(transformer, adapters.PREVIOUS, adapters.adapter_state_dict(transformer, "student"))
    student, n = model.encode_student(PROMPTS), noise(model)
    assert dopsd_loss(model, student, student, n, SIGMAS, teacher="previous").loss.item() == 0.0
    # Mixed: the first sample taught by the previous adapter (nothing), the second by the base; the batch mean
    # is then half the second sample's loss under the base alone.
    mixed = dopsd_loss(model, student, student, n, SIGMAS, teacher=["previous", "base"])
    second = dopsd_loss(model, student[1:], student[1:], n[1:], SIGMAS, teacher="base")
    assert second.loss.item() > 0
    assert mixed.step_losses == pytest.approx([loss / 2 for loss in second.step_losses], rel=1e-4)
    with pytest.raises(ValueError, match="1 teacher kinds for a batch of 2"):
        dopsd_loss(model, student, student, n, SIGMAS, teacher=["base"])


def test_klein_teachers_with_and_without_a_reference_share_a_batch(tiny_klein_path):
    # FLUX.2-klein cannot batch contexts with and without reference tokens: each teacher kind runs on its own rows.
    torch.manual_seed(0)
    model = load_model(tiny_klein_path, text_encoder_layers=(1, 2, 3))
    adapters.add_student_teacher(model.pipeline.transformer, 4, 8.0, model.default_lora_targets, with_previous=True)
    student, teacher = model.encode_student(PROMPTS), model.encode_teacher(PROMPTS, images(2))
    mixed = dopsd_loss(model, student, [student[0], teacher[1]], noise(model), SIGMAS, teacher=["previous", "ema"])
    alone = dopsd_loss(model, student[1:], teacher[1:], noise(model)[1:], SIGMAS, teacher="ema")
    assert alone.loss.item() > 0  # the reference image changes the teacher's prediction
    assert mixed.step_losses == pytest.approx([loss / 2 for loss in alone.step_losses], rel=1e-4)


def test_per_step_backward_gives_the_summed_gradient(model):
    perturb_student(model)
    transformer = model.pipeline.transformer
    student = model.encode_student(PROMPTS)
    teacher = model.encode_teacher(PROMPTS, images(2))
    params = [p for _, p in adapters.adapter_pairs(transformer)]
    dopsd_loss(model, student, teacher, noise(model), SIGMAS).loss.backward()
    summed = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    calls = []
    out = dopsd_loss(
        model,
        student,
        teacher,
        noise(model),
        SIGMAS,
        backward=lambda loss, last: (calls.append(last), loss.backward()),
    )
    assert calls == [False, False, False, True]
    assert not out.loss.requires_grad
    for a, p in zip(summed, params, strict=True):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-8)


def test_velocity_target_and_grad_steps(model):
    perturb_student(model)
    student = model.encode_student(PROMPTS)
    teacher = model.encode_teacher(PROMPTS, images(2))
    x0 = dopsd_loss(model, student, teacher, noise(model), SIGMAS, target="x0")
    vel = dopsd_loss(model, student, teacher, noise(model), SIGMAS, target="velocity")
    # x0 distance = sigma^2 * velocity distance per step, so the two targets weigh the steps differently
    ratios = [a / b for a, b in zip(x0.step_losses, vel.step_losses, strict=True)]
    assert ratios == pytest.approx([s**2 for s in SIGMAS[:-1].tolist()], rel=1e-4)
    sub = dopsd_loss(
        model,
        student,
        teacher,
        noise(model),
        SIGMAS,
        grad_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(sub.step_losses) == 2 and len(sub.states) == 4
    assert rollout_steps_to_train(SIGMAS, 0, None) == [0, 1, 2, 3]


def test_loss_max_sigma_trains_only_the_later_states(model):
    perturb_student(model)
    student = model.encode_student(PROMPTS)
    teacher = model.encode_teacher(PROMPTS, images(2))
    every = dopsd_loss(model, student, teacher, noise(model), SIGMAS)
    late = dopsd_loss(model, student, teacher, noise(model), SIGMAS, loss_max_sigma=0.75)
    # The roll-out visits every state; only those at sigma <= 0.75 (.75 and .5) carry a loss, the same as before.
    assert len(late.states) == 4 and late.step_losses == pytest.approx(every.step_losses[2:], rel=1e-5)
    assert rollout_steps_to_train(SIGMAS, 1, torch.Generator().manual_seed(0), loss_max_sigma=0.75) in ([2], [3])
    with pytest.raises(ValueError, match="loss_max_sigma 0.1 is below every roll-out sigma"):
        rollout_steps_to_train(SIGMAS, 0, None, loss_max_sigma=0.1)


def test_the_layout_anchor_holds_the_caption_taught_samples_at_the_top_states(tiny_zimage_path):
    torch.manual_seed(0)
    model = ZImageModel.load(tiny_zimage_path)
    transformer = model.pipeline.transformer
    adapters.add_student_teacher(transformer, 4, 8.0, model.default_lora_targets, with_previous=True)
    perturb_student(model)  # the previous adapter stays at the base: it now differs from the student
    student, n = model.encode_student(PROMPTS), noise(model)
    kinds = ["previous", "base"]
    plain = dopsd_loss(model, student, student, n, SIGMAS, teacher=kinds, loss_max_sigma=0.75)
    held = dopsd_loss(model, student, student, n, SIGMAS, teacher=kinds, loss_max_sigma=0.75, anchor_layout=1.0)
    # Two more terms, the states at sigma 1 and .9, then the trained states unchanged.
    assert len(plain.step_losses) == 2 and held.step_losses[2:] == pytest.approx(plain.step_losses, rel=1e-5)
    # At sigma 1 the state is the noise: the term is the first sample's x0 distance to the previous adapter's,
    # over its half of the batch; the base-taught second sample adds nothing there.
    sigma = torch.ones(1)
    with torch.no_grad(), adapters.use_adapter(transformer, adapters.STUDENT):
        x0_student = model.predicted_x0(n[:1], sigma, student[:1])
    with torch.no_grad(), adapters.use_adapter(transformer, adapters.PREVIOUS):
        x0_previous = model.predicted_x0(n[:1], sigma, student[:1])
    expected = torch.nn.functional.mse_loss(x0_student, x0_previous).item() / 2
    assert expected > 0 and held.step_losses[0] == pytest.approx(expected, rel=1e-4)
    # Held from sigma 0.95 up: the state at sigma 1 alone.
    top = dopsd_loss(
        model, student, student, n, SIGMAS, teacher=kinds, loss_max_sigma=0.75, anchor_layout=1.0, anchor_min_sigma=0.95
    )
    assert top.step_losses == pytest.approx([held.step_losses[0], *plain.step_losses], rel=1e-5)
    # A weight below 1 scales the held terms alone.
    light = dopsd_loss(model, student, student, n, SIGMAS, teacher=kinds, loss_max_sigma=0.75, anchor_layout=0.25)
    assert light.step_losses[:2] == pytest.approx([0.25 * x for x in held.step_losses[:2]], rel=1e-4)
    assert light.step_losses[2:] == pytest.approx(plain.step_losses, rel=1e-5)
    # No sample taught by the previous adapter: nothing to hold, the loss is the plain one.
    unheld = dopsd_loss(model, student, student, n, SIGMAS, teacher="base", loss_max_sigma=0.75, anchor_layout=1.0)
    base_only = dopsd_loss(model, student, student, n, SIGMAS, teacher="base", loss_max_sigma=0.75)
    assert unheld.step_losses == pytest.approx(base_only.step_losses, rel=1e-5)
    # The held terms' gradient reaches the student adapter.
    transformer.zero_grad(set_to_none=True)
    top_only = dopsd_loss(
        model, student, student, n, SIGMAS, teacher="previous", loss_max_sigma=0.75, anchor_layout=1.0
    )
    top_only.loss.backward()
    grads = [p.grad for name, p in transformer.named_parameters() if f".{adapters.STUDENT}." in name]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_the_spatial_means_distance_ignores_where_things_are():
    torch.manual_seed(0)
    states, velocity = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigma = torch.tensor([1.0, 0.9])
    shifted = torch.roll(velocity, shifts=(3, 2), dims=(-2, -1))  # the same content, elsewhere
    for target in ("x0", "velocity"):
        assert prediction_distance(velocity, shifted, states, sigma, target) > 0.1
        assert prediction_distance(velocity, shifted, states, sigma, target, spatial_means=True) < 1e-10
    brighter = velocity + 0.5  # every channel's mean moves: x0 by -sigma * 0.5
    x0_means = prediction_distance(velocity, brighter, states, sigma, "x0", spatial_means=True)
    assert x0_means.item() == pytest.approx(((0.5 * sigma) ** 2).mean().item(), rel=1e-5)


def test_top_state_means_reach_the_image_taught_samples_above_the_loss_cut(tiny_zimage_path):
    torch.manual_seed(0)
    model = ZImageModel.load(tiny_zimage_path)
    transformer = model.pipeline.transformer
    adapters.add_student_teacher(transformer, 4, 8.0, model.default_lora_targets, with_previous=True)
    perturb_student(model)
    student, n = model.encode_student(PROMPTS), noise(model)
    teacher = [student[0], model.encode_teacher(PROMPTS[1:], images(1))[0]]
    kinds = ["previous", "base"]
    plain = dopsd_loss(model, student, teacher, n, SIGMAS, teacher=kinds, loss_max_sigma=0.75)
    both = dopsd_loss(
        model, student, teacher, n, SIGMAS, teacher=kinds, loss_max_sigma=0.75, anchor_layout=1.0, top_state_means=0.5
    )
    held = dopsd_loss(model, student, teacher, n, SIGMAS, teacher=kinds, loss_max_sigma=0.75, anchor_layout=1.0)
    assert both.step_losses[2:] == pytest.approx(plain.step_losses, rel=1e-5)
    # At sigma 1: the held term of the first sample, plus half the spatial-means distance of the second sample's
    # x0 to the base teacher's (which sees its image), over its half of the batch.
    sigma = torch.ones(1)
    with torch.no_grad(), adapters.use_adapter(transformer, adapters.STUDENT):
        v_student = model.velocity(n[1:], sigma, student[1:])
    with torch.no_grad(), adapters.use_adapter(transformer, None):
        v_teacher = model.velocity(n[1:], sigma, teacher[1:])
    means = prediction_distance(v_student, v_teacher, n[1:], sigma, "x0", spatial_means=True).item()
    assert means > 0 and both.step_losses[0] == pytest.approx(held.step_losses[0] + 0.5 * means / 2, rel=1e-4)
    # Its gradient reaches the student adapter.
    transformer.zero_grad(set_to_none=True)
    top_only = dopsd_loss(model, student, teacher, n, SIGMAS, teacher="base", loss_max_sigma=0.75, top_state_means=1.0)
    assert len(top_only.step_losses) == 4
    top_only.loss.backward()
    grads = [p.grad for name, p in transformer.named_parameters() if f".{adapters.STUDENT}." in name]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_sft_loss_is_flow_matching(model):
    ctx = model.encode_student(PROMPTS)
    latents = model.to_latents(images(2), 32, 32)
    n = noise(model)
    sigma = torch.tensor([0.3, 0.7])
    loss = sft_loss(model, ctx, latents, n, sigma)
    s = sigma.view(-1, 1, 1, 1)
    with adapters.use_adapter(model.pipeline.transformer, "student"):
        v = model.velocity((1 - s) * latents + s * n, sigma, ctx)
    assert loss.item() == pytest.approx(((v - (n - latents)) ** 2).mean().item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for _, p in adapters.adapter_pairs(model.pipeline.transformer))
