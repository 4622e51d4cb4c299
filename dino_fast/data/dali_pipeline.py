"""The DINO multi-crop recipe as an NVIDIA DALI pipeline graph (imported only when DALI is).

One decode per image (``mixed``: nvJPEG / the hardware decoder on a GPU; ``cpu`` in DALI's
CPU-only mode), then per crop slot the official recipe (see :mod:`dino_fast.data.augment`), each
random choice drawn per sample, applied per sample with DALI conditionals. Differences from the
torchvision reference (only the distributions can match, not the pixels):

* the horizontal flip is applied last, inside the normalisation; every other op is
  mirror-symmetric, so the distribution is the same as flipping first;
* hue uses DALI's rotation of the chroma plane in YIQ space, a linear approximation of
  torchvision's HSV hue shift (identical for grays, close for moderate saturations);
* colour jitter runs in a fixed order, brightness and contrast in one pass, then saturation and
  hue in one pass, where torchvision draws a random order. In exact arithmetic the four
  operations commute (brightness scales all of YIQ; contrast scales the chroma and pulls the luma
  to its mean; saturation scales and hue rotates the chroma plane), so the order only shows
  where torchvision clips a pixel to [0, 255] between two steps (and through PIL's non-linear
  HSV hue, see the previous point);
* grayscale is folded into the saturation/hue pass (saturation 0), so a view that is jittered
  and then grayscaled is not clipped between the two;
* the Gaussian blur is a true Gaussian (sigma = PIL's radius), PIL uses a box approximation;
* the random resized crop uses DALI's sampler (area U(scale), log-uniform aspect, 10 tries,
  then a centred crop), bicubic with antialiasing like PIL's.
"""
import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

from .augment import (
    BLUR_RADIUS,
    BRIGHTNESS,
    CONTRAST,
    CROP_RATIO,
    FLIP_P,
    GRAYSCALE_P,
    HUE,
    JITTER_P,
    MEAN,
    SATURATION,
    SOLARIZE_THRESHOLD,
    STD,
    ViewSpec,
)
from .shards import IMAGE_EXTS

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601, PIL's RGB -> "L"

# Padding that lets nvJPEG reuse its buffers across batches (the values DALI's ImageNet
# examples use), so the decoder does not reallocate as image sizes vary.
_DEVICE_PADDING, _HOST_PADDING = 211025920, 140544512


def _coin(p: float):
    """A per-sample boolean, true with probability ``p``; a plain bool when ``p`` is 0 or 1."""
    return p >= 1 if p <= 0 or p >= 1 else fn.random.coin_flip(probability=p)


def _uniform(low: float, high: float):
    return fn.random.uniform(range=(low, high))


def _to_uint8(x):
    return fn.cast(dmath.clamp(x, 0.0, 255.0), dtype=types.UINT8)


def _luma_mean(image, keep_dims: bool):
    """Per-sample mean luma (weights 0.299/0.587/0.114, as PIL's "L"), from the channel means:
    a scalar, or ``(1, 1, 1)`` with ``keep_dims``."""
    channel_means = fn.reductions.mean(image, axes=(0, 1), keep_dims=keep_dims)
    weighted = channel_means * types.Constant(np.array(LUMA_WEIGHTS, np.float32))
    return fn.reductions.sum(weighted, axes=2 if keep_dims else 0, keep_dims=keep_dims)


def _brightness_contrast(image, brightness, contrast, gpu: bool):
    """torchvision's brightness (scale) and contrast (blend with the mean luma) in one pass:
    ``brightness * (mean + contrast * (x - mean))``, whichever of the two comes first."""
    if gpu:  # argument inputs must be CPU data: do it with arithmetic beside the image
        return brightness_contrast_arithmetic(image, brightness.gpu(), contrast.gpu(),
                                              _luma_mean(image, keep_dims=True))
    return fn.brightness_contrast(image, brightness=brightness, contrast=contrast,
                                  contrast_center=_luma_mean(image, keep_dims=False))


def brightness_contrast_arithmetic(image, brightness, contrast, mean):
    """The GPU form of :func:`_brightness_contrast` (all inputs on the image's device)."""
    return _to_uint8((mean + contrast * (image - mean)) * brightness)


def _colour(image, gpu: bool):
    """Colour jitter (p 0.8: brightness, contrast, saturation and hue with random factors), then
    grayscale (p 0.2), in two passes at most: brightness and contrast in one, then saturation
    and hue in one. Grayscale is the luma in all three channels, which is saturation 0 (YIQ
    chroma zeroed), so it folds into the second pass."""
    jitter, gray = _coin(JITTER_P), _coin(GRAYSCALE_P)
    if jitter:
        image = _brightness_contrast(image, _uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS),
                                     _uniform(1 - CONTRAST, 1 + CONTRAST), gpu)
    if jitter | gray:
        jittered = fn.cast(jitter, dtype=types.FLOAT)
        saturation = 1 + jittered * (_uniform(1 - SATURATION, 1 + SATURATION) - 1)
        hue_degrees = jittered * _uniform(-HUE * 360, HUE * 360)  # torchvision's hue is in turns
        image = fn.hsv(image, hue=hue_degrees,
                       saturation=saturation * (1 - fn.cast(gray, dtype=types.FLOAT)))
    return image


def _solarize(image):
    """Invert the pixels at or above the threshold: v -> 255 - v."""
    return fn.cast(image + (image >= SOLARIZE_THRESHOLD) * (255 - 2 * image), dtype=types.UINT8)


def _view(image, spec: ViewSpec, gpu: bool, out_dtype):
    """One crop slot of the recipe: ``(3, size, size)`` normalised floats per sample."""
    image = fn.random_resized_crop(image, size=(spec.size, spec.size), random_area=spec.scale,
                                   random_aspect_ratio=CROP_RATIO, num_attempts=10,
                                   interp_type=types.INTERP_CUBIC, antialias=True)
    image = _colour(image, gpu)
    if _coin(spec.blur_p):
        image = fn.gaussian_blur(image, sigma=_uniform(*BLUR_RADIUS))
    if _coin(spec.solarize_p):
        image = _solarize(image)
    return fn.crop_mirror_normalize(image, dtype=out_dtype, output_layout="CHW",
                                    mean=[255 * m for m in MEAN], std=[255 * s for s in STD],
                                    mirror=_coin(FLIP_P))


def read_encoded(source: dict):
    """The encoded images of ``source``, in its order: ``{"files": [...]}`` for DALI's file
    reader, ``{"paths": [...], "index_paths": [...]}`` for its WebDataset reader."""
    if "files" in source:
        return fn.readers.file(files=source["files"], random_shuffle=False, name="reader")[0]
    return fn.readers.webdataset(paths=source["paths"], index_paths=source["index_paths"],
                                 ext=[";".join(IMAGE_EXTS)], missing_component_behavior="error",
                                 random_shuffle=False, name="reader")


@pipeline_def(enable_conditionals=True)
def multicrop_pipeline(source: dict, specs: list[ViewSpec], gpu: bool, half: bool):
    """The views of the images of ``source`` (:func:`read_encoded`), in its order: one output
    per crop slot."""
    encoded = read_encoded(source)
    decoded = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                **({"device_memory_padding": _DEVICE_PADDING,
                                    "host_memory_padding": _HOST_PADDING} if gpu else {}))
    out_dtype = types.FLOAT16 if half else types.FLOAT
    return tuple(_view(decoded, spec, gpu, out_dtype) for spec in specs)
