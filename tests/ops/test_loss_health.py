"""The DINO loss's health outputs (teacher entropy, KL over the pairs, batch-mean entropy) on
every backend, against a NumPy transcription of their definitions, and the promise that asking
for them leaves the loss, the teacher mean and the gradient bit-for-bit as they were."""
import math

import numpy as np
import pytest
import torch

from dino_fast.ops import use_backend
from dino_fast.ops.dino_loss import (
    dino_loss,
    dino_loss_with_health,
    teacher_health_reference,
)
from dino_fast.training.loss import DINOLoss
from tests.conftest import available_backends, device_for

BACKENDS = available_backends()
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


def make_logits(batch, ncrops, K, dtype=torch.float32, device="cpu", teacher_scale=2.0):
    student = torch.randn(ncrops * batch, K, dtype=torch.float64) * 2
    teacher = torch.randn(2 * batch, K, dtype=torch.float64) * teacher_scale + 0.5
    center = torch.randn(K, dtype=torch.float64) * 0.5
    return [x.to(device=device, dtype=dtype) for x in (student, teacher, center)]


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def numpy_health(student, teacher, center, ncrops, student_temp=STUDENT_TEMP,
                 teacher_temp=TEACHER_TEMP) -> dict:
    """The definitions, in float64, one pair at a time: H(P_t) = -sum q log q averaged over the
    teacher rows; KL(P_t || P_s) = sum q (log q - log p) averaged over the batch and over the
    pairs (teacher view iq, student view v != iq); H of the rows' mean q (0 log 0 = 0)."""
    s, t, c = (x.detach().double().cpu().numpy() for x in (student, teacher, center))
    log_q = _log_softmax((t - c) / teacher_temp)  # (2B, K)
    log_p = _log_softmax(s / student_temp)  # (ncrops*B, K)
    q = np.exp(log_q)
    batch = t.shape[0] // 2
    kls = [np.mean(np.sum(q[iq * batch:(iq + 1) * batch]
                          * (log_q[iq * batch:(iq + 1) * batch] - log_p[v * batch:(v + 1) * batch]),
                          axis=-1))
           for iq in range(2) for v in range(ncrops) if v != iq]
    q_mean = q.mean(axis=0)
    nonzero = q_mean[q_mean > 0]
    return {"teacher_entropy": float(np.mean(-np.sum(q * log_q, axis=-1))),
            "kl": float(np.mean(kls)),
            "batch_entropy": float(-np.sum(nonzero * np.log(nonzero)))}


def run_health(backend, student, teacher, center, ncrops):
    with use_backend(backend):
        return dino_loss_with_health(student, teacher, center, ncrops, STUDENT_TEMP, TEACHER_TEMP)


def assert_health(got: dict, want: dict, atol: float):
    for name, value in want.items():
        assert got[name].dim() == 0 and got[name].device == got["kl"].device
        assert abs(got[name].item() - value) <= atol, (name, got[name].item(), value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [37, 1000, 4097])
@pytest.mark.parametrize("batch,ncrops", [(3, 2), (2, 4), (1, 10)])
@pytest.mark.parametrize("teacher_scale", [2.0, 0.02])  # sharp and near-uniform teachers
def test_health_matches_numpy_definitions(backend, K, batch, ncrops, teacher_scale):
    student, teacher, center = make_logits(batch, ncrops, K, device=device_for(backend),
                                           teacher_scale=teacher_scale)
    center = center * teacher_scale
    _, _, health = run_health(backend, student, teacher, center, ncrops)
    want = numpy_health(student, teacher, center, ncrops)
    # float32 math on logits / 0.04 ~ 100: absolute errors ~1e-5 of the loss's scale
    assert_health(health, want, atol=2e-5 * max(1.0, math.log(K)) * 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1000, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_health_leaves_loss_outputs_bit_identical(backend, K, dtype):
    student, teacher, center = make_logits(3, 4, K, dtype, device_for(backend))
    outputs = []
    for with_health in (False, True):
        s = student.clone().requires_grad_(True)
        with use_backend(backend):
            call = dino_loss_with_health if with_health else dino_loss
            loss, teacher_mean = call(s, teacher, center, 4, STUDENT_TEMP, TEACHER_TEMP)[:2]
        loss.backward()
        outputs.append((loss.detach(), teacher_mean, s.grad))
    for name, a, b in zip(("loss", "teacher_mean", "grad"), *outputs):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_health_of_collapsed_teachers(backend):
    """A teacher equal for every sample and sharp (one-dimension collapse): both entropies ~0
    (no NaN where probabilities underflow); a flat one (uniform collapse): both ln K; a student
    that copies the teacher: KL ~0."""
    batch, ncrops, K = 4, 3, 1000
    device = device_for(backend)
    center = torch.zeros(K, device=device)
    sharp = torch.zeros(2 * batch, K, device=device)
    sharp[:, 7] = 10.0  # / 0.04: every other probability underflows
    flat = torch.zeros(2 * batch, K, device=device)
    for teacher, entropy in ((sharp, 0.0), (flat, math.log(K))):
        student = (teacher * STUDENT_TEMP / TEACHER_TEMP)[:batch].repeat(ncrops, 1)
        _, _, health = run_health(backend, student, teacher, center, ncrops)
        for name in ("teacher_entropy", "batch_entropy"):
            assert abs(health[name].item() - entropy) < 1e-4, (name, health[name].item())
        assert abs(health["kl"].item()) < 1e-4


def _entropy_rows(K: int) -> torch.Tensor:
    """Teacher rows whose scaled logits ``y = (t + 3) * 16`` are exact in float32 and large
    (8048 to 8208): uniform (``H = ln K``), one logit 8 above the others (``H ~ 2``), 30 above
    (``H ~ 31 K e^-30``, every other probability ~1e-13) and 160 above (``H ~ 0``, the others
    underflow). At this size ``lse - sum q y`` loses up to ``ulp(8208) ~ 1e-3`` to cancellation
    (4e-5 to 3e-4 measured on these rows); ``log S - sum q (y - max)`` does not."""
    rows = torch.full((4, K), 500.0)
    for row, gap in ((1, 8), (2, 30), (3, 160)):
        rows[row, K // 3] += gap / 16
    return rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1000, 4097])
def test_entropy_of_uniform_and_sharp_rows(backend, K):
    """Each teacher row's entropy against float64 within ``1e-6 + 1e-5 H``, whatever the
    logits' size (measured: the kernels within 8e-7, under 2 float32 ulps of ``1 + H``; the
    float32 reference within 6e-6)."""
    teacher = _entropy_rows(K).to(device_for(backend))
    center = torch.full((K,), -3.0, device=teacher.device)
    student = torch.zeros(4, K, device=teacher.device)
    with use_backend(backend):
        entropy = torch.ops.dino_fast.dino_loss_fwd(student, teacher, center, 2, STUDENT_TEMP,
                                                    1 / 16, False, True)[3]
    want, _ = teacher_health_reference(teacher.double().cpu(), center.double().cpu(), 1 / 16)
    assert abs(want[0].item() - math.log(K)) < 1e-12 and want[3].item() < 1e-60
    error = (entropy.double().cpu() - want).abs()
    assert (error <= 1e-6 + 1e-5 * want).all(), (entropy.tolist(), want.tolist())


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name == "triton"])
@pytest.mark.parametrize("need_health", [False, True])
def test_triton_launcher_reads_row_strided_teacher(backend, need_health):
    """The Triton launcher with a teacher whose rows are strided (the op passes contiguous
    ones): every output the same bits as with a contiguous copy."""
    from dino_fast.kernels.dino_loss import dino_loss_fwd
    student, _, center = make_logits(3, 4, 1000, device=device_for(backend))
    teacher = torch.randn(6, 1013, device=student.device)[:, 5:1005]  # (2B, K), row stride 1013
    args = (center, 4, STUDENT_TEMP, TEACHER_TEMP, True, need_health)
    strided = dino_loss_fwd(student, teacher, *args)
    contiguous = dino_loss_fwd(student, teacher.contiguous(), *args)
    for name, a, b in zip(("loss", "teacher_mean", "grad", "entropy", "probs_mean"), strided,
                          contiguous):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_op_health_outputs_and_opcheck(backend):
    student, teacher, center = make_logits(3, 4, 37, device=device_for(backend))
    with use_backend(backend):
        out = torch.ops.dino_fast.dino_loss_fwd(student, teacher, center, 4, STUDENT_TEMP,
                                                TEACHER_TEMP, False, True)
        assert out[3].shape == (6,) and out[4].shape == (37,)
        assert out[3].dtype == out[4].dtype == torch.float32
        assert abs(out[4].sum().item() - 1.0) < 1e-5  # a distribution over K
        torch.library.opcheck(torch.ops.dino_fast.dino_loss_fwd,
                              (student.requires_grad_(True), teacher, center, 4, STUDENT_TEMP,
                               TEACHER_TEMP, True, True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_health_under_torch_compile(backend):
    student, teacher, center = make_logits(2, 4, 333, device=device_for(backend))

    def step(s, t, c):
        loss, _, health = dino_loss_with_health(s, t, c, 4, STUDENT_TEMP, TEACHER_TEMP)
        return loss, health

    torch._dynamo.reset()
    with use_backend(backend):
        _, health = torch.compile(step, backend="aot_eager", fullgraph=True)(student, teacher,
                                                                             center)
    assert_health(health, numpy_health(student, teacher, center, 4), atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dino_loss_module_keeps_step_health(backend):
    """``DINOLoss.health`` after a step: the op's metrics and the norm of the center it used."""
    batch, ncrops, K = 2, 4, 100
    device = device_for(backend)
    module = DINOLoss(K, ncrops, 0.04, 0.04, 0, 2).to(device)
    module.center.fill_(0.5)
    student, teacher, _ = make_logits(batch, ncrops, K, device=device)
    with use_backend(backend):
        module(student, teacher, 0)
    want = numpy_health(student, teacher, torch.full((K,), 0.5), ncrops)
    assert_health(module.health, want, atol=1e-3)
    assert module.health["center_norm"].item() == pytest.approx(0.5 * math.sqrt(K))
    assert not torch.allclose(module.center, torch.full_like(module.center, 0.5))  # updated
