"""Adapters from torch tensors to the C++ CPU kernels of ``dino_fast._C`` (``csrc/``).

The extension is plain pybind11 over buffers (no torch headers): each adapter passes zero-copy
numpy views of contiguous CPU tensors, bfloat16 as its ``uint16`` bit pattern (numpy has no
bfloat16), and preallocated torch outputs, plus ``torch.get_num_threads()`` as the thread count.
Each call is a ``record_function`` range (``dino_fast::cpp_*``), so profiles show the kernels.
The kernels run in float32 whatever the input; float16 and float64 inputs are converted to
float32 here and the gradient is returned in the input's dtype, as the kernel contract says.
"""
import torch

from dino_fast.ops import _backend

_NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # what the C++ kernels read and write


def _module():
    module = _backend.cpp_module()
    if module is None:
        raise RuntimeError("dino_fast._C was not built (reinstall with a C++17 compiler)")
    return module


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous CPU tensor of a dtype the kernels read (float32 or bfloat16)."""
    x = x.detach()
    return (x if x.dtype in _NATIVE_DTYPES else x.float()).contiguous()


def _view(x: torch.Tensor):
    """A zero-copy numpy view of a contiguous CPU tensor; bfloat16 as uint16 bits."""
    return (x.view(torch.uint16) if x.dtype == torch.bfloat16 else x).numpy()


def dino_loss_fwd(student, teacher, center, ncrops, student_temp, teacher_temp, need_grad,
                  need_health=False):
    """The DINO loss kernel contract (``dino_fast.ops.dino_loss``) on CPU tensors, in C++."""
    out_dtype = student.dtype
    student, teacher = _kernel_input(student), _kernel_input(teacher)
    center = center.detach().reshape(-1).float().contiguous()
    batch, k = teacher.shape[0] // 2, student.shape[1]
    teacher_mean = torch.empty(k, dtype=torch.float32)
    grad = torch.empty_like(student) if need_grad else None
    entropy = torch.empty(2 * batch if need_health else 0, dtype=torch.float32)
    probs_mean = torch.empty(k if need_health else 0, dtype=torch.float32)
    health = ({"teacher_entropy": _view(entropy), "probs_mean": _view(probs_mean)}
              if need_health else {})
    with torch.profiler.record_function("dino_fast::cpp_dino_loss_fwd"):
        loss = _module().dino_loss_fwd(_view(student), _view(teacher), _view(center),
                                       None if grad is None else _view(grad),
                                       _view(teacher_mean), batch, k, ncrops, float(student_temp),
                                       float(teacher_temp), torch.get_num_threads(), **health)
    grad = student.new_empty(0, dtype=out_dtype) if grad is None else grad.to(out_dtype)
    return torch.tensor(loss, dtype=torch.float32), teacher_mean, grad, entropy, probs_mean


def ema_(teacher, student, momentum):
    """``teacher = m * teacher + (1 - m) * student`` in place on flat float32 CPU buffers."""
    with torch.profiler.record_function("dino_fast::cpp_ema_"):
        _module().ema_(_view(teacher.detach()), _view(student.detach()), float(momentum),
                       torch.get_num_threads())


def clip_gradients_(grads, norms, clip):
    """``grads[i] *= min(clip / (norms[i] + 1e-6), 1)`` in place on float32 CPU tensors
    (gradients, which never require grad: no ``detach`` per tensor)."""
    with torch.profiler.record_function("dino_fast::cpp_clip_gradients_"):
        _module().clip_gradients_([_view(g) for g in grads], _view(norms.detach()),
                                  float(clip), torch.get_num_threads())
