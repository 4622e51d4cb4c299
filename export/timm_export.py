"""Write a ViT backbone for timm: a folder with ``model.safetensors`` and ``config.json`` (timm's
Hub layout: ``architecture``, ``num_classes``, ``model_args`` and the ``pretrained_cfg``).

timm's ViT uses the official DINO tensor names, so the weights are stored unchanged. Load them
offline with either of::

    timm.create_model("vit_small_patch16_224", num_classes=0, pretrained=True,
                      pretrained_cfg_overlay=dict(file="folder/model.safetensors"))
    timm.create_model("local-dir:folder", pretrained=True)    # reads config.json

``model(images)`` is then our CLS embedding. timm has no ``vit_tiny_patch8_224`` and no
``vit_large_patch8_224``: those models are ``vit_tiny_patch16_224`` and ``vit_large_patch16_224``
built with ``patch_size=8`` (in ``model_args``).
"""
import json
import os

from dino_fast.export.output import replacing
from dino_fast.export.parity import check_cls_parity
from dino_fast.export.safetensors_export import export_safetensors
from dino_fast.models import ARCH_DEPTHS

TIMM_FILES = ("config.json", "model.safetensors")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TIMM_MODELS = {"vit_tiny_patch16_224", "vit_small_patch16_224", "vit_small_patch8_224",
               "vit_base_patch16_224", "vit_base_patch8_224", "vit_large_patch16_224"}


def timm_model(vit, arch: str) -> tuple[str, dict]:
    """The timm model name for ``vit`` and the ``model_args`` it needs (no head; the patch size
    and depth when the name does not say them)."""
    patch, depth = vit.patch_embed.patch_size, len(vit.blocks)
    name = f"{arch}_patch{patch}_224"
    model_args = {"num_classes": 0}
    if name not in TIMM_MODELS:
        name, model_args["patch_size"] = f"{arch}_patch16_224", patch
    if depth != ARCH_DEPTHS[arch]:
        model_args["depth"] = depth
    return name, model_args


def timm_config(vit, arch: str) -> dict:
    """``config.json`` in timm's Hub layout (what ``local-dir:`` and the Hub read)."""
    name, model_args = timm_model(vit, arch)
    size = vit.patch_embed.img_size
    return {"architecture": name, "num_classes": 0, "num_features": vit.embed_dim,
            "global_pool": "token", "model_args": model_args,
            "pretrained_cfg": {"tag": "dino_fast", "custom_load": False,
                               "input_size": [3, size, size], "fixed_input_size": True,
                               "interpolation": "bicubic", "crop_pct": 224 / 256,
                               "crop_mode": "center", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                               "num_classes": 0, "first_conv": "patch_embed.proj",
                               "classifier": "head"}}


def export_timm(vit, folder: str, arch: str, epoch: int | None = None, check: bool = True,
                overwrite: bool = False):
    """Write ``folder/model.safetensors`` and ``folder/config.json`` for ``vit``; with ``check``,
    load them with timm and compare its output with ours (skipped, with a message, when timm is
    not installed). Written beside ``folder`` and renamed over it once checked, as
    :func:`~dino_fast.export.hf_export.export_hf` does (``overwrite``: the same)."""
    with replacing(folder, TIMM_FILES, overwrite) as temporary:
        export_safetensors(vit, os.path.join(temporary, "model.safetensors"), arch, epoch)
        with open(os.path.join(temporary, "config.json"), "w") as f:
            json.dump(timm_config(vit, arch), f, indent=2)
        if check:
            check_timm(temporary, vit, arch)


def check_timm(folder: str, vit, arch: str) -> float | None:
    """Build the timm model from ``folder`` (strict load) and compare its output with ``vit``'s;
    None when timm is not installed."""
    try:
        import timm
    except ImportError:
        print("timm is not installed: the export was not loaded back to check it")
        return None
    name, model_args = timm_model(vit, arch)
    overlay = {"file": os.path.join(folder, "model.safetensors")}
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay,
                              **model_args).eval()
    return check_cls_parity(vit, model, f"timm {name}")
