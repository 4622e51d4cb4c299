"""ONNX Runtime serving of an exported DINO ViT: images in, CLS attentions and features out.

Uses the CUDA execution provider when ONNX Runtime has it (inputs and outputs bound on the GPU
with IO binding, so a CUDA tensor is read in place), else the CPU.
"""
import numpy as np
import onnxruntime as ort

METADATA_PREFIX = "dino_fast."  # keys of the ONNX metadata written by the export
OUTPUTS = ("attentions", "features")


def default_providers() -> list[str]:
    """CUDA first when this ONNX Runtime build has it, then the CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class AttentionMapPredictor:
    """An exported model (``python -m dino_fast.export``) in an ONNX Runtime session.

    ``run(images)`` takes normalised images ``[B, 3, H, W]`` (NumPy or torch, float32, H and W
    multiples of the patch size) and returns NumPy ``attentions [B, heads, H/p * W/p]`` and
    ``features [B, dim]``. ``patch_size`` / ``arch``, when given, must match the model's.
    """

    def __init__(self, model_path: str, providers: list[str] | None = None,
                 threads: int | None = None, patch_size: int | None = None,
                 arch: str | None = None):
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model_path, options,
                                            providers=providers or default_providers())
        meta = {k.removeprefix(METADATA_PREFIX): v for k, v in
                self.session.get_modelmeta().custom_metadata_map.items()}
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
        self.on_gpu = self.session.get_providers()[0] == "CUDAExecutionProvider"

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
        attentions, features = self.session.run(list(OUTPUTS), {"images": images.astype(
            np.float32, copy=False)})
        return attentions, features

    def _run_bound(self, images) -> tuple[np.ndarray, np.ndarray]:
        binding = self.session.io_binding()
        if isinstance(images, np.ndarray):
            binding.bind_ortvalue_input("images", ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(images, dtype=np.float32), "cuda", 0))
        else:  # a torch tensor: bind its memory directly when it is float32 on a GPU
            images = images.float().contiguous()
            if images.device.type != "cuda":
                images = images.cuda()
            import torch  # images is a torch tensor, so torch is installed
            torch.cuda.current_stream(images.device).synchronize()  # ORT reads on its own stream
            binding.bind_input("images", "cuda", images.device.index or 0, np.float32,
                               tuple(images.shape), images.data_ptr())
        for name in OUTPUTS:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        attentions, features = binding.copy_outputs_to_cpu()
        return attentions, features
