"""Weights are checked for what they claim (dino_fast/models/pretrained.py, and the reading side
of checkpoint.py): a file that is not a checkpoint says what it is, never suggesting an unsafe
``weights_only=False`` load; tensors that are not floating point or not finite are refused by
name; a Hugging Face ``transformers`` ViT's weights are recognised and the message says how to
load them."""
import math
import os

import pytest
import torch

from dino_fast.models import build_model, build_vit, load_pretrained


def tiny_vit():
    vit = build_vit("vit_tiny", 16).eval()
    vit.blocks = vit.blocks[:1]
    return vit


class _Payload:
    """A pickled object that is not a tensor, container or number."""


def onnx_bytes(tmp_path) -> bytes:
    onnx = pytest.importorskip("onnx")
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    onnx.save(model, str(tmp_path / "model.onnx"))
    return (tmp_path / "model.onnx").read_bytes()


def safetensors_bytes(tmp_path) -> bytes:
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3)}, str(tmp_path / "a.safetensors"))
    return (tmp_path / "a.safetensors").read_bytes()


def checkpoint_bytes(tmp_path) -> bytes:
    torch.save(tiny_vit().state_dict(), tmp_path / "good.pth")
    return (tmp_path / "good.pth").read_bytes()


FILES = {  # what the file holds -> what the message says
    "empty": (lambda tmp: b"", "empty file"),
    "truncated": (lambda tmp: checkpoint_bytes(tmp)[:5000], "truncated"),
    "onnx": (onnx_bytes, "not a PyTorch checkpoint: looks like ONNX"),
    "safetensors": (safetensors_bytes, "looks like safetensors: name it *.safetensors"),
    "text": (lambda tmp: b"weights go here\n", "not a PyTorch checkpoint: looks like text"),
    "html": (lambda tmp: b"<!DOCTYPE html>\n<html><body>404</body></html>", "HTML page"),
}


@pytest.mark.parametrize("kind", FILES)
def test_a_file_that_is_not_a_checkpoint_says_what_it_is(tmp_path, kind):
    content, says = FILES[kind]
    path = tmp_path / "weights.pth"
    path.write_bytes(content(tmp_path))
    with pytest.raises(RuntimeError) as err:
        build_model(str(path))
    message = str(err.value)
    assert says in message and str(path) in message, message
    assert "weights_only" not in message and "\n" not in message


def test_pickled_objects_are_named_and_no_unsafe_load_is_suggested(tmp_path):
    torch.save({"teacher": _Payload()}, tmp_path / "payload.pth")
    with pytest.raises(RuntimeError) as err:
        build_model(str(tmp_path / "payload.pth"))
    message = str(err.value)
    assert "_Payload" in message and "not loaded" in message
    assert "weights_only" not in message and "trust" not in message


@pytest.mark.parametrize("content,says", [
    (b"", "empty file"), (b"PK\x03\x04 rest of a zip", "looks like a PyTorch checkpoint"),
    (None, "damaged or truncated safetensors")])
def test_a_safetensors_file_that_is_not_says_what_it_is(tmp_path, content, says):
    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors_bytes(tmp_path)[:-4] if content is None else content)
    with pytest.raises(RuntimeError, match=f"cannot read {path}") as err:
        build_model(str(path))
    assert says in str(err.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_tensors_that_are_not_floating_point_are_refused_by_name(dtype):
    state = tiny_vit().state_dict()
    state["blocks.0.norm1.weight"] = state["blocks.0.norm1.weight"].to(dtype)
    with pytest.raises(RuntimeError, match=rf"blocks\.0\.norm1\.weight \({dtype}\)"):
        load_pretrained(tiny_vit(), state)


def test_entries_that_are_not_tensors_are_refused_by_name():
    state = tiny_vit().state_dict()
    state["pos_embed"] = [0.0] * 10
    with pytest.raises(RuntimeError, match=r"pos_embed \(list\)"):
        load_pretrained(tiny_vit(), state)
    with pytest.raises(RuntimeError, match=r"pos_embed \(list\)"):
        build_model(state)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_tensors_are_refused_by_name(tmp_path, value):
    state = build_vit("vit_tiny", 16).state_dict()
    state["blocks.3.mlp.fc1.weight"][5, 7] = value
    state["norm.bias"][0] = value
    torch.save(state, tmp_path / "diverged.pth")
    with pytest.raises(RuntimeError, match="NaN or infinite") as err:
        build_model(str(tmp_path / "diverged.pth"))
    assert "blocks.3.mlp.fc1.weight" in str(err.value) and "norm.bias" in str(err.value)
    assert "pos_embed" not in str(err.value)


def test_half_precision_weights_still_load():
    vit = tiny_vit()
    state = {k: v.half() for k, v in vit.state_dict().items()}
    other = tiny_vit()
    load_pretrained(other, state)
    assert other.pos_embed.dtype == torch.float32
    torch.testing.assert_close(other.pos_embed, vit.pos_embed.half().float())


def hf_folder(tmp_path):
    """A Hugging Face transformers ViTModel folder (our hf export: transformers' names)."""
    pytest.importorskip("safetensors")
    from dino_fast.export.hf_export import export_hf

    export_hf(build_vit("vit_tiny", 16), str(tmp_path / "hf"), "vit_tiny", check=False)
    return tmp_path / "hf"


def test_hugging_face_weights_say_how_to_load_them(tmp_path):
    from safetensors.torch import load_file

    folder = hf_folder(tmp_path)
    hf_state = load_file(str(folder / "model.safetensors"))
    torch.save({f"vit.{k}": v for k, v in hf_state.items()}, tmp_path / "classifier.pth")
    for given in (folder, folder / "model.safetensors", tmp_path / "classifier.pth"):
        with pytest.raises((RuntimeError, ValueError)) as err:
            build_model(str(given))
        message = str(err.value)
        assert "Hugging Face transformers ViT" in message and str(given) in message, message
        assert "ViTModel.from_pretrained" in message


def test_other_folders_say_what_to_give(tmp_path):
    folder = hf_folder(tmp_path)
    os.remove(folder / "model.safetensors")
    with pytest.raises(RuntimeError, match=f"{folder} is a folder, not a checkpoint file"):
        build_model(str(folder))
    timm_like = tmp_path / "timm"
    timm_like.mkdir()
    from safetensors.torch import save_file
    save_file(build_vit("vit_tiny", 16).state_dict(), str(timm_like / "model.safetensors"))
    with pytest.raises(RuntimeError, match="give its weights file"):
        build_model(str(timm_like))
    build_model(str(timm_like / "model.safetensors"))  # the file itself loads
