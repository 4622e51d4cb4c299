"""The DINO loss as one op: centered teacher softmax, student log-softmax, cross-entropy over all
(teacher view, student view) pairs that are not the same view, and the teacher batch mean for the
center update (Caron et al. 2021, Algorithm 1; official ``main_dino.py`` ``DINOLoss``).

Layers of this file, top to bottom:
1. ``dino_loss_reference``: the readable spec and the test oracle (pure PyTorch, autograd).
2. ``dino_fast::dino_loss_fwd``: a ``torch.library`` custom op returning the loss, the teacher mean
   and the student gradient, computed by the Triton kernel (``dino_fast.kernels.dino_loss``), the
   C++ kernel (``dino_fast._C`` via ``dino_fast.ops._cpp``) or the reference, as dispatched.
3. ``dino_loss`` and ``dino_loss_with_health``: the public functions, with autograd.

Kernel contract (Triton and C++ alike)::

    dino_loss_fwd(student [S, K], teacher [2B, K], center [K], ncrops, student_temp,
                  teacher_temp, need_grad, need_health=False)
      -> loss [] float32, teacher_mean [K] float32,
         grad_student [S, K] in student's dtype (d loss / d student; shape [0] if not need_grad),
         teacher_entropy [2B] float32 (each teacher row's entropy; [0] if not need_health),
         teacher_probs_mean [K] float32 (the rows' mean teacher softmax; [0] if not need_health)

with S = ncrops * B, rows ordered view-major (g1, g2, l1, ..., each B rows), inputs contiguous.

The health outputs give the collapse diagnostics of the DINO paper (section 5.3) at almost no
cost: each pair's ``KL(P_t || P_s) = CE(P_t, P_s) - H(P_t)``, and every teacher view meets the
same number of student views, so the mean KL over the loss's pairs is ``loss - mean H(P_t)``
(see ``health_metrics``). Asking for them never changes the other outputs.
"""
import torch
import torch.nn.functional as F

from dino_fast.ops import _backend


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision in, float32 math (as autocast runs softmax); fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def dino_loss_terms_reference(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                              ncrops: int, student_temp: float, teacher_temp: float) -> dict:
    """``{(teacher view, student view): batch-mean cross-entropy}`` for every pair of different
    views: the terms the DINO loss averages (official loop order)."""
    student_views = (_upcast(student) / student_temp).chunk(ncrops)
    teacher_probs = F.softmax((_upcast(teacher) - center) / teacher_temp, dim=-1)
    teacher_probs = teacher_probs.detach().chunk(2)
    return {(iq, v): torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
            for iq, q in enumerate(teacher_probs)
            for v, s in enumerate(student_views) if v != iq}  # never a view with itself


def dino_loss_reference(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                        ncrops: int, student_temp: float, teacher_temp: float):
    """The official DINO loss; returns ``(loss, teacher_mean)``, the teacher logits' row mean."""
    terms = dino_loss_terms_reference(student, teacher, center, ncrops, student_temp,
                                      teacher_temp)
    teacher_mean = _upcast(teacher).detach().mean(dim=0)
    return sum(terms.values()) / len(terms), teacher_mean


def teacher_health_reference(teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float):
    """``(entropy [2B], probs_mean [K])``: the entropy ``-sum_k q log q`` of each centered,
    sharpened teacher row ``q``, and the mean of those rows (the batch-mean teacher output)."""
    log_probs = F.log_softmax((_upcast(teacher).detach() - center) / teacher_temp, dim=-1)
    probs = log_probs.exp()
    return -(probs * log_probs).sum(dim=-1), probs.mean(dim=0)


def health_metrics(loss: torch.Tensor, teacher_entropy: torch.Tensor,
                   teacher_probs_mean: torch.Tensor) -> dict:
    """The per-step health scalars (device tensors, no host sync) from the op's outputs:
    ``teacher_entropy`` (mean ``H(P_t)`` over the teacher rows, nats), ``kl`` (mean
    ``KL(P_t || P_s)`` over the loss's pairs) and ``batch_entropy`` (``H`` of the batch-mean
    teacher distribution; its ``exp`` is the number of prototypes in use)."""
    entropy = teacher_entropy.mean()
    batch_entropy = -torch.special.xlogy(teacher_probs_mean, teacher_probs_mean).sum()
    return {"teacher_entropy": entropy, "kl": loss.detach() - entropy,
            "batch_entropy": batch_entropy}


def check_shapes(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, ncrops: int):
    """Raise a clear error when the logits do not form ``ncrops`` student and 2 teacher views."""
    if ncrops < 2:
        raise ValueError(f"the DINO loss needs ncrops >= 2 (2 global views), got {ncrops}")
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(f"logits must be 2-D [rows, K], got student {tuple(student.shape)} "
                         f"and teacher {tuple(teacher.shape)}")
    k = student.shape[1]
    if teacher.shape[1] != k or center.numel() != k:
        raise ValueError(f"K differs: student {k}, teacher {teacher.shape[1]}, "
                         f"center {center.numel()}")
    if teacher.shape[0] % 2 or student.shape[0] != ncrops * (teacher.shape[0] // 2):
        raise ValueError(f"expected teacher rows 2*B and student rows ncrops*B with ncrops="
                         f"{ncrops}; got teacher {teacher.shape[0]}, student {student.shape[0]}")


def _reference_grad(student, teacher, center, ncrops, student_temp, teacher_temp):
    """``d loss / d student`` in closed form (autograd is not available inside the op body under
    dispatch modes such as opcheck's): ``(|w_v| softmax(s_v / Ts) - w_v) / (Ts * npairs * B)``,
    ``w_v`` the sum of the teacher probabilities that student view ``v`` is compared with."""
    q0, q1 = F.softmax((_upcast(teacher) - center) / teacher_temp, dim=-1).chunk(2)  # (B, K)
    weights = (q0 + q1).expand(ncrops, -1, -1).clone()  # (ncrops, B, K)
    weights[0], weights[1] = q1, q0  # a global view is not compared with itself
    probs = F.softmax(_upcast(student) / student_temp, dim=-1).view_as(weights)
    grad = weights.sum(-1, keepdim=True) * probs - weights
    scale = student_temp * 2 * (ncrops - 1) * q0.shape[0]
    return (grad / scale).view_as(student).to(student.dtype)


def _reference_fwd(student, teacher, center, ncrops, student_temp, teacher_temp, need_grad,
                   need_health=False):
    """The kernel contract computed with the reference (any device)."""
    loss, teacher_mean = dino_loss_reference(student.detach(), teacher, center, ncrops,
                                             student_temp, teacher_temp)
    grad = (_reference_grad(student, teacher, center, ncrops, student_temp, teacher_temp)
            if need_grad else student.new_empty(0))
    if need_health:
        entropy, probs_mean = teacher_health_reference(teacher, center, teacher_temp)
    else:
        entropy, probs_mean = teacher.new_empty(0), teacher.new_empty(0)  # outputs never alias
    return loss.float(), teacher_mean.float(), grad, entropy.float(), probs_mean.float()


@torch.library.custom_op("dino_fast::dino_loss_fwd", mutates_args=())
def dino_loss_fwd(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                  ncrops: int, student_temp: float, teacher_temp: float, need_grad: bool,
                  need_health: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor, torch.Tensor]:
    """Loss, teacher mean, student gradient and the health outputs in one call (see the module
    docstring)."""
    check_shapes(student, teacher, center, ncrops)  # the kernels index rows by these shapes
    student, teacher, center = student.contiguous(), teacher.contiguous(), center.contiguous()
    backend = _backend.resolve("dino_loss", student.device)
    args = (student, teacher, center, ncrops, student_temp, teacher_temp, need_grad, need_health)
    if backend == "triton":
        from dino_fast.kernels.dino_loss import dino_loss_fwd as triton_fwd
        return triton_fwd(*args)
    if backend == "cpp":
        from dino_fast.ops import _cpp
        return _cpp.dino_loss_fwd(*args)
    return _reference_fwd(*args)


@dino_loss_fwd.register_fake
def _(student, teacher, center, ncrops, student_temp, teacher_temp, need_grad, need_health=False):
    check_shapes(student, teacher, center, ncrops)
    grad = torch.empty_like(student) if need_grad else student.new_empty(0)
    health_rows, health_k = (teacher.shape[0], center.numel()) if need_health else (0, 0)
    return (student.new_empty((), dtype=torch.float32),
            center.new_empty(center.numel(), dtype=torch.float32), grad,
            teacher.new_empty(health_rows, dtype=torch.float32),
            teacher.new_empty(health_k, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2])
    ctx.set_materialize_grads(False)  # no zero-filled [S, K] grad for the unused outputs


def _backward(ctx, grad_loss, grad_teacher_mean, grad_grad, grad_entropy, grad_probs_mean):
    (grad_student,) = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 8
    return (grad_student * grad_loss.to(grad_student.dtype),) + (None,) * 7


dino_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, ncrops: int,
              student_temp: float, teacher_temp: float):
    """DINO loss of student logits ``[ncrops*B, K]`` against teacher logits ``[2*B, K]``.

    Returns ``(loss, teacher_mean)``: a float32 scalar with a gradient for ``student`` only, and
    the float32 mean of the teacher rows ``[K]`` for the center update. ``center`` is ``[K]`` or
    ``[1, K]``. Dispatched by ``DINO_FAST_BACKEND``; the result matches the reference.
    """
    loss, teacher_mean, _ = _dino_loss(student, teacher, center, ncrops, student_temp,
                                       teacher_temp, need_health=False)
    return loss, teacher_mean


def dino_loss_with_health(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                          ncrops: int, student_temp: float, teacher_temp: float):
    """:func:`dino_loss` plus ``health``, the dict of :func:`health_metrics` (0-d tensors on the
    logits' device); ``loss`` and ``teacher_mean`` are the same bits as ``dino_loss`` gives."""
    return _dino_loss(student, teacher, center, ncrops, student_temp, teacher_temp,
                      need_health=True)


def _dino_loss(student, teacher, center, ncrops, student_temp, teacher_temp, need_health):
    """``(loss, teacher_mean, health dict or None)`` through the dispatched backend."""
    center = center.reshape(-1)
    check_shapes(student, teacher, center, ncrops)
    if student.dtype == torch.float16:
        # The gradient entries (~1 / (K * B * pairs * student_temp)) underflow fp16 before the
        # loss scaler multiplies them: compute it in float32, cast back after the scaling.
        student = student.float()
    if _backend.resolve("dino_loss", student.device) == "reference":
        loss, teacher_mean = dino_loss_reference(student, teacher, center, ncrops, student_temp,
                                                 teacher_temp)
        health = (health_metrics(loss, *teacher_health_reference(teacher, center, teacher_temp))
                  if need_health else None)
        return loss, teacher_mean, health
    loss, teacher_mean, _, entropy, probs_mean = dino_loss_fwd(
        student, teacher.detach(), center.detach(), ncrops, float(student_temp),
        float(teacher_temp), student.requires_grad and torch.is_grad_enabled(), need_health)
    return loss, teacher_mean, (health_metrics(loss, entropy, probs_mean) if need_health else None)
