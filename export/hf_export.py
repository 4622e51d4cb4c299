"""Write a ViT backbone as a Hugging Face ``transformers`` ``ViTModel`` folder.

The folder holds ``config.json``, ``model.safetensors``, ``preprocessor_config.json`` and a short
model card (``README.md``), and loads offline with
``transformers.ViTModel.from_pretrained(folder, add_pooling_layer=False)``: its
``last_hidden_state[:, 0]`` is our CLS embedding. The tensors use the ``ViTModel`` names that
``save_pretrained`` writes (those of the ``facebook/dino-vit*`` models), with our fused ``qkv``
projection split into ``query``, ``key`` and ``value``. Writing needs safetensors only;
``transformers`` is needed for the check that loads the folder back.
"""
import importlib
import json
import os
import sys

import torch

from dino_fast.export.output import replacing
from dino_fast.export.parity import check_cls_parity
from dino_fast.export.safetensors_export import backbone_metadata, backbone_tensors

HF_FILES = ("README.md", "config.json", "model.safetensors", "preprocessor_config.json")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
_BLOCK_NAMES = {  # ours (blocks.{i}.) -> transformers (encoder.layer.{i}.), qkv aside
    "norm1": "layernorm_before", "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
_TOP_NAMES = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
              "patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm"}


def hf_tensors(vit) -> dict[str, torch.Tensor]:
    """``vit``'s weights under the ``transformers`` ``ViTModel`` names."""
    out = {}
    for name, tensor in backbone_tensors(vit).items():
        stem, _, kind = name.rpartition(".")  # kind: weight / bias, or the whole name
        if name in _TOP_NAMES or stem in _TOP_NAMES:
            out[_TOP_NAMES[name] if name in _TOP_NAMES else f"{_TOP_NAMES[stem]}.{kind}"] = tensor
            continue
        _, index, inner = stem.split(".", 2)  # blocks, i, attn.qkv / norm1 / ...
        prefix = f"encoder.layer.{index}."
        if inner == "attn.qkv":  # rows: q, k, v, each (heads * head_dim), as Attention reshapes
            for part, chunk in zip(("query", "key", "value"), tensor.chunk(3, dim=0)):
                out[f"{prefix}attention.attention.{part}.{kind}"] = chunk.contiguous()
        else:
            out[f"{prefix}{_BLOCK_NAMES[inner]}.{kind}"] = tensor
    return out


def hf_config(vit) -> dict:
    """The ``ViTConfig`` of ``vit``: LayerNorm eps 1e-6 and exact GELU, as DINO's ViT."""
    dim, patch = vit.embed_dim, vit.patch_embed.patch_size
    return {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": dim,
            "num_hidden_layers": len(vit.blocks),
            "num_attention_heads": vit.blocks[0].attn.num_heads,
            "intermediate_size": vit.blocks[0].mlp.fc1.out_features, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02, "layer_norm_eps": vit.norm.eps,
            "image_size": vit.patch_embed.img_size, "patch_size": patch, "num_channels": 3,
            "qkv_bias": vit.blocks[0].attn.qkv.bias is not None, "encoder_stride": patch,
            "dtype": "float32"}


def preprocessor_config(image_size: int) -> dict:
    """``ViTImageProcessor`` settings: bicubic resize to the square size, ImageNet statistics."""
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": image_size, "width": image_size}, "resample": 3,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD}


def model_card(arch: str, patch: int, epoch: int | None) -> str:
    """The folder's README.md: what the model is, how to load it, what differs from ours."""
    trained = f"after {epoch} epochs " if epoch is not None else ""
    return f"""---
library_name: transformers
tags: [dino, vision-transformer, self-supervised, image-feature-extraction]
---
# DINO {arch}/{patch}, exported by dino_fast

A Vision Transformer trained {trained}with DINO self-supervision (Caron et al. 2021, "Emerging
Properties in Self-Supervised Vision Transformers"), exported by `python -m dino_fast.export
--format hf`. No classification head: the image embedding is the CLS token.

```python
from transformers import ViTModel
model = ViTModel.from_pretrained("path/to/this/folder", add_pooling_layer=False).eval()
embedding = model(pixel_values=images).last_hidden_state[:, 0]  # images: (B, 3, 224, 224)
```

Inputs: RGB, scaled to [0, 1], normalised with the ImageNet mean {IMAGENET_MEAN} and standard
deviation {IMAGENET_STD}. The DINO evaluations resize the shorter side to 256 (bicubic) and
center-crop 224; `preprocessor_config.json` resizes straight to 224 x 224 instead.

At 224 x 224 the output equals dino_fast's within 1e-4 (checked when exported). At other sizes
(`interpolate_pos_encoding=True`), transformers resizes the positional embeddings with its own
bicubic interpolation, not the official DINO one (bicubic with scale factors offset by 0.1), so
the outputs differ slightly from dino_fast's and the official code's there. The architecture is
DINO's: LayerNorm eps 1e-6, exact GELU, biases on the query, key and value projections.
"""


def export_hf(vit, folder: str, arch: str, epoch: int | None = None, check: bool = True,
              overwrite: bool = False):
    """Write the ``ViTModel`` folder for ``vit`` and, with ``check``, load it with
    ``transformers`` and compare its CLS output with ours (skipped, with a message, when
    transformers is not installed). The folder is written beside ``folder`` and renamed over it
    once checked (:func:`~dino_fast.export.output.replacing`): an earlier export there is
    replaced; other files, or a file at ``folder``, are refused unless ``overwrite``."""
    with replacing(folder, HF_FILES, overwrite) as temporary:
        write_hf_folder(vit, temporary, arch, epoch)
        if check:
            check_hf(temporary, vit)


def write_hf_folder(vit, folder: str, arch: str, epoch: int | None):
    """Write the files :data:`HF_FILES` for ``vit`` into the existing ``folder``."""
    from safetensors.torch import save_file

    save_file(hf_tensors(vit), os.path.join(folder, "model.safetensors"),
              metadata=backbone_metadata(vit, arch, epoch))
    files = {"config.json": hf_config(vit),
             "preprocessor_config.json": preprocessor_config(vit.patch_embed.img_size)}
    for name, content in files.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(model_card(arch, vit.patch_embed.patch_size, epoch))


def import_hub_kernels_first():
    """Import Hugging Face's ``kernels`` package, a dependency of transformers 5, before
    transformers does. Run from a dino_fast checkout (``python -m`` and pytest put it first on
    ``sys.path``), the checkout's ``kernels/`` folder, our Triton sources, has the same name and
    would be imported in its place, failing transformers' model loading; theirs is imported
    here with the checkout off the path. Nothing to do in an installed package, or when theirs
    is not installed."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if "kernels" in sys.modules or not os.path.isfile(os.path.join(checkout, "kernels",
                                                                   "__init__.py")):
        return
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != checkout]
    if len(elsewhere) == len(sys.path):
        return
    saved, sys.path[:] = sys.path[:], elsewhere
    try:
        importlib.import_module("kernels")
    except ImportError:  # not installed: transformers then does not import it either
        pass
    finally:
        sys.path[:] = saved


def check_hf(folder: str, vit) -> float | None:
    """Load ``folder`` with ``transformers.ViTModel`` (no missing or unexpected tensor allowed)
    and compare its CLS output with ``vit``'s; None when transformers is not installed."""
    import_hub_kernels_first()
    try:
        from transformers import ViTModel
    except ImportError as err:
        missing = isinstance(err, ModuleNotFoundError) and err.name == "transformers"
        cause = "is not installed" if missing else f"cannot be imported ({err})"
        print(f"transformers {cause}: the export was not loaded back to check it")
        return None
    model, info = ViTModel.from_pretrained(folder, add_pooling_layer=False,
                                           output_loading_info=True)
    wrong = {k: v for k, v in info.items() if v and k != "error_msgs"} or info.get("error_msgs")
    if wrong:
        raise RuntimeError(f"transformers loaded {folder} with problems: {wrong}")
    model.eval()
    return check_cls_parity(vit, lambda x: model(pixel_values=x).last_hidden_state[:, 0],
                            "transformers ViTModel")
