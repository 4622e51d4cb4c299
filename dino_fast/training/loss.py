"""The DINO loss module (official ``main_dino.py`` ``DINOLoss``): the teacher-temperature
schedule, the fused loss op, and the center, an EMA of the teacher logits' batch mean."""
import numpy as np
import torch
import torch.nn as nn

from dino_fast.ops.dino_loss import dino_loss_with_health
from dino_fast.training.distributed import all_reduce_mean


def teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs):
    """Per-epoch teacher temperature: linear warm-up (endpoint included), then constant."""
    if not 0 <= warmup_teacher_temp_epochs <= nepochs:
        raise ValueError(f"warmup_teacher_temp_epochs={warmup_teacher_temp_epochs} must be in "
                         f"[0, epochs={nepochs}]")
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))


class DINOLoss(nn.Module):
    """Cross-entropy between the centered, sharpened teacher and the student, over view pairs.

    The ``center`` buffer ``[1, out_dim]`` is saved in checkpoints as ``dino_loss``. Each forward
    uses the center of the previous steps, then updates it with the batch mean of the teacher
    logits (averaged over processes when torch.distributed is initialised).

    After each forward, ``health`` holds that step's collapse diagnostics as 0-d device tensors
    (read them when needed; nothing here waits for the device): ``teacher_entropy``, ``kl`` and
    ``batch_entropy`` (``dino_fast.ops.dino_loss.health_metrics``) and ``center_norm``, the L2
    norm of the center the step used.
    """

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        # a list of Python floats: torch.compile treats them as constants (a NumPy element
        # would become a data-dependent symbolic float)
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs).tolist()
        self.health: dict[str, torch.Tensor] = {}

    def forward(self, student_output, teacher_output, epoch):
        """The loss of student logits ``[ncrops*B, K]`` against teacher logits ``[2*B, K]``."""
        temp = self.teacher_temp_schedule[epoch]
        loss, teacher_mean, health = dino_loss_with_health(
            student_output, teacher_output, self.center, self.ncrops, self.student_temp, temp)
        self.health = {**health, "center_norm": self.center.detach().norm()}
        self.update_center(teacher_mean)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_mean: torch.Tensor):
        """``center = m * center + (1 - m) * batch mean`` (the mean over all processes)."""
        batch_center = all_reduce_mean(teacher_mean.reshape(1, -1).to(self.center.dtype))
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
