"""Training checkpoints in the official layout, written atomically.

``checkpoint.pth`` holds ``{'student', 'teacher', 'optimizer', 'epoch' (the next epoch), 'args',
'dino_loss'}`` (plus ``fp16_scaler`` with fp16), as official ``main_dino.py`` writes it. A write
goes to a temporary file in the same folder, is flushed to disk, then renamed over the target,
so a crash never leaves a torn checkpoint behind.
"""
import os
import tempfile

import torch


def save_atomic(obj, path: str):
    """``torch.save`` to ``path`` via a temporary file and an atomic rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    """Load a training checkpoint on the CPU; a clear error if it is not one."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise RuntimeError(f"cannot read checkpoint {path}: {err}") from err
    missing = [k for k in ("student", "teacher", "optimizer", "epoch") if k not in ckpt]
    if not isinstance(ckpt, dict) or missing:
        raise RuntimeError(f"{path} is not a DINO training checkpoint (missing {missing})")
    return ckpt
