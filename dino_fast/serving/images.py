"""Uploaded image bytes to model inputs, and the one-line HTTP error of each bad upload.

An upload is checked before it costs memory: its size is read from its header and refused above
``max_pixels`` (a decompression bomb, a few kilobytes declaring billions of pixels, says so),
then it is decoded fully (truncation shows here) and converted to 8-bit RGB as training does
(:func:`dino_fast.data.folder.to_rgb`), and resized and normalised as ``infer`` does
(:func:`dino_fast.evaluation.attention_maps.prepare_image`).
"""
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from dino_fast.data.folder import to_rgb
from dino_fast.evaluation.attention_maps import PixelBudgetError, prepare_image

# Above this many decoded bytes per file byte, an over-budget image is called a bomb: photos
# compress about 10:1, flat PNG art a few hundred to one.
BOMB_RATIO = 1000


class RequestError(Exception):
    """A request the server refuses: ``status`` (a 4xx) and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class PreparedImage:
    """One upload, ready for the model: ``name``, ``rgb`` uint8 ``[H, W, 3]`` (the resized
    image the maps lie on) and ``pixels`` float32 ``[3, H, W]`` (the normalised input)."""

    name: str
    rgb: np.ndarray
    pixels: np.ndarray


def decode_upload(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """The RGB image in ``data``, or a :class:`RequestError` naming ``name`` and the cause:
    empty, not an image, over ``max_pixels`` (or a decompression bomb), truncated or corrupt."""
    if not data:
        raise RequestError(422, f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise RequestError(422, f"{name}: not an image ({len(data)} bytes starting "
                           f"{data[:8]!r}): send JPEG, PNG, WebP or BMP") from None
    except Image.DecompressionBombError as err:
        raise RequestError(413, f"{name}: decompression bomb: {err}") from None
    _check_pixels(img, len(data), name, max_pixels)
    try:
        return to_rgb(img)  # the conversion decodes every pixel: truncation shows here
    except (OSError, ValueError, SyntaxError) as err:
        raise RequestError(422, f"{name}: truncated or corrupt {img.format} image: "
                           f"{' '.join(str(err).split())}") from None


def _check_pixels(img: Image.Image, file_bytes: int, name: str, max_pixels: int):
    pixels = img.width * img.height
    if pixels <= max_pixels:
        return
    if pixels * 3 > BOMB_RATIO * file_bytes:
        raise RequestError(413, f"{name}: decompression bomb: a {file_bytes}-byte file declares "
                           f"{img.width}x{img.height} pixels, over --max_pixels {max_pixels}")
    raise RequestError(413, f"{name}: image of {img.width}x{img.height} = {pixels} pixels is "
                       f"over --max_pixels {max_pixels}")


def prepare_upload(data: bytes, name: str, max_pixels: int, image_size, patch_size: int,
                   input_pixels: int) -> PreparedImage:
    """Decode an upload (:func:`decode_upload`) and resize it to the model's input: ``image_size``
    as ``infer``'s flag, scaled down to at most ``input_pixels`` (the model's pixel budget)."""
    img = decode_upload(data, name, max_pixels)
    try:
        rgb, pixels = prepare_image(img, image_size, patch_size, input_pixels)
    except PixelBudgetError as err:
        raise RequestError(413, f"{name}: {err}") from None
    return PreparedImage(name, rgb, pixels)
