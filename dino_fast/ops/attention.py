"""Multi-head self-attention (non-causal, no mask) as one op.

``attention_reference`` is the readable spec and test oracle: ``softmax(q k^T * scale) v``.
The Triton flash-attention kernels plug in here (``dino_fast.kernels.attention``).
"""
import torch


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """Softmax attention of ``q, k, v`` ``[B, heads, N, head_dim]``; returns ``[B, heads, N, head_dim]``."""
    attn = (q @ k.transpose(-2, -1)) * scale  # (B, heads, N, N)
    return attn.softmax(dim=-1) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of ``[B, heads, N, head_dim]`` tensors, dispatched by ``DINO_FAST_BACKEND``."""
    return attention_reference(q, k, v, scale)
