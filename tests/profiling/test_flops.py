"""The FLOP count behind every MFU figure, against a hand count."""
from dino_fast.profiling.flops import dino_step_flops, head_forward_flops, vit_forward_flops


def test_vit_small_16_dino_step_by_hand():
    """ViT-S/16 (dim 384, depth 12), 2 x 224 + 10 x 96 crops, K = 65536, counted by hand in
    multiply-adds (MACs) per crop, then 2 FLOPs per MAC."""
    d = 384
    block_per_token = 3 * d * d + d * d + 4 * d * d + 4 * d * d  # qkv, proj, fc1, fc2
    # 224 px: 196 patches + CLS = 197 tokens; attention q k^T and p v: 2 * 197 * d per token
    g = 196 * (3 * 16 * 16 * d) + 12 * 197 * (block_per_token + 2 * 197 * d)
    # 96 px: 36 patches + CLS = 37 tokens
    loc = 36 * (3 * 16 * 16 * d) + 12 * 37 * (block_per_token + 2 * 37 * d)
    head = 384 * 2048 + 2048 * 2048 + 2048 * 256 + 256 * 65536
    assert (g, loc, head) == (4_598_498_304, 808_879_104, 22_282_240)
    student_macs = 2 * (g + head) + 10 * (loc + head)
    teacher_macs = 2 * (g + head)
    want = 2 * (3 * student_macs + teacher_macs)  # forward + backward (2x) for the student
    assert dino_step_flops("vit_small", 16, 224, 96, 10, 65536) == want
    assert round(want / 1e9, 1) == 123.8  # the figure the benchmark used before this count


def test_scales_with_crops_and_arch():
    base = dino_step_flops("vit_small", local_crops=10)
    assert dino_step_flops("vit_small", local_crops=0) < base < dino_step_flops("vit_base")
    assert round(dino_step_flops("vit_base") / 1e9, 1) == 474.1


def test_vit_large_counts_its_24_blocks():
    """vit_large's backbone is 24 blocks of width 1024: its per-crop FLOPs are those of a
    24-block ViT, not 12 (the head is the same function of the width)."""
    step = dino_step_flops("vit_large", local_crops=0)
    head = head_forward_flops(1024, 65536)
    crop = vit_forward_flops(1024, 224, 16, depth=24) + head
    assert step == 3 * 2 * crop + 2 * crop
    twelve = vit_forward_flops(1024, 224, 16, depth=12) + head
    assert step != 3 * 2 * twelve + 2 * twelve
