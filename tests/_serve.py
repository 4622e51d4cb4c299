"""Shared by the serve tests: a tiny export, and a real ``python -m dino_fast.serve`` in a
subprocess serving it at :data:`IMAGE_SIZE` (:func:`dino_fast.serving.process.running_server`)."""
import contextlib
from pathlib import Path

from dino_fast.data.folder import bundled_data_path
from dino_fast.serving.process import running_server as serve_subprocess

IMAGES = Path(bundled_data_path())
CAT, COFFEE = IMAGES / "animals" / "cat_chelsea.jpg", IMAGES / "objects" / "coffee.png"
IMAGE_SIZE = (96, 128)  # the served input size: small, so the tests stay fast


def tiny_export(path: Path) -> str:
    """A dynamic-size ONNX export of a 1-block vit_tiny/16 (3 heads) with random weights."""
    from dino_fast.export import export_onnx
    from tests.export.test_export import random_vit
    export_onnx(random_vit("vit_tiny", depth=1), str(path), arch="vit_tiny", check=False)
    return str(path)


@contextlib.contextmanager
def running_server(model: str, *flags: str, env: dict | None = None):
    """``(process, port)`` of a server of ``model`` at :data:`IMAGE_SIZE` with ``flags``."""
    with serve_subprocess(model, "--image_size", *map(str, IMAGE_SIZE), *flags,
                          env=env) as server:
        yield server
