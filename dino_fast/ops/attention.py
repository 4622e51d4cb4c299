"""Multi-head self-attention (non-causal, no mask) as one op, batched or packed by sequence.

Layers of this file, top to bottom:
1. ``attention_reference`` / ``attention_varlen_reference``: the readable spec and test oracle,
   ``softmax(q k^T * scale) v`` (per sequence for the packed layout).
2. ``dino_fast::attention_fwd`` / ``dino_fast::attention_bwd``: ``torch.library`` custom ops run
   by the Triton flash-attention kernels (``dino_fast.kernels.attention``), with a fake and an
   autograd formula, so ``torch.compile(fullgraph=True)`` traces through them. They mutate
   nothing.
3. ``attention`` / ``attention_varlen``: the public functions, dispatched by
   ``DINO_FAST_BACKEND`` (``dino_fast.ops._backend``); there is no C++ kernel, so ``auto`` on the
   CPU runs the reference.

Kernel contract (see ``dino_fast.kernels.attention``)::

    attention_fwd(q, k, v, scale, cu_seqlens | None, max_seqlen) -> (out, lse float32)
    attention_bwd(grad_out, q, k, v, out, lse, scale, cu_seqlens | None, max_seqlen)
        -> (grad_q, grad_k, grad_v)

with ``q, k, v`` ``[B, heads, N, head_dim]`` (any strides) when ``cu_seqlens`` is None, else
packed ``[total, heads, head_dim]`` with int32 offsets ``cu_seqlens`` ``[nseq + 1]``.
"""
import itertools

import torch

from dino_fast.ops import _backend


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Softmax attention of ``q, k, v`` ``[B, heads, N, head_dim]``; returns
    ``[B, heads, N, head_dim]``."""
    attn = (q @ k.transpose(-2, -1)) * scale  # (B, heads, N, N)
    return attn.softmax(dim=-1) @ v


def attention_varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`attention_reference` on each sequence of packed ``[total, heads, head_dim]``
    tensors, sequence ``i`` being the tokens ``cu_seqlens[i]:cu_seqlens[i + 1]``."""
    bounds = cu_seqlens.tolist()
    outs = [attention_reference(*(x[start:end].transpose(0, 1) for x in (q, k, v)), scale)
            for start, end in itertools.pairwise(bounds)]  # each (heads, n, head_dim)
    return torch.cat([o.transpose(0, 1) for o in outs]) if outs else torch.empty_like(q)


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: int):
    """Raise a clear error unless ``cu_seqlens`` are int32 offsets from 0 to ``total``, never
    decreasing, with no sequence longer than ``max_seqlen`` (reads them: one host sync)."""
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [nseq + 1], got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    offsets = cu_seqlens.tolist()
    lengths = [end - start for start, end in itertools.pairwise(offsets)]
    if offsets[0] != 0 or offsets[-1] != total or min(lengths) < 0:
        raise ValueError(f"cu_seqlens must rise from 0 to the {total} packed tokens, got "
                         f"{offsets}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen {max_seqlen} is shorter than the longest sequence "
                         f"({max(lengths)} tokens)")


def _kernels():
    """The Triton launchers, imported on first use (they need triton)."""
    from dino_fast.kernels import attention as kernels
    return kernels


@torch.library.custom_op("dino_fast::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  cu_seqlens: torch.Tensor | None,
                  max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and float32 row log-sum-exp, by the Triton kernel."""
    return _kernels().attention_fwd(q, k, v, scale, cu_seqlens, max_seqlen)


@attention_fwd.register_fake
def _(q, k, v, scale, cu_seqlens, max_seqlen):
    varlen = cu_seqlens is not None
    return _kernels().empty_like_input(q, varlen), _kernels().empty_lse(q, varlen)


@torch.library.custom_op("dino_fast::attention_bwd", mutates_args=())
def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, scale: float,
                  cu_seqlens: torch.Tensor | None,
                  max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``q, k, v`` from the forward's output and log-sum-exp, by the Triton kernel."""
    return _kernels().attention_bwd(grad_out, q, k, v, out, lse, scale, cu_seqlens, max_seqlen)


@attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, scale, cu_seqlens, max_seqlen):
    return tuple(_kernels().empty_like_input(q, cu_seqlens is not None) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, scale, cu_seqlens, max_seqlen = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.scale, ctx.max_seqlen = scale, max_seqlen
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    grads = attention_bwd(grad_out, q, k, v, out, lse, ctx.scale, cu_seqlens, ctx.max_seqlen)
    return (*grads, None, None, None)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` of ``[B, heads, N, head_dim]`` tensors (any strides), with
    autograd; returns ``[B, heads, N, head_dim]``.

    Dispatched by ``DINO_FAST_BACKEND``: the Triton flash-attention kernel (CUDA, or CPU under
    ``TRITON_INTERPRET=1``; float16/bfloat16/float32, head_dim <= 256, any N; float32 products
    in TF32 only when ``torch.get_float32_matmul_precision()`` allows it, as the eager matmul)
    or :func:`attention_reference`. ``torch.compile(fullgraph=True)`` traces through it.
    """
    if _backend.resolve("attention", q.device, has_cpp=False) == "reference":
        return attention_reference(q, k, v, scale)
    return attention_fwd(q, k, v, float(scale), None, 0)[0]


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float, check: bool = True) -> torch.Tensor:
    """Attention within each sequence of packed ``[total, heads, head_dim]`` tensors, with
    autograd; returns ``[total, heads, head_dim]``.

    Sequence ``i`` is the tokens ``cu_seqlens[i]:cu_seqlens[i + 1]`` (``cu_seqlens``: int32
    ``[nseq + 1]`` on ``q``'s device, from 0 to ``total``); ``max_seqlen`` is an upper bound of
    the sequence lengths. The same as :func:`attention` run per sequence (a block-diagonal mask)
    in one launch. ``check`` validates ``cu_seqlens`` (a host sync; skipped under
    ``torch.compile``). Dispatched like :func:`attention`.
    """
    if check and not torch.compiler.is_compiling():
        check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    if _backend.resolve("attention", q.device, has_cpp=False) == "reference":
        return attention_varlen_reference(q, k, v, cu_seqlens, scale)
    return attention_fwd(q, k, v, float(scale), cu_seqlens, int(max_seqlen))[0]
