"""The teacher EMA as one in-place op over flat parameter buffers:
``teacher = m * teacher + (1 - m) * student`` (DINO's momentum teacher, official ``main_dino.py``).

1. ``ema_reference``: the readable spec and test oracle, in the official operation order.
2. ``dino_fast::ema_``: a ``torch.library`` custom op that mutates ``teacher`` (declared), run by
   the Triton kernel (``dino_fast.kernels.ema``), the C++ kernel (``dino_fast.ops._cpp``) or the
   reference, as dispatched.

Kernel contract (Triton and C++ alike)::

    ema_(teacher [P] float32, contiguous, updated in place; student [P] float32, contiguous;
         momentum 0-d float32 tensor on the buffers' device) -> None

The momentum is a tensor so that a compiled step does not recompile as it changes every step.
"""
import torch

from dino_fast.ops import _backend


def ema_reference(teacher: torch.Tensor, student: torch.Tensor, momentum) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, in place."""
    teacher.mul_(momentum).add_((1 - momentum) * student)


def check_buffers(teacher: torch.Tensor, student: torch.Tensor):
    """Raise a clear error unless both are contiguous float32 buffers of one shape and device."""
    if teacher.shape != student.shape or teacher.device != student.device:
        raise ValueError(f"teacher {tuple(teacher.shape)} on {teacher.device} and student "
                         f"{tuple(student.shape)} on {student.device} must match")
    if teacher.dtype != torch.float32 or student.dtype != torch.float32:
        raise ValueError("the EMA keeps float32 master weights; "
                         f"got {teacher.dtype}/{student.dtype}")
    if not (teacher.is_contiguous() and student.is_contiguous()):
        raise ValueError("the EMA runs on contiguous (flat) buffers")


@torch.library.custom_op("dino_fast::ema_", mutates_args=("teacher",))
def ema_op(teacher: torch.Tensor, student: torch.Tensor, momentum: torch.Tensor) -> None:
    """In-place EMA of ``teacher`` towards ``student`` with a 0-d ``momentum`` tensor."""
    check_buffers(teacher, student)  # the kernels assume one flat float32 length
    backend = _backend.resolve("ema", teacher.device)
    if backend == "triton":
        from dino_fast.kernels.ema import ema_ as triton_ema_
        triton_ema_(teacher, student, momentum)
    elif backend == "cpp":
        from dino_fast.ops import _cpp
        _cpp.ema_(teacher, student, momentum)
    else:
        ema_reference(teacher, student, momentum)


@ema_op.register_fake
def _(teacher, student, momentum):
    check_buffers(teacher, student)
    return None


def ema_(teacher: torch.Tensor, student: torch.Tensor, momentum) -> None:
    """Update the flat float32 ``teacher`` buffer in place towards ``student``.

    ``momentum`` is a float or a 0-d tensor. Dispatched by ``DINO_FAST_BACKEND``.
    """
    check_buffers(teacher, student)
    if not torch.is_tensor(momentum):
        momentum = torch.tensor(float(momentum), dtype=torch.float32, device=teacher.device)
    elif momentum.numel() != 1:
        raise ValueError(f"momentum must be a scalar, got shape {tuple(momentum.shape)}")
    if _backend.resolve("ema", teacher.device) == "reference":
        ema_reference(teacher, student, momentum)
        return
    ema_op(teacher, student, momentum.to(device=teacher.device, dtype=torch.float32).reshape(()))
