"""ONNX export of DINO's ViT and ONNX Runtime inference of its attention maps.

``python -m dino_fast.export`` writes the model (:mod:`.onnx_export`), ``python -m
dino_fast.infer`` turns images into attention maps with it (:mod:`.infer`), and
:class:`AttentionMapPredictor` serves it from Python.
"""
from dino_fast.export.onnx_export import check_onnx, export_onnx
from dino_fast.export.predictor import AttentionMapPredictor

__all__ = ["AttentionMapPredictor", "check_onnx", "export_onnx"]
