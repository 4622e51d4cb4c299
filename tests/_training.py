"""Shared by the training tests: a tiny image folder, the tiny-run flags, and subprocess runs of
``python -m dino_fast.train`` on one CPU thread (2-thread OpenMP under a loaded CI machine is
several times slower, and the thread count must match for bit-exact comparisons). The runs are
on the CPU (``--device cpu`` in ``TINY_RUN``) even on a GPU machine, since the resume and
fault-tolerance tests assert bit-exact states, which CUDA does not give."""
import os
import socket
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

# vit_tiny on 32 px global / 16 px local crops, K = 32: about half a second per step on one core;
# no curves.png (matplotlib would add seconds per run; tests/monitoring/test_monitor.py draws it).
TINY_RUN = ["--arch", "vit_tiny", "--out_dim", "32", "--local_crops_number", "1",
            "--global_crops_size", "32", "--local_crops_size", "16", "--num_workers", "0",
            "--saveckp_freq", "0", "--warmup_epochs", "0", "--loader", "torch", "--device", "cpu",
            "--seed", "0", "--no-curves"]
# Two steps that both move the weights: no lr warm-up, no stochastic depth, no frozen layer.
TWO_STEPS = ["--epochs", "1", "--drop_path_rate", "0", "--freeze_last_layer", "0"]


def make_images(folder, count: int, seed: int = 0):
    """``count`` random RGB images of 48x56 pixels in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    gen = np.random.default_rng(seed)
    for i in range(count):
        pixels = gen.integers(0, 256, (48, 56, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:03}.png"))
    return str(folder)


def single_thread_env() -> dict:
    """The environment for training subprocesses: one OpenMP thread, loopback-only Gloo, and
    Python's fault handler (an abort, seen rarely when a Gloo process exits, then shows where
    each thread was)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")  # a crash shows its Python stack
    env.pop("TRITON_INTERPRET", None)  # CPU runs dispatch to cpp/reference, never the interpreter
    return env


def train_command(*flags) -> list[str]:
    """``python -m dino_fast.train`` with the tiny-run flags and ``flags``."""
    return [sys.executable, "-m", "dino_fast.train", *TINY_RUN, *map(str, flags)]


def run_in_process(*flags):
    """``dino_fast.train.main`` in this process on one thread (saves a torch import)."""
    from dino_fast import train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main([*TINY_RUN, *map(str, flags)])
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load(path) -> dict:
    """A training checkpoint, with the ``module.`` prefix of DDP stripped from the models."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("student", "teacher"):
        ckpt[key] = {k.removeprefix("module."): v for k, v in ckpt[key].items()}
    return ckpt


def assert_same_state(got: dict, want: dict, atol: float = 0.0):
    """Student, teacher and center equal within ``atol``; names the worst tensor otherwise."""
    pairs = [(f"{part}.{name}", got[part][name], value)
             for part in ("student", "teacher") for name, value in want[part].items()]
    pairs.append(("center", got["dino_loss"]["center"], want["dino_loss"]["center"]))
    errors = sorted(((a.double() - b.double()).abs().max().item(), name) for name, a, b in pairs)
    assert errors[-1][0] <= atol, f"largest differences (abs, tensor): {errors[-3:]}"


def run(cmd, timeout=120, extra_env=None, **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd`` to the end with the single-thread environment (plus ``extra_env``); output
    captured as text."""
    return subprocess.run(cmd, env={**single_thread_env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout, **kwargs)
