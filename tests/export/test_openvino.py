"""OpenVINO runs the dynamic ONNX export with ONNX Runtime's outputs, and the file stays valid ONNX.

The dynamic export once failed OpenVINO's CPU compile (a MatMul of a rank-2 and a rank-3 operand
in the positional-embedding resize). Here it compiles, runs at three image sizes and a batch of
two, and matches ONNX Runtime within 1e-4 on the attentions; ONNX's reference evaluator runs the
same file to the same outputs. The predictor, ``infer`` and their ``--runtime`` flag use it.
"""
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from dino_fast.cli.errors import MissingDependencyError  # noqa: E402 (after the skip)
from dino_fast.export import AttentionMapPredictor, export_onnx  # noqa: E402
from dino_fast.infer import main as infer_main  # noqa: E402
from tests.export.test_export import random_vit  # noqa: E402

SIZES = [(224, 224), (160, 256), (96, 128)]  # the training grid, then two interpolated
ATTENTION_TOL, FEATURE_TOL = 1e-4, 1e-4


@pytest.fixture(scope="module", params=[23, 18], ids=["opset23", "opset18"])
def dynamic_export(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("ov") / f"dynamic{request.param}.onnx"
    export_onnx(random_vit("vit_tiny", depth=2), str(path), arch="vit_tiny",
                opset=request.param)
    return str(path)


def images(size, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, *size), dtype=np.float32)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_openvino_matches_onnxruntime_on_the_dynamic_export(dynamic_export, size):
    pytest.importorskip("openvino")
    ort_attn, ort_feat = AttentionMapPredictor(dynamic_export).run(images(size))
    ov = AttentionMapPredictor(dynamic_export, runtime="openvino")
    assert (ov.patch_size, ov.num_heads, ov.image_size) == (16, 3, None)  # its metadata
    ov_attn, ov_feat = ov.run(images(size))
    assert ov_attn.shape == ort_attn.shape == (2, 3, size[0] * size[1] // 256)
    assert np.abs(ov_attn - ort_attn).max() <= ATTENTION_TOL
    assert np.abs(ov_feat - ort_feat).max() <= FEATURE_TOL * np.abs(ort_feat).max()


def test_reference_evaluator_runs_the_dynamic_export(dynamic_export):
    from onnx.reference import ReferenceEvaluator
    x = images((96, 128), batch=1)
    ref_attn, ref_feat = ReferenceEvaluator(dynamic_export).run(None, {"images": x})
    ort_attn, ort_feat = AttentionMapPredictor(dynamic_export).run(x)
    assert np.abs(ref_attn - ort_attn).max() <= ATTENTION_TOL
    assert np.abs(ref_feat - ort_feat).max() <= FEATURE_TOL * np.abs(ort_feat).max()


def test_infer_writes_maps_with_openvino(dynamic_export, tmp_path, capsys):
    pytest.importorskip("openvino")
    from dino_fast.data.folder import bundled_data_path
    image = f"{bundled_data_path()}/animals/cat_chelsea.jpg"
    assert infer_main(["--model", dynamic_export, "--runtime", "openvino", "--images", image,
                       "--image_size", "96", "--output_dir", str(tmp_path)]) == 0
    assert "running on OpenVINO" in capsys.readouterr().out
    assert (tmp_path / "cat_chelsea" / "mask-head2.png").exists()


def test_unknown_runtime_is_refused(dynamic_export):
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'; choose from onnxruntime"):
        AttentionMapPredictor(dynamic_export, runtime="tensorrt")


def test_missing_openvino_says_how_to_install(dynamic_export, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'dino-fast\[openvino\]'"):
        AttentionMapPredictor(dynamic_export, runtime="openvino")
