"""The collapse rule (``dino_fast.monitoring.health``) on synthetic collapses made of real loss
outputs: teacher logits equal for every sample and sharp (one-dimension), or flat (uniform), with a
student that copies them; random healthy logits and the first epochs of a healthy run must not
raise a warning."""
import math

import pytest
import torch

from dino_fast.monitoring.health import CollapseDetector, CollapseRule, epoch_health
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


def logged(ratios, kls, out_dim=1024) -> list[dict]:
    """Per-epoch records with these entropy ratios and KLs (many prototypes in use)."""
    ln_k = math.log(out_dim)
    return [{"teacher_entropy": r * ln_k, "teacher_entropy_ratio": r, "kl": kl,
             "batch_entropy": 0.97 * ln_k, "prototypes_used": out_dim * 0.8, "center_norm": 1.0}
            for r, kl in zip(ratios, kls)]


# Recorded per-epoch (H / ln K, KL) of a real run: vit_tiny, K = 1024, the bundled photos,
# batch 8, lr 0.02, 3 warm-up epochs, 4 local crops at 64/32 px (the slow test's command, see
# test_collapse_run.py); its loss climbed back to 6.76 of ln K = 6.93 (--norm_last_layer true
# and false gave the same numbers to 3 decimals over these epochs).
DRIFT_TO_UNIFORM = logged(
    (0.861, 0.870, 0.876, 0.871, 0.881, 0.904, 0.897, 0.905, 0.909, 0.918, 0.932, 0.936),
    (0.696, 0.688, 0.531, 0.450, 0.401, 0.334, 0.308, 0.311, 0.296, 0.295, 0.214, 0.248))


def test_recorded_drift_to_uniform_is_flagged_after_warmup():
    detector = CollapseDetector(1024, start_epoch=3)
    messages = [detector.update(epoch, record) for epoch, record in enumerate(DRIFT_TO_UNIFORM)]
    assert [i for i, m in enumerate(messages) if m] == [9]
    assert messages[9].startswith("WARNING: uniform collapse at epoch 9")


# Recorded per-epoch (H / ln K, KL) of the healthy learning check (benchmarks/learning_check.py:
# vit_tiny, K = 1024, 256 photo stamps, 10 warm-up epochs), epochs 10-22, where its teacher is
# flattest; its 20-NN top-1 keeps rising. KL 0.05 ln K flagged it at epoch 16.
HEALTHY_LEARNING_CHECK = logged(
    (0.904, 0.907, 0.910, 0.910, 0.914, 0.906, 0.906, 0.903, 0.903, 0.892, 0.902, 0.893, 0.897),
    (0.378, 0.387, 0.359, 0.354, 0.346, 0.341, 0.342, 0.367, 0.361, 0.387, 0.391, 0.376, 0.392))


def test_recorded_healthy_learning_check_is_not_flagged():
    detector = CollapseDetector(1024, start_epoch=0)
    assert [detector.update(epoch, record) for epoch, record in
            enumerate(HEALTHY_LEARNING_CHECK)] == [None] * len(HEALTHY_LEARNING_CHECK)


def test_warmup_epochs_are_not_judged():
    """A collapse signature during the learning-rate warm-up counts for nothing."""
    flat = logged([0.99] * 6, [0.01] * 6)
    detector = CollapseDetector(1024, start_epoch=4)
    messages = [detector.update(epoch, record) for epoch, record in enumerate(flat)]
    assert messages == [None] * 6  # epochs 4 and 5 only: fewer than `patience`
    assert len(detector.history) == 2
