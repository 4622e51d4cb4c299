"""Training checkpoints in the official layout, written atomically.

``checkpoint.pth`` holds ``{'student', 'teacher', 'optimizer', 'epoch' (the next epoch), 'args',
'dino_loss'}`` (plus ``fp16_scaler`` with fp16), as official ``main_dino.py`` writes it, and our
``iteration``: the steps of epoch ``epoch`` already done (0 at an epoch boundary; non-zero only
when a signal stopped training mid-epoch, official code then restarts that epoch). A write
goes to ``<path>.tmp`` in the same folder, is flushed to disk, then renamed over the target, so
a crash never leaves a torn checkpoint behind (at most a torn ``<path>.tmp``, which the next write
overwrites; a single writer per path is assumed, as only rank 0 writes; ``train.lock`` keeps
other runs out of the folder). A second stop signal during a write abandons it with the
``SystemExit`` it raised, never a traceback. ``args`` is stored as a
plain dict, so a plain ``torch.load`` (``weights_only=True``, PyTorch >= 2.6) reads our
checkpoints; older ones holding an ``argparse.Namespace`` still load here.

What is read is verified first: torch writes checkpoints as zip archives with a CRC-32 per
member, and a member whose bytes no longer match its CRC (a flipped block on disk, a bad copy)
is refused, naming the file, instead of being trained on and saved into the next checkpoint.
"""
import argparse
import errno
import os
import re
import zipfile

import numpy as np
import torch


class WriteError(OSError):
    """A checkpoint or log file could not be written (``errno``, ``strerror`` and ``filename``
    say why and which); whatever was written there before is intact."""


def save_atomic(obj, path: str):
    """``torch.save`` to ``path`` via ``<path>.tmp`` and an atomic rename; a failure to write
    (a full disk) raises :class:`WriteError` naming ``path`` and leaves ``path`` as it was."""
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
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        stop = _in_chain(err, lambda e: isinstance(e, (SystemExit, KeyboardInterrupt)))
        if stop is not None:  # a second stop signal: torch.save reports it as a RuntimeError
            raise stop from None
        cause = os_error_in(err)
        if cause is None or isinstance(err, WriteError):
            raise
        raise WriteError(cause.errno, cause.strerror, path) from err


def os_error_in(err: BaseException):
    """The ``OSError`` that caused ``err`` (itself, or one in its chain), or None. torch.save
    reports a failed write as an internal ``RuntimeError`` raised while handling the real one."""
    return _in_chain(err, lambda e: isinstance(e, OSError) and e.errno is not None)


def _in_chain(err: BaseException, matches):
    """The first exception of ``err``'s chain (itself, its causes and contexts) that
    ``matches``, or None."""
    while err is not None:
        if matches(err):
            return err
        err = err.__cause__ or err.__context__
    return None


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


def verify_archive(path: str):
    """Check the CRC-32 of every member of the zip archive ``path`` (torch's format since 1.6);
    raise ``RuntimeError`` naming the file and the first damaged member. Files in torch's legacy
    format, and members written without a checksum, are not checked."""
    if not zipfile.is_zipfile(path):
        return  # legacy format, or truncated (torch.load then fails with its own message)
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size:  # torch's compute_crc32 was off
                    continue
                with archive.open(info) as member:  # the CRC is checked at the member's end
                    while member.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise RuntimeError(f"checkpoint {path} is damaged: {err}") from err


def load_file(path: str):
    """``torch.load`` on the CPU, after :func:`verify_archive`, that runs no pickled code:
    tensors, plain containers and numbers, NumPy scalars and the ``argparse.Namespace`` of the
    ``args`` of older checkpoints. A file it cannot read raises ``RuntimeError`` with the cause
    in words (:func:`unreadable_cause`)."""
    verify_archive(path)
    torch.serialization.add_safe_globals([argparse.Namespace, *_numpy_scalar_globals()])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(f"cannot read checkpoint {path}: {unreadable_cause(path, err)}") \
            from err


def load_checkpoint(path: str) -> dict:
    """Load a training checkpoint on the CPU; a clear error if it is not one."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict):
        raise RuntimeError(f"{path} is not a DINO training checkpoint (a {type(ckpt).__name__})")
    missing = [k for k in ("student", "teacher", "optimizer", "epoch") if k not in ckpt]
    if missing:
        raise RuntimeError(f"{path} is not a DINO training checkpoint (missing {missing})")
    return ckpt


def saved_args(ckpt: dict) -> dict:
    """The training flags stored in ``ckpt['args']`` as a dict (``{}`` when absent); old
    checkpoints and official ones hold an ``argparse.Namespace``."""
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


# What a file that is not a PyTorch checkpoint starts with, and what it then is.
_MAGIC = [(b"\x89HDF", "looks like HDF5 (Keras?)"), (b"\x93NUMPY", "looks like a NumPy array"),
          (b"\x1f\x8b", "looks like gzip (a compressed file: unpack it first?)")]
_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+)")
_PATH_ERRNOS = {errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM}  # the path's


def unreadable_cause(path: str, err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed on ``path``, in words: an empty file, a
    file of another kind (ONNX, safetensors, text, ...), a truncated one, or Python objects that
    are not loaded (their classes are named; loading them would run code). Never suggests
    ``weights_only=False``."""
    if isinstance(err, OSError) and err.errno in _PATH_ERRNOS:
        return os.strerror(err.errno)
    if os.path.getsize(path) == 0:
        return "empty file"
    unsafe = _UNSAFE_GLOBAL.search(str(err))
    if unsafe:
        return (f"it holds a Python object ({unsafe.group(1).rstrip('.')}) that is not loaded: "
                "checkpoints are read as tensors, containers and numbers only, as unpickling "
                "other objects can run code")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        return ("a zip archive that is not a PyTorch checkpoint" if zipfile.is_zipfile(path) else
                "truncated: a zip archive without its end (an interrupted download or copy?)")
    if head.startswith(b"\x80"):  # a pickle: torch's legacy format
        return "truncated or damaged: a pickle that does not load"
    return f"not a PyTorch checkpoint: {file_kind(head) or 'an unknown kind of file'}"


def file_kind(head: bytes) -> str | None:
    """What the first bytes ``head`` of a file that is not a PyTorch checkpoint show it to be
    (ONNX, safetensors, text, ...), or None."""
    if len(head) > 2 and head[0] == 0x08 and head[1] < 0x80 and head[2] in b"\x12\x1a\x22\x3a":
        return "looks like ONNX (an exported model, not weights)"  # ir_version, then a field
    if head[8:10] == b'{"':  # 8 bytes of header length, then the JSON header
        return "looks like safetensors: name it *.safetensors"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "looks like an HTML page (a download that saved an error page?)"
    if all(byte >= 0x20 or byte in b"\t\n\r" for byte in head):
        return "looks like text"
    return None
