"""Models of the DINO recipe, with the official parameter names."""
from dino_fast.models.checkpointing import (
    ACTIVATION_CHECKPOINTING,
    apply_activation_checkpointing,
)
from dino_fast.models.head import DINOHead
from dino_fast.models.multicrop import MultiCropWrapper
from dino_fast.models.packed import PackedMultiCropWrapper
from dino_fast.models.pretrained import (
    build_model,
    checkpoint_epoch,
    detect_arch,
    extract_state_dict,
    load_pretrained,
    read_weights,
)
from dino_fast.models.vision_transformer import (
    ARCH_DEPTHS,
    ARCH_DIMS,
    ARCHS,
    ATTN_BACKENDS,
    VisionTransformer,
    build_vit,
    vit_base,
    vit_large,
    vit_small,
    vit_tiny,
)

__all__ = ["ACTIVATION_CHECKPOINTING", "ARCH_DEPTHS", "ARCH_DIMS", "ARCHS", "ATTN_BACKENDS",
           "DINOHead", "MultiCropWrapper", "PackedMultiCropWrapper", "VisionTransformer",
           "apply_activation_checkpointing", "build_model", "build_vit", "checkpoint_epoch",
           "detect_arch", "extract_state_dict", "load_pretrained", "read_weights", "vit_base",
           "vit_large", "vit_small", "vit_tiny"]
