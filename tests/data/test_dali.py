"""The DALI loader in DALI's CPU-only mode: the contract, the order and sharding shared with the
torch loader, bad data, and statistical agreement with the torchvision reference.

Statistical checks use a few hundred crops per slot: binomial tolerances of 5 sigma for event
fractions, two-sample KS tests (p > 1e-3) for distributions. Seeds are fixed, so they are
deterministic. Skipped when DALI does not import.
"""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from dino_fast.data import BadImageError, augment, build_loader, dali_pipeline
from tests.data.test_data import SMALL, make_folder, photo, unnormalise

N_STAT = 256  # images per statistical run (one epoch, one batch per step)


def both_loaders(root, **kwargs):
    base = dict(data_path=root, num_workers=2, seed=3, **SMALL)
    base.update(kwargs)
    return build_loader(kind="torch", **base), build_loader(kind="dali", **base)


def copies(root, image: Image.Image, n: int) -> str:
    """``n`` copies of ``image`` as PNG files (identical content, distinct files)."""
    os.makedirs(root, exist_ok=True)
    image.save(os.path.join(root, "0000.png"))
    with open(os.path.join(root, "0000.png"), "rb") as f:
        data = f.read()
    for k in range(1, n):
        with open(os.path.join(root, f"{k:04d}.png"), "wb") as f:
            f.write(data)
    return str(root)


def all_views(loader) -> list[torch.Tensor]:
    """Per slot, the views of one epoch concatenated: list of ``(N, 3, H, W)``."""
    batches = [crops for crops, _ in loader]
    return [torch.cat([b[slot] for b in batches]) for slot in range(len(batches[0]))]


def test_contract_shapes_dtype_normalisation(tmp_path):
    root = make_folder(tmp_path, {f"c{k % 3}/{k}.jpg": "RGB" for k in range(8)})
    loader = build_loader(kind="dali", data_path=root, batch_size=3, num_workers=2,
                          local_crops_number=3, **SMALL)
    assert loader.kind == "dali" and len(loader) == 2
    assert loader.dataset.classes == ["c0", "c1", "c2"]
    for crops, labels in loader:
        assert [tuple(c.shape) for c in crops] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 3
        assert all(c.dtype == torch.float32 and c.device.type == "cpu" for c in crops)
        assert labels.dtype == torch.int64 and labels.shape == (3,)
        for c in crops:
            pixels = torch.stack([unnormalise(v) for v in c])
            assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    half = build_loader(kind="dali", data_path=root, batch_size=3, num_workers=1,
                        local_crops_number=1, dtype=torch.bfloat16, **SMALL)
    assert all(c.dtype == torch.bfloat16 for c in next(iter(half))[0])


def test_same_order_and_sharding_as_torch_loader(tmp_path):
    root = make_folder(tmp_path, {f"{k:02d}/x.jpg": "RGB" for k in range(11)})  # label = file
    seen = []
    for rank in range(3):
        torch_loader, dali_loader = both_loaders(root, batch_size=2, rank=rank, world_size=3,
                                                 local_crops_number=0, num_workers=1)
        for loader in (torch_loader, dali_loader):
            loader.set_epoch(4)
        torch_labels = [y.tolist() for _, y in torch_loader]
        assert [y.tolist() for _, y in dali_loader] == torch_labels
        seen += [label for batch in torch_labels for label in batch]
    assert len(seen) == len(set(seen)) == 3 * 2 * (11 // 6)  # disjoint, drop-last


def test_seeded_epochs_are_reproducible(tmp_path):
    root = make_folder(tmp_path, {f"{k}.jpg": "RGB" for k in range(6)})
    kwargs = dict(kind="dali", data_path=root, batch_size=3, local_crops_number=1, seed=9, **SMALL)
    a, b = build_loader(num_workers=2, **kwargs), build_loader(num_workers=2, **kwargs)
    a.set_epoch(2)
    b.set_epoch(2)
    first, second = list(a), list(b)
    for (ca, ya), (cb, yb) in zip(first, second):
        assert torch.equal(ya, yb) and all(torch.equal(x, y) for x, y in zip(ca, cb))
    one_thread = build_loader(num_workers=1, **kwargs)  # one pipeline: another stream, same order
    one_thread.set_epoch(2)
    assert [y.tolist() for _, y in one_thread] == [y.tolist() for _, y in first]
    a.set_epoch(3)
    assert not torch.equal(next(iter(a))[0][0], first[0][0][0])
    a.set_epoch(2, first_step=1)  # a mid-epoch resume: the uninterrupted epoch's last batch
    (crops, labels), = list(a)
    assert torch.equal(labels, first[1][1]) and torch.equal(crops[2], first[1][0][2])


def test_odd_images_decode(tmp_path):
    root = make_folder(tmp_path, {"rgba.png": "RGBA", "cmyk.jpg": "CMYK", "gray.png": "L",
                                  "palette.png": "P", "gray.jpg": "L", "x.bmp": "RGB",
                                  "x.webp": "RGB"})
    photo((3, 2)).save(os.path.join(root, "tiny.png"))  # smaller than every crop
    loader = build_loader(kind="dali", data_path=root, batch_size=8, num_workers=2,
                          local_crops_number=1, **SMALL)
    (crops, _), = list(loader)
    assert all(torch.isfinite(c).all() for c in crops)


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_bad_file_is_named_or_skipped(tmp_path, content, caplog, monkeypatch):
    root = make_folder(tmp_path, {f"{k}.jpg": "RGB" for k in range(5)})
    good = (tmp_path / "0.jpg").read_bytes()
    bad = good[: len(good) // 3] if content == "truncated" else b"not an image at all"
    (tmp_path / "3_bad.jpg").write_bytes(bad)
    kwargs = dict(kind="dali", data_path=root, batch_size=2, num_workers=2, local_crops_number=1,
                  **SMALL)  # two pipelines, on alternate batches
    with pytest.raises(BadImageError, match="3_bad.jpg"):
        list(build_loader(**kwargs))
    skipping = build_loader(skip_bad_images=True, **kwargs)
    assert len(list(skipping)) == 3
    assert [os.path.basename(p) for p in skipping.dataset.bad_files] == ["3_bad.jpg"]
    assert "3_bad.jpg" in caplog.text
    restarts, replace = [], skipping._replace_bad_files  # later epochs replace it up front
    monkeypatch.setattr(skipping, "_replace_bad_files",
                        lambda *a: restarts.append(a) or replace(*a))
    skipping.set_epoch(1)
    assert len(list(skipping)) == 3 and restarts == []


def test_empty_folder_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images found"):
        build_loader(kind="dali", data_path=tmp_path, batch_size=1)


def binomial_close(count, n, p):
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1e-9


def test_event_fractions_per_slot_match_reference(tmp_path):
    """Class "bright" is a bright, faintly coloured image that jitter cannot bring below 128: its
    view is solarised iff its mean is below one half. Class "vivid" is strongly coloured: its
    view is grayscale iff the three channels agree everywhere."""
    bright = photo((40, 40)).point(lambda v: 235 + v * 15 // 255)  # values in [235, 250]
    copies(tmp_path / "bright", bright, N_STAT)
    copies(tmp_path / "vivid", photo((40, 40)), N_STAT)
    counts, brightness = {}, {}
    for loader in both_loaders(str(tmp_path), batch_size=32, local_crops_number=1):
        batches = list(loader)
        labels = torch.cat([y for _, y in batches])
        views = [unnormalise_batch(torch.cat([c[slot] for c, _ in batches])) for slot in range(3)]
        solarised = [(v[labels == 0].mean((1, 2, 3)) < 0.5).sum().item() for v in views]
        spread = [(v[labels == 1].amax(1) - v[labels == 1].amin(1)).flatten(1).amax(1)
                  for v in views]
        gray = [(s < 1.5 / 255).sum().item() for s in spread]
        counts[loader.kind] = solarised, gray
        brightness[loader.kind] = [v[labels == 1].mean((1, 2, 3)).numpy() for v in views]
    for kind, (solarised, gray) in counts.items():
        for slot, p in enumerate([0.0, 0.2, 0.0]):
            assert binomial_close(solarised[slot], N_STAT, p), (kind, slot, solarised)
            assert binomial_close(gray[slot], N_STAT, 0.2), (kind, slot, gray)
    from scipy.stats import ks_2samp
    for slot in (0, 2):  # unsolarised slots: the jitter's brightness shift distribution
        ref, dali = brightness["torch"][slot], brightness["dali"][slot]
        assert ks_2samp(ref, dali).pvalue > 1e-3, (slot, ref.mean(), dali.mean())


def unnormalise_batch(views: torch.Tensor) -> torch.Tensor:
    return torch.stack([unnormalise(v) for v in views])


def crop_geometry(views: torch.Tensor, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop area fraction and log aspect, read back from a coordinate image's views (R encodes
    x, G encodes y, 0..255 across the source), undoing a flip."""
    pixels = unnormalise_batch(views) * 255
    x, y = pixels[:, 0], pixels[:, 1]  # (N, H, W)
    width = (x[:, :, -1] - x[:, :, 0]).abs().mean(1) * size / (size - 1)
    height = (y[:, -1, :] - y[:, 0, :]).abs().mean(1) * size / (size - 1)
    return (width * height / 256**2).numpy(), torch.log(width / height).numpy()


def test_crop_area_and_aspect_match_reference(tmp_path, monkeypatch):
    """Colour ops off (their probabilities patched to 0) so the pixels are the crop geometry."""
    y, x = np.mgrid[0:256, 0:256]
    coords = Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8))
    root = copies(tmp_path / "coords", coords, N_STAT)
    for module in (augment, dali_pipeline):
        monkeypatch.setattr(module, "JITTER_P", 0.0)
        monkeypatch.setattr(module, "GRAYSCALE_P", 0.0)
    monkeypatch.setattr(augment, "view_specs", lambda g, loc, n, gs, ls: [
        augment.ViewSpec(gs, tuple(g), 0.0, 0.0), augment.ViewSpec(ls, tuple(loc), 0.0, 0.0)])
    from scipy.stats import ks_2samp
    geometry = {}
    for loader in both_loaders(root, batch_size=32, global_size=48, local_size=48):
        views = all_views(loader)
        geometry[loader.kind] = [crop_geometry(v, 48) for v in views]
    for slot, (low, high) in enumerate([(0.4, 1.0), (0.05, 0.4)]):
        for k, name in enumerate(["area", "log aspect"]):
            ref, dali = geometry["torch"][slot][k], geometry["dali"][slot][k]
            assert ks_2samp(ref, dali).pvalue > 1e-3, (slot, name, ref.mean(), dali.mean())
        area = geometry["dali"][slot][0]
        assert low - 0.03 <= area.min() and area.max() <= high + 0.03, (area.min(), area.max())



@pytest.mark.parametrize("form", ["fused op (CPU)", "arithmetic (GPU)"])
def test_brightness_contrast_matches_pil(form):
    """Both forms of the fused brightness/contrast against PIL's brightness then contrast, on
    an image they do not clip: within 2 grey levels (each side rounds differently)."""
    from nvidia.dali import fn, pipeline_def

    image = photo((64, 48)).point(lambda v: 40 + v * 150 // 255)  # values in [40, 190]
    brightness, contrast = 1.15, 0.7

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: [np.asarray(image)], batch=True, layout="HWC")
        if form.startswith("fused"):
            return dali_pipeline._brightness_contrast(x, brightness, contrast, gpu=False)
        return dali_pipeline.brightness_contrast_arithmetic(
            x, brightness, contrast, dali_pipeline._luma_mean(x, keep_dims=True))

    p = pipe()
    p.build()
    ours = np.asarray(p.run()[0][0]).astype(int)
    from PIL import ImageEnhance
    brightened = ImageEnhance.Brightness(image).enhance(brightness)
    ref = ImageEnhance.Contrast(brightened).enhance(contrast)
    assert np.abs(ours - np.asarray(ref).astype(int)).max() <= 2
