"""The JSON bodies of the model endpoints: CLS features, and attention maps as arrays or PNGs.

The maps are those ``infer`` writes (:mod:`dino_fast.evaluation.attention_maps`): each head's
CLS-to-patch attention on the patch grid, their mean, and the masks keeping ``threshold`` of the
attention mass, as the official ``visualize_attention.py``. ``format=png`` gives each as a
``data:image/png;base64`` URL: the resized input image, heat-map overlays, black/white masks.
"""
import base64
import io

import numpy as np
from PIL import Image

from dino_fast.evaluation.attention_maps import heatmap_overlay, threshold_masks, upsample_nearest

FORMATS = ("json", "png")


def features_body(images, results) -> dict:
    """``{"features": [[...]], "images": [{"name", "height", "width"}]}`` of one request."""
    return {"features": [features.tolist() for _, features in results],
            "images": [_describe(image) for image in images]}


def attention_body(images, results, patch_size: int, threshold: float, fmt: str) -> dict:
    """``{"images": [...]}``: per image its size, patch grid, ``heads``, ``mean`` and ``masks``
    (``heads`` and ``mean``), as lists (``json``) or PNG data URLs (``png``, plus ``image``)."""
    out = []
    for image, (attentions, _) in zip(images, results):
        rows, cols = image.rgb.shape[0] // patch_size, image.rgb.shape[1] // patch_size
        maps = np.concatenate((attentions, attentions.mean(axis=0, keepdims=True)))  # (heads+1, N)
        masks = threshold_masks(maps.astype(np.float64), threshold)
        entry = {**_describe(image), "grid": [rows, cols], "threshold": threshold}
        if fmt == "png":
            entry.update(_pngs(image.rgb, maps.reshape(-1, rows, cols),
                               masks.reshape(-1, rows, cols), patch_size))
        else:
            entry.update(heads=maps[:-1].tolist(), mean=maps[-1].tolist(),
                         masks={"heads": masks[:-1].astype(int).tolist(),
                                "mean": masks[-1].astype(int).tolist()})
        out.append(entry)
    return {"images": out}


def _describe(image) -> dict:
    return {"name": image.name, "height": image.rgb.shape[0], "width": image.rgb.shape[1]}


def _pngs(rgb: np.ndarray, maps: np.ndarray, masks: np.ndarray, patch_size: int) -> dict:
    overlays = [png_url(heatmap_overlay(rgb, grid, patch_size)) for grid in maps]
    mask_urls = [png_url(upsample_nearest(mask, patch_size).astype(np.uint8) * 255)
                 for mask in masks]
    return {"image": png_url(rgb), "heads": overlays[:-1], "mean": overlays[-1],
            "masks": {"heads": mask_urls[:-1], "mean": mask_urls[-1]}}


def png_url(pixels: np.ndarray) -> str:
    """``pixels`` (uint8 ``[H, W]`` or ``[H, W, 3]``) as a ``data:image/png;base64`` URL."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
