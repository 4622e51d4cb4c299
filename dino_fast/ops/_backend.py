"""Which implementation runs a fused op: the one dispatch rule shared by every op.

Each fused op (attention, DINO loss, teacher EMA, gradient clipping) has a pure-PyTorch
reference, and may have a Triton kernel (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``) and a C++ kernel (CPU tensors, ``dino_fast._C``). The choice:

* ``DINO_FAST_BACKEND`` (``auto`` by default, ``reference``, ``triton``, ``cpp``), read when the op
  is called, or the :func:`use_backend` context manager, which wins over the variable;
* ``reference`` when asked for, during ONNX export, or when the op has no kernel for the device;
* ``auto``: Triton on CUDA, C++ on the CPU, when they are installed;
* a forced backend that is not installed, or that cannot run on the tensor's device, is an error
  that says so (never a silent fallback that would make a benchmark lie).

The decision uses only static facts (device type, what is installed, the setting), so
``torch.compile`` folds it at trace time: after changing the setting, call
``torch._dynamo.reset()`` before running a compiled function again.
"""
import contextlib
import functools
import importlib
import os

import torch

BACKENDS = ("auto", "reference", "triton", "cpp")
_ENV = "DINO_FAST_BACKEND"
_forced: list[str] = []  # stack of use_backend() overrides, innermost last


def requested_backend() -> str:
    """The backend asked for: the innermost :func:`use_backend`, else ``$DINO_FAST_BACKEND``."""
    name = _forced[-1] if _forced else (os.environ.get(_ENV, "auto").strip().lower() or "auto")
    if name not in BACKENDS:
        raise ValueError(f"{_ENV}={name!r} is not one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend for the ops called inside the block (tests, benchmarks, export)."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def triton_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    try:
        importlib.import_module("triton")
    except Exception:  # missing, or broken against this torch
        return False
    return True


@functools.lru_cache(maxsize=None)
def cpp_module():
    """The compiled ``dino_fast._C`` module, or None when it was not built."""
    try:
        return importlib.import_module("dino_fast._C")
    except ImportError:
        return None


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export()


@torch.compiler.assume_constant_result  # evaluated once at trace time, never traced into
def resolve(op: str, device: torch.device, has_triton: bool = True, has_cpp: bool = True) -> str:
    """The backend that runs ``op`` on tensors of ``device``: ``reference``, ``triton`` or ``cpp``.

    ``has_triton`` / ``has_cpp`` say whether the op has such a kernel at all; an op without one
    falls back to its reference even when that backend is forced.
    """
    want = requested_backend()
    if want == "reference" or _exporting():
        return "reference"
    if want == "auto":
        if device.type == "cuda" and has_triton and triton_available():
            return "triton"
        if device.type == "cpu" and has_cpp and cpp_module() is not None:
            return "cpp"
        return "reference"
    if want == "triton":
        if not has_triton:
            return "reference"
        if not triton_available():
            raise RuntimeError(f"{op}: the triton backend was forced but `triton` does not import")
        if device.type == "cpu" and not triton_interpreting():
            raise RuntimeError(f"{op}: the triton backend on CPU tensors needs TRITON_INTERPRET=1 "
                               "(set before importing dino_fast)")
        return "triton"
    # want == "cpp"
    if not has_cpp:
        return "reference"
    if device.type != "cpu":
        raise RuntimeError(f"{op}: the cpp backend runs on CPU tensors, got {device.type}")
    if cpp_module() is None:
        raise RuntimeError(f"{op}: the cpp backend was forced but dino_fast._C was not built "
                           "(reinstall with a C++17 compiler: pip install -e .)")
    return "cpp"
