"""Shared by the serve tests: a tiny export, and a real ``python -m dino_fast.serve`` in a
subprocess on a free loopback port, started and stopped around a test."""
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from dino_fast.data.folder import bundled_data_path
from dino_fast.serving.client import ServeClient

IMAGES = Path(bundled_data_path())
CAT, COFFEE = IMAGES / "animals" / "cat_chelsea.jpg", IMAGES / "objects" / "coffee.png"
IMAGE_SIZE = (96, 128)  # the served input size: small, so the tests stay fast


def tiny_export(path: Path) -> str:
    """A dynamic-size ONNX export of a 1-block vit_tiny/16 (3 heads) with random weights."""
    from dino_fast.export import export_onnx
    from tests.export.test_export import random_vit
    export_onnx(random_vit("vit_tiny", depth=1), str(path), arch="vit_tiny", check=False)
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(model: str, *flags: str, env: dict | None = None, timeout: float = 90.0):
    """Yield ``(process, port)`` of a server of ``model`` once ``/health`` answers; SIGTERM and
    reap it afterwards. Its output goes to a log file, shown if it dies before answering."""
    port = free_port()
    log = Path(model).with_name(f"serve-{port}.log")
    command = [sys.executable, "-m", "dino_fast.serve", "--model", model, "--port", str(port),
               "--image_size", *map(str, IMAGE_SIZE), "--log_level", "warning", *flags]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
    try:
        wait_healthy(process, port, log, timeout)
        yield process, port
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


def wait_healthy(process, port: int, log: Path, timeout: float):
    """Return once ``GET /health`` answers 200; fail with the server's log if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited ({process.returncode}):\n{log.read_text()}")
        try:
            if ServeClient(port, timeout=2).get("/health")[0] == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the server did not answer in {timeout} s:\n{log.read_text()}")
