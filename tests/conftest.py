"""Test setup: Triton runs in its interpreter on CPU tensors when there is no GPU.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is defined, so it is set
here, before the tests import dino_fast. On a CUDA machine the kernels run for real.

Triton before 3.8 has an interpreter that fails with numpy >= 2.4 (it calls ``int()`` on
one-element arrays). pip cannot express that pair in setup.py (an environment marker cannot see
another package's version), so on such a machine every test that runs Triton on the CPU is
skipped, with the reason and the fix (``pip install 'numpy<2.4'`` or ``triton>=3.8``).

The tests load exports in transformers as users do; pytest puts the checkout first on
``sys.path``, where ``kernels/`` would shadow Hugging Face's ``kernels`` package that
transformers imports, so that one is imported first (``import_hub_kernels_first``).

Image folders' file lists are cached in a temporary folder of this session
(``DINO_FAST_CACHE_DIR``), not in the user's cache, and every test starts without one.
"""
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["DINO_FAST_CACHE_DIR"] = tempfile.mkdtemp(prefix="dino_fast_test_cache_")

import pytest  # noqa: E402

from dino_fast.export.hf_export import import_hub_kernels_first  # noqa: E402
from dino_fast.ops import _backend  # noqa: E402

import_hub_kernels_first()


def _major_minor(version: str) -> tuple[int, int]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def triton_skip_reason() -> str | None:
    """Why Triton kernels cannot run in these tests here, or ``None`` when they can."""
    if not _backend.triton_available():
        return "triton is not installed"
    if torch.cuda.is_available():
        return None
    import numpy
    import triton
    if _major_minor(triton.__version__) < (3, 8) and _major_minor(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s CPU interpreter fails with numpy "
                f"{numpy.__version__} (>= 2.4): pip install 'numpy<2.4' or 'triton>=3.8'")
    return None


def pytest_collection_modifyitems(config, items):
    """Skip the tests parametrised with the ``triton`` backend where it cannot run."""
    reason = triton_skip_reason()
    if reason is None:
        return
    for item in items:
        params = getattr(item, "callspec", None)
        if params is not None and "triton" in params.params.values():
            item.add_marker(pytest.mark.skip(reason=reason))


def available_backends() -> list[str]:
    """The op backends this machine can run: reference always, cpp when built, triton."""
    names = ["reference"]
    if _backend.cpp_module() is not None:
        names.append("cpp")
    if _backend.triton_available() and (torch.cuda.is_available()
                                        or _backend.triton_interpreting()):
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
