"""Write a ViT backbone as a ``.safetensors`` file: tensors only (no pickle, so loading it runs
no code), with metadata describing the model.

The tensor names are the official DINO backbone names (``cls_token``, ``pos_embed``,
``blocks.{i}.attn.qkv.weight``, ...), which are also timm's, so the file loads with
:func:`dino_fast.models.load_pretrained` and :func:`dino_fast.models.build_model`, in every command
that takes ``--checkpoint``, in the official DINO code (``model.load_state_dict``) and in timm.
"""
import torch

import dino_fast
from dino_fast.export.output import replacing


def backbone_tensors(vit) -> dict[str, torch.Tensor]:
    """The backbone's state dict as contiguous float32 CPU tensors (what safetensors stores)."""
    return {name: tensor.detach().to("cpu", torch.float32).contiguous()
            for name, tensor in vit.state_dict().items()}


def backbone_metadata(vit, arch: str, epoch: int | None = None) -> dict[str, str]:
    """What the file says about its model: arch, patch size, embed dim, depth, heads, the epochs
    trained (when known) and the dino_fast version. safetensors metadata values are strings."""
    metadata = {"format": "pt", "arch": arch, "patch_size": str(vit.patch_embed.patch_size),
                "embed_dim": str(vit.embed_dim), "depth": str(len(vit.blocks)),
                "num_heads": str(vit.blocks[0].attn.num_heads),
                "dino_fast_version": dino_fast.__version__}
    if epoch is not None:
        metadata["epoch"] = str(epoch)
    return metadata


def export_safetensors(vit, path: str, arch: str, epoch: int | None = None,
                       overwrite: bool = False):
    """Write ``vit``'s weights and :func:`backbone_metadata` to ``path``, through a temporary
    file renamed over it when complete (:func:`~dino_fast.export.output.replacing`;
    ``overwrite`` replaces a folder there)."""
    from safetensors.torch import save_file

    with replacing(path, overwrite=overwrite) as temporary:
        save_file(backbone_tensors(vit), temporary, metadata=backbone_metadata(vit, arch, epoch))
