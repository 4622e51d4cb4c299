"""The pixel budget of the map input size: an image whose resized size would exceed
``max_pixels`` is scaled down keeping its aspect ratio, to multiples of the patch size, or
refused when even one patch on its shorter side would exceed it."""
import pytest
from PIL import Image

from dino_fast.evaluation.attention_maps import PixelBudgetError, prepare_image, resized_shape


def test_within_the_budget_nothing_changes():
    assert resized_shape(300, 451, 480, 16, max_pixels=480 * 720) == (480, 720)
    assert resized_shape(300, 451, (224, 100), 16, max_pixels=224 * 96) == (224, 96)


@pytest.mark.parametrize("height,width,image_size", [(300, 451, 480), (3000, 20, 480),
                                                     (5, 5, (4000, 6000))])
def test_over_the_budget_fits_keeping_the_aspect_ratio(height, width, image_size):
    wanted = resized_shape(height, width, image_size, 16)
    budget = wanted[0] * wanted[1] // 10
    fitted = resized_shape(height, width, image_size, 16, max_pixels=budget)
    assert fitted[0] * fitted[1] <= budget and fitted[0] % 16 == 0 and fitted[1] % 16 == 0
    assert (fitted[0] + 16) * (fitted[1] + 16) > budget  # one patch less than fits, at most
    assert abs(fitted[0] / fitted[1] / (wanted[0] / wanted[1]) - 1) < 0.1, (wanted, fitted)


@pytest.mark.parametrize("height,width,image_size,budget", [(1, 2000, 48, 8192),
                                                            (1, 1, None, 255)])
def test_no_patch_fits_the_budget_is_refused(height, width, image_size, budget):
    with pytest.raises(PixelBudgetError, match=f"over the budget of {budget} pixels"):
        resized_shape(height, width, image_size, 16, max_pixels=budget)


def test_prepare_image_resizes_to_the_fitted_size():
    rgb, normalised = prepare_image(Image.new("RGB", (451, 300)), 480, 16, max_pixels=34560)
    assert rgb.shape == (144, 224, 3) and normalised.shape == (3, 144, 224)
