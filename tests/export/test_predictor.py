"""What the ONNX Runtime predictor refuses, and the pixel budget sized from its model.

A model path that is a folder, a PyTorch checkpoint (zip or legacy pickle), safetensors weights
or a damaged ONNX file is a ``ValueError`` that says what the file is and, for weights, the
export command that turns them into an ONNX model.
"""
import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from dino_fast.export.predictor import (  # noqa: E402 (after the skip)
    ATTENTION_COPIES,
    MEMORY_BUDGET,
    AttentionMapPredictor,
    pixel_budget,
)


def tiny_onnx(path):
    """A valid one-node ONNX model (no dino_fast metadata)."""
    helper = onnx.helper
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def write_zip_checkpoint(path):
    torch.save({"teacher": {"w": torch.zeros(2)}}, path)


def write_pickle_checkpoint(path):
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)


def write_safetensors(path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(path))


def write_damaged_onnx(path):
    data = tiny_onnx(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("write,says", [
    (write_zip_checkpoint, "is a PyTorch checkpoint, not an ONNX model; export it first: "
     "python -m dino_fast.export --checkpoint"),
    (write_pickle_checkpoint, "is a PyTorch checkpoint, not an ONNX model; export it first"),
    (write_safetensors, "is safetensors weights, not an ONNX model; export it first"),
    (write_damaged_onnx, "damaged or truncated"),
    (write_empty, "damaged or truncated"),
], ids=["zip-checkpoint", "pickle-checkpoint", "safetensors", "damaged-onnx", "empty"])
def test_a_model_file_that_is_not_onnx_says_what_it_is(tmp_path, write, says):
    path = tmp_path / "model.pth"
    write(path)
    with pytest.raises(ValueError, match="model.pth") as error:
        AttentionMapPredictor(str(path))
    assert says in str(error.value)


def test_the_export_command_never_writes_over_the_checkpoint(tmp_path):
    path = tmp_path / "model.onnx"  # a checkpoint under an ONNX name
    write_zip_checkpoint(path)
    with pytest.raises(ValueError, match="--output .*model-export.onnx$"):
        AttentionMapPredictor(str(path))


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not an ONNX model file"):
        AttentionMapPredictor(str(tmp_path))


def test_onnx_not_from_our_export_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no dino_fast metadata"):
        AttentionMapPredictor(str(tiny_onnx(tmp_path / "m.onnx")))


@pytest.mark.parametrize("heads,patch", [(3, 16), (6, 16), (6, 8), (12, 8)])
def test_pixel_budget_keeps_the_attention_within_the_memory_budget(heads, patch):
    """The largest multiple of patch^2 whose attention, ATTENTION_COPIES float32 copies of
    [heads, N + 1, N + 1] with N = pixels / patch^2, fits in MEMORY_BUDGET."""
    def attention_bytes(pixels):
        return ATTENTION_COPIES * 4 * heads * (pixels // patch**2 + 1) ** 2

    budget = pixel_budget(heads, patch)
    assert budget % patch**2 == 0
    assert attention_bytes(budget) <= MEMORY_BUDGET < attention_bytes(budget + patch**2)


def test_pixel_budget_of_vit_base_8_takes_the_default_image_size():
    """vit_base/8, the most memory-hungry official model, still runs infer's default 480 x 640
    (a 4:3 photo's shorter side at 480) without resizing."""
    assert pixel_budget(12, 8) >= 480 * 640
