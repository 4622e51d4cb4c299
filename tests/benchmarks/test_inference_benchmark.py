"""``benchmarks/inference.py``: its eager int8 baseline needs ``torch.ao.quantization``
(deprecated since torch 2.10); a torch without it loses that row, not the benchmark."""
import importlib.util
import sys

from torch import nn


def test_eager_int8_quantizes_linears_or_is_left_out(monkeypatch):
    from benchmarks.inference import eager_int8
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    if importlib.util.find_spec("torch.ao.quantization") is not None:
        quantized = eager_int8(model)
        assert type(quantized[0]) is not nn.Linear and type(model[0]) is nn.Linear  # a copy
    monkeypatch.setitem(sys.modules, "torch.ao.quantization", None)  # as if removed
    assert eager_int8(model) is None
