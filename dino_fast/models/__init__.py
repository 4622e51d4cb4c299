"""Models of the DINO recipe, with the official parameter names."""
from dino_fast.models.head import DINOHead
from dino_fast.models.multicrop import MultiCropWrapper
from dino_fast.models.pretrained import extract_state_dict, load_pretrained
from dino_fast.models.vision_transformer import (ARCH_DIMS, ATTN_BACKENDS, VisionTransformer, vit_base,
                                                 vit_small, vit_tiny)

ARCHS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}


def build_vit(arch: str, patch_size: int = 16, **kwargs) -> VisionTransformer:
    """A ViT by name (``vit_tiny``, ``vit_small``, ``vit_base``)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    return ARCHS[arch](patch_size=patch_size, **kwargs)


__all__ = ["ARCH_DIMS", "ARCHS", "ATTN_BACKENDS", "DINOHead", "MultiCropWrapper", "VisionTransformer",
           "build_vit", "extract_state_dict", "load_pretrained", "vit_base", "vit_small",
           "vit_tiny"]
