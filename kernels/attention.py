"""Flash attention (non-causal, no mask) in Triton: forward with online softmax, backward by
recomputation from the saved log-sum-exp (Dao et al. 2022, FlashAttention; Dao 2023,
FlashAttention-2). No ``[B, heads, N, N]`` tensor is ever stored.

Two layouts share the same kernels:

* batched: ``q, k, v`` ``[B, heads, N, head_dim]`` with any strides (the ViT passes permuted
  views of its qkv projection);
* packed variable length: ``q, k, v`` ``[total_tokens, heads, head_dim]`` holding several
  sequences back to back, delimited by ``cu_seqlens`` (int32 ``[nseq + 1]``, cumulative offsets
  starting at 0); each sequence attends only to itself (a block-diagonal mask, as DINOv2 packs
  its crops).

Every kernel addresses a row as ``base(b, h) + (seq_start + i) * stride_token``: in the batched
layout ``seq_start = 0`` and the batch stride is real; in the packed layout the "batch" is the
sequence index, its stride is 0 and ``seq_start = cu_seqlens[b]``.

Launcher contract (no autograd here; ``dino_fast.ops.attention`` registers the ops)::

    attention_fwd(q, k, v, scale, cu_seqlens=None, max_seqlen=0) -> (out, lse)
    attention_bwd(grad_out, q, k, v, out, lse, scale, cu_seqlens=None, max_seqlen=0)
        -> (grad_q, grad_k, grad_v)

``out`` and the gradients have the inputs' shape and dtype; in the batched layout they are laid
out as ``[B, N, heads, head_dim]`` in memory (so the ViT's ``transpose(1, 2).reshape`` after
attention is free). ``lse`` is float32, ``[B, heads, N]`` (batched) or ``[heads, total]``
(packed): the natural-log normaliser of each softmax row.

Tiles: a head dim that is not a power of two is padded to the next one with masks (48 -> 64,
80 and 96 -> 128); sequence lengths need no padding. On a GPU the tile sizes are autotuned once
per (length, head dim, layout, dtype, matmul precision) among the candidates of the input's
class (``_TENSOR_CORE_TILES`` for half precision and float32 with TF32, the smaller
``_EXACT_FP32_TILES`` for float32 with exact products), less those whose operands would not fit
in shared memory at that head dim, dropped before compiling (``candidates``).
``TRITON_PRINT_AUTOTUNING=1`` prints the choice. ``DINO_FAST_AUTOTUNE=off`` (read when a shape
is first launched) pins each kernel to the first candidate of the class, so a new shape compiles
one kernel (the GPU correctness tests); triton 3.8 then times nothing, triton 3.6 (the GPU
machine's) still times that one candidate once per shape (its autotuner benchmarks whatever the
pruning leaves, one config included: a few hundred launches, no compile). The interpreter
always runs the first candidate.
``benchmarks/kernel_resources.py`` compiles every candidate for sm_90 without a GPU and prints
registers, spills and occupancy.
"""

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dino_fast.ops._backend import triton_interpreting

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _program(cu_seqlens, num_heads, seqlen, BLOCK: tl.constexpr, VARLEN: tl.constexpr):
    """This program's row block, (sequence, head), sequence's first token and length.

    The grid is 1-D, ``cdiv(seqlen, BLOCK) * sequences * heads`` (no 65535 limit as on grid
    axis 1), the blocks of one (sequence, head) adjacent so they share its K, V in L2.
    """
    num_blocks = tl.cdiv(seqlen, BLOCK)
    block = tl.program_id(0) % num_blocks
    pid_bh = tl.program_id(0) // num_blocks
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    if VARLEN:
        start = tl.load(cu_seqlens + b)
        seqlen = tl.load(cu_seqlens + b + 1) - start
    else:
        start = seqlen * 0
    return block, b, h, start, seqlen


@triton.jit
def _rows(block, BLOCK: tl.constexpr, start, seqlen):
    """Mask and packed token indices of the rows of block ``block`` of a sequence."""
    offs = block * BLOCK + tl.arange(0, BLOCK)
    return offs < seqlen, (start + offs).to(tl.int64)


@triton.jit
def _tile(base, rows, mask_rows, stride_n, offs_d, mask_d, stride_d):
    """Load the ``[rows, BLOCK_D]`` tile at ``base``, zero outside the masks."""
    return tl.load(base + rows[:, None] * stride_n + offs_d[None, :] * stride_d,
                   mask=mask_rows[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _tile_t(base, rows, mask_rows, stride_n, offs_d, mask_d, stride_d):
    """Load the same tile as :func:`_tile` transposed, ``[BLOCK_D, rows]``."""
    return tl.load(base + rows[None, :] * stride_n + offs_d[:, None] * stride_d,
                   mask=mask_rows[None, :] & mask_d[:, None], other=0.0)


@triton.jit
def _attn_fwd_kernel(
        Q, K, V, O, LSE, cu_seqlens,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od,
        stride_lb, stride_lh,
        num_heads, seqlen, qk_scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One block of ``BLOCK_M`` query rows of one (sequence, head): online softmax over keys."""
    pid_m, b, h, start, seqlen = _program(cu_seqlens, num_heads, seqlen, BLOCK_M, VARLEN)
    if pid_m * BLOCK_M >= seqlen:  # a short sequence of the packed batch
        return
    mask_m, rows = _rows(pid_m, BLOCK_M, start, seqlen)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = _tile(Q + b * stride_qb + h * stride_qh, rows, mask_m, stride_qn,
              offs_d, mask_d, stride_qd)  # (BLOCK_M, BLOCK_D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for block_n in range(tl.cdiv(seqlen, BLOCK_N)):
        mask_n, keys = _rows(block_n, BLOCK_N, start, seqlen)
        # (BLOCK_D, BLOCK_N)
        kt = _tile_t(k_base, keys, mask_n, stride_kn, offs_d, mask_d, stride_kd)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale_log2  # (BLOCK_M, BLOCK_N)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(v_base, keys, mask_n, stride_vn, offs_d, mask_d, stride_vd)  # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = (O + b * stride_ob + h * stride_oh + rows[:, None] * stride_on
              + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634  # natural log
    tl.store(LSE + b * stride_lb + h * stride_lh + rows, lse, mask=mask_m)


@triton.jit
def _attn_bwd_delta_kernel(
        O, DO, DELTA, cu_seqlens,
        stride_ob, stride_oh, stride_on, stride_od,
        stride_dob, stride_doh, stride_don, stride_dod,
        stride_lb, stride_lh,
        num_heads, seqlen,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        VARLEN: tl.constexpr):
    """``delta = rowsum(dO * O)`` in float32, laid out like the log-sum-exp."""
    pid_m, b, h, start, seqlen = _program(cu_seqlens, num_heads, seqlen, BLOCK_M, VARLEN)
    if pid_m * BLOCK_M >= seqlen:
        return
    mask_m, rows = _rows(pid_m, BLOCK_M, start, seqlen)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    o = _tile(O + b * stride_ob + h * stride_oh, rows, mask_m, stride_on, offs_d, mask_d, stride_od)
    do = _tile(DO + b * stride_dob + h * stride_doh, rows, mask_m, stride_don,
               offs_d, mask_d, stride_dod)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b * stride_lb + h * stride_lh + rows, delta, mask=mask_m)


@triton.jit
def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, cu_seqlens,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_don, stride_dod,
        stride_gb, stride_gh, stride_gn, stride_gd,
        stride_lb, stride_lh,
        num_heads, seqlen, scale, qk_scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK and dV of one block of ``BLOCK_N`` keys: a loop over all query blocks.

    ``DK`` and ``DV`` share the strides ``stride_g*`` (both allocated by the launcher).
    """
    pid_n, b, h, start, seqlen = _program(cu_seqlens, num_heads, seqlen, BLOCK_N, VARLEN)
    if pid_n * BLOCK_N >= seqlen:
        return
    mask_n, keys = _rows(pid_n, BLOCK_N, start, seqlen)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    k = _tile(K + b * stride_kb + h * stride_kh, keys, mask_n, stride_kn,
              offs_d, mask_d, stride_kd)  # (BLOCK_N, BLOCK_D)
    v = _tile(V + b * stride_vb + h * stride_vh, keys, mask_n, stride_vn,
              offs_d, mask_d, stride_vd)  # (BLOCK_N, BLOCK_D)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    l_base = b * stride_lb + h * stride_lh

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for block_m in range(tl.cdiv(seqlen, BLOCK_M)):
        mask_m, rows = _rows(block_m, BLOCK_M, start, seqlen)
        # (BLOCK_D, BLOCK_M)
        qt = _tile_t(q_base, rows, mask_m, stride_qn, offs_d, mask_d, stride_qd)
        # Rows past the sequence get lse = +inf, so their probabilities are exactly 0.
        lse = tl.load(LSE + l_base + rows, mask=mask_m, other=float("inf")) * 1.4426950408889634
        pt = tl.math.exp2(tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale_log2
                          - lse[None, :])  # (BLOCK_N, BLOCK_M)
        # (BLOCK_M, BLOCK_D)
        do = _tile(do_base, rows, mask_m, stride_don, offs_d, mask_d, stride_dod)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(DELTA + l_base + rows, mask=mask_m, other=0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)

    g_offs = b * stride_gb + h * stride_gh + keys[:, None] * stride_gn + offs_d[None, :] * stride_gd
    mask_nd = mask_n[:, None] & mask_d[None, :]
    tl.store(DK + g_offs, (dk * scale).to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + g_offs, dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, cu_seqlens,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_don, stride_dod,
        stride_gb, stride_gh, stride_gn, stride_gd,
        stride_lb, stride_lh,
        num_heads, seqlen, scale, qk_scale_log2,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ of one block of ``BLOCK_M`` queries: a loop over all key blocks."""
    pid_m, b, h, start, seqlen = _program(cu_seqlens, num_heads, seqlen, BLOCK_M, VARLEN)
    if pid_m * BLOCK_M >= seqlen:
        return
    mask_m, rows = _rows(pid_m, BLOCK_M, start, seqlen)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = _tile(Q + b * stride_qb + h * stride_qh, rows, mask_m, stride_qn,
              offs_d, mask_d, stride_qd)  # (BLOCK_M, BLOCK_D)
    do = _tile(DO + b * stride_dob + h * stride_doh, rows, mask_m, stride_don,
               offs_d, mask_d, stride_dod)  # (BLOCK_M, BLOCK_D)
    l_base = b * stride_lb + h * stride_lh
    lse = tl.load(LSE + l_base + rows, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + l_base + rows, mask=mask_m, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for block_n in range(tl.cdiv(seqlen, BLOCK_N)):
        mask_n, keys = _rows(block_n, BLOCK_N, start, seqlen)
        k = _tile(k_base, keys, mask_n, stride_kn, offs_d, mask_d, stride_kd)  # (BLOCK_N, BLOCK_D)
        v = _tile(v_base, keys, mask_n, stride_vn, offs_d, mask_d, stride_vd)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        p = tl.math.exp2(tl.where(mask_n[None, :], s, float("-inf")) - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    g_ptrs = (DQ + b * stride_gb + h * stride_gh + rows[:, None] * stride_gn
              + offs_d[None, :] * stride_gd)
    tl.store(g_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ---------------------------------------------------------------------------------------------
# launch configurations
# ---------------------------------------------------------------------------------------------
# Autotuning candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and operand class:
# "half" (float16 / bfloat16), "tf32" and "ieee" (float32 with TF32 or exact products). The first
# that fits an input's head dim is pinned (DINO_FAST_AUTOTUNE=off, the interpreter), chosen to
# spill at no head dim up to 128 where the class allows. Exact float32 products run on FMA units
# with the operands in registers: their own small tiles keep them from spilling on sm_90 at head
# dim 64 (benchmarks/results/2026-11-30-sm90-resources.md). At DINO's head dim (64) no candidate
# spills (tests/kernels/test_kernel_compile.py). At wider heads some do (up to ~2 KB in half
# precision, up to 20 KB in the exact-float32 forward); they stay because the ViTs DINO trains have
# head dim 64 and, when autotuning, a spilling tile loses to the others. The forward's 128x64 tile
# runs with 8 warps only: with 4 it needs 211-255 registers at head dim 64 (255, the cap, for the
# packed layout under triton 3.6's ptxas), one ptxas release away from spilling.
_TENSOR_CORE_TILES = {  # half precision and TF32
    "fwd": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 2)],
    "dkdv": [(32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2)],
    "dq": [(128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2)],
}
_EXACT_FP32_TILES = {
    "fwd": [(32, 32, 4, 2), (64, 16, 4, 2)],
    "dkdv": [(16, 32, 4, 2), (32, 32, 4, 2)],
    "dq": [(32, 32, 4, 2), (32, 16, 4, 2)],
}
# Tiles whose operands would pass this much shared memory are dropped before compiling (they
# cannot load on an A100, 163 KiB per block, and barely on an H100, 227 KiB).
_SHARED_BUDGET = 160 * 1024
# Where no candidate of a class fits (float32 at head dim 256): the smallest tiles.
_FALLBACK = {"fwd": (64, 16, 4, 2), "dkdv": (16, 32, 4, 2), "dq": (32, 16, 4, 2)}


def _shared_bytes(kernel: str, tile: tuple, block_d: int, itemsize: int) -> int:
    """Shared memory of a tile's operands: the streamed ones once per pipeline stage (K, V in
    the forward and dQ; Q, dO in dK/dV), the resident ones once (a conservative estimate)."""
    block_m, block_n, _, stages = tile
    rows = {"fwd": stages * 2 * block_n + block_m,
            "dkdv": stages * 2 * block_m + 2 * block_n,
            "dq": stages * 2 * block_n + 2 * block_m}[kernel]
    return rows * block_d * itemsize


AUTOTUNE_ENV = "DINO_FAST_AUTOTUNE"


def autotuning() -> bool:
    """``DINO_FAST_AUTOTUNE`` (``on`` by default, or ``off``), read when a new shape is first
    launched: whether the kernels time every candidate of an input's class on a GPU."""
    value = os.environ.get(AUTOTUNE_ENV, "on").strip().lower() or "on"
    if value not in ("on", "off"):
        raise ValueError(f"{AUTOTUNE_ENV}={value!r} must be on or off")
    return value == "on"


def operand_class(dtype: torch.dtype, dot_precision: str) -> str:
    """The candidate class of an input: ``half``, ``tf32`` or ``ieee``."""
    return "half" if dtype != torch.float32 else dot_precision


def candidates(kernel: str, dtype: torch.dtype, head_dim: int, dot_precision: str,
               autotune: bool | None = None) -> list[triton.Config]:
    """The configurations ``kernel`` (``fwd``, ``dkdv``, ``dq``) may run with for this input:
    every candidate of its class that fits the head dim when autotuning (default:
    :func:`autotuning`, never in the interpreter, where timing means nothing), else the first."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    table = _EXACT_FP32_TILES if operand_class(dtype, dot_precision) == "ieee" \
        else _TENSOR_CORE_TILES
    tiles = [tile for tile in table[kernel]
             if _shared_bytes(kernel, tile, block_d, dtype.itemsize) <= _SHARED_BUDGET]
    tiles = tiles or [_FALLBACK[kernel]]
    if autotune is None:
        autotune = autotuning() and not triton_interpreting()
    if not autotune:
        tiles = tiles[:1]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in tiles]


def _autotuned(kernel: str, fn):
    """``fn`` autotuned over the candidates of each input's class, pruned before compiling."""
    def prune(configs, named_args, **kwargs):
        return candidates(kernel, named_args["Q"].dtype, kwargs["HEAD_DIM"],
                          kwargs["DOT_PRECISION"])

    every = {*_TENSOR_CORE_TILES[kernel], *_EXACT_FP32_TILES[kernel]}
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in sorted(every)]
    return triton.autotune(configs, key=_TUNE_KEY,
                           prune_configs_by={"early_config_prune": prune})(fn)


# Keyed on the length, head dim and matmul precision (the dtype is part of Triton's key): DINO
# has few distinct shapes (2 crop sizes), so each is tuned once; a TF32/IEEE switch retunes.
_TUNE_KEY = ["seqlen", "HEAD_DIM", "VARLEN", "DOT_PRECISION"]
_fwd = _autotuned("fwd", _attn_fwd_kernel)
_bwd_dkdv = _autotuned("dkdv", _attn_bwd_dkdv_kernel)
_bwd_dq = _autotuned("dq", _attn_bwd_dq_kernel)
_DELTA_BLOCK_M = 64


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens=None):
    """Raise a clear error unless ``q, k, v`` (and ``cu_seqlens``) can go to the kernels
    (checks that need no host sync: the offsets' values are checked by the caller)."""
    varlen = cu_seqlens is not None
    want = 3 if varlen else 4
    layout = "[total, heads, head_dim]" if varlen else "[B, heads, N, head_dim]"
    if q.dim() != want:
        raise ValueError(f"attention expects q, k, v {layout}, got q {tuple(q.shape)}")
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)} (self-attention only)")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the attention kernel runs float16/bfloat16/float32 with one dtype, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if q.device.type == "cpu" and not triton_interpreting():
        raise RuntimeError("the Triton attention kernel on CPU tensors needs TRITON_INTERPRET=1")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported")
    if varlen and (cu_seqlens.dtype != torch.int32 or cu_seqlens.device != q.device
                   or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2):
        raise ValueError(f"cu_seqlens must be 1-D int32 [nseq + 1] on {q.device}, got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)} on {cu_seqlens.device}")


def _layout(x: torch.Tensor, varlen: bool):
    """Strides ``(batch, head, token, dim)``; the packed layout has no batch stride."""
    if varlen:
        token, head, dim = x.stride()
        return 0, head, token, dim
    return tuple(x.stride())


def _problem(q: torch.Tensor, cu_seqlens, max_seqlen: int):
    """``(varlen, batch, heads, seqlen, head_dim)`` with ``batch`` the number of sequences."""
    if cu_seqlens is None:
        batch, heads, seqlen, head_dim = q.shape
        return False, batch, heads, seqlen, head_dim
    return True, cu_seqlens.numel() - 1, q.shape[1], max_seqlen, q.shape[2]


def empty_like_input(q: torch.Tensor, varlen: bool) -> torch.Tensor:
    """An output shaped like ``q``: packed contiguous, or batched ``[B, heads, N, D]`` stored as
    ``[B, N, heads, D]`` (also the fake of the ops, so it must not need a real tensor)."""
    if varlen:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    batch, heads, seqlen, head_dim = q.shape
    return q.new_empty((batch, seqlen, heads, head_dim)).transpose(1, 2)


def empty_lse(q: torch.Tensor, varlen: bool) -> torch.Tensor:
    """The float32 row statistics: ``[B, heads, N]`` batched, ``[heads, total]`` packed."""
    shape = (q.shape[1], q.shape[0]) if varlen else q.shape[:3]
    return torch.empty(shape, dtype=torch.float32, device=q.device)


def _lse_strides(lse: torch.Tensor, varlen: bool):
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _dot_precision(q: torch.Tensor) -> str:
    """float32 products as the eager matmul makes them: TF32 only where torch allows it."""
    exact = q.dtype == torch.float32 and (  # (a meta tensor counts as a GPU one)
        q.device.type == "cpu" or torch.get_float32_matmul_precision() == "highest")
    return "ieee" if exact else "tf32"  # (tf32 means nothing for half inputs)


def _common(q: torch.Tensor):
    """Compile-time constants shared by the kernels for this input."""
    head_dim = q.shape[-1]
    return {"HEAD_DIM": head_dim, "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
            "DOT_PRECISION": _dot_precision(q)}


def _cu_arg(q: torch.Tensor, cu_seqlens):
    """The ``cu_seqlens`` pointer (a dummy, never read, in the batched layout)."""
    return cu_seqlens if cu_seqlens is not None else q.new_empty(1, dtype=torch.int32)


class Launch(NamedTuple):
    """One kernel launch: ``kernel[grid](*args, **constexprs)``."""
    kernel: object
    grid: object
    args: tuple
    constexprs: dict


def forward_launch(q, k, v, out, lse, scale: float, cu_seqlens=None, max_seqlen: int = 0):
    """The forward's :class:`Launch` writing ``out`` and ``lse`` (tensors on any device, ``meta``
    included: the compile checks of ``benchmarks/kernel_compile.py`` build theirs here)."""
    varlen, batch, heads, seqlen, _ = _problem(q, cu_seqlens, max_seqlen)
    grid = lambda meta: (triton.cdiv(seqlen, meta["BLOCK_M"]) * batch * heads,)
    args = (q, k, v, out, lse, _cu_arg(q, cu_seqlens),
            *_layout(q, varlen), *_layout(k, varlen), *_layout(v, varlen),
            *_layout(out, varlen), *_lse_strides(lse, varlen), heads, seqlen, scale * LOG2E)
    return Launch(_fwd, grid, args, {"VARLEN": varlen, **_common(q)})


def backward_launches(grad_out, q, k, v, out, lse, scale: float, grads, delta,
                      cu_seqlens=None, max_seqlen: int = 0) -> list[Launch]:
    """The backward's three launches, in order: delta, dK/dV, dQ (``grads = (dq, dk, dv)``)."""
    varlen, batch, heads, seqlen, _ = _problem(q, cu_seqlens, max_seqlen)
    grad_q, grad_k, grad_v = grads
    common, cu = _common(q), _cu_arg(q, cu_seqlens)
    lse_strides = _lse_strides(lse, varlen)
    delta_launch = Launch(
        _attn_bwd_delta_kernel, (triton.cdiv(seqlen, _DELTA_BLOCK_M) * batch * heads,),
        (out, grad_out, delta, cu, *_layout(out, varlen), *_layout(grad_out, varlen),
         *lse_strides, heads, seqlen),
        {"HEAD_DIM": common["HEAD_DIM"], "BLOCK_D": common["BLOCK_D"],
         "BLOCK_M": _DELTA_BLOCK_M, "VARLEN": varlen})
    inputs = (*_layout(q, varlen), *_layout(k, varlen), *_layout(v, varlen),
              *_layout(grad_out, varlen), *_layout(grad_q, varlen), *lse_strides,
              heads, seqlen, scale, scale * LOG2E)
    grid_n = lambda meta: (triton.cdiv(seqlen, meta["BLOCK_N"]) * batch * heads,)
    grid_m = lambda meta: (triton.cdiv(seqlen, meta["BLOCK_M"]) * batch * heads,)
    return [delta_launch,
            Launch(_bwd_dkdv, grid_n, (q, k, v, grad_out, lse, delta, grad_k, grad_v, cu, *inputs),
                   {"VARLEN": varlen, **common}),
            Launch(_bwd_dq, grid_m, (q, k, v, grad_out, lse, delta, grad_q, cu, *inputs),
                   {"VARLEN": varlen, **common})]


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0):
    """``softmax(q k^T * scale) v`` and the row log-sum-exp (see the module docstring)."""
    check_inputs(q, k, v, cu_seqlens)
    varlen = cu_seqlens is not None
    out, lse = empty_like_input(q, varlen), empty_lse(q, varlen)
    if out.numel() == 0:
        return out, lse
    kernel, grid, args, constexprs = forward_launch(q, k, v, out, lse, scale, cu_seqlens,
                                                    max_seqlen)
    kernel[grid](*args, **constexprs)
    return out, lse


def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, scale: float,
                  cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0):
    """Gradients ``(dq, dk, dv)`` from the forward's ``out`` and ``lse``, recomputing the
    probabilities block by block."""
    check_inputs(q, k, v, cu_seqlens)
    varlen = cu_seqlens is not None
    grads = tuple(empty_like_input(q, varlen) for _ in range(3))
    if q.numel() == 0:
        return grads
    delta = torch.empty_like(lse)  # (B, heads, N) or (heads, total)
    for kernel, grid, args, constexprs in backward_launches(
            grad_out, q, k, v, out, lse, scale, grads, delta, cu_seqlens, max_seqlen):
        kernel[grid](*args, **constexprs)
    return grads
