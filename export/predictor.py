"""ONNX Runtime (or OpenVINO) serving of an exported DINO ViT: images in, CLS attentions and
features out.

Uses the CUDA execution provider when ONNX Runtime has it (``pip install 'dino-fast[onnx-gpu]'``),
else the CPU. On CUDA, the input, the outputs and the session live on ONE device, the session's
(its ``device_id``): a CUDA tensor on that device is read in place, any other input is copied
there, and the outputs are bound there before being copied to the host.

A model path that is not an ONNX export (a folder, a PyTorch checkpoint, safetensors weights, a
damaged file) is a ``ValueError`` saying what it is. :func:`pixel_budget` sizes the largest
image one model can take within :data:`MEMORY_BUDGET`.
"""
import math
import os
import shlex
import zipfile

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

METADATA_PREFIX = "dino_fast."  # keys of the ONNX metadata written by the export
OUTPUTS = ("attentions", "features")
RUNTIMES = ("onnxruntime", "openvino")  # which library runs the graph (``runtime=``)
CUDA_ATTENTION_ORT = (1, 25)  # the first ONNX Runtime with a CUDA kernel for ONNX Attention-23
# What ONNX Runtime raises: one plain Exception subclass per status code (a damaged file, a
# failed allocation, a kernel error), all defined in its binding module.
ORT_ERRORS = tuple(error for error in vars(ort_state).values()
                   if isinstance(error, type) and issubclass(error, Exception))
# Memory for one image's attention. The peak of one forward pass, measured with ONNX Runtime
# 1.32 on the CPU (vit_base/16, 768 to 1536 pixels square, opset 18 and 23), is 1.4 to 3.5
# float32 copies of one block's [heads, N + 1, N + 1] attention; 4 bounds it. 8 GiB is a third of
# the 24 GiB of this project's machines, leaving the rest to the decoded image and to others.
ATTENTION_COPIES = 4
MEMORY_BUDGET = 8 * 2**30


def pixel_budget(num_heads: int, patch_size: int, memory: int = MEMORY_BUDGET) -> int:
    """The most pixels (a multiple of ``patch_size**2``) of one image whose attention,
    :data:`ATTENTION_COPIES` float32 copies of ``[heads, N + 1, N + 1]`` with ``N`` patches,
    fits in ``memory`` bytes: it grows as ``patch_size**2 / sqrt(num_heads)``, from 427,968
    pixels (654 x 654) for vit_base/8 to 2,421,248 (1556 x 1556) for vit_small/16."""
    tokens = math.isqrt(memory // (ATTENTION_COPIES * 4 * num_heads))
    return (tokens - 1) * patch_size**2


def check_model_file(path: str):
    """Raise a ``ValueError`` saying what ``path`` is when it is plainly not an ONNX model: a
    folder, a PyTorch checkpoint (zip or legacy pickle) or safetensors weights, the last two with
    the export command that makes one. A missing path is left to ONNX Runtime."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not an ONNX model file (the .onnx file that "
                         "`python -m dino_fast.export --output` writes)")
    if not os.path.isfile(path):
        return
    kind = _weights_kind(path)
    if kind:
        stem = os.path.splitext(path)[0]
        onnx_path = stem + ("-export.onnx" if path.endswith(".onnx") else ".onnx")  # not over it
        raise ValueError(f"{path} is {kind}, not an ONNX model; export it first: python -m "
                         f"dino_fast.export --checkpoint {shlex.quote(path)} --output "
                         f"{shlex.quote(onnx_path)}")


def _weights_kind(path: str) -> str | None:
    """``a PyTorch checkpoint`` or ``safetensors weights`` when the file's first bytes say so."""
    with open(path, "rb") as file:
        head = file.read(9)
    if head.startswith(b"PK\x03\x04") and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:  # torch.save writes <name>/data.pkl
            if any(name.endswith("data.pkl") for name in archive.namelist()):
                return "a PyTorch checkpoint"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # legacy torch.save: a pickle
        return "a PyTorch checkpoint"
    header_size = int.from_bytes(head[:8], "little")  # safetensors: u64 size, then JSON
    if head[8:9] == b"{" and 8 + header_size <= os.path.getsize(path):
        return "safetensors weights"
    return None


def default_providers() -> list[str]:
    """CUDA first when this ONNX Runtime build has it, then the CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class AttentionMapPredictor:
    """An exported model (``python -m dino_fast.export``) in an ONNX Runtime session.

    ``run(images)`` takes normalised images ``[B, 3, H, W]`` (NumPy or torch, float32, H and W
    multiples of the patch size) and returns NumPy ``attentions [B, heads, H/p * W/p]`` and
    ``features [B, dim]``. ``patch_size`` / ``arch``, when given, must match the model's.
    ``runtime="openvino"`` runs it in OpenVINO on the CPU instead of ONNX Runtime (same outputs,
    see :mod:`dino_fast.export.openvino_runtime`); ``providers`` is ONNX Runtime's.
    """

    def __init__(self, model_path: str, providers: list[str] | None = None,
                 threads: int | None = None, patch_size: int | None = None,
                 arch: str | None = None, runtime: str = "onnxruntime"):
        check_model_file(model_path)
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
        self.runtime = runtime
        if runtime == "openvino":
            from dino_fast.export.openvino_runtime import OpenVinoSession
            self.session = OpenVinoSession(model_path, threads)
            metadata = self.session.metadata
            self.provider = "OpenVINO"
        else:
            self.session = _ort_session(model_path, providers, threads)
            metadata = self.session.get_modelmeta().custom_metadata_map
            self.provider = self.session.get_providers()[0]  # the one that runs the graph's nodes
        self._read_metadata(model_path, metadata, patch_size, arch)
        self.on_gpu = self.provider == "CUDAExecutionProvider"
        self.device_id = session_device_id(self.session) if self.on_gpu else None

    def _read_metadata(self, model_path: str, metadata: dict, patch_size, arch):
        meta = {k.removeprefix(METADATA_PREFIX): v for k, v in metadata.items()}
        if "patch_size" not in meta:
            raise ValueError(f"{model_path} was not written by `python -m dino_fast.export` "
                             "(no dino_fast metadata)")
        self.patch_size, self.num_heads = int(meta["patch_size"]), int(meta["num_heads"])
        self.arch, self.precision = meta.get("arch", ""), meta.get("precision", "fp32")
        self.image_size = None if meta["image_size"] == "dynamic" else \
            tuple(int(s) for s in meta["image_size"].split("x"))
        for name, want, have in (("patch size", patch_size, self.patch_size),
                                 ("arch", arch, self.arch)):
            if want is not None and want != have:
                raise ValueError(f"{model_path} is a {self.arch}/{self.patch_size} model, "
                                 f"not the {name} {want} asked for; re-export it")

    def describe(self) -> str:
        """Which runtime and provider run the model, e.g. ``ONNX Runtime 1.32.0:
        CUDAExecutionProvider (device 0)`` or ``OpenVINO 2026.4.1: CPU``."""
        if self.runtime == "openvino":
            return self.session.describe()
        where = f" (device {self.device_id})" if self.on_gpu else ""
        return f"ONNX Runtime {ort.__version__}: {self.provider}{where}"

    def check_size(self, height: int, width: int):
        """Raise a clear error if the model cannot take ``height x width`` images."""
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size "
                             f"{self.patch_size}")
        if self.image_size is not None and (height, width) != self.image_size:
            raise ValueError(f"this model was exported for {self.image_size[0]}x"
                             f"{self.image_size[1]} images only, got {height}x{width}")

    def run(self, images) -> tuple[np.ndarray, np.ndarray]:
        """``(attentions [B, heads, N], features [B, dim])`` of ``images [B, 3, H, W]``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        self.check_size(images.shape[2], images.shape[3])
        if self.on_gpu:
            return self._run_bound(images)
        if not isinstance(images, np.ndarray):  # a torch tensor
            images = images.detach().cpu().numpy()
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.runtime == "openvino":
            return self.session.run(images)
        attentions, features = self.session.run(list(OUTPUTS), {"images": images})
        return attentions, features

    def _run_bound(self, images) -> tuple[np.ndarray, np.ndarray]:
        binding = self.session.io_binding()
        if isinstance(images, np.ndarray) or images.device.type != "cuda":
            host = images if isinstance(images, np.ndarray) else images.detach().cpu().numpy()
            binding.bind_cpu_input("images", np.ascontiguousarray(host, dtype=np.float32))
        else:  # a CUDA tensor: bound in place on the session's device (copied there if needed)
            import torch  # images is a torch tensor, so torch is installed
            images = images.detach().to(f"cuda:{self.device_id}", torch.float32).contiguous()
            torch.cuda.current_stream(images.device).synchronize()  # ORT reads on its own stream
            binding.bind_input("images", "cuda", self.device_id, np.float32,
                               tuple(images.shape), images.data_ptr())
        for name in OUTPUTS:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        attentions, features = binding.copy_outputs_to_cpu()
        return attentions, features


def _ort_session(model_path: str, providers: list[str] | None, threads: int | None):
    """An ONNX Runtime session of ``model_path``; a file it cannot load is a ValueError."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model_path, options,
                                    providers=providers or default_providers())
    except ORT_ERRORS as err:
        raise ValueError(f"cannot load {model_path} as an ONNX model (is it damaged or "
                         f"truncated? export it again): {err}") from err


def session_device_id(session) -> int:
    """The CUDA device of ``session`` (its CUDA provider's ``device_id``, 0 when unset)."""
    options = session.get_provider_options().get("CUDAExecutionProvider", {})
    return int(options.get("device_id", 0))


def attention_placement_note(model_path: str, provider: str) -> str | None:
    """A note when this ONNX Runtime would run the graph's opset-23 ``Attention`` nodes on the
    CPU although the session is on CUDA (builds before 1.25 have no CUDA kernel for it and
    copy every block's activations to the host and back); ``None`` otherwise."""
    version = tuple(int(part) for part in ort.__version__.split(".")[:2])
    if provider != "CUDAExecutionProvider" or version >= CUDA_ATTENTION_ORT:
        return None
    import onnx
    graph = onnx.load(model_path, load_external_data=False).graph
    if not any(node.op_type == "Attention" and node.domain in ("", "ai.onnx")
               for node in graph.node):
        return None
    return (f"note: ONNX Runtime {ort.__version__} runs the opset-23 Attention nodes on the CPU "
            "(its CUDA kernel came in 1.25); export with --opset 18 for this runtime")
