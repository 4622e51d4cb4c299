"""Triton kernel for the teacher EMA (DINO's momentum teacher, official ``main_dino.py``).

Contract (shared with the C++ kernel; see ``dino_fast/ops/ema.py``)::

    ema_(teacher [P] float32 contiguous, in place; student [P] float32 contiguous;
         momentum 0-d float32 tensor on the same device) -> None

One launch over the whole flat buffer: each program reads the momentum from its pointer (so a
changing momentum never recompiles or syncs) and updates a block of contiguous elements, which
Triton turns into 128-bit loads and stores. The work is pure streaming (8 bytes read, 4 written
per element), so it runs at memory bandwidth.
"""
import torch
import triton
import triton.language as tl

_BLOCK = 4096
_NUM_WARPS = 8


@triton.jit
def _ema_kernel(teacher_ptr, student_ptr, momentum_ptr, numel, BLOCK: tl.constexpr):
    """``teacher = momentum * teacher + (1 - momentum) * student`` on one block."""
    start = tl.program_id(0).to(tl.int64) * BLOCK  # int64: buffers may pass 2**31 elements
    offsets = start + tl.arange(0, BLOCK)
    mask = offsets < numel
    momentum = tl.load(momentum_ptr).to(tl.float32)
    teacher = tl.load(teacher_ptr + offsets, mask=mask)
    student = tl.load(student_ptr + offsets, mask=mask)
    tl.store(teacher_ptr + offsets, teacher * momentum + student * (1.0 - momentum), mask=mask)


def ema_(teacher: torch.Tensor, student: torch.Tensor, momentum: torch.Tensor) -> None:
    """In-place EMA of the flat float32 ``teacher`` towards ``student`` (checked by the op)."""
    numel = teacher.numel()
    if numel == 0:
        return
    _ema_kernel[(triton.cdiv(numel, _BLOCK),)](teacher, student, momentum, numel,
                                               BLOCK=_BLOCK, num_warps=_NUM_WARPS)
