"""The DINO recipe against the official semantics (../shared/REFERENCE.md): loss and center,
schedules, parameter groups, clipping, last-layer freezing, LARS, and the teacher EMA."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from dino_fast.models import DINOHead, MultiCropWrapper, VisionTransformer
from dino_fast.ops import use_backend
from dino_fast.training.ema import TeacherEMA, flatten_parameters
from dino_fast.training.loss import DINOLoss, teacher_temp_schedule
from dino_fast.training.optim import (
    LARS,
    build_optimizer,
    cancel_gradients_last_layer,
    clip_gradients,
    get_params_groups,
)
from dino_fast.training.schedules import cosine_scheduler
from dino_fast.training.step import TrainStep


def test_loss_hand_computed_case():
    # B = 1, K = 2, ncrops = 3: views g1, g2, l1; teacher temp 1, student temp 1, center 0.
    student = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(3.0)]])
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    loss_fn = DINOLoss(2, 3, 1.0, 1.0, 0, 1, student_temp=1.0)
    # teacher probs: q1 = (3/4, 1/4), q2 = (1/2, 1/2); student log-probs:
    # s1 = log(1/2, 1/2), s2 = log(3/4, 1/4), s3 = log(1/4, 3/4).
    ce = lambda q, p: -(q[0] * math.log(p[0]) + q[1] * math.log(p[1]))  # noqa: E731
    q1, q2 = (0.75, 0.25), (0.5, 0.5)
    s1, s2, s3 = (0.5, 0.5), (0.75, 0.25), (0.25, 0.75)
    expected = (ce(q1, s2) + ce(q1, s3) + ce(q2, s1) + ce(q2, s3)) / 4
    with use_backend("reference"):
        loss = loss_fn(student, teacher, epoch=0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # the center moves 10% of the way to the teacher batch mean
    torch.testing.assert_close(loss_fn.center, 0.1 * teacher.mean(0, keepdim=True))


def test_center_uses_previous_steps_only():
    torch.manual_seed(0)
    loss_fn = DINOLoss(7, 4, 0.04, 0.04, 0, 2)
    student, teacher = torch.randn(8, 7), torch.randn(4, 7)
    first = loss_fn(student, teacher, 0)
    center_after_one = loss_fn.center.clone()
    second = loss_fn(student, teacher, 0)
    assert not torch.equal(first, second)  # the second step sees the updated center
    fresh = DINOLoss(7, 4, 0.04, 0.04, 0, 2)
    fresh.center.copy_(center_after_one)
    torch.testing.assert_close(fresh(student, teacher, 0), second)
    assert list(loss_fn.state_dict()) == ["center"] and loss_fn.center.shape == (1, 7)


def test_teacher_temp_schedule_is_per_epoch_with_endpoint():
    sched = teacher_temp_schedule(0.04, 0.07, 3, 5)
    np.testing.assert_allclose(sched, [0.04, 0.055, 0.07, 0.07, 0.07])
    np.testing.assert_allclose(teacher_temp_schedule(0.04, 0.04, 0, 3), [0.04] * 3)
    with pytest.raises(ValueError):
        teacher_temp_schedule(0.04, 0.07, 4, 3)


def test_cosine_schedule_endpoints():
    sched = cosine_scheduler(1.0, 0.1, epochs=4, niter_per_ep=5, warmup_epochs=1)
    assert len(sched) == 20
    np.testing.assert_allclose(sched[:5], np.linspace(0, 1.0, 5))  # warm-up, endpoint included
    assert sched[5] == pytest.approx(1.0)
    n = 15
    assert sched[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * (n - 1) / n)))
    assert sched[-1] > 0.1  # the final value is approached, never reached
    assert np.all(np.diff(sched[5:]) < 0)


def test_momentum_schedule_goes_to_one():
    sched = cosine_scheduler(0.996, 1.0, 2, 10)
    assert sched[0] == pytest.approx(0.996) and 0.9999 < sched[-1] < 1.0


def small_student():
    return MultiCropWrapper(VisionTransformer(patch_size=16, embed_dim=24, depth=1, num_heads=2,
                                              qkv_bias=True),
                            DINOHead(24, 9, hidden_dim=16, bottleneck_dim=8))


def test_params_groups_official_split():
    model = small_student()
    regularized, not_regularized = get_params_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    reg = {names[id(p)] for p in regularized["params"]}
    assert {"backbone.cls_token", "backbone.pos_embed", "head.last_layer.weight_v"} <= reg
    assert "head.last_layer.weight_g" not in reg  # frozen (norm_last_layer)
    assert all(n.endswith(".bias") or "norm" in n for n in
               (names[id(p)] for p in not_regularized["params"]))
    assert not_regularized["weight_decay"] == 0.0


def test_clipping_is_per_parameter():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    model = nn.Module()
    model.a, model.b = a, b
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.4])
    norms = clip_gradients(model, 1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0, 0.0]) / (5 + 1e-6))
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))  # below the clip: untouched


def test_last_layer_frozen_in_first_epochs():
    model = small_student()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    cancel_gradients_last_layer(0, model, freeze_last_layer=1)
    assert model.head.last_layer.weight_v.grad is None
    assert model.head.mlp[0].weight.grad is not None
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    cancel_gradients_last_layer(1, model, freeze_last_layer=1)
    assert model.head.last_layer.weight_v.grad is not None


def test_lars_step_matches_formula():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    bias = nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}],
               lr=0.5)
    w.grad, bias.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([2.0])
    opt.step()
    update = torch.tensor([[0.3, 1.4]])  # grad + wd * w
    ratio = 0.001 * 5.0 / update.norm()
    torch.testing.assert_close(w.data, torch.tensor([[3.0, 4.0]]) - 0.5 * ratio * update)
    torch.testing.assert_close(bias.data, torch.tensor([0.0]))  # 1-D: plain momentum SGD


def test_teacher_ema_equals_official_per_parameter_loop():
    student, teacher = small_student(), small_student()
    reference = small_student()
    reference.load_state_dict(teacher.state_dict())
    ema = TeacherEMA(student, teacher)
    for m in (0.9, 0.996):
        ema.update(m)
        with torch.no_grad():
            for q, k in zip(student.parameters(), reference.parameters()):
                k.data.mul_(m).add_((1 - m) * q.detach().data)
    for (name, p), q in zip(teacher.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_flatten_parameters_keeps_values_and_aliases():
    model = small_student()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flat = flatten_parameters(model)
    assert flat.numel() == sum(p.numel() for p in model.parameters())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    flat.zero_()
    assert all(torch.all(p == 0) for p in model.parameters())


def test_train_step_equals_a_hand_written_official_step():
    student, teacher = small_student(), small_student()
    teacher.load_state_dict(student.state_dict())
    ref_student, ref_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    loss_fn, ref_loss_fn = DINOLoss(9, 3, 0.04, 0.04, 0, 1), DINOLoss(9, 3, 0.04, 0.04, 0, 1)
    ema = TeacherEMA(student, teacher)
    # SGD: linear in the gradients (Adam's first step, ~lr * sign(g), would amplify last-bit
    # differences between the fused and the reference loss)
    step = TrainStep(student, teacher, loss_fn, build_optimizer("sgd", get_params_groups(student)),
                     ema, clip_grad=0.5, freeze_last_layer=1)
    step(crops, 0, 1e-2, 0.1, 0.9)

    # main_dino.py, written out: schedules on the groups, forward, loss, zero_grad, backward,
    # per-parameter clipping, last layer frozen in epoch 0, SGD, EMA loop.
    optimizer = torch.optim.SGD(get_params_groups(ref_student), lr=0, momentum=0.9)
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = 1e-2
        if i == 0:
            group["weight_decay"] = 0.1
    with use_backend("reference"):
        loss = ref_loss_fn(ref_student(crops), ref_teacher(crops[:2]), 0)
    optimizer.zero_grad()
    loss.backward()
    for p in ref_student.parameters():
        if p.grad is not None:
            coef = 0.5 / (p.grad.norm(2) + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)
    for name, p in ref_student.named_parameters():
        if "last_layer" in name:
            p.grad = None
    optimizer.step()
    with torch.no_grad():
        for q, k in zip(ref_student.parameters(), ref_teacher.parameters()):
            k.mul_(0.9).add_((1 - 0.9) * q)
    for ours, theirs in ((student, ref_student), (teacher, ref_teacher)):
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(loss_fn.center, ref_loss_fn.center)
    assert not torch.equal(student.head.mlp[0].weight, small_student().head.mlp[0].weight)
