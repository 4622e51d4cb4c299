"""Exports of DINO's ViT (ONNX, safetensors, Hugging Face transformers, timm) and ONNX Runtime
inference of its attention maps.

``python -m dino_fast.export`` (:mod:`.command`) writes the model, ``python -m dino_fast.infer``
turns images into attention maps with an ONNX export (:mod:`dino_fast.infer`), and
:class:`AttentionMapPredictor` serves one from Python. The ONNX names are imported on first use,
so the other formats work without ONNX Runtime installed.
"""
import importlib

_ONNX_NAMES = {"AttentionMapPredictor": "dino_fast.export.predictor",
               "check_onnx": "dino_fast.export.onnx_export",
               "export_onnx": "dino_fast.export.onnx_export"}
__all__ = ["AttentionMapPredictor", "check_onnx", "export_onnx"]


def __getattr__(name):
    if name in _ONNX_NAMES:
        return getattr(importlib.import_module(_ONNX_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
