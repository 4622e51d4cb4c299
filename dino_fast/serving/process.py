"""A server in a subprocess: ``python -m dino_fast.serve`` on a free loopback port, started and
stopped around a block of code (for the tests, ``benchmarks/serve_load.py`` and scripts)."""
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from dino_fast.serving.client import ServeClient


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(model: str, *flags: str, env: dict | None = None, timeout: float = 90.0,
                   log: str | None = None):
    """Yield ``(process, port)`` of a server of ``model`` (with the ``serve`` ``flags``) once
    ``GET /health`` answers; SIGTERM and reap it afterwards. Its output goes to ``log``
    (default: ``serve-<port>.log`` beside the model), shown if it dies before answering."""
    port = free_port()
    log = Path(log or Path(model).with_name(f"serve-{port}.log"))
    command = [sys.executable, "-m", "dino_fast.serve", "--model", model, "--port", str(port),
               "--log_level", "warning", *flags]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
    try:
        wait_healthy(process, port, log, timeout)
        yield process, port
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)


def wait_healthy(process, port: int, log: Path, timeout: float):
    """Return once ``GET /health`` answers 200; raise with the server's log if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}):\n{log.read_text()}")
        try:
            if ServeClient(port, timeout=2).get("/health")[0] == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the server did not answer in {timeout} s:\n{log.read_text()}")
