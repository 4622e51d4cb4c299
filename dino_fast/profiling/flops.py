"""Model FLOPs of a DINO training step: the one count behind every model FLOP utilisation (MFU)
figure in this repository.

Counted as 2 FLOPs per multiply-add of the matrix products only (the usual MFU convention, as in
the PaLM paper's appendix B): patch embedding, qkv, attention scores and weighted sum, output
projection, MLP, and the DINO head with its last layer; not norms, softmax, GELU, the loss, the
optimizer or the EMA. The backward pass counts twice the forward; recomputation (e.g. flash
attention's) is not counted, since MFU measures the model's work, not the implementation's.
"""
from dino_fast.models.vision_transformer import ARCH_DEPTHS, ARCH_DIMS

DEPTH, MLP_RATIO = 12, 4  # DINO's ViTs (vit_large: 24 blocks, ARCH_DEPTHS)


def vit_forward_flops(embed_dim: int, image_size: int, patch_size: int = 16,
                      depth: int = DEPTH, mlp_ratio: int = MLP_RATIO, in_chans: int = 3) -> int:
    """Forward matmul FLOPs of a ViT on one square ``image_size`` crop (CLS token included)."""
    patches = (image_size // patch_size) ** 2
    tokens = patches + 1
    embed = patches * in_chans * patch_size ** 2 * embed_dim
    per_token = (3 + 1 + 2 * mlp_ratio) * embed_dim ** 2  # qkv, proj, fc1 and fc2
    attention = 2 * tokens * embed_dim  # q k^T and p v, over all heads
    return 2 * (embed + depth * tokens * (per_token + attention))


def head_forward_flops(embed_dim: int, out_dim: int, hidden_dim: int = 2048,
                       bottleneck_dim: int = 256) -> int:
    """Forward matmul FLOPs of the 3-layer DINO head and its last layer, for one crop."""
    macs = (embed_dim * hidden_dim + hidden_dim * hidden_dim + hidden_dim * bottleneck_dim
            + bottleneck_dim * out_dim)
    return 2 * macs


def dino_step_flops(arch: str = "vit_small", patch_size: int = 16, global_size: int = 224,
                    local_size: int = 96, local_crops: int = 10, out_dim: int = 65536) -> int:
    """Model FLOPs of one training step per image: the student forward and backward (3x the
    forward) on the 2 global and ``local_crops`` local crops, and the teacher forward on the 2
    global crops."""
    dim, depth = ARCH_DIMS[arch][0], ARCH_DEPTHS[arch]
    head = head_forward_flops(dim, out_dim)
    global_crop = vit_forward_flops(dim, global_size, patch_size, depth) + head
    local_crop = vit_forward_flops(dim, local_size, patch_size, depth) + head
    student = 2 * global_crop + local_crops * local_crop
    return 3 * student + 2 * global_crop
