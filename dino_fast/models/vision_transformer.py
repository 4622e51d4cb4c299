"""Vision Transformer as in DINO (Caron et al. 2021), built on Dosovitskiy et al. 2020.

Parameter names, shapes, initialisation and numerics follow the official
``vision_transformer.py`` of facebookresearch/dino, so official checkpoints load with
``strict=True`` and give the same outputs. What we add: an attention backend switch
(``eager`` as official, ``sdpa``, ``triton``, ``xformers``) and an ``exportable`` path for ONNX.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from dino_fast.cli.errors import MissingDependencyError
from dino_fast.models.checkpointing import checkpointed
from dino_fast.ops import attention as attention_op

ATTN_BACKENDS = ("eager", "sdpa", "triton", "xformers")
ARCH_DIMS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12),
             "vit_large": (1024, 16)}  # (dim, heads)
ARCH_DEPTHS = {"vit_tiny": 12, "vit_small": 12, "vit_base": 12, "vit_large": 24}


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop whole residual branches per sample, rescaling the kept ones."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = (keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep_prob) * mask


class DropPath(nn.Module):
    """Module form of :func:`drop_path`."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    """Two linear layers with an exact GELU between them."""

    def __init__(self, in_features, hidden_features, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _xformers_attention(q, k, v, scale):
    try:
        import xformers.ops as xops
    except ImportError as err:
        raise MissingDependencyError("attn_backend='xformers' needs xformers: "
                          "pip install 'dino-fast[xformers]'") from err
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2),
                                          v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0,
                 proj_drop=0.0, attn_backend="eager"):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_backend = attn_backend

    def forward(self, x, return_attention=False):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        if return_attention or self.attn_backend == "eager" or self.attn_drop.p > 0:
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, heads, N, N)
            attn = self.attn_drop(attn)
            out = attn @ v
        elif self.attn_backend == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        elif self.attn_backend == "triton":
            out = attention_op.attention(q, k, v, self.scale)
        else:
            out = _xformers_attention(q, k, v, self.scale)
        x = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
        return (x, attn) if return_attention else x


class Block(nn.Module):
    """Pre-norm transformer block: attention and MLP residual branches."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0,
                 attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 attn_backend="eager"):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop, attn_backend=attn_backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.activation_checkpointing = "none"  # see models/checkpointing.py

    def forward(self, x, return_attention=False, body=None):
        """The block's output tokens, or only its attention ``[B, heads, N, N]`` (as official).
        ``body(block, x)``, when given, computes the output tokens in place of the standard
        body, checkpointed alike (the packed forward's); passing it through the module call
        keeps the module's hooks, such as FSDP2's gathering of the block's parameters."""
        if return_attention:
            return self.attn(self.norm1(x), return_attention=True)[1]
        function = self._forward if body is None else partial(body, self)
        return checkpointed(self.activation_checkpointing, function, x)

    def _forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward_with_attention(self, x):
        """Output tokens and attention probabilities of the block, in one pass."""
        y, attn = self.attn(self.norm1(x), return_attention=True)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x))), attn


class PatchEmbed(nn.Module):
    """Image to patch tokens with one strided convolution."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) * (img_size // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, patches, dim)


class VisionTransformer(nn.Module):
    """DINO's ViT: CLS token, learnt positional embeddings (interpolated for other sizes)."""

    def __init__(self, img_size=(224,), patch_size=16, in_chans=3, num_classes=0, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=False, qk_scale=None,
                 drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 norm_layer=nn.LayerNorm, attn_backend="eager", **kwargs):
        super().__init__()
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend {attn_backend!r} is not one of {ATTN_BACKENDS}")
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size=img_size[0], patch_size=patch_size,
                                      in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        # Stochastic depth per block; on the host, so that the model builds on any device.
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
                  norm_layer=norm_layer, attn_backend=attn_backend)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def set_attn_backend(self, attn_backend: str):
        """Switch every block's attention implementation (the weights are unchanged)."""
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend {attn_backend!r} is not one of {ATTN_BACKENDS}")
        for blk in self.blocks:
            blk.attn.attn_backend = attn_backend

    def interpolate_pos_encoding(self, x, w, h):
        """Positional embeddings for an image of ``h x w`` pixels (official bicubic resize)."""
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export() \
                and npatch == n and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_embed.patch_size
        h0 = h // self.patch_embed.patch_size
        side = int(math.sqrt(n))
        # The +0.1 avoids floating point error in the interpolation (as official); using
        # `size=` instead of `scale_factor=` gives different values.
        w0, h0 = w0 + 0.1, h0 + 0.1
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic",
            align_corners=False)
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def prepare_tokens(self, x):
        """Patch tokens with the CLS token and positional embeddings: ``[B, 1 + N, dim]``."""
        B, nc, w, h = x.shape
        p = self.patch_embed.patch_size
        if w % p or h % p:
            raise ValueError(f"image size {w}x{h} is not a multiple of the patch size {p}")
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        return self.pos_drop(x)

    def forward_features(self, x):
        """All tokens after the last block and the final norm: ``[B, 1 + N, dim]``."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x):
        """The CLS embedding ``[B, dim]`` (through ``head``, an identity for DINO)."""
        return self.head(self.forward_features(x)[:, 0])

    def get_last_selfattention(self, x):
        """Softmax attention of the last block, ``[B, heads, 1 + N, 1 + N]``."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1](x, return_attention=True)

    def forward_with_attention(self, x):
        """CLS embedding ``[B, dim]`` and last-block attention ``[B, heads, 1 + N, 1 + N]``."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        x, attn = self.blocks[-1].forward_with_attention(x)
        return self.norm(x)[:, 0], attn

    def get_intermediate_layers(self, x, n=1):
        """Normed tokens of the last ``n`` blocks."""
        x = self.prepare_tokens(x)
        output = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                output.append(self.norm(x))
        return output


def _init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


def _vit(arch, patch_size=16, **kwargs):
    embed_dim, num_heads = ARCH_DIMS[arch]
    return VisionTransformer(patch_size=patch_size, embed_dim=embed_dim, depth=ARCH_DEPTHS[arch],
                             num_heads=num_heads, mlp_ratio=4, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def vit_tiny(patch_size=16, **kwargs):
    """ViT-Tiny: dim 192, 3 heads, depth 12."""
    return _vit("vit_tiny", patch_size, **kwargs)


def vit_small(patch_size=16, **kwargs):
    """ViT-Small: dim 384, 6 heads, depth 12."""
    return _vit("vit_small", patch_size, **kwargs)


def vit_base(patch_size=16, **kwargs):
    """ViT-Base: dim 768, 12 heads, depth 12."""
    return _vit("vit_base", patch_size, **kwargs)


def vit_large(patch_size=16, **kwargs):
    """ViT-Large: dim 1024, 16 heads, depth 24 (DINOv2's ViT-L without registers)."""
    return _vit("vit_large", patch_size, **kwargs)


ARCHS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base,
         "vit_large": vit_large}


def build_vit(arch: str, patch_size: int = 16, **kwargs) -> VisionTransformer:
    """A ViT by name (``vit_tiny``, ``vit_small``, ``vit_base``, ``vit_large``)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    return ARCHS[arch](patch_size=patch_size, **kwargs)
