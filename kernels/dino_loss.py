"""Triton kernels for the fused DINO loss (Caron et al. 2021; official ``main_dino.py`` DINOLoss).

Contract (shared with the C++ kernel; see ``dino_fast/ops/dino_loss.py``)::

    dino_loss_fwd(student [S, K], teacher [2B, K], center [K], ncrops, student_temp,
                  teacher_temp, need_grad, need_health=False)
      -> (loss [] f32, teacher_mean [K] f32, grad_student, teacher_entropy [2B] f32,
          teacher_probs_mean [K] f32)

No ``[pairs, B, K]`` tensor is ever built. With teacher probabilities ``q0, q1`` of sample ``b``
and student log-probabilities ``ls_v`` of its ``ncrops`` views, the sum over the pairs
``(iq, v != iq)`` regroups per student row::

    sum_iq sum_{v != iq} q_iq . ls_v = sum_v w_v . ls_v,  w_0 = q1, w_1 = q0, w_v = q0 + q1 (v >= 2)

so each student row needs only its own logits and the two teacher rows of its sample, and
``d loss / d s_v = (|w_v| softmax(s_v / Ts) - w_v) / (Ts * npairs * B)`` with ``|w_v| = sum_k w_v``.

Three launches, each streaming over K in blocks (any K, not only powers of two):
1. ``_row_lse_kernel`` on the teacher rows: log-sum-exp of ``(t - center) / Tt``;
2. ``_row_lse_kernel`` on the student rows: log-sum-exp of ``s / Ts``;
3. ``_dino_rows_kernel``, one program per student row: ``w_v . ls_v`` and the gradient row.
Per-row loss partials are summed by torch, so the loss is deterministic (no atomics).
Math is float32 whatever the input dtype; the gradient is stored in the student's dtype.

With ``need_health`` a fourth launch, ``_teacher_health_kernel`` (one program per block of
columns, reusing the teacher log-sum-exps of launch 1), reads the teacher once more (2B rows, a
fraction ``2 / ncrops`` of what launch 3 reads) for the health outputs: each teacher row's
entropy and the teacher probabilities' mean over the rows. The first three launches and their
outputs are the same with or without it.
"""
import torch
import triton
import triton.language as tl

_MAX_BLOCK_K = 4096


@triton.jit
def _row_lse_kernel(x_ptr, center_ptr, lse_ptr, K, stride_row, scale,
                    HAS_CENTER: tl.constexpr, BLOCK_K: tl.constexpr):
    """``lse[row] = logsumexp_k((x[row, k] - center[k]) * scale)`` with an online max per lane."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_K)
    # Start below any float32 logit but above -inf: a lane that never sees a value keeps a zero
    # sum without the nan of exp(-inf - (-inf)).
    run_max = tl.full([BLOCK_K], -1.0e38, tl.float32)  # per-lane running max
    run_sum = tl.zeros([BLOCK_K], tl.float32)  # per-lane sum of exp(x - run_max)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        mask = k < K
        x = tl.load(x_row + k, mask=mask, other=0.0).to(tl.float32)
        if HAS_CENTER:
            x = x - tl.load(center_ptr + k, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x * scale, float("-inf"))
        new_max = tl.maximum(run_max, x)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(x - new_max)
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    row_sum = tl.sum(run_sum * tl.exp(run_max - row_max), axis=0)
    tl.store(lse_ptr + row, row_max + tl.log(row_sum))


@triton.jit
def _dino_rows_kernel(student_ptr, teacher_ptr, center_ptr, student_lse_ptr, teacher_lse_ptr,
                      loss_rows_ptr, grad_ptr, B, K, stride_s, stride_t, stride_g,
                      inv_student_temp, inv_teacher_temp, grad_scale,
                      NCROPS: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """One student row (view ``v``, sample ``b``): ``-w_v . ls_v`` and optionally its gradient.

    Programs are ordered sample-major (``pid = b * NCROPS + v``) so the ``NCROPS`` programs that
    read the same two teacher rows run together and find them in L2.
    """
    pid = tl.program_id(0)
    b = (pid // NCROPS).to(tl.int64)
    v = pid % NCROPS
    row = v.to(tl.int64) * B + b  # student rows are view-major
    coef0 = (v != 0).to(tl.float32)  # weight of teacher view 0 (never against student view 0)
    coef1 = (v != 1).to(tl.float32)
    s_lse = tl.load(student_lse_ptr + row)
    t0_lse = tl.load(teacher_lse_ptr + b)
    t1_lse = tl.load(teacher_lse_ptr + B + b)
    s_row = student_ptr + row * stride_s
    t0_row = teacher_ptr + b * stride_t
    t1_row = teacher_ptr + (B + b) * stride_t
    g_row = grad_ptr + row * stride_g
    weight_total = coef0 + coef1  # |w_v|: each teacher softmax sums to 1
    cols = tl.arange(0, BLOCK_K)
    dot = tl.zeros([BLOCK_K], tl.float32)  # per-lane w_v * s_v / Ts
    weight_sum = tl.zeros([BLOCK_K], tl.float32)  # per-lane w_v, as the reference sums it
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        mask = k < K
        c = tl.load(center_ptr + k, mask=mask, other=0.0).to(tl.float32)
        t0 = tl.load(t0_row + k, mask=mask, other=0.0).to(tl.float32)
        t1 = tl.load(t1_row + k, mask=mask, other=0.0).to(tl.float32)
        q0 = tl.exp((t0 - c) * inv_teacher_temp - t0_lse)
        q1 = tl.exp((t1 - c) * inv_teacher_temp - t1_lse)
        w = tl.where(mask, coef0 * q0 + coef1 * q1, 0.0)
        s = tl.load(s_row + k, mask=mask, other=0.0).to(tl.float32) * inv_student_temp
        dot += w * s
        weight_sum += w
        if NEED_GRAD:
            p = tl.exp(s - s_lse)
            g = grad_scale * (weight_total * p - w)
            tl.store(g_row + k, g.to(grad_ptr.dtype.element_ty), mask=mask)
    # -w . (s / Ts - lse) = lse * sum(w) - w . s / Ts
    loss_row = s_lse * tl.sum(weight_sum, axis=0) - tl.sum(dot, axis=0)
    tl.store(loss_rows_ptr + row, loss_row)


@triton.jit
def _teacher_health_kernel(teacher_ptr, center_ptr, teacher_lse_ptr, probs_mean_ptr,
                           entropy_parts_ptr, rows, K, stride_t, inv_teacher_temp,
                           BLOCK_K: tl.constexpr):
    """One block of columns over every teacher row: the rows' mean of ``q = exp(x - lse)``,
    ``x = (t - c) / Tt``, and each row's share ``sum_k q (lse - x)`` of its entropy, written to
    ``entropy_parts[block, row]`` (summed over the blocks by torch: deterministic)."""
    block = tl.program_id(0)
    k = block * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = k < K
    c = tl.load(center_ptr + k, mask=mask, other=0.0).to(tl.float32)
    probs_sum = tl.zeros([BLOCK_K], tl.float32)
    for r in range(0, rows):
        lse = tl.load(teacher_lse_ptr + r)
        t = tl.load(teacher_ptr + r * stride_t + k, mask=mask, other=0.0).to(tl.float32)
        neg_log_q = lse - (t - c) * inv_teacher_temp  # -log q
        q = tl.where(mask, tl.exp(-neg_log_q), 0.0)
        probs_sum += q
        tl.store(entropy_parts_ptr + block * rows + r, tl.sum(q * neg_log_q, axis=0))
    tl.store(probs_mean_ptr + k, probs_sum / rows, mask=mask)


def teacher_health(teacher: torch.Tensor, center: torch.Tensor, teacher_lse: torch.Tensor,
                   teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(entropy [2B], probs_mean [K])`` of the centered, sharpened teacher softmax, float32,
    from its row log-sum-exps ``teacher_lse`` (``row_logsumexp(teacher, 1 / Tt, center)``)."""
    rows, K = teacher.shape
    block = _health_block(K)
    blocks = triton.cdiv(K, block)
    probs_mean = torch.empty(K, device=teacher.device, dtype=torch.float32)
    parts = torch.empty(blocks, rows, device=teacher.device, dtype=torch.float32)
    _teacher_health_kernel[(blocks,)](teacher, center, teacher_lse, probs_mean, parts, rows, K,
                                      teacher.stride(0), 1.0 / teacher_temp, BLOCK_K=block)
    return parts.sum(dim=0), probs_mean


def _health_block(K: int) -> int:
    """``BLOCK_K`` of ``_teacher_health_kernel`` (default 4 warps): narrow column blocks, so that
    K = 65536 gives 256 programs to spread over the SMs."""
    return min(256, triton.next_power_of_2(K))


def _launch_config(K: int) -> tuple[int, int]:
    """``(BLOCK_K, num_warps)``: blocks of up to 4096 columns, 8 warps for the large ones."""
    block = min(_MAX_BLOCK_K, triton.next_power_of_2(K))
    return block, (8 if block >= 2048 else 4)


def _rows_unit_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its columns are contiguous (any row stride), else a contiguous copy."""
    return x if x.stride(1) == 1 else x.contiguous()


def row_logsumexp(x: torch.Tensor, scale: float, center: torch.Tensor | None = None):
    """``logsumexp((x - center) * scale, dim=1)`` of a 2-D tensor, float32 ``[rows]``."""
    x = _rows_unit_stride(x)
    rows, K = x.shape
    lse = torch.empty(rows, device=x.device, dtype=torch.float32)
    block, warps = _launch_config(K)
    _row_lse_kernel[(rows,)](x, center if center is not None else x, lse, K, x.stride(0),
                             scale, HAS_CENTER=center is not None, BLOCK_K=block,
                             num_warps=warps)
    return lse


def dino_loss_fwd(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                  ncrops: int, student_temp: float, teacher_temp: float, need_grad: bool,
                  need_health: bool = False):
    """Fused DINO loss: ``(loss, teacher_mean, grad_student, teacher_entropy,
    teacher_probs_mean)`` per the module contract (the last two empty without ``need_health``).

    ``student [ncrops*B, K]``, ``teacher [2B, K]`` (any float dtype, rows may be strided),
    ``center [K]``. Shapes are checked by the op (``dino_fast.ops.dino_loss.check_shapes``).
    """
    student, teacher = _rows_unit_stride(student), _rows_unit_stride(teacher)
    center = center.reshape(-1).contiguous()
    S, K = student.shape
    B = teacher.shape[0] // 2
    npairs = 2 * (ncrops - 1)
    teacher_lse = row_logsumexp(teacher, 1.0 / teacher_temp, center)  # (2B,)
    student_lse = row_logsumexp(student, 1.0 / student_temp)  # (S,)
    loss_rows = torch.empty(S, device=student.device, dtype=torch.float32)
    grad = torch.empty_like(student) if need_grad else student.new_empty(0)
    block, warps = _launch_config(K)
    _dino_rows_kernel[(S,)](
        student, teacher, center, student_lse, teacher_lse, loss_rows,
        grad if need_grad else student, B, K,  # never written without NEED_GRAD
        student.stride(0), teacher.stride(0), grad.stride(0) if need_grad else 0,
        1.0 / student_temp, 1.0 / teacher_temp, 1.0 / (student_temp * npairs * B),
        NCROPS=ncrops, NEED_GRAD=need_grad, BLOCK_K=block, num_warps=warps)
    loss = loss_rows.sum() / (npairs * B)
    teacher_mean = teacher.sum(dim=0, dtype=torch.float32) / teacher.shape[0]  # (K,)
    if need_health:
        entropy, probs_mean = teacher_health(teacher, center, teacher_lse, teacher_temp)
    else:
        entropy, probs_mean = teacher_lse.new_empty(0), teacher_lse.new_empty(0)  # no aliases
    return loss, teacher_mean, grad, entropy, probs_mean
