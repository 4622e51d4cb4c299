"""vit_large in the Hugging Face and timm exports: the names and configs of the full model (built
on the meta device), and one-block models of its width loaded back by the real libraries (the
exports' own checks compare the CLS embedding, within 1e-4)."""
import json

import pytest
import torch

from dino_fast.export.hf_export import export_hf, hf_config
from dino_fast.export.timm_export import export_timm, timm_model
from dino_fast.models import build_vit

pytest.importorskip("safetensors")


def meta_vit_large(patch: int):
    with torch.device("meta"):
        return build_vit("vit_large", patch)


def one_block_vit_large(patch: int):
    """vit_large cut to its first block, with random weights (no full-size model in memory)."""
    vit = meta_vit_large(patch)
    vit.blocks = vit.blocks[:1]
    vit = vit.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in vit.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator)
                        * (0.5 if "embed" in name or "cls" in name else 0.02))
    return vit


@pytest.mark.parametrize("patch,model_args", [(16, {"num_classes": 0}),
                                              (8, {"num_classes": 0, "patch_size": 8})])
def test_timm_names_the_full_model(patch, model_args):
    """timm has vit_large_patch16_224 and no patch-8 ViT-L: that one is the patch-16 model
    built with patch_size=8. The depth (24) is the name's own, so it is not repeated."""
    assert timm_model(meta_vit_large(patch), "vit_large") == ("vit_large_patch16_224",
                                                                model_args)


def test_hf_config_of_the_full_model():
    config = hf_config(meta_vit_large(16))
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["intermediate_size"]) == (1024, 24, 16, 4096)


@pytest.mark.parametrize("patch", [16, 8])
def test_exports_load_back_with_the_same_output(tmp_path, capsys, patch):
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    vit = one_block_vit_large(patch)
    export_timm(vit, str(tmp_path / "timm"), "vit_large")
    export_hf(vit, str(tmp_path / "hf"), "vit_large")
    assert capsys.readouterr().out.count("max abs error of the CLS embedding") == 2
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["architecture"] == "vit_large_patch16_224"
    assert config["model_args"]["depth"] == 1
