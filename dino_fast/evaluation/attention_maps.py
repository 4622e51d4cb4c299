"""Attention maps of DINO's last block as images, as the official visualize_attention.py.

Shared by the PyTorch command (:mod:`dino_fast.visualize`) and ONNX Runtime inference
(:mod:`dino_fast.infer`), so it works on NumPy arrays (no matplotlib). Per image: the
CLS-to-patch attention of each head on the patch grid, the mask that keeps the smallest set of
patches holding ``threshold`` of a head's attention mass (Caron et al. 2021, Fig. 3 and the
official ``--threshold``), both upsampled by the patch size (nearest) and written as PNG files:
heat-map overlays on the image and black/white masks.
"""
import math
import os

import numpy as np
from PIL import Image

from dino_fast.data.augment import MEAN, STD
from dino_fast.data.folder import find_images as find_images_under
from dino_fast.data.folder import load_rgb

# Anchors of a dark-to-bright heat colormap (black, purple, red, orange, pale yellow).
_HEAT_ANCHORS = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)],
                         dtype=np.float64)


class PixelBudgetError(ValueError):
    """An image that cannot be resized within a pixel budget: even one patch on its shorter side,
    with the aspect ratio kept, would exceed it."""


def _resize_target(height: int, width: int, image_size, patch_size: int,
                   max_pixels: int | None = None) -> tuple[int, int]:
    """``(H, W)`` the image is resized to before the crop, as torchvision's ``Resize``: None keeps
    the size, one int (or a 1-sequence) scales the shorter side to it keeping the aspect ratio,
    ``(H, W)`` is exact. Each side is at least one patch. With ``max_pixels``, a size whose crop
    would hold more pixels is scaled down, aspect ratio kept, until its crop fits (see
    :func:`_fit_pixels`)."""
    if image_size is not None and not isinstance(image_size, int) and len(image_size) == 1:
        image_size = image_size[0]
    if image_size is None:
        size = (height, width)
    elif isinstance(image_size, int):
        short, long = sorted((height, width))
        scaled = (image_size, int(image_size * long / short))
        size = scaled if height <= width else scaled[::-1]
    else:
        size = tuple(image_size)
    if min(size) <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    size = tuple(max(patch_size, s) for s in size)
    if max_pixels is not None and math.prod(_crop(size, patch_size)) > max_pixels:
        size = _fit_pixels(size, patch_size, max_pixels)
    return size


def _crop(size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """``size`` cropped down to multiples of ``patch_size``."""
    return tuple(s - s % patch_size for s in size)


def _fit_pixels(size: tuple[int, int], patch_size: int, max_pixels: int) -> tuple[int, int]:
    """``size`` scaled by ``sqrt(max_pixels / pixels)``, so that its crop to multiples of the
    patch holds at most ``max_pixels`` (the crop loses under one patch per side); raises
    :class:`PixelBudgetError` when one patch on the shorter side is already too many."""
    scale = math.sqrt(max_pixels / (size[0] * size[1]))
    fitted = tuple(max(patch_size, int(s * scale)) for s in size)
    if math.prod(_crop(fitted, patch_size)) > max_pixels:
        height, width = _crop(fitted, patch_size)
        raise PixelBudgetError(
            f"{size[0]}x{size[1]} does not fit in {max_pixels} pixels with its aspect ratio "
            f"kept: one {patch_size}-pixel patch on its shorter side makes {height}x{width}, "
            f"over the budget of {max_pixels} pixels")
    return fitted


def resized_shape(height: int, width: int, image_size, patch_size: int,
                  max_pixels: int | None = None) -> tuple[int, int]:
    """``(H, W)`` of the model input: the resize target (see ``_resize_target``) cropped down to
    multiples of ``patch_size``; at most ``max_pixels`` pixels when given."""
    return _crop(_resize_target(height, width, image_size, patch_size, max_pixels), patch_size)


def load_image(path, image_size, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The image at ``path`` as the official ``visualize_attention.py`` prepares it (see
    :func:`prepare_image`). An unreadable file raises :class:`dino_fast.data.BadImageError`
    naming it."""
    return prepare_image(load_rgb(str(path)), image_size, patch_size)


def prepare_image(img: Image.Image, image_size, patch_size: int,
                  max_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An RGB PIL image resized (bilinear, see :func:`resized_shape`), then cropped at the bottom
    and right to multiples of the patch size, as official. Returns ``(rgb, normalised)``.

    ``rgb`` is uint8 ``[H, W, 3]`` for the overlays, ``normalised`` float32 ``[3, H, W]`` with the
    ImageNet mean and std, the model's input. ``max_pixels`` bounds ``H * W`` (scaled down,
    aspect ratio kept; :class:`PixelBudgetError` when it cannot be).
    """
    height, width = _resize_target(img.height, img.width, image_size, patch_size, max_pixels)
    crop_h, crop_w = _crop((height, width), patch_size)
    rgb = np.asarray(img.resize((width, height), Image.BILINEAR))[:crop_h, :crop_w]  # (H, W, 3)
    normalised = (rgb.astype(np.float32) / 255 - MEAN) / STD
    return rgb, normalised.transpose(2, 0, 1).astype(np.float32)  # (3, H, W)


def find_images(paths) -> list[str]:
    """Image files among ``paths``: files as given, folders searched recursively (sorted)."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            found += [os.path.join(path, p) for p in find_images_under(path)]
        else:
            found.append(path)
    return found


def cls_patch_attention(attn: np.ndarray) -> np.ndarray:
    """CLS-to-patch rows ``[..., heads, N]`` of last-block attention ``[..., heads, N+1, N+1]``."""
    return attn[..., 0, 1:]


def threshold_masks(maps: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean masks ``[..., N]`` keeping the fewest patches that hold ``threshold`` of the mass.

    As official: sort each map ascending, normalise to sum 1, cumulative sum, keep the patches
    whose cumulative sum exceeds ``1 - threshold``, and put them back in patch order.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    order = np.argsort(maps, axis=-1, kind="stable")
    ascending = np.take_along_axis(maps, order, axis=-1)
    cumulative = np.cumsum(ascending / ascending.sum(axis=-1, keepdims=True), axis=-1)
    masks = np.empty(maps.shape, dtype=bool)
    np.put_along_axis(masks, order, cumulative > 1 - threshold, axis=-1)
    return masks


def upsample_nearest(grid_maps: np.ndarray, patch_size: int) -> np.ndarray:
    """Repeat each cell of ``[..., rows, cols]`` maps ``patch_size`` times along both axes."""
    return grid_maps.repeat(patch_size, axis=-2).repeat(patch_size, axis=-1)


def heat_colormap(values: np.ndarray) -> np.ndarray:
    """RGB uint8 ``[..., 3]`` heat colours of ``values`` in [0, 1] (dark low, bright high)."""
    stops = np.linspace(0, 1, len(_HEAT_ANCHORS))
    values = np.clip(values, 0, 1)
    channels = [np.interp(values, stops, _HEAT_ANCHORS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def heatmap_overlay(rgb: np.ndarray, grid_map: np.ndarray, patch_size: int,
                    alpha: float = 0.6) -> np.ndarray:
    """``rgb`` ``[H, W, 3]`` blended with the heat colours of a ``[rows, cols]`` patch map.

    The map is min-max scaled, coloured, and upsampled by ``patch_size`` (nearest) to the image.
    """
    low, high = float(grid_map.min()), float(grid_map.max())
    scaled = (grid_map - low) / (high - low) if high > low else np.zeros_like(grid_map)
    colours = upsample_nearest(heat_colormap(scaled).transpose(2, 0, 1), patch_size)  # (3, H, W)
    blended = (1 - alpha) * rgb + alpha * colours.transpose(1, 2, 0)
    return blended.round().astype(np.uint8)


def save_attention_maps(output_dir: str, rgb: np.ndarray, attentions: np.ndarray,
                        patch_size: int, threshold: float | None = 0.6) -> list[str]:
    """Write one image's maps as PNG files in ``output_dir``; returns their paths.

    ``rgb`` is the model's input image ``[H, W, 3]`` (uint8), ``attentions`` its CLS-to-patch
    attention ``[heads, N]`` with ``N = (H / p) * (W / p)``. Files: ``img.png``,
    ``attn-head{i}.png`` and ``attn-mean.png`` (overlays), and unless ``threshold`` is None
    ``mask-head{i}.png`` and ``mask-mean.png`` (white = kept patches).
    """
    rows, cols = rgb.shape[0] // patch_size, rgb.shape[1] // patch_size
    if attentions.ndim != 2 or attentions.shape[1] != rows * cols:
        raise ValueError(f"attentions {attentions.shape} do not fit a {rows}x{cols} patch grid "
                         f"of a {rgb.shape[0]}x{rgb.shape[1]} image with patch {patch_size}")
    attentions = attentions.astype(np.float64)
    maps = np.concatenate((attentions, attentions.mean(axis=0, keepdims=True)))  # (heads + 1, N)
    names = [f"head{i}" for i in range(len(attentions))] + ["mean"]
    os.makedirs(output_dir, exist_ok=True)
    written = [os.path.join(output_dir, "img.png")]
    Image.fromarray(rgb).save(written[0])
    masks = None if threshold is None else upsample_nearest(
        threshold_masks(maps, threshold).reshape(-1, rows, cols), patch_size)
    for i, name in enumerate(names):
        written.append(os.path.join(output_dir, f"attn-{name}.png"))
        Image.fromarray(heatmap_overlay(rgb, maps[i].reshape(rows, cols), patch_size)).save(
            written[-1])
        if masks is not None:
            written.append(os.path.join(output_dir, f"mask-{name}.png"))
            Image.fromarray(masks[i].astype(np.uint8) * 255).save(written[-1])
    return written
