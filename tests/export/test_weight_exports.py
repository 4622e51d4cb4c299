"""safetensors, Hugging Face ``transformers`` and timm exports, loaded back by the real libraries.

Each export is compared with our ViT on the CLS embedding at 224 px (within 1e-4, fp32), for
vit_tiny and vit_small at patch 16 and 8 (vit_base differs only in width), from our training
checkpoints and from official-layout ones. Most models keep 1 of their 12 blocks to stay fast:
the exported config says the depth, and block i maps the same way for every i. Positional
embeddings are randomised so that a wrong mapping of them shows.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from dino_fast.models import build_model, build_vit, checkpoint_epoch, load_pretrained

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from dino_fast.export.command import main as export_main  # noqa: E402
from dino_fast.export.hf_export import export_hf  # noqa: E402
from dino_fast.export.safetensors_export import export_safetensors  # noqa: E402
from dino_fast.export.timm_export import export_timm  # noqa: E402
from tests._cli import user_error  # noqa: E402

TOL = 1e-4
MODELS = [("vit_tiny", 16), ("vit_tiny", 8), ("vit_small", 16), ("vit_small", 8)]


def random_vit(arch: str, patch: int, depth: int | None = 1):
    vit = build_vit(arch, patch).eval()
    if depth:
        vit.blocks = vit.blocks[:depth]
    with torch.no_grad():
        vit.pos_embed.normal_(0, 0.5)
        vit.cls_token.normal_(0, 0.5)
    return vit


def images(batch=2, size=224):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def our_checkpoint(teacher, student, epoch=5) -> dict:
    """A training checkpoint as dino_fast.train writes it (MultiCropWrapper keys, head included)."""
    def wrap(vit):
        state = {f"backbone.{k}": v.clone() for k, v in vit.state_dict().items()}
        state["head.last_layer.weight_g"] = torch.ones(64, 1)
        return state
    return {"student": {f"module.{k}": v for k, v in wrap(student).items()},
            "teacher": wrap(teacher), "optimizer": {}, "epoch": epoch, "args": None}


def official_backbone(vit) -> dict:
    """The official released weights' layout (dino_deitsmall16_pretrain.pth): a bare backbone."""
    return {k: v.clone() for k, v in vit.state_dict().items()}


@torch.no_grad()
def assert_close(got, want, what):
    error = float((got - want).abs().max())
    assert error <= TOL, f"{what}: max abs error {error}"


def test_safetensors_round_trip_from_our_checkpoint(tmp_path):
    teacher, student = random_vit("vit_tiny", 16, None), random_vit("vit_tiny", 16, None)
    torch.save(our_checkpoint(teacher, student, epoch=7), tmp_path / "checkpoint.pth")
    out = tmp_path / "weights" / "teacher.safetensors"
    export_main(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--format", "safetensors",
                 "--output", str(out)])
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
        assert set(f.keys()) == set(teacher.state_dict())  # backbone only, no head
    assert {k: metadata[k] for k in ("arch", "patch_size", "embed_dim", "epoch")} == \
        {"arch": "vit_tiny", "patch_size": "16", "embed_dim": "192", "epoch": "7"}
    assert metadata["dino_fast_version"]
    assert checkpoint_epoch(str(out)) == 7
    loaded = build_model(str(out))
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(loaded(images(1, 64)), teacher(images(1, 64)))

    export_main(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--format", "safetensors",
                 "--key", "student", "--output", str(tmp_path / "student.safetensors")])
    student_loaded = build_model(str(tmp_path / "student.safetensors"))
    assert torch.equal(student_loaded.pos_embed, student.pos_embed)


def test_safetensors_with_missing_or_unexpected_tensors_is_refused(tmp_path, capsys):
    vit = random_vit("vit_tiny", 16, None)
    export_safetensors(vit, str(tmp_path / "ok.safetensors"), "vit_tiny")
    tensors = load_file(str(tmp_path / "ok.safetensors"))
    del tensors["blocks.3.mlp.fc2.bias"]
    tensors["head.weight"] = torch.zeros(10, 192)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(RuntimeError, match="missing keys") as err:
        build_model(str(tmp_path / "bad.safetensors"))
    assert "blocks.3.mlp.fc2.bias" in str(err.value) and "head.weight" in str(err.value)
    with pytest.raises(RuntimeError, match="blocks.3.mlp.fc2.bias"):
        load_pretrained(build_vit("vit_tiny"), str(tmp_path / "bad.safetensors"))
    line = user_error(capsys, export_main, ["--checkpoint", str(tmp_path / "bad.safetensors"),
                                            "--format", "hf", "--output", str(tmp_path / "hf")])
    assert "head.weight" in line  # a command: one line, no traceback
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match="junk.safetensors"):
        build_model(str(tmp_path / "junk.safetensors"))


def test_onnx_flags_are_refused_for_other_formats(tmp_path, capsys):
    with pytest.raises(SystemExit):
        export_main(["--format", "hf", "--fp16", "--output", str(tmp_path / "hf")])
    assert "--fp16: for --format onnx only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main(["--format", "safetensors", "--output", str(tmp_path / "w.pth")])
    assert "name the file *.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("arch,patch", MODELS, ids=lambda v: str(v))
def test_hf_export_loads_in_transformers_with_the_same_cls(tmp_path, arch, patch):
    transformers = pytest.importorskip("transformers")
    vit = random_vit(arch, patch)
    export_hf(vit, str(tmp_path), arch, epoch=3, check=False)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", "model.safetensors",
                                            "preprocessor_config.json"]
    model, info = transformers.ViTModel.from_pretrained(
        str(tmp_path), add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.layer_norm_eps == 1e-6 and model.config.hidden_act == "gelu"
    with torch.no_grad():
        got = model.eval()(pixel_values=images()).last_hidden_state[:, 0]
        assert_close(got, vit(images()), f"transformers {arch}/{patch}")
    processor = transformers.ViTImageProcessor.from_pretrained(str(tmp_path))
    assert list(processor.image_mean) == [0.485, 0.456, 0.406]


@pytest.mark.parametrize("arch,patch", MODELS, ids=lambda v: str(v))
def test_timm_export_loads_in_timm_with_the_same_output(tmp_path, arch, patch):
    timm = pytest.importorskip("timm")
    vit = random_vit(arch, patch)
    export_timm(vit, str(tmp_path), arch, check=False)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_args"]["depth"] == 1
    model = timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                              pretrained_cfg_overlay={"file": str(tmp_path / "model.safetensors")})
    with torch.no_grad():
        assert_close(model.eval()(images()), vit(images()), f"timm {arch}/{patch}")
    if hasattr(timm.models._hub, "load_model_config_from_path"):  # timm's `local-dir:` models
        model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
        with torch.no_grad():
            assert_close(model.eval()(images()), vit(images()), f"timm local-dir {arch}/{patch}")


def test_full_depth_exports_from_an_official_checkpoint(tmp_path):
    """The issue's calls, verbatim, on a full 12-block ViT-S/16 in the official layout; and the
    timm export's weights load back into dino_fast."""
    transformers = pytest.importorskip("transformers")
    timm = pytest.importorskip("timm")
    vit = random_vit("vit_small", 16, None)
    torch.save(official_backbone(vit), tmp_path / "dino_deitsmall16_pretrain.pth")
    for fmt in ("hf", "timm"):
        export_main(["--checkpoint", str(tmp_path / "dino_deitsmall16_pretrain.pth"),
                     "--format", fmt, "--output", str(tmp_path / fmt), "--no_check"])
    hf = transformers.ViTModel.from_pretrained(str(tmp_path / "hf"), add_pooling_layer=False)
    timm_model = timm.create_model(
        "vit_small_patch16_224", num_classes=0, pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "timm" / "model.safetensors")))
    with torch.no_grad():
        want = vit(images(1))
        assert_close(hf.eval()(pixel_values=images(1)).last_hidden_state[:, 0], want, "hf")
        assert_close(timm_model.eval()(images(1)), want, "timm")
    reloaded = build_model(str(tmp_path / "timm" / "model.safetensors"))
    assert torch.equal(reloaded.pos_embed, vit.pos_embed)


def test_export_checks_catch_a_wrong_model(tmp_path, capsys):
    """The checks the exports run by default load the files back and compare; a model that
    differs from the files is reported."""
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    vit = random_vit("vit_tiny", 16)
    export_hf(vit, str(tmp_path / "hf"), "vit_tiny")
    export_timm(vit, str(tmp_path / "timm"), "vit_tiny")
    assert capsys.readouterr().out.count("max abs error of the CLS embedding") == 2
    with torch.no_grad():
        vit.norm.bias.add_(1e-3)
    from dino_fast.export.hf_export import check_hf
    from dino_fast.export.timm_export import check_timm
    with pytest.raises(RuntimeError, match="disagrees"):
        check_hf(str(tmp_path / "hf"), vit)
    with pytest.raises(RuntimeError, match="disagrees"):
        check_timm(str(tmp_path / "timm"), vit, "vit_tiny")


def test_exports_work_without_the_optional_libraries(tmp_path, monkeypatch, capsys):
    """Writing needs safetensors only; without transformers or timm the check is skipped, said."""
    for name in ("transformers", "timm", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    vit = random_vit("vit_tiny", 16)
    export_hf(vit, str(tmp_path / "hf"), "vit_tiny")
    export_timm(vit, str(tmp_path / "timm"), "vit_tiny")
    out = capsys.readouterr().out
    assert "transformers is not installed" in out and "timm is not installed" in out
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert (tmp_path / "timm" / "config.json").exists()


def test_the_check_fails_when_either_side_is_not_finite():
    """NaN minus NaN is NaN, which no tolerance test rejects unless asked: both sides are checked
    for finite values first, and the message names the side that is not."""
    from dino_fast.export.parity import check_cls_parity

    vit = random_vit("vit_tiny", 16)
    with pytest.raises(RuntimeError, match="output of timm is not finite"):
        check_cls_parity(vit, lambda x: vit(x) * float("nan"), "timm")
    with torch.no_grad():
        vit.norm.bias[0] = float("inf")
    with pytest.raises(RuntimeError, match="output of timm and dino_fast is not finite"):
        check_cls_parity(vit, vit, "timm")


def test_a_checkpoint_that_is_not_one_is_one_line_saying_what_it_is(tmp_path, capsys):
    (tmp_path / "empty.pth").write_bytes(b"")
    line = user_error(capsys, export_main, ["--checkpoint", str(tmp_path / "empty.pth"),
                                            "--format", "safetensors",
                                            "--output", str(tmp_path / "w.safetensors")])
    assert "empty file" in line and not (tmp_path / "w.safetensors").exists()


def test_hf_export_checks_itself_when_run_from_the_checkout(tmp_path):
    """``python -m dino_fast.export`` from the repository root, as a user of ``pip install -e .``
    runs it: the checkout's ``kernels/`` folder is first on ``sys.path``, and transformers 5
    imports Hugging Face's ``kernels`` package; the check still loads the export back."""
    pytest.importorskip("transformers")
    torch.save(official_backbone(random_vit("vit_tiny", 16, None)), tmp_path / "backbone.pth")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-m", "dino_fast.export", "--checkpoint",
                           str(tmp_path / "backbone.pth"), "--format", "hf", "--output",
                           str(tmp_path / "hf")], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "transformers ViTModel vs dino_fast" in done.stdout, done.stdout + done.stderr[-2000:]
