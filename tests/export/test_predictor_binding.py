"""The ONNX Runtime predictor's provider choice and CUDA IO binding, on the CPU with a fake session.

Issue 19 item 9: the input, the outputs and the session must be bound on ONE device, the
session's. ONNX Runtime's CUDA provider is not needed: a fake session reports a provider list
with CUDA first on device 1 and records every binding call. (The in-place binding of CUDA
tensors needs a GPU; the GPU suite's inference stage runs it.)
"""
import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from dino_fast.export import predictor as predictor_module  # noqa: E402 (after the skip)
from dino_fast.export.predictor import AttentionMapPredictor, attention_placement_note  # noqa: E402

METADATA = {"dino_fast.patch_size": "16", "dino_fast.num_heads": "3", "dino_fast.arch": "vit_tiny",
            "dino_fast.image_size": "dynamic", "dino_fast.precision": "fp32"}


class FakeBinding:
    def __init__(self, calls):
        self.calls = calls

    def bind_cpu_input(self, name, array):
        self.calls.append(("input", name, "host copy", array.dtype, array.flags.c_contiguous))

    def bind_input(self, name, device, device_id, *rest):
        self.calls.append(("input", name, device, device_id))

    def bind_output(self, name, device, device_id=0):
        self.calls.append(("output", name, device, device_id))

    def copy_outputs_to_cpu(self):
        return [np.ones((1, 3, 4), np.float32), np.ones((1, 192), np.float32)]


class FakeSession:
    """What ``ort.InferenceSession`` would be with ``providers`` given and CUDA on device 1."""

    def __init__(self, path, options, providers):
        self.providers, self.calls = list(providers), []

    def get_providers(self):
        return self.providers

    def get_provider_options(self):
        return {name: ({"device_id": "1"} if name.startswith("CUDA") else {})
                for name in self.providers}

    def get_modelmeta(self):
        return type("Meta", (), {"custom_metadata_map": METADATA})()

    def io_binding(self):
        return FakeBinding(self.calls)

    def run_with_iobinding(self, binding):
        self.calls.append(("run",))

    def run(self, names, feeds):
        self.calls.append(("host run", feeds["images"].dtype))
        return FakeBinding([]).copy_outputs_to_cpu()


@pytest.fixture
def fake_ort(monkeypatch):
    """ONNX Runtime with a CUDA provider listed (or not: set ``fake_ort.available``)."""
    state = type("State", (), {"available": ["CUDAExecutionProvider", "CPUExecutionProvider"]})()
    monkeypatch.setattr(predictor_module.ort, "InferenceSession", FakeSession)
    monkeypatch.setattr(predictor_module.ort, "get_available_providers", lambda: state.available)
    return state


def test_cuda_session_binds_input_and_outputs_on_its_own_device(fake_ort):
    predictor = AttentionMapPredictor("model.onnx")
    assert predictor.on_gpu and predictor.device_id == 1
    assert predictor.describe().endswith("CUDAExecutionProvider (device 1)")
    for images in (np.zeros((1, 3, 32, 32)), torch.zeros(1, 3, 32, 32, dtype=torch.float64)):
        predictor.session.calls.clear()
        attentions, features = predictor.run(images)
        assert attentions.shape == (1, 3, 4) and features.shape == (1, 192)
        assert predictor.session.calls == [
            ("input", "images", "host copy", np.float32, True),  # ORT copies it to the session's
            ("output", "attentions", "cuda", 1), ("output", "features", "cuda", 1), ("run",)]


def test_without_cuda_the_cpu_runs_and_says_so(fake_ort):
    fake_ort.available = ["CPUExecutionProvider"]
    predictor = AttentionMapPredictor("model.onnx")
    assert not predictor.on_gpu and predictor.device_id is None
    assert predictor.describe().endswith(": CPUExecutionProvider")
    predictor.run(torch.zeros(1, 3, 32, 32))
    assert predictor.session.calls == [("host run", np.float32)]


def test_attention_placement_note_names_old_runtimes(tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    helper = onnx.helper
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8])
    node = helper.make_node("Attention", ["x", "x", "x"], ["y"], q_num_heads=2, kv_num_heads=2)
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8])
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 23)])
    onnx.save(model, str(tmp_path / "a.onnx"))
    path = str(tmp_path / "a.onnx")
    monkeypatch.setattr(predictor_module.ort, "__version__", "1.24.4")
    assert "--opset 18" in attention_placement_note(path, "CUDAExecutionProvider")
    assert attention_placement_note(path, "CPUExecutionProvider") is None
    monkeypatch.setattr(predictor_module.ort, "__version__", "1.25.0")
    assert attention_placement_note(path, "CUDAExecutionProvider") is None
