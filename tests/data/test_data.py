"""The image-folder dataset, the DINO multi-crop augmentation and the torchvision loader.

Probabilities are checked against the official recipe over a few hundred draws with binomial
tolerances of 5 sigma (the seeds are fixed, so the tests are deterministic).
"""
import math
import os
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

import dino_fast.data
from dino_fast.data import (
    IMAGE_EXTENSIONS,
    BadImageError,
    DataAugmentationDINO,
    ImageFolderDataset,
    augment,
    build_loader,
    bundled_data_path,
)
from dino_fast.data.augment import MEAN, STD, random_resized_crop_box
from dino_fast.data.sampling import EpochPlan

SMALL = {"global_size": 32, "local_size": 16}  # tiny crops keep the loader tests fast


def photo(size=(48, 40), seed=0, mode="RGB") -> Image.Image:
    """A smooth colourful test image (gradients plus noise), converted to ``mode``."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + 64], -1)
    rgb = np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def make_folder(root, layout: dict[str, str]):
    """Write ``{relative path: PIL mode}`` images under ``root``; returns ``root`` as str."""
    for k, (rel, mode) in enumerate(layout.items()):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP",
               ".webp": "WEBP"}[os.path.splitext(rel)[1].lower()]
        photo(seed=k, mode=mode).save(path, format=fmt)
    return str(root)


def unnormalise(t: torch.Tensor) -> torch.Tensor:
    return t * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


# ---------------------------------------------------------------- dataset
def test_discovery_labels_and_order(tmp_path):
    root = make_folder(tmp_path, {"b/x.JPG": "RGB", "a/deep/er/y.png": "RGBA", "a/z.Webp": "RGB",
                                  "loose.bmp": "RGB", "c/q.jpeg": "CMYK"})
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "empty_class").mkdir()
    ds = ImageFolderDataset(root)
    assert ds.classes == ["a", "b", "c"]  # empty_class holds no image, so is no class
    rel = [(os.path.relpath(p, root), y) for p, y in ds.samples]
    assert rel == [("a/deep/er/y.png", 0), ("a/z.Webp", 0), ("b/x.JPG", 1), ("c/q.jpeg", 2),
                   ("loose.bmp", -1)]
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.mode == "RGB" and image.size == (48, 40) and label == ds.samples[i][1]


def test_flat_folder_has_no_classes(tmp_path):
    ds = ImageFolderDataset(make_folder(tmp_path, {"1.jpg": "RGB", "2.png": "L", "3.png": "P"}))
    assert ds.classes == [] and [y for _, y in ds.samples] == [-1, -1, -1]
    assert all(ds[i][0].mode == "RGB" for i in range(3))
    gray = np.asarray(ds[1][0])
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_empty_and_missing_folder_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images found") as err:
        ImageFolderDataset(tmp_path)
    assert str(tmp_path) in str(err.value) and all(e in str(err.value) for e in IMAGE_EXTENSIONS)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")


def test_corrupt_and_truncated_files_are_named_or_skipped(tmp_path, caplog):
    root = make_folder(tmp_path, {"a.jpg": "RGB", "d.jpg": "RGB"})
    (tmp_path / "b.jpg").write_bytes(b"this is not a jpeg")
    good = (tmp_path / "d.jpg").read_bytes()
    (tmp_path / "c.jpg").write_bytes(good[: len(good) // 2])  # truncated
    ds = ImageFolderDataset(root)
    for index, name in [(1, "b.jpg"), (2, "c.jpg")]:
        with pytest.raises(BadImageError, match=name):
            ds[index]
    skipping = ImageFolderDataset(root, skip_bad_images=True)
    image, _ = skipping[1]  # b and c are bad: the next readable image is d
    assert np.array_equal(np.asarray(image), np.asarray(ds[3][0]))
    assert {os.path.basename(p) for p in skipping.bad_files} == {"b.jpg", "c.jpg"}
    caplog.clear()
    skipping[2]
    assert not caplog.records  # each bad file is logged once


def test_all_bad_files_is_an_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(BadImageError, match="none of the 1 images"):
        ImageFolderDataset(tmp_path, skip_bad_images=True)[0]


def test_bundled_images_load_and_are_attributed():
    root = bundled_data_path()
    ds = ImageFolderDataset(root)
    assert len(ds) >= 30 and len(ds.classes) >= 5 and min(y for _, y in ds.samples) >= 0
    with open(os.path.join(root, "ATTRIBUTION.md"), encoding="utf-8") as f:
        attribution = f.read()
    for path, _ in ds.samples:
        image = ds.load(ds.samples.index((path, _)))[0]
        assert image.mode == "RGB" and min(image.size) >= 256
        stem = os.path.relpath(path, root).rsplit(".", 1)[0].split("_crop")[0]
        assert stem in attribution, f"{path} has no line in ATTRIBUTION.md"


# ---------------------------------------------------------------- augmentation
def test_views_shapes_and_normalisation():
    aug = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 3, global_size=64, local_size=24)
    views = aug(photo((90, 70)), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 2 + [(3, 24, 24)] * 3
    for v in views:
        assert v.dtype == torch.float32
        pixels = unnormalise(v)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_normalisation_matches_torchvision_on_a_solid_colour():
    """A solid image stays solid under every op except jitter; check the plain pipeline value."""
    spec = augment.ViewSpec(8, (0.5, 1.0), blur_p=0.0, solarize_p=0.0)
    image = Image.new("RGB", (20, 20), (200, 100, 50))
    expected = T.Normalize(MEAN, STD)(T.ToTensor()(image.resize((8, 8))))
    gen = torch.Generator().manual_seed(1)
    plain = 0
    for _ in range(20):
        view = augment.augment_view(image, spec, gen)
        plain += torch.allclose(view, expected, atol=1e-6)
    assert plain >= 1  # (1 - 0.8) * (1 - 0.2) = 0.16 of the views are neither jittered nor gray


def test_crop_box_distribution_matches_torchvision():
    from scipy.stats import ks_2samp
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    image = Image.new("RGB", (300, 200))
    ours, theirs = [], []
    for _ in range(1500):
        top, left, h, w = random_resized_crop_box(300, 200, (0.05, 0.4), (3 / 4, 4 / 3), gen)
        assert 0 <= top <= 200 - h and 0 <= left <= 300 - w
        ours.append((h * w / 60000, math.log(w / h)))
        top, left, h, w = T.RandomResizedCrop.get_params(image, [0.05, 0.4], [3 / 4, 4 / 3])
        theirs.append((h * w / 60000, math.log(w / h)))
    ours, theirs = np.array(ours), np.array(theirs)
    for k in range(2):
        assert ks_2samp(ours[:, k], theirs[:, k]).pvalue > 1e-3


def test_crop_box_fallback_is_a_centred_clamped_crop():
    gen = torch.Generator().manual_seed(0)
    assert random_resized_crop_box(1000, 10, (0.999, 1.0), (3 / 4, 4 / 3), gen) == (0, 493, 10, 13)


def count_calls(monkeypatch, module, name, record):
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        record.append(kwargs.get("radius", args[0] if args else None))
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("slot,blur_p,solarize_p", [(0, 1.0, 0.0), (1, 0.1, 0.2), (2, 0.5, 0.0)])
def test_official_probabilities_per_slot(monkeypatch, slot, blur_p, solarize_p):
    spec = augment.view_specs((0.4, 1.0), (0.05, 0.4), 1, 12, 12)[slot]
    calls = {name: [] for name in ("blur", "solarize", "flip", "jitter")}
    count_calls(monkeypatch, ImageFilter, "GaussianBlur", calls["blur"])
    count_calls(monkeypatch, TF, "solarize", calls["solarize"])
    count_calls(monkeypatch, TF, "hflip", calls["flip"])
    count_calls(monkeypatch, augment, "color_jitter", calls["jitter"])
    image, gen, n, gray = photo((30, 30)), torch.Generator().manual_seed(slot), 400, 0
    for _ in range(n):
        pixels = unnormalise(augment.augment_view(image, spec, gen))
        gray += bool((pixels.max(0).values - pixels.min(0).values).max() < 1e-4)
    for name, p in [("blur", blur_p), ("solarize", solarize_p), ("flip", 0.5), ("jitter", 0.8),
                    ("gray", 0.2)]:
        count = gray if name == "gray" else len(calls[name])
        tol = 5 * math.sqrt(n * p * (1 - p)) + 1e-9
        assert abs(count - n * p) <= tol, f"{name}: {count}/{n}, expected p={p}"
    assert all(0.1 <= r <= 2.0 for r in calls["blur"])


def test_same_generator_seed_gives_same_views():
    aug = DataAugmentationDINO(local_crops_number=2, **SMALL)
    a = aug(photo(), torch.Generator().manual_seed(7))
    b = aug(photo(), torch.Generator().manual_seed(7))
    c = aug(photo(), torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])


# ---------------------------------------------------------------- sampling and loader
@pytest.mark.parametrize("n,batch,world", [(37, 4, 3), (10, 5, 2), (7, 1, 1)])
def test_sharding_is_disjoint_and_complete(n, batch, world):
    plans = [EpochPlan(n, batch, rank, world, seed=5) for rank in range(world)]
    shards = [p.rank_indices(3).tolist() for p in plans]
    steps = n // (batch * world)
    assert all(p.steps == steps and len(s) == steps * batch for p, s in zip(plans, shards))
    union = sorted(i for shard in shards for i in shard)
    assert len(set(union)) == len(union) == steps * batch * world  # disjoint, drop-last only
    assert all(0 <= i < n for i in union)
    assert plans[0].rank_indices(3).tolist() != plans[0].rank_indices(4).tolist() or n < 3


def test_loader_contract_and_determinism(tmp_path):
    root = make_folder(tmp_path, {f"{c}/{i}.jpg": "RGB" for c in "ab" for i in range(5)})
    kwargs = dict(kind="torch", data_path=root, batch_size=3, local_crops_number=2, seed=11,
                  **SMALL)
    first = build_loader(num_workers=0, **kwargs)
    assert first.kind == "torch" and len(first) == 3 and first.dataset.classes == ["a", "b"]

    def epoch(loader, e):
        loader.set_epoch(e)
        return list(loader)
    run0, run1 = epoch(first, 0), epoch(first, 1)
    crops, labels = run1[0]
    assert [tuple(c.shape) for c in crops] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 2
    assert labels.dtype == torch.int64 and labels.shape == (3,)
    fresh = build_loader(num_workers=2, **kwargs)  # a "restarted" process, with workers
    again = epoch(fresh, 1)
    for (c1, y1), (c2, y2) in zip(run1, again):
        assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(c1, c2))
    assert not torch.equal(run0[0][0][0], run1[0][0][0])


def test_loader_starts_mid_epoch_without_decoding_the_skipped_batches(tmp_path, monkeypatch):
    root = make_folder(tmp_path, {f"{i}.jpg": "RGB" for i in range(8)})
    loader = build_loader(kind="torch", data_path=root, batch_size=2, num_workers=0,
                          local_crops_number=1, seed=4, **SMALL)
    loader.set_epoch(3)
    whole = list(loader)
    decoded = []
    load = loader.dataset.load
    monkeypatch.setattr(loader.dataset, "load", lambda i: decoded.append(i) or load(i))
    loader.set_epoch(3, first_step=2)
    resumed = list(loader)
    assert len(resumed) == 2 and len(decoded) == 4  # steps 2 and 3 only
    for (c1, y1), (c2, y2) in zip(whole[2:], resumed):
        assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(c1, c2))


def test_loader_labels_follow_the_images(tmp_path):
    root = make_folder(tmp_path, {"a/0.jpg": "RGB", "a/1.jpg": "RGB", "b/0.jpg": "RGB"})
    loader = build_loader(kind="torch", data_path=root, batch_size=1, num_workers=0,
                          local_crops_number=0, **SMALL)
    assert sorted(y.item() for _, y in loader) == [0, 0, 1]


def test_loader_dtype_and_batch_errors(tmp_path):
    root = make_folder(tmp_path, {f"{i}.png": "RGB" for i in range(5)})
    loader = build_loader(kind="torch", data_path=root, batch_size=2, num_workers=0,
                          local_crops_number=1, dtype=torch.bfloat16, **SMALL)
    crops, _ = next(iter(loader))
    assert all(c.dtype == torch.bfloat16 for c in crops)
    with pytest.raises(ValueError, match=r"5 images, fewer than one global batch of 6 \(3 per"):
        build_loader(kind="torch", data_path=root, batch_size=3, world_size=2, rank=1)
    with pytest.raises(ValueError, match="not one of"):
        build_loader(kind="jax", data_path=root)


def test_loader_error_names_bad_file_from_a_worker(tmp_path):
    root = make_folder(tmp_path, {"a.jpg": "RGB", "b.jpg": "RGB"})
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    loader = build_loader(kind="torch", data_path=root, batch_size=3, num_workers=1,
                          local_crops_number=0, **SMALL)
    with pytest.raises(BadImageError, match="broken.png"):
        list(loader)
    skipping = build_loader(kind="torch", data_path=root, batch_size=3, num_workers=1,
                            local_crops_number=0, skip_bad_images=True, **SMALL)
    assert len(list(skipping)) == 1


def test_dali_kind_without_dali_says_how_to_install(monkeypatch, tmp_path):
    root = make_folder(tmp_path, {"a.jpg": "RGB"})
    # As if DALI were not installed, even when another test imported it already.
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.setitem(sys.modules, "dino_fast.data.dali_pipeline", None)
    monkeypatch.delattr(dino_fast.data, "dali_pipeline", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'dino-fast\[dali\]'"):
        build_loader(kind="dali", data_path=root, batch_size=1)
    assert build_loader(kind="auto", data_path=root, batch_size=1, num_workers=0,
                        device=torch.device("cpu")).kind == "torch"
