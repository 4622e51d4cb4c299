"""The collapse rule (``dino_fast.health``) on synthetic collapses made of real loss outputs:
teacher logits equal for every sample and sharp (one-dimension), or flat (uniform), with a
student that copies them; random healthy logits and the first epochs of a healthy run must not
raise a warning."""
import math

import pytest
import torch

from dino_fast.health import CollapseDetector, CollapseRule, epoch_health
from dino_fast.ops import use_backend
from dino_fast.ops.dino_loss import dino_loss_with_health
from tests.conftest import available_backends

BATCH, NCROPS, K = 8, 4, 256
# every backend's metrics are checked in test_loss_health.py; the interpreted Triton kernels
# would take ~20 s here for nothing more
BACKENDS = [name for name in available_backends() if name != "triton"]
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


def epoch_record(teacher, student, backend="reference", center=None) -> dict:
    """One epoch's metrics from one step of the fused loss on these logits."""
    center = torch.zeros(K) if center is None else center
    with use_backend(backend):
        _, _, health = dino_loss_with_health(student, teacher, center, NCROPS, STUDENT_TEMP,
                                             TEACHER_TEMP)
    means = {name: value.item() for name, value in health.items()}
    return epoch_health({**means, "center_norm": center.norm().item()}, K)


def copying_student(teacher):
    """Student logits whose softmax at 0.1 equals the teacher's at 0.04, for every view."""
    return (teacher[:BATCH] * STUDENT_TEMP / TEACHER_TEMP).repeat(NCROPS, 1)


def one_dimension_logits(noise=0.0):
    teacher = torch.randn(2 * BATCH, K) * noise
    teacher[:, 5] += 1.0  # / 0.04: the same prototype takes everything, for every image
    return teacher, copying_student(teacher)


def uniform_logits(noise=0.001):
    teacher = torch.randn(2 * BATCH, K) * noise
    return teacher, copying_student(teacher)


def healthy_logits():
    """Sharp teachers spread over many prototypes, a student that does not copy them yet."""
    return torch.randn(2 * BATCH, K), torch.randn(NCROPS * BATCH, K)


def run_detector(records) -> tuple[list, CollapseDetector]:
    detector = CollapseDetector(K)
    return [detector.update(epoch, record) for epoch, record in enumerate(records)], detector


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,make", [("one-dimension", one_dimension_logits),
                                       ("uniform", uniform_logits)])
def test_synthetic_collapse_is_named_once_after_patience(backend, kind, make):
    records = [epoch_record(*make(), backend=backend) for _ in range(6)]
    messages, detector = run_detector(records)
    patience = CollapseRule().patience
    assert messages[:patience - 1] == [None] * (patience - 1)  # held for `patience` epochs
    assert messages[patience - 1].startswith(f"WARNING: {kind} collapse at epoch "
                                             f"{patience - 1}")
    assert "What usually helps" in messages[patience - 1]
    assert messages[patience:] == [None] * (6 - patience)  # logged once
    assert detector.collapse == kind


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_healthy_logits_raise_nothing(backend):
    records = [epoch_record(*healthy_logits(), backend=backend) for _ in range(8)]
    assert records[0]["prototypes_used"] > BATCH and records[0]["kl"] > 1
    messages, detector = run_detector(records)
    assert messages == [None] * 8 and detector.collapse is None


def test_signatures_and_their_thresholds():
    rule = CollapseRule()
    ln_k = math.log(K)
    base = {"teacher_entropy_ratio": 0.99, "kl": 0.001, "batch_entropy": ln_k}
    assert rule.signature(base, K) == "uniform"
    assert rule.signature({**base, "kl": 0.5}, K) is None  # the student still learns
    assert rule.signature({**base, "teacher_entropy_ratio": 0.9}, K) is None
    sharp = {"teacher_entropy_ratio": 0.01, "kl": 0.001, "batch_entropy": 0.05 * ln_k}
    assert rule.signature(sharp, K) == "one-dimension"
    # a healthy sharp teacher: low per-image entropy, many prototypes over the batch
    assert rule.signature({**sharp, "batch_entropy": 0.8 * ln_k}, K) is None


def test_early_epochs_of_a_healthy_run_do_not_warn():
    """The teacher starts near ln K by construction: entropy high and KL small while the
    teacher sharpens is a trend back to health, not a collapse."""
    ln_k = math.log(K)
    records = [{"teacher_entropy": r * ln_k, "teacher_entropy_ratio": r, "kl": 0.01,
                "batch_entropy": ln_k, "prototypes_used": K, "center_norm": 0.0}
               for r in (0.995, 0.985, 0.97, 0.955, 0.9, 0.7, 0.5)]
    messages, _ = run_detector(records)
    assert messages == [None] * len(records)
    # the same entropies rising back towards ln K: a uniform collapse
    messages, detector = run_detector(records[::-1] + [records[0]] * 2)
    assert detector.collapse == "uniform"


def test_recovering_one_dimension_trend_does_not_warn():
    ln_k = math.log(K)
    records = [{"teacher_entropy": 0.01, "teacher_entropy_ratio": 0.01 / ln_k, "kl": 0.001,
                "batch_entropy": b * ln_k, "prototypes_used": math.exp(b * ln_k),
                "center_norm": 1.0} for b in (0.01, 0.03, 0.05, 0.07, 0.09)]
    assert run_detector(records)[1].collapse is None
