"""Image folders as they really are: links (to parents, in loops, leading outside), FIFOs,
sockets and broken links among the images, and images of every PIL mode."""
import logging
import os
import socket
import threading

import numpy as np
import pytest
from PIL import Image

from dino_fast.data import ImageFolderDataset
from dino_fast.data.folder import find_images, load_rgb, to_rgb


def write_images(folder, names, size=(12, 10)):
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", size, (10 * i, 0, 0)).save(os.path.join(folder, name))


def scan(root, timeout=60):
    """``find_images(root)`` in a daemon thread, so that a scan that loops or blocks on a FIFO
    fails the test instead of hanging it."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(files=find_images(str(root))),
                              daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the scan did not terminate"
    return result["files"]


def test_link_to_a_parent_folder_lists_each_image_once(tmp_path):
    write_images(tmp_path / "cat", ["0.png", "1.png"])
    write_images(tmp_path / "dog", ["0.png"])
    os.symlink("..", tmp_path / "cat" / "up")  # cat/up/cat/up/... forever, were it followed
    os.symlink(tmp_path, tmp_path / "dog" / "root")
    assert scan(tmp_path) == ["cat/0.png", "cat/1.png", "dog/0.png"]
    assert ImageFolderDataset(tmp_path).classes == ["cat", "dog"]


def test_two_links_into_each_other_terminate(tmp_path):
    write_images(tmp_path / "x", ["a.png"])
    write_images(tmp_path / "y", ["b.png"])
    os.symlink("../y", tmp_path / "x" / "to_y")
    os.symlink("../x", tmp_path / "y" / "to_x")
    assert scan(tmp_path) == ["x/a.png", "y/b.png"]  # each at its real path, with its class


def test_links_leading_outside_are_followed_once(tmp_path):
    outside, root = tmp_path / "outside", tmp_path / "root"
    write_images(outside / "shared", ["s.png"])
    write_images(root / "own", ["o.png"])
    os.symlink(outside / "shared", root / "linked")
    os.symlink(outside / "shared", root / "linked_again")  # the same folder by a second link
    os.symlink(outside, outside / "shared" / "loop")  # a loop outside the root
    os.symlink(outside / "shared" / "s.png", root / "own" / "file_link.png")
    os.symlink(root / "own" / "o.png", root / "own" / "inner_link.png")  # o.png is listed
    assert scan(root) == ["linked/s.png", "own/o.png"]


def test_non_regular_files_are_skipped_counted_and_never_opened(tmp_path, caplog, monkeypatch):
    write_images(tmp_path / "a", ["0.png", "1.jpg"])
    os.mkfifo(tmp_path / "a" / "fifo.png")  # opening it would block until a writer comes
    server = socket.socket(socket.AF_UNIX)
    monkeypatch.chdir(tmp_path / "a")  # a relative name: socket paths are limited to 108 bytes
    server.bind("socket.jpg")
    os.symlink(tmp_path / "gone.png", tmp_path / "a" / "broken.png")
    try:
        with caplog.at_level(logging.WARNING):
            files = scan(tmp_path)
    finally:
        server.close()
    assert files == ["a/0.png", "a/1.jpg"]
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 3 entries" in warning
    assert all(name in warning for name in ("fifo.png", "socket.jpg", "broken.png"))


def gradient() -> Image.Image:
    """A smooth RGB image with every channel spanning most of 0..255."""
    y, x = np.mgrid[0:24, 0:32]
    rgb = np.stack([x * 8, y * 10, 255 - x * 8], -1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


def gray_of(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L")).astype(np.float64)


def as_mode(mode: str) -> tuple[Image.Image, np.ndarray]:
    """The gradient in ``mode`` and the RGB it should decode to, ``[H, W, 3]`` float."""
    rgb = gradient()
    gray = np.repeat(gray_of(rgb)[..., None], 3, axis=-1)
    if mode in ("RGB", "RGBA", "CMYK"):
        return rgb.convert(mode), np.asarray(rgb, dtype=np.float64)  # alpha dropped
    if mode in ("P", "PA"):
        palette = rgb.quantize(256)
        return palette.convert(mode) if mode == "PA" else palette, np.asarray(rgb, np.float64)
    if mode in ("L", "LA"):
        return rgb.convert(mode), gray
    if mode == "1":
        bilevel = rgb.convert("1")
        return bilevel, np.repeat(np.asarray(bilevel, np.float64)[..., None] * 255, 3, axis=-1)
    if mode == "F":  # floats in 8-bit units, as PIL's own conversions read them
        return Image.fromarray(gray[..., 0].astype(np.float32)), gray
    wide = (gray[..., 0] * 257).astype(np.uint16)  # 16-bit: 0..65535
    if mode == "I;16":
        return Image.fromarray(wide), gray
    return Image.fromarray(wide.astype(np.int32)), gray  # "I": 16-bit values in 32 bits


# Modes that the accepted formats store, and the format; the others are checked in memory.
SAVED_AS = {"RGB": "png", "RGBA": "png", "CMYK": "jpg", "P": "png", "L": "png", "LA": "png",
            "1": "png", "I;16": "png"}


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "CMYK", "P", "PA", "L", "LA", "1", "I;16", "I",
                                  "F"])
def test_every_mode_decodes_to_sensible_rgb(tmp_path, mode):
    image, expected = as_mode(mode)
    assert image.mode == mode
    if mode in SAVED_AS:
        path = tmp_path / f"image.{SAVED_AS[mode]}"
        image.save(path)
        decoded = load_rgb(str(path))
    else:
        decoded = to_rgb(image)
    assert decoded.mode == "RGB" and decoded.size == image.size
    error = np.abs(np.asarray(decoded, np.float64) - expected)
    lossy = {"CMYK": 4.0, "P": 4.0, "PA": 4.0}.get(mode, 0.5)  # JPEG, 256-colour palette
    assert error.mean() <= lossy and np.percentile(error, 99) <= 8 * lossy + 1, error.mean()


def test_sixteen_bit_png_is_not_clipped_to_white(tmp_path):
    wide = np.linspace(0, 65535, 64 * 8).reshape(8, 64).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "deep.png")
    decoded = np.asarray(load_rgb(str(tmp_path / "deep.png")))[..., 0].astype(int)
    np.testing.assert_allclose(decoded, np.round(wide / 257), atol=1)
    assert decoded.mean() == pytest.approx(127.5, abs=1)  # clipping gave about 254
