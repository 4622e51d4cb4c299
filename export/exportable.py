"""The ViT as an ONNX-exportable graph: images in, CLS attention and CLS features out.

``VisionTransformer.interpolate_pos_encoding`` takes a Python branch on the token count and calls
``F.interpolate`` with Python-float scale factors, so ``torch.export`` bakes the example input's
size into the graph. :class:`AttentionMapModel` computes the same positional embeddings with
tensor ops on the symbolic grid size instead: the official bicubic resize (``align_corners``
False, cubic coefficient -0.75, borders clamped, source scale ``sqrt(N) / (grid + 0.1)``) written
as two interpolation matrices, and the official shortcut (the stored embeddings unchanged at the
training grid) as a resize scale of exactly 1, which makes those matrices identities. Outputs
match :meth:`VisionTransformer.get_last_selfattention` (facebookresearch/dino
``visualize_attention.py``) for any image size that is a multiple of the patch size.
"""
import math

import torch
import torch.nn as nn

CUBIC_A = -0.75  # PyTorch's (and ONNX Resize's default) bicubic coefficient


def _cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """Keys' cubic weights ``[n, 4]`` of the 4 taps around samples at fractions ``t`` ``[n]``."""
    d = torch.stack((t + 1, t, 1 - t, 2 - t), dim=-1)  # distance to taps -1, 0, 1, 2
    near = ((CUBIC_A + 2) * d - (CUBIC_A + 3)) * d * d + 1  # |d| <= 1
    far = ((CUBIC_A * d - 5 * CUBIC_A) * d + 8 * CUBIC_A) * d - 4 * CUBIC_A  # 1 < |d| < 2
    return torch.where(d <= 1, near, far)


def bicubic_matrix(out_size, in_size: int, inv_scale: torch.Tensor) -> torch.Tensor:
    """``M`` with ``M @ v`` the bicubic resize of ``v`` (``in_size`` rows) to ``out_size`` rows.

    ``inv_scale`` is the input/output ratio of the source coordinates, ``1 / scale_factor`` as
    ``F.interpolate`` computes it; taps outside the input are clamped to its edge.
    """
    dst = torch.arange(out_size, dtype=torch.float32, device=inv_scale.device)  # (out,)
    src = (dst + 0.5) * inv_scale - 0.5
    first = torch.floor(src)
    weights = _cubic_weights(src - first)  # (out, 4)
    taps = first.long().unsqueeze(-1) + torch.arange(-1, 3, device=inv_scale.device)  # (out, 4)
    taps = taps.clamp(0, in_size - 1)
    one_hot = (taps.unsqueeze(-1) == torch.arange(in_size, device=inv_scale.device)).float()
    return (weights.unsqueeze(-1) * one_hot).sum(dim=1)  # (out, in_size)


class AttentionMapModel(nn.Module):
    """``images [B, 3, H, W]`` -> ``attentions [B, heads, H/p * W/p]``, ``features [B, dim]``.

    ``image_size=(H, W)`` precomputes the positional embeddings for that one size (a smaller,
    static graph); ``None`` interpolates them inside the graph for any size. ``dtype`` is the
    compute precision; inputs and outputs stay float32.
    """

    def __init__(self, vit: nn.Module, image_size: tuple[int, int] | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.vit = vit
        self.dtype = dtype
        self.patch_size = vit.patch_embed.patch_size
        self.grid = int(math.sqrt(vit.pos_embed.shape[1] - 1))  # training grid side
        fixed = None
        if image_size is not None:
            with torch.no_grad():
                grid = math.prod(s // self.patch_size for s in image_size)
                tokens = torch.zeros(1, 1 + grid, vit.embed_dim)  # only its shape is read
                fixed = vit.interpolate_pos_encoding(tokens, *image_size).detach().clone()
        self.register_buffer("fixed_pos_embed", fixed, persistent=False)

    def interpolate_pos_encoding(self, rows: int, cols: int) -> torch.Tensor:
        """Positional embeddings ``[1, 1 + rows * cols, dim]`` for a ``rows x cols`` patch grid."""
        pos = self.vit.pos_embed.float()
        side = self.grid
        rows_t = torch.scalar_tensor(rows, dtype=torch.float32)
        cols_t = torch.scalar_tensor(cols, dtype=torch.float32)
        native = (rows_t == side) & (cols_t == side)  # official: no resize at the training grid
        one = torch.ones((), dtype=torch.float32)
        inv_r = torch.where(native, one, side / (rows_t + 0.1))
        inv_c = torch.where(native, one, side / (cols_t + 0.1))
        # Two rank-2 products, one per axis: OpenVINO's CPU plugin (2026.4) compiles no MatMul
        # of a rank-2 and a rank-3 operand computed in the graph, and runs none that broadcasts
        # a batch axis onto constant weights.
        dim = pos.shape[-1]
        patch_pos = pos[0, 1:].reshape(side, side * dim)  # (side rows, side cols * dim)
        by_rows = bicubic_matrix(rows, side, inv_r) @ patch_pos  # (rows, side * dim)
        by_rows = by_rows.reshape(rows, side, dim).transpose(0, 1).reshape(side, rows * dim)
        resized = bicubic_matrix(cols, side, inv_c) @ by_rows  # (cols, rows * dim)
        patch_pos = resized.reshape(cols, rows, dim).transpose(0, 1).reshape(1, rows * cols, dim)
        return torch.cat((pos[:, :1], patch_pos), dim=1)

    def forward(self, images: torch.Tensor):
        vit = self.vit
        rows, cols = images.shape[2] // self.patch_size, images.shape[3] // self.patch_size
        x = vit.patch_embed(images.to(self.dtype))  # (B, rows * cols, dim)
        x = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        pos = self.fixed_pos_embed if self.fixed_pos_embed is not None else \
            self.interpolate_pos_encoding(rows, cols)
        x = x + pos.to(self.dtype)
        for blk in vit.blocks[:-1]:
            x = blk(x)
        x, attn = vit.blocks[-1].forward_with_attention(x)  # attn (B, heads, 1 + N, 1 + N)
        features = vit.norm(x)[:, 0]
        return attn[:, :, 0, 1:].float(), features.float()
