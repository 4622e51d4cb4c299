"""Models: official state-dict names and shapes, positional interpolation, attention backends,
checkpoint layouts."""
import math

import pytest
import torch
import torch.nn.functional as F

from dino_fast.models import (
    DINOHead,
    MultiCropWrapper,
    VisionTransformer,
    build_vit,
    detect_arch,
    load_pretrained,
    vit_large,
    vit_small,
    vit_tiny,
)


def official_vit_keys(depth, dim, patch, num_patches, mlp_ratio=4):
    """The official ViT state dict, written out from facebookresearch/dino's naming."""
    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + num_patches, dim),
            "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({
            b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
            b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
            b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
            b + "mlp.fc1.weight": (mlp_ratio * dim, dim), b + "mlp.fc1.bias": (mlp_ratio * dim,),
            b + "mlp.fc2.weight": (dim, mlp_ratio * dim), b + "mlp.fc2.bias": (dim,)})
    keys.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return keys


OFFICIAL_HEAD_KEYS = {  # DINOHead(384, 65536), use_bn=False, nlayers=3
    "mlp.0.weight": (2048, 384), "mlp.0.bias": (2048,),
    "mlp.2.weight": (2048, 2048), "mlp.2.bias": (2048,),
    "mlp.4.weight": (256, 2048), "mlp.4.bias": (256,),
    "last_layer.weight_g": (65536, 1), "last_layer.weight_v": (65536, 256)}


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_vit_small_16_state_dict_is_official():
    assert shapes(vit_small(patch_size=16)) == official_vit_keys(12, 384, 16, 196)


def test_vit_tiny_8_state_dict_is_official():
    assert shapes(vit_tiny(patch_size=8)) == official_vit_keys(12, 192, 8, 784)


@pytest.mark.parametrize("patch", [16, 8])
def test_vit_large_is_dinov2_vit_l_without_registers(patch):
    """24 blocks of width 1024 and 16 heads, built on the meta device (no memory): the official
    naming, 303.3M backbone parameters at patch 16, and detect_arch finds it from the shapes."""
    with torch.device("meta"):
        vit = build_vit("vit_large", patch)
    assert shapes(vit) == official_vit_keys(24, 1024, patch, (224 // patch) ** 2)
    assert vit.blocks[0].attn.num_heads == 16
    if patch == 16:
        assert sum(p.numel() for p in vit.parameters()) == 303_301_632
    assert detect_arch(vit.state_dict()) == ("vit_large", patch)
    backbone = {f"backbone.{k}": torch.empty(v.shape, device="meta")
                for k, v in vit.state_dict().items()}
    assert detect_arch(backbone) == ("vit_large", patch)


def test_vit_large_builds_by_name_and_function():
    with torch.device("meta"):
        assert shapes(vit_large(patch_size=16)) == shapes(build_vit("vit_large", 16))


def test_dino_head_state_dict_is_official():
    head = DINOHead(384, 65536)
    assert shapes(head) == OFFICIAL_HEAD_KEYS
    assert torch.all(head.last_layer.weight_g == 1)
    assert not head.last_layer.weight_g.requires_grad  # norm_last_layer=True freezes g
    assert DINOHead(384, 10, norm_last_layer=False).last_layer.weight_g.requires_grad


def test_dino_head_with_bn_shifts_indices():
    keys = DINOHead(64, 10, use_bn=True, hidden_dim=32).state_dict()
    assert "mlp.1.running_mean" in keys and "mlp.3.weight" in keys and "mlp.6.weight" in keys


def test_weight_norm_matches_torch():
    head = DINOHead(16, 7, norm_last_layer=False, hidden_dim=8, bottleneck_dim=4)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2)
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 7, bias=False))
    ref.parametrizations.weight.original0.data.copy_(head.last_layer.weight_g)
    ref.parametrizations.weight.original1.data.copy_(head.last_layer.weight_v)
    x = torch.randn(5, 4)
    torch.testing.assert_close(head.last_layer(x), ref(x))


def test_multicrop_wrapper_keys_and_order():
    model = MultiCropWrapper(tiny_vit(), DINOHead(192, 11, hidden_dim=16, bottleneck_dim=8))
    assert all(k.startswith(("backbone.", "head.")) for k in model.state_dict())
    model.eval()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    out = model(crops)
    assert out.shape == (6, 11)
    expected = model.head(torch.cat([model.backbone(torch.cat(crops[:2])),
                                     model.backbone(crops[2])]))
    torch.testing.assert_close(out, expected)


def tiny_vit(**kwargs):
    return VisionTransformer(patch_size=16, embed_dim=192, depth=2, num_heads=3, qkv_bias=True,
                             **kwargs)


def test_pos_embed_native_size_is_unchanged():
    model = tiny_vit()
    tokens = torch.zeros(1, 197, 192)
    assert model.interpolate_pos_encoding(tokens, 224, 224) is model.pos_embed


@pytest.mark.parametrize("size", [(96, 96), (480, 320), (32, 80), (224, 208)])
def test_pos_embed_interpolation_official_formula(size):
    model = tiny_vit()
    h, w = size
    n = model.pos_embed.shape[1] - 1
    side = int(math.sqrt(n))
    grid = model.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, mode="bicubic", align_corners=False,
                             scale_factor=((h // 16 + 0.1) / math.sqrt(n),
                                           (w // 16 + 0.1) / math.sqrt(n)))
    expected = torch.cat([model.pos_embed[:, :1], expected.flatten(2).transpose(1, 2)], dim=1)
    tokens = torch.zeros(1, 1 + (h // 16) * (w // 16), 192)
    torch.testing.assert_close(model.interpolate_pos_encoding(tokens, h, w), expected)


def test_input_not_multiple_of_patch_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_vit()(torch.randn(1, 3, 40, 32))


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_attention_backends_match_eager(backend):
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 48, 64)
    expected = model(x)
    model.set_attn_backend(backend)
    torch.testing.assert_close(model(x), expected, atol=2e-5, rtol=1e-4)


def test_last_selfattention_shape_and_rows_sum_to_one():
    attn = vit_tiny().get_last_selfattention(torch.randn(2, 3, 64, 48))
    assert attn.shape == (2, 3, 1 + 12, 1 + 12)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 13))


def official_checkpoint(model_student, model_teacher):
    """A checkpoint laid out as official main_dino.py writes it under DDP."""
    return {"student": {"module." + k: v for k, v in model_student.state_dict().items()},
            "teacher": model_teacher.state_dict(), "epoch": 3, "optimizer": {},
            "dino_loss": {"center": torch.zeros(1, 11)}}


def test_load_pretrained_official_layouts():
    def wrapper():
        return MultiCropWrapper(tiny_vit(), DINOHead(192, 11, hidden_dim=16, bottleneck_dim=8))

    student, teacher = wrapper(), wrapper()
    ckpt = official_checkpoint(student, teacher)
    x = torch.randn(1, 3, 32, 32)
    backbone = tiny_vit().eval()
    load_pretrained(backbone, ckpt)  # teacher, backbone. prefix stripped
    torch.testing.assert_close(backbone(x), teacher.backbone.eval()(x))
    load_pretrained(backbone, ckpt, key="student")  # module. prefix stripped
    torch.testing.assert_close(backbone(x), student.backbone.eval()(x))
    full = wrapper()
    load_pretrained(full, ckpt, key="student")
    torch.testing.assert_close(full.eval()(x), student.eval()(x))


def test_load_pretrained_parametrize_weight_norm_keys():
    head = DINOHead(8, 5, hidden_dim=4, bottleneck_dim=3)
    state = {k.replace("last_layer.weight_g", "last_layer.parametrizations.weight.original0")
              .replace("last_layer.weight_v", "last_layer.parametrizations.weight.original1"): v
             for k, v in head.state_dict().items()}
    other = DINOHead(8, 5, hidden_dim=4, bottleneck_dim=3)
    load_pretrained(other, state)
    torch.testing.assert_close(other.state_dict()["last_layer.weight_v"], head.last_layer.weight_v)


def test_load_pretrained_wrong_arch_lists_keys():
    with pytest.raises(RuntimeError, match="missing keys|shape mismatches"):
        load_pretrained(build_vit("vit_tiny", 16), vit_small().state_dict())


class _Payload:
    """A pickled object that is not a tensor, container or number."""


def test_checkpoints_load_without_running_pickled_code(tmp_path):
    import argparse

    import numpy as np

    from dino_fast.models.checkpoint import load_file
    model = tiny_vit()
    official = {"teacher": model.state_dict(), "student": {}, "epoch": 1,
                "optimizer": {"param_groups": [{"lr": np.float64(0.1)}]},
                "args": argparse.Namespace(arch="vit_tiny")}
    torch.save(official, tmp_path / "official.pth")
    load_pretrained(tiny_vit(), str(tmp_path / "official.pth"))  # NumPy floats and args: fine
    torch.save({"teacher": _Payload()}, tmp_path / "payload.pth")
    with pytest.raises(RuntimeError, match="cannot read checkpoint"):
        load_file(str(tmp_path / "payload.pth"))
