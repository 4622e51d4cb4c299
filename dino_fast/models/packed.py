"""All crops of a DINO step through the ViT in one pass: the tokens of every crop, whatever its
resolution, packed into one sequence ``[total_tokens, dim]``, so that the norms, the qkv and
output projections and the MLP are one matrix product each over the tokens of all crops.
Attention stays within each crop, in one of two ways (``PACK_ATTENTION``):

* ``varlen``: one ``attention_varlen`` call over the packed tokens with cumulative offsets (a
  block-diagonal mask, as DINOv2 packs its crops); the Triton kernel on CUDA. When the op
  resolves to its reference (the CPU), each run of equal-size crops goes through
  ``attention_reference`` batched, which is the same computation without reading the offsets
  on the host.
* ``sdpa_split``: the packed qkv split by crop size, one ``scaled_dot_product_attention`` call
  per size (DINOv3's way), the outputs packed again.

The result equals ``MultiCropWrapper.forward`` on the same crops (official ``utils.py``
``MultiCropWrapper``): the same submodules run on the same tokens. With stochastic depth in
training mode the drop decisions are still one per crop and follow the same distribution, but
the random draws differ from the unpacked run. The layout (crop counts and token counts) is
static, so the packed pass has no data-dependent branch and no host sync; its device metadata
(``cu_seqlens``) is built once per layout and device and reused (:meth:`Packing.cu_seqlens`).
"""
from functools import partial
from itertools import accumulate

import torch
import torch.nn.functional as F

from dino_fast.models.multicrop import MultiCropWrapper, _equal_size_runs
from dino_fast.models.vision_transformer import Attention, Block, drop_path
from dino_fast.ops import _backend
from dino_fast.ops.attention import attention_reference, attention_varlen

PACK_ATTENTION = ("varlen", "sdpa_split")


class Packing:
    """A crop layout: ``runs`` of ``(crops, tokens per crop)`` in packed order (host ints)."""

    def __init__(self, runs: tuple):
        self.runs = runs
        self.total = sum(count * length for count, length in runs)
        self.max_seqlen = max(length for _, length in runs)

    def cu_seqlens(self, device: torch.device) -> torch.Tensor:
        """int32 offsets ``[num_crops + 1]`` on ``device``. Eagerly, copied there once per
        layout and device (a copy from the host each step would wait for the device); under
        ``torch.compile``, a constant of the graph, made on the device (a cache would be state
        that the compiled graph guards on, and recompiles for once it is filled)."""
        offsets = list(accumulate((length for count, length in self.runs
                                   for _ in range(count)), initial=0))
        if torch.compiler.is_compiling():
            return torch.tensor(offsets, dtype=torch.int32, device=device)
        key = (self.runs, device)
        if key not in _CU_SEQLENS:
            _CU_SEQLENS[key] = torch.tensor(offsets, dtype=torch.int32).to(device)
        return _CU_SEQLENS[key]

    def split(self, x: torch.Tensor):
        """Views ``[count, length, ...]`` of packed ``x`` ``[total, ...]``, one per run (one
        ``split``, whose backward is one ``cat``, not a zero-filled copy per slice)."""
        parts = x.split([count * length for count, length in self.runs])
        return [part.view(count, length, *x.shape[1:])
                for part, (count, length) in zip(parts, self.runs)]

    def drop_path(self, x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
        """Stochastic depth with one draw per crop (not per token) of packed ``x``."""
        if drop_prob == 0.0 or not training:
            return x
        scales = [drop_path(x.new_ones(count, 1), drop_prob, training).expand(count, length)
                  for count, length in self.runs]  # each (count, length): 0 or 1 / keep
        return x * torch.cat([s.reshape(-1) for s in scales]).unsqueeze(1)  # (total, dim)


_CU_SEQLENS = {}  # (layout, device) -> offsets: a training run has one or two layouts


def _attention(attn: Attention, x: torch.Tensor, packing: Packing, mode: str) -> torch.Tensor:
    """``attn`` on packed tokens ``[total, dim]``, each crop attending only to itself."""
    if attn.attn_drop.p > 0:
        raise ValueError("packed crops do not support attention dropout (attn_drop_rate > 0)")
    total, dim = x.shape
    qkv = attn.qkv(x).view(total, 3, attn.num_heads, dim // attn.num_heads)
    if mode == "varlen" and _backend.resolve("attention", x.device, has_cpp=False) != "reference":
        q, k, v = qkv.unbind(1)  # each (total, heads, head_dim)
        out = attention_varlen(q, k, v, packing.cu_seqlens(x.device), packing.max_seqlen,
                               attn.scale, check=False)
        return attn.proj_drop(attn.proj(out.reshape(total, dim)))
    outs = []
    for run in packing.split(qkv):  # (count, length, 3, heads, head_dim)
        q, k, v = run.permute(2, 0, 3, 1, 4).unbind(0)  # each (count, heads, length, head_dim)
        if mode == "varlen":
            out = attention_reference(q, k, v, attn.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        outs.append(out.transpose(1, 2).reshape(-1, dim))
    return attn.proj_drop(attn.proj(torch.cat(outs)))


def _block_forward(blk: Block, x: torch.Tensor, packing: Packing, mode: str) -> torch.Tensor:
    drop_prob = getattr(blk.drop_path, "drop_prob", 0.0)
    y = _attention(blk.attn, blk.norm1(x), packing, mode)
    x = x + packing.drop_path(y, drop_prob, blk.training)
    return x + packing.drop_path(blk.mlp(blk.norm2(x)), drop_prob, blk.training)


def packed_multicrop_forward(wrapper: MultiCropWrapper, crops, mode: str = "varlen"):
    """``wrapper(crops)`` for a ViT backbone, with every crop in one packed pass of the blocks.

    ``crops`` is a list of ``[B, 3, H, W]`` tensors (e.g. 2 global 224 px and N local 96 px
    crops); returns the head's output ``[sum of B, out_dim]`` in the list order, as
    ``MultiCropWrapper.forward`` does. ``mode`` (``varlen`` or ``sdpa_split``) picks the
    attention, whatever the blocks' ``attn_backend``; ``varlen`` is dispatched by
    ``DINO_FAST_BACKEND``.
    """
    if mode not in PACK_ATTENTION:
        raise ValueError(f"pack attention {mode!r} is not one of {PACK_ATTENTION}")
    if not isinstance(crops, (list, tuple)):
        crops = [crops]
    backbone, tokens, runs, start = wrapper.backbone, [], [], 0
    for end in _equal_size_runs(crops):
        x = backbone.prepare_tokens(torch.cat(crops[start:end]))  # (count, length, dim)
        tokens.append(x.reshape(-1, x.shape[-1]))
        runs.append(tuple(x.shape[:2]))
        start = end
    packing = Packing(tuple(runs))
    x = torch.cat(tokens)  # (total, dim)
    for blk in backbone.blocks:
        # through the module call, checkpointed as the block says and with its hooks (FSDP2)
        x = blk(x, body=partial(_block_forward, packing=packing, mode=mode))
    cls = torch.cat([run[:, 0] for run in packing.split(x)])  # (num_crops, dim), in crop order
    return wrapper.head(backbone.head(backbone.norm(cls)))


class PackedMultiCropWrapper(MultiCropWrapper):
    """A :class:`MultiCropWrapper` (same parameters and state-dict names) whose forward packs
    all crops into one pass (:func:`packed_multicrop_forward` with ``attention``), so that
    DistributedDataParallel and ``torch.compile`` wrap it like the unpacked one."""

    def __init__(self, backbone, head, attention: str = "sdpa_split"):
        if attention not in PACK_ATTENTION:
            raise ValueError(f"pack attention {attention!r} is not one of {PACK_ATTENTION}")
        super().__init__(backbone, head)
        self.attention = attention

    def forward(self, x):
        return packed_multicrop_forward(self, x, self.attention)
