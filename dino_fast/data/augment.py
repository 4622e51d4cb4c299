"""The DINO multi-crop augmentation (Caron et al. 2021, Sec. 3.1 and appendix; official
``main_dino.py`` ``DataAugmentationDINO``) on PIL images with torchvision's functional ops.

Per view: random resized crop (bicubic, ratio 3/4 to 4/3), horizontal flip p 0.5, colour jitter
p 0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, applied in a random order),
grayscale p 0.2, Gaussian blur with radius U(0.1, 2) at p 1.0 / 0.1 / 0.5 (global 1 / global 2 /
local), solarisation (pixels >= 128 inverted) p 0.2 on global 2 only, then ImageNet
normalisation. The views are ``[global_1, global_2, local_1 .. local_N]``.

Every random draw comes from one ``torch.Generator`` passed in by the caller, so a loader can seed
each sample explicitly and get the same crops whatever its worker count. The slot table
(:func:`view_specs`) and the constants here are shared with the DALI pipeline.
"""
import math
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CROP_RATIO = (3 / 4, 4 / 3)
FLIP_P = 0.5
JITTER_P = 0.8
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.2, 0.1
GRAYSCALE_P = 0.2
BLUR_RADIUS = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128


@dataclass(frozen=True)
class ViewSpec:
    """What differs between the crop slots: output size, area range, blur and solarise odds."""
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


def view_specs(global_crops_scale, local_crops_scale, local_crops_number,
               global_size=224, local_size=96) -> list[ViewSpec]:
    """The official slots: global 1 (always blurred), global 2 (blur 0.1, solarise 0.2), locals."""
    global_scale, local_scale = tuple(global_crops_scale), tuple(local_crops_scale)
    return ([ViewSpec(global_size, global_scale, 1.0, 0.0),
             ViewSpec(global_size, global_scale, 0.1, 0.2)]
            + [ViewSpec(local_size, local_scale, 0.5, 0.0)] * local_crops_number)


def _uniform(low: float, high: float, gen) -> float:
    return low + (high - low) * torch.rand((), generator=gen).item()


def _chance(p: float, gen) -> bool:
    return torch.rand((), generator=gen).item() < p


def random_resized_crop_box(width: int, height: int, scale, ratio,
                            gen) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` as torchvision's RandomResizedCrop picks it: up to 10 tries of an
    area fraction U(scale) and a log-uniform aspect ratio; else the whole image, its aspect
    clamped to ``ratio``, centred."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(*scale, gen)
        aspect = math.exp(_uniform(*log_ratio, gen))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=gen))
            left = int(torch.randint(0, width - w + 1, (), generator=gen))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def color_jitter(image: Image.Image, gen) -> Image.Image:
    """Brightness, contrast, saturation and hue with random factors, in a random order."""
    factors = [_uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS, gen),
               _uniform(1 - CONTRAST, 1 + CONTRAST, gen),
               _uniform(1 - SATURATION, 1 + SATURATION, gen),
               _uniform(-HUE, HUE, gen)]
    adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for k in torch.randperm(4, generator=gen).tolist():
        image = adjust[k](image, factors[k])
    return image


def augment_view(image: Image.Image, spec: ViewSpec, gen) -> torch.Tensor:
    """One normalised view ``(3, size, size)`` of ``image`` following ``spec``."""
    top, left, h, w = random_resized_crop_box(image.width, image.height, spec.scale, CROP_RATIO,
                                              gen)
    view = TF.resized_crop(image, top, left, h, w, [spec.size, spec.size],
                           InterpolationMode.BICUBIC)
    if _chance(FLIP_P, gen):
        view = TF.hflip(view)
    if _chance(JITTER_P, gen):
        view = color_jitter(view, gen)
    if _chance(GRAYSCALE_P, gen):
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    if _chance(spec.blur_p, gen):
        view = view.filter(ImageFilter.GaussianBlur(radius=_uniform(*BLUR_RADIUS, gen)))
    if _chance(spec.solarize_p, gen):
        view = TF.solarize(view, SOLARIZE_THRESHOLD)
    return TF.normalize(TF.to_tensor(view), MEAN, STD)  # (3, size, size)


class DataAugmentationDINO:
    """Multi-crop views of an RGB PIL image: ``[global_1, global_2, local_1 .. local_N]``.

    ``aug(image, generator)`` draws every random choice from ``generator`` (the global torch RNG
    when it is None).
    """

    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4),
                 local_crops_number=8, global_size=224, local_size=96):
        self.specs = view_specs(global_crops_scale, local_crops_scale, local_crops_number,
                                global_size, local_size)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None):
        return [augment_view(image, spec, generator) for spec in self.specs]
