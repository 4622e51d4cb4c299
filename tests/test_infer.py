"""``python -m dino_fast.infer`` never aborts a folder (issue 29).

A folder of awkward files (corrupt, 1x1, 16-bit, CMYK, a PNG header claiming 60000x60000, a
non-image with an image suffix, an image too wide for the pixel budget) is processed image by
image: each file is written, resized to fit ``--max_pixels``, skipped or failed with its name,
and the run ends with one summary line. A model path that is not an ONNX export is one
``error:`` line.
"""
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException  # noqa: E402

from dino_fast.export import export_onnx  # noqa: E402
from dino_fast.export.predictor import AttentionMapPredictor  # noqa: E402
from dino_fast.infer import main as infer_main  # noqa: E402
from tests._cli import user_error  # noqa: E402
from tests.export.test_export import random_vit  # noqa: E402

BUDGET = 8192  # pixels: 32 patches of 16 x 16
WRITTEN = {"good", "one", "deep", "cmyk", "wide"}
SKIPPED = {"corrupt.jpg", "huge.png", "fake.png", "needle.png"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A one-block vit_tiny/16 (3 heads) exported to ONNX."""
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    export_onnx(random_vit("vit_tiny", depth=1), str(path), arch="vit_tiny")
    return str(path)


def png_header(path, width: int, height: int):
    """A PNG that is only a header claiming ``width x height`` RGB pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def awkward_folder(folder):
    """Files that are written (``WRITTEN``, by output name) and skipped (``SKIPPED``)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 100, 3), np.uint8)).save(folder / "good.png")
    Image.fromarray(rng.integers(0, 255, (1, 1, 3), np.uint8)).save(folder / "one.png")
    Image.fromarray(np.full((40, 30), 32768, np.uint16)).save(folder / "deep.png")  # mid-grey
    Image.fromarray(rng.integers(0, 255, (50, 60, 3), np.uint8)).convert("CMYK").save(
        folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 200, 3), np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 255, (1, 2000, 3), np.uint8)).save(folder / "needle.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(folder / "corrupt.jpg")
    (folder / "corrupt.jpg").write_bytes((folder / "corrupt.jpg").read_bytes()[:300])
    png_header(folder / "huge.png", 60000, 60000)  # PIL refuses it: a decompression bomb
    (folder / "fake.png").write_text("not an image")
    return folder


def run(capsys, model, images, out, *flags) -> tuple[int, str, str]:
    """``infer`` on ``images`` with the test budget; ``(status, stdout, stderr)``."""
    capsys.readouterr()
    status = infer_main(["--model", model, "--images", *map(str, images), "--output_dir",
                         str(out), "--image_size", "48", "--max_pixels", str(BUDGET), *flags])
    out, err = capsys.readouterr()
    return status, out, err


def test_awkward_folder_is_processed_image_by_image(model, tmp_path, capsys):
    status, out, err = run(capsys, model, [awkward_folder(tmp_path / "imgs")], tmp_path / "out")
    assert status == 0, err  # skipped files are the input's, not failures
    assert {p.name for p in (tmp_path / "out").iterdir()} == WRITTEN
    for name in SKIPPED:
        assert any(name in line and line.startswith("skipping") for line in err.splitlines()), \
            (name, err)
    assert "Traceback" not in err
    summary = out.strip().splitlines()[-1]
    assert summary.startswith(f"5 written (1 resized to fit --max_pixels {BUDGET}), 4 skipped, "
                              "0 failed"), summary
    width, height = Image.open(tmp_path / "out" / "wide" / "img.png").size
    assert width * height <= BUDGET and (height, width) == (16, 272)  # 48x480 scaled down
    assert "wide.png" in err and "16x272" in err  # the resize is reported by name
    grey = np.asarray(Image.open(tmp_path / "out" / "deep" / "img.png"))
    assert abs(int(grey.mean()) - 128) <= 1  # 16-bit mid-grey, not clipped to white


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_skipped(model, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "good.png")
    Image.new("RGB", (32, 32)).save(folder / "locked.png")
    os.chmod(folder / "locked.png", 0)
    status, out, err = run(capsys, model, [folder], tmp_path / "out")
    assert status == 0 and "locked.png" in err and "1 written, 1 skipped, 0 failed" in out


def test_a_failing_image_is_reported_and_the_rest_are_written(model, tmp_path, capsys,
                                                              monkeypatch):
    """Writing one image's maps fails (its output folder is a file), ONNX Runtime fails on
    another, a bug strikes a third: each is reported by name, the others are written, and the
    run exits 1."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, (height, width) in (("a", (48, 48)), ("blocked", (48, 48)), ("oom", (48, 96)),
                                  ("bug", (96, 48))):
        Image.new("RGB", (width, height)).save(folder / f"{name}.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "blocked").write_text("a file where the maps' folder goes")
    real_run = AttentionMapPredictor.run

    def failing_run(self, images):
        if images.shape[-2:] == (48, 96):
            raise RuntimeException("Failed to allocate memory for requested buffer")
        if images.shape[-2:] == (96, 48):
            raise TypeError("a bug")
        return real_run(self, images)

    monkeypatch.setattr(AttentionMapPredictor, "run", failing_run)
    status, stdout, err = run(capsys, model, [folder], out)
    assert status == 1
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"a"}
    failed = [line for line in err.splitlines() if line.startswith("failed")]
    assert len(failed) == 3, err
    assert any("blocked.png" in line and "FileExistsError" in line for line in failed)
    assert any("oom.png" in line and "Failed to allocate memory" in line for line in failed)
    assert any("bug.png" in line for line in failed) and "TypeError: a bug" in err
    assert "Traceback" in err  # the bug keeps its traceback; the others are one line each
    assert err.count("Traceback") == 1
    assert "1 written, 0 skipped, 3 failed" in stdout


def test_a_run_where_every_image_fails_exits_1(model, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "fake.png").write_text("not an image")
    png_header(folder / "huge.png", 60000, 60000)
    status, out, _ = run(capsys, model, [folder], tmp_path / "out")
    assert status == 1 and "0 written, 2 skipped, 0 failed" in out


def test_a_checkpoint_given_as_model_says_how_to_export_it(tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    torch.save({"teacher": {}}, tmp_path / "checkpoint.pth")
    line = user_error(capsys, infer_main, ["--model", str(tmp_path / "checkpoint.pth"),
                                           "--images", str(tmp_path / "a.png")])
    assert "python -m dino_fast.export --checkpoint" in line and "checkpoint.pth" in line


@pytest.mark.parametrize("kind", ["folder", "damaged"])
def test_a_model_that_is_not_onnx_is_one_error_line(model, tmp_path, capsys, kind):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    path = tmp_path / "m.onnx"
    if kind == "folder":
        path.mkdir()
    else:
        data = open(model, "rb").read()
        path.write_bytes(data[: len(data) // 3])
    line = user_error(capsys, infer_main, ["--model", str(path), "--images",
                                           str(tmp_path / "a.png")])
    assert "m.onnx" in line and ("folder" if kind == "folder" else "damaged") in line


def test_an_output_dir_that_cannot_be_created_is_one_error_line(model, tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "out").write_text("a file")
    line = user_error(capsys, infer_main, ["--model", model, "--images", str(tmp_path / "a.png"),
                                           "--output_dir", str(tmp_path / "out")])
    assert f"cannot create --output_dir {tmp_path / 'out'}" in line


def test_max_pixels_below_one_is_a_flag_error(model, tmp_path, capsys):
    assert "--max_pixels" in user_error(capsys, infer_main, [
        "--model", model, "--images", str(tmp_path), "--max_pixels", "0"], code=2)


def test_a_fixed_size_model_over_the_budget_is_refused(tmp_path, capsys):
    path = str(tmp_path / "fixed.onnx")
    export_onnx(random_vit("vit_tiny", depth=1), path, image_size=(64, 96), arch="vit_tiny")
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    line = user_error(capsys, infer_main, ["--model", path, "--images", str(tmp_path / "a.png"),
                                           "--max_pixels", "4096"])
    assert "64x96" in line and "--max_pixels" in line
