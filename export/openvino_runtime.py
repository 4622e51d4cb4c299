"""OpenVINO (CPU) serving of an ONNX export, the second runtime of :class:`AttentionMapPredictor`.

``pip install 'dino-fast[openvino]'``. OpenVINO reads the ``.onnx`` file as it is (the dynamic
export included: batch, height and width stay dynamic) and compiles it for the CPU. Its CPU
plugin computes in bfloat16 by default on CPUs with bf16 instructions (AVX512-BF16, AMX): features
then differ from ONNX Runtime by about 3e-3. :data:`COMPILE_CONFIG` asks for float32, which
matches ONNX Runtime to about 1e-8 on the attentions. The int8 export (ONNX Runtime's dynamically
quantised MatMuls) runs too, within the int8 tolerance of the export.
"""
import numpy as np

from dino_fast.cli.errors import MissingDependencyError

DEVICE = "CPU"
COMPILE_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


def import_openvino():
    """The ``openvino`` module, or a :class:`MissingDependencyError` saying how to install it."""
    try:
        import openvino
    except ImportError as err:
        raise MissingDependencyError(
            "--runtime openvino needs OpenVINO: pip install 'dino-fast[openvino]'") from err
    return openvino


class OpenVinoSession:
    """An ONNX export compiled by OpenVINO for the CPU: :meth:`run` maps ``images`` (float32
    NumPy ``[B, 3, H, W]``) to ``(attentions, features)``; :attr:`metadata` holds the ONNX
    file's metadata (``dino_fast.*`` keys for our exports). A file OpenVINO cannot read is a
    ValueError."""

    def __init__(self, model_path: str, threads: int | None = None):
        openvino = import_openvino()
        self.version = openvino.__version__.split("-")[0]
        core = openvino.Core()
        config = dict(COMPILE_CONFIG)
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            model = core.read_model(model_path)
            self.compiled = core.compile_model(model, DEVICE, config)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"cannot load {model_path} in OpenVINO (is it damaged or "
                             f"truncated? export it again): {first}") from err
        self.metadata = _metadata(model)
        self.outputs = [self.compiled.output(name) for name in ("attentions", "features")]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(attentions [B, heads, N], features [B, dim])`` of ``images [B, 3, H, W]``."""
        # A fresh request per call: requests are not shareable across threads, calls may be.
        results = self.compiled.create_infer_request().infer({"images": images})
        return tuple(np.array(results[output]) for output in self.outputs)

    def describe(self) -> str:
        """``OpenVINO <version>: CPU``."""
        return f"OpenVINO {self.version}: {DEVICE}"


def _metadata(model) -> dict[str, str]:
    """The ONNX file's metadata, which OpenVINO keeps as ``framework`` runtime info."""
    info = model.get_rt_info()
    if "framework" not in info:
        return {}
    return {key: value.astype(str) for key, value in info["framework"].items()}
