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

Four launches, each streaming over K in blocks (any K, not only powers of two):
1. ``_row_lse_kernel`` on the teacher rows: log-sum-exp of ``(t - center) / Tt``;
2. ``_teacher_columns_kernel``, one program per block of columns over every teacher row: the
   teacher mean for the center update. It replaces torch's column sum, which read the teacher
   anyway, on the loss-only path too: it reads as that sum does (16-byte loads of whole row
   segments, 1024 programs at K = 65536, no atomics), and one summation order for both paths
   keeps the mean the same bits with or without health;
3. ``_row_lse_kernel`` on the student rows: log-sum-exp of ``s / Ts``;
4. ``_dino_rows_kernel``, one program per student row: ``w_v . ls_v`` and the gradient row.
Per-row loss partials are summed by torch, so the loss is deterministic (no atomics).
Math is float32 whatever the input dtype; the gradient is stored in the student's dtype.

With ``need_health`` no launch is added and the teacher is read no more: launch 1 also gives
each teacher row's entropy (from one more running sum per lane), launch 2 also the rows' mean
teacher probabilities (from the same loads, with the log-sum-exps of launch 1). Their other
outputs are the same with or without it (the extra work only adds results).
"""
import torch
import triton
import triton.language as tl

_MAX_BLOCK_K = 4096


@triton.jit
def _row_lse_kernel(x_ptr, center_ptr, lse_ptr, entropy_ptr, K, stride_row, scale,
                    HAS_CENTER: tl.constexpr, NEED_ENTROPY: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """``lse[row] = logsumexp_k(y)``, ``y = (x[row, k] - center[k]) * scale``, with an online max
    per lane; with ``NEED_ENTROPY`` also ``entropy[row] = -sum_k p log p``, ``p = softmax(y)``.

    The entropy is ``log S - W / S`` with ``S = sum exp(y - M)``, ``W = sum exp(y - M) (y - M)``
    and ``M`` the row max, not ``lse - sum p y``: every term of ``log S`` and ``-W / S`` is
    non-negative, so nothing cancels and the error is a few float32 ulps of ``1 + entropy``
    whatever the logits' size (``lse - sum p y`` loses about ``ulp(max |y|)`` to cancellation,
    1.5e-5 at ``|y| ~ 250``, where a sharp row's entropy is near 0).
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_K)
    # Start below any float32 logit but above -inf: a lane that never sees a value keeps a zero
    # sum without the nan of exp(-inf - (-inf)).
    run_max = tl.full([BLOCK_K], -1.0e38, tl.float32)  # per-lane running max
    run_sum = tl.zeros([BLOCK_K], tl.float32)  # per-lane sum of exp(y - run_max)
    run_dev = tl.zeros([BLOCK_K], tl.float32)  # per-lane sum of exp(y - run_max) (y - run_max)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        mask = k < K
        x = tl.load(x_row + k, mask=mask, other=0.0).to(tl.float32)
        if HAS_CENTER:
            x = x - tl.load(center_ptr + k, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x * scale, float("-inf"))
        new_max = tl.maximum(run_max, x)
        rescale = tl.exp(run_max - new_max)
        weight = tl.exp(x - new_max)
        if NEED_ENTROPY:
            # The old terms move by run_max - new_max; masked lanes add 0, not 0 * -inf.
            run_dev = (rescale * (run_dev + (run_max - new_max) * run_sum)
                       + weight * tl.where(mask, x - new_max, 0.0))
        run_sum = run_sum * rescale + weight
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    lane_scale = tl.exp(run_max - row_max)
    row_sum = tl.sum(run_sum * lane_scale, axis=0)
    log_sum = tl.log(row_sum)
    tl.store(lse_ptr + row, row_max + log_sum)
    if NEED_ENTROPY:
        row_dev = tl.sum(lane_scale * (run_dev + (run_max - row_max) * run_sum), axis=0)
        tl.store(entropy_ptr + row, log_sum - row_dev / row_sum)


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
def _teacher_columns_kernel(teacher_ptr, center_ptr, teacher_lse_ptr, mean_ptr, probs_mean_ptr,
                            rows, K, stride_t, inv_teacher_temp, NEED_HEALTH: tl.constexpr,
                            BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """One block of columns over every teacher row: ``mean[k]``, the rows' mean of ``t``, and
    with ``NEED_HEALTH`` ``probs_mean[k]``, their mean of ``q = exp((t - c) / Tt - lse)``.

    Tiles of ``BLOCK_ROWS`` rows are added element-wise, in row order, and reduced over the tile
    once at the end: no reduction per row, no atomics (deterministic). The teacher mean's sums
    are the same instructions with or without ``NEED_HEALTH``.
    """
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = k < K
    if NEED_HEALTH:
        c = tl.load(center_ptr + k, mask=col_mask, other=0.0).to(tl.float32)
    tile_rows = tl.arange(0, BLOCK_ROWS)
    logit_sum = tl.zeros([BLOCK_ROWS, BLOCK_K], tl.float32)
    probs_sum = tl.zeros([BLOCK_ROWS, BLOCK_K], tl.float32)
    for r0 in range(0, rows, BLOCK_ROWS):
        r = r0 + tile_rows
        row_mask = r < rows
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = r[:, None].to(tl.int64) * stride_t + k[None, :]
        t = tl.load(teacher_ptr + offsets, mask=mask, other=0.0).to(tl.float32)  # (ROWS, K)
        logit_sum += t
        if NEED_HEALTH:
            lse = tl.load(teacher_lse_ptr + r, mask=row_mask, other=0.0)
            log_q = (t - c[None, :]) * inv_teacher_temp - lse[:, None]
            probs_sum += tl.exp(tl.where(mask, log_q, float("-inf")))  # no overflow off-mask
    tl.store(mean_ptr + k, tl.sum(logit_sum, axis=0) / rows, mask=col_mask)
    if NEED_HEALTH:
        tl.store(probs_mean_ptr + k, tl.sum(probs_sum, axis=0) / rows, mask=col_mask)


def teacher_columns(teacher: torch.Tensor, center: torch.Tensor, teacher_lse: torch.Tensor,
                    teacher_temp: float, need_health: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(teacher_mean [K], probs_mean [K])``, float32, in one pass over the teacher: the rows'
    mean logits and (with ``need_health``; else ``[0]``) the rows' mean of the centered,
    sharpened teacher softmax, from its row log-sum-exps ``teacher_lse``."""
    rows, K = teacher.shape
    block_rows, block_k = _columns_config(rows, K)
    mean = torch.empty(K, device=teacher.device, dtype=torch.float32)
    probs_mean = torch.empty(K if need_health else 0, device=teacher.device, dtype=torch.float32)
    _teacher_columns_kernel[(triton.cdiv(K, block_k),)](
        teacher, center, teacher_lse, mean, probs_mean if need_health else mean, rows, K,
        teacher.stride(0), 1.0 / teacher_temp, NEED_HEALTH=need_health,
        BLOCK_ROWS=block_rows, BLOCK_K=block_k)
    return mean, probs_mean


def _columns_config(rows: int, K: int) -> tuple[int, int]:
    """``(BLOCK_ROWS, BLOCK_K)`` of ``_teacher_columns_kernel`` (default 4 warps). Row segments
    of 64 columns (128-256 B, whole cache lines) keep the loads coalesced while giving many
    programs: 1024 at K = 65536, 16 at K = 1000, 65 at K = 4097. 32-row tiles (16 values per
    thread) keep 4-8 KiB in flight per program at each step."""
    return min(32, triton.next_power_of_2(rows)), min(64, triton.next_power_of_2(K))


def _launch_config(K: int) -> tuple[int, int]:
    """``(BLOCK_K, num_warps)``: blocks of up to 4096 columns, 8 warps for the large ones."""
    block = min(_MAX_BLOCK_K, triton.next_power_of_2(K))
    return block, (8 if block >= 2048 else 4)


def _rows_unit_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its columns are contiguous (any row stride), else a contiguous copy."""
    return x if x.stride(1) == 1 else x.contiguous()


def row_logsumexp(x: torch.Tensor, scale: float, center: torch.Tensor | None = None,
                  need_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse, entropy)``, float32 ``[rows]``: ``logsumexp(y, dim=1)`` and (with
    ``need_entropy``; else ``[0]``) the entropy of ``softmax(y, dim=1)``,
    ``y = (x - center) * scale`` of a 2-D tensor."""
    x = _rows_unit_stride(x)
    rows, K = x.shape
    lse = torch.empty(rows, device=x.device, dtype=torch.float32)
    entropy = torch.empty(rows if need_entropy else 0, device=x.device, dtype=torch.float32)
    block, warps = _launch_config(K)
    _row_lse_kernel[(rows,)](x, center if center is not None else x, lse,
                             entropy if need_entropy else lse, K, x.stride(0), scale,
                             HAS_CENTER=center is not None, NEED_ENTROPY=need_entropy,
                             BLOCK_K=block, num_warps=warps)
    return lse, entropy


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
    teacher_lse, entropy = row_logsumexp(teacher, 1.0 / teacher_temp, center,
                                         need_health)  # (2B,), (2B,) or (0,)
    # Next to launch 1, which has just brought the teacher into L2.
    teacher_mean, probs_mean = teacher_columns(teacher, center, teacher_lse, teacher_temp,
                                               need_health)  # (K,), (K,) or (0,)
    student_lse, _ = row_logsumexp(student, 1.0 / student_temp)  # (S,)
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
    return loss, teacher_mean, grad, entropy, probs_mean
