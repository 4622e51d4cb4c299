"""The momentum teacher: ``teacher = m * teacher + (1 - m) * student`` over every parameter in one
fused op per step. Parameters of both models are re-pointed to views of one flat float32 buffer
per model (``flatten_parameters``), so the EMA is a single contiguous update; buffers (e.g. BN
statistics) are not averaged, as official."""
import torch
import torch.nn as nn

from dino_fast.ops.ema import ema_


def flatten_parameters(module: nn.Module) -> torch.Tensor:
    """Make every parameter of ``module`` a view of one new flat float32 buffer; return it.

    Values are kept. Call this before creating the optimizer (the Parameter objects stay the
    same, only their storage moves), and before wrapping in DistributedDataParallel.
    """
    params = list(module.parameters())
    if not params:
        raise ValueError("the module has no parameters")
    bad = {p.dtype for p in params if p.dtype != torch.float32}
    if bad:
        raise ValueError(f"the EMA keeps float32 master weights; found parameters of {bad}")
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        n = p.numel()
        p.data = flat[offset:offset + n].view_as(p)
        offset += n
    return flat


class TeacherEMA:
    """Keeps ``teacher`` an exponential moving average of ``student`` (same architecture)."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        names_s = [(n, p.shape) for n, p in student.named_parameters()]
        names_t = [(n, p.shape) for n, p in teacher.named_parameters()]
        if names_s != names_t:
            raise ValueError("student and teacher must have the same parameters in the same order")
        self.student_flat = flatten_parameters(student)
        self.teacher_flat = flatten_parameters(teacher)
        # one device scalar, refilled each step: no host-to-device copy per step
        self.momentum = torch.zeros((), dtype=torch.float32, device=self.teacher_flat.device)

    @torch.no_grad()
    def update(self, momentum):
        """One EMA step with ``momentum`` (a float or a 0-d tensor)."""
        self.momentum.fill_(momentum)
        ema_(self.teacher_flat, self.student_flat, self.momentum)
