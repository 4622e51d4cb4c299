"""All crops of a DINO step through the ViT in one pass: the tokens of every crop, whatever its
resolution, packed into one sequence of ``[total_tokens, dim]``, attention restricted to each
crop by cumulative sequence offsets (``attention_varlen``, a block-diagonal mask as DINOv2 packs
its crops). One launch per layer instead of one per crop size, and no padding.

The result equals ``MultiCropWrapper.forward`` on the same crops (official ``utils.py``
``MultiCropWrapper``): the same submodules run in the same order on the same tokens. With
stochastic depth in training mode the drop decisions are still per crop and follow the same
distribution, but the random draws differ from the unpacked run.
"""
import torch

from dino_fast.models.multicrop import MultiCropWrapper, _equal_size_runs
from dino_fast.models.vision_transformer import Attention, Block, drop_path
from dino_fast.ops.attention import attention_varlen


class _Packing:
    """Where each crop lies in the packed tokens: offsets, longest length, token -> crop."""

    def __init__(self, lengths: list[int], device: torch.device):
        offsets = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        self.cu_seqlens = offsets.to(device, non_blocking=True)  # (nseq + 1,)
        self.max_seqlen = max(lengths)
        self.first_tokens = self.cu_seqlens[:-1].long()  # (nseq,) the CLS tokens
        self.sequence_of_token = torch.repeat_interleave(
            torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device),
            output_size=sum(lengths))  # (total,)

    def drop_path(self, x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
        """Stochastic depth with one draw per crop (not per token) of packed ``x``."""
        if drop_prob == 0.0 or not training:
            return x
        keep = drop_path(x.new_ones(len(self.first_tokens), 1), drop_prob, training)  # (nseq, 1)
        return x * keep[self.sequence_of_token]


def _attention(attn: Attention, x: torch.Tensor, packing: _Packing) -> torch.Tensor:
    """``attn`` on packed tokens ``[total, dim]``, each crop attending only to itself."""
    if attn.attn_drop.p > 0:
        raise ValueError("packed crops do not support attention dropout (attn_drop_rate > 0)")
    total, dim = x.shape
    qkv = attn.qkv(x).reshape(total, 3, attn.num_heads, dim // attn.num_heads)
    q, k, v = qkv.unbind(1)  # each (total, heads, head_dim)
    out = attention_varlen(q, k, v, packing.cu_seqlens, packing.max_seqlen, attn.scale,
                           check=False)
    return attn.proj_drop(attn.proj(out.reshape(total, dim)))


def _block(blk: Block, x: torch.Tensor, packing: _Packing) -> torch.Tensor:
    """``Block.forward`` on packed tokens ``[total, dim]``."""
    drop_prob = getattr(blk.drop_path, "drop_prob", 0.0)
    x = x + packing.drop_path(_attention(blk.attn, blk.norm1(x), packing), drop_prob, blk.training)
    return x + packing.drop_path(blk.mlp(blk.norm2(x)), drop_prob, blk.training)


def packed_multicrop_forward(wrapper: MultiCropWrapper, crops) -> torch.Tensor:
    """``wrapper(crops)`` for a ViT backbone, with every crop in one packed pass of the blocks.

    ``crops`` is a list of ``[B, 3, H, W]`` tensors (e.g. 2 global 224 px and N local 96 px
    crops); returns the head's output ``[sum of B, out_dim]`` in the list order, as
    ``MultiCropWrapper.forward`` does. Attention runs through ``attention_varlen`` (dispatched by
    ``DINO_FAST_BACKEND``), whatever the blocks' ``attn_backend``.
    """
    if not isinstance(crops, (list, tuple)):
        crops = [crops]
    backbone, tokens, lengths, start = wrapper.backbone, [], [], 0
    for end in _equal_size_runs(crops):
        x = backbone.prepare_tokens(torch.cat(crops[start:end]))  # (b, 1 + patches, dim)
        tokens.append(x.reshape(-1, x.shape[-1]))
        lengths += [x.shape[1]] * x.shape[0]
        start = end
    x = torch.cat(tokens)  # (total, dim)
    packing = _Packing(lengths, x.device)
    for blk in backbone.blocks:
        x = _block(blk, x, packing)
    cls = backbone.norm(x[packing.first_tokens])  # (nseq, dim), in crop order
    return wrapper.head(backbone.head(cls))
