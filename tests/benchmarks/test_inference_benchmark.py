"""``benchmarks/inference.py``: its eager int8 baseline needs ``torch.ao.quantization``
(deprecated since torch 2.10); a torch without it loses that row, not the benchmark. Its
OpenVINO rows run the very export its ONNX Runtime rows run, to the same outputs."""
import importlib.util
import sys

import numpy as np
import pytest
from torch import nn


def test_eager_int8_quantizes_linears_or_is_left_out(monkeypatch):
    from benchmarks.inference import eager_int8
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    if importlib.util.find_spec("torch.ao.quantization") is not None:
        quantized = eager_int8(model)
        assert type(quantized[0]) is not nn.Linear and type(model[0]) is nn.Linear  # a copy
    monkeypatch.setitem(sys.modules, "torch.ao.quantization", None)  # as if removed
    assert eager_int8(model) is None


def test_openvino_rows_serve_the_same_export_as_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    from benchmarks.inference import onnx_runners
    from dino_fast.models import build_vit
    vit = build_vit("vit_tiny").eval()
    vit.blocks = vit.blocks[:1]
    named = onnx_runners(vit, str(tmp_path), "vit_tiny", 1, "fp32", ("onnxruntime", "openvino"))
    assert list(named) == ["onnxruntime fp32 (CPU)", "openvino fp32 (CPU)"]
    images = np.random.default_rng(0).standard_normal((2, 3, 64, 96), dtype=np.float32)
    (ort_attn, _), (ov_attn, _) = (run(images) for run in named.values())
    assert np.abs(ort_attn - ov_attn).max() <= 1e-4
