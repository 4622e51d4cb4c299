"""Test setup: Triton runs in its interpreter on CPU tensors when there is no GPU.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined, so it is set
here, before the tests import dino_fast. On a CUDA machine the kernels run for real.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from dino_fast.ops import _backend  # noqa: E402


def available_backends() -> list[str]:
    """The op backends this machine can run: reference always, cpp when built, triton."""
    names = ["reference"]
    if _backend.cpp_module() is not None:
        names.append("cpp")
    if _backend.triton_available() and (torch.cuda.is_available() or _backend.triton_interpreting()):
        names.append("triton")
    return names


def device_for(backend: str) -> torch.device:
    """Where a backend's kernels run in the tests: CUDA when present (not for cpp), else CPU."""
    if backend != "cpp" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
