"""Training checkpoints in the official layout, written atomically.

``checkpoint.pth`` holds ``{'student', 'teacher', 'optimizer', 'epoch' (the next epoch), 'args',
'dino_loss'}`` (plus ``fp16_scaler`` with fp16), as official ``main_dino.py`` writes it, and our
``iteration``: the steps of epoch ``epoch`` already done (0 at an epoch boundary; non-zero only
when a signal stopped training mid-epoch, official code then restarts that epoch). A write
goes to ``<path>.tmp`` in the same folder, is flushed to disk, then renamed over the target, so
a crash never leaves a torn checkpoint behind (at most a torn ``<path>.tmp``, which the next write
overwrites; a single writer per path is assumed, as only rank 0 writes).
"""
import argparse
import os

import numpy as np
import torch


def save_atomic(obj, path: str):
    """``torch.save`` to ``path`` via ``<path>.tmp`` and an atomic rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(folder)  # make the rename itself durable
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _fsync_folder(folder: str):
    """Flush ``folder``'s entries (POSIX); a no-op where a folder cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _numpy_scalar_globals() -> list:
    """What unpickling a NumPy float needs (official checkpoints keep the schedules' NumPy floats
    in the optimizer's param groups)."""
    core = getattr(np, "_core", None) or np.core  # NumPy 2 / NumPy 1
    return [core.multiarray.scalar, np.dtype, type(np.dtype(np.float64))]


def load_file(path: str):
    """``torch.load`` on the CPU that runs no pickled code: tensors, plain containers and numbers,
    NumPy scalars and the ``argparse.Namespace`` of the saved ``args``."""
    torch.serialization.add_safe_globals([argparse.Namespace, *_numpy_scalar_globals()])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(f"cannot read checkpoint {path}: {err}") from err


def load_checkpoint(path: str) -> dict:
    """Load a training checkpoint on the CPU; a clear error if it is not one."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict):
        raise RuntimeError(f"{path} is not a DINO training checkpoint (a {type(ckpt).__name__})")
    missing = [k for k in ("student", "teacher", "optimizer", "epoch") if k not in ckpt]
    if missing:
        raise RuntimeError(f"{path} is not a DINO training checkpoint (missing {missing})")
    return ckpt
