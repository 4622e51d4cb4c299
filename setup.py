"""Install dino-fast: the Python packages and the optional C++ CPU kernels (`dino_fast._C`).

The C++ extension is best effort: if no compiler is found or the build fails, the install still
succeeds, one warning says why, and the ops run on their PyTorch reference on the CPU.
"""
import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build `dino_fast._C` when possible; never fail the install because of it."""

    def run(self):
        try:
            super().run()
        except Exception as err:  # compiler missing (CCompilerError, DistutilsPlatformError...)
            self._warn(err)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as err:
            self._warn(err)

    @staticmethod
    def _warn(err):
        print(
            "WARNING: dino_fast: the C++ CPU kernels (dino_fast._C) were not built "
            f"({type(err).__name__}: {err}). The fused ops fall back to their PyTorch reference on "
            "the CPU. Install a C++17 compiler and reinstall to get them.",
            file=sys.stderr,
        )


def cpp_extensions():
    """The pybind11 extension over every csrc/*.cpp, or nothing when pybind11 is missing."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("WARNING: dino_fast: pybind11 is not installed; skipping the C++ kernels.",
              file=sys.stderr)
        return []
    compile_args = ["-O3", "-fopenmp"] if sys.platform != "win32" else ["/O2", "/openmp"]
    link_args = ["-fopenmp"] if sys.platform != "win32" else []
    headers = sorted(glob.glob(os.path.join("csrc", "*.h")))  # rebuilt on change, in the sdist
    return [Pybind11Extension("dino_fast._C", sources, depends=headers, cxx_std=17,
                              extra_compile_args=compile_args, extra_link_args=link_args)]


ONNX = ["onnx>=1.18", "onnxruntime>=1.23", "onnxscript"]  # 1.23: ONNX Runtime's Attention-23
# onnxruntime-gpu replaces onnxruntime (same module; install one). Its CUDA kernel for the
# opset-23 Attention node came in 1.25: older builds run that node on the CPU (README).
ONNX_GPU = ["onnx>=1.18", "onnxruntime-gpu>=1.23", "onnxscript"]
HF, TIMM = ["transformers>=4.40"], ["timm>=1.0"]
MONITOR = ["tensorboard", "matplotlib"]  # --tensorboard, curves.png, python -m dino_fast.plot
# dino_fast.serve; uvloop and httptools: uvicorn's C event loop and HTTP parser (it picks them)
SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9", "uvloop", "httptools",
         *ONNX]
OPENVINO = ["openvino>=2025.0", *ONNX]  # --runtime openvino (the export still needs onnx)
extras = {
    "dali": ["nvidia-dali-cuda130"],
    "onnx": ONNX,
    "onnx-gpu": ONNX_GPU,
    "hf": HF,
    "timm": TIMM,
    "monitor": MONITOR,
    "serve": SERVE,
    "openvino": OPENVINO,
    "xformers": ["xformers"],
    "bench": ["webdataset"],  # benchmarks/loader.py's row for the webdataset package
    # pytest-xdist: the GPU suite runs the kernel tests on several workers (compiling in parallel);
    # ruff pinned to a minor release, whose rule set is stable (pyproject.toml chooses the rules)
    "dev": ["pytest>=7", "pytest-xdist", "ruff>=0.17,<0.18", "pre-commit", "scikit-learn", *ONNX,
            *HF, *TIMM, *MONITOR, *SERVE, "selenium"],
}
extras["all"] = sorted({dep for name, deps in extras.items() if name != "onnx-gpu" for dep in deps})

setup(
    name="dino-fast",
    version="0.1.0",
    description="DINO self-supervised ViT training, official-compatible and fast "
                "(Triton/C++ fused ops, DALI loader, ONNX attention maps).",
    long_description=(open("README.md", encoding="utf-8").read()
                      if os.path.exists("README.md") else ""),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["dino_fast", "dino_fast.cli", "dino_fast.data", "dino_fast.evaluation",
              "dino_fast.models", "dino_fast.monitoring", "dino_fast.ops", "dino_fast.profiling",
              "dino_fast.serving", "dino_fast.training", "dino_fast.kernels", "dino_fast.export"],
    package_dir={"dino_fast.kernels": "kernels", "dino_fast.export": "export"},
    package_data={"dino_fast.data": ["images/*", "images/**/*"],
                  "dino_fast.serving": ["page.html"]},
    include_package_data=True,
    install_requires=["torch>=2.4", "torchvision>=0.19", "numpy", "pillow", "tqdm", "safetensors"],
    extras_require=extras,
    ext_modules=cpp_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    entry_points={"console_scripts": [
        "dino-fast-train=dino_fast.train:main",
    ]},
)
