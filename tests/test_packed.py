"""All crops in one packed pass (``dino_fast.models.packed``) against ``MultiCropWrapper``."""
import copy

import pytest
import torch

from dino_fast.models import DINOHead, MultiCropWrapper, VisionTransformer
from dino_fast.models.packed import _Packing, packed_multicrop_forward
from dino_fast.ops import use_backend
from tests.conftest import available_backends, device_for, triton_skip_reason

BACKENDS = [b for b in available_backends() if b != "cpp"]  # attention has no C++ kernel


def tiny_wrapper(**vit_kwargs):
    torch.manual_seed(0)
    backbone = VisionTransformer(img_size=[32], patch_size=8, embed_dim=64, depth=2,
                                 num_heads=2, qkv_bias=True, **vit_kwargs)
    return MultiCropWrapper(backbone, DINOHead(64, 13, hidden_dim=32, bottleneck_dim=16))


def make_crops(device):
    """2 global crops of 32 px (17 tokens) and 3 local crops of 16 px (5 tokens), batch 2."""
    return ([torch.randn(2, 3, 32, 32, device=device) for _ in range(2)]
            + [torch.randn(2, 3, 16, 16, device=device) for _ in range(3)])


def output_and_grads(forward, model, crops):
    out = forward(model, crops)
    out.pow(2).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_multicrop_wrapper(backend):
    """Head outputs and every parameter gradient equal the unpacked wrapper run in float64."""
    device = device_for(backend)
    model = tiny_wrapper().to(device)
    oracle = copy.deepcopy(model).double().cpu()
    crops = make_crops(device)
    want_out, want_grads = output_and_grads(lambda m, c: m(c), oracle,
                                            [c.double().cpu() for c in crops])
    with use_backend(backend):
        got_out, got_grads = output_and_grads(packed_multicrop_forward, model, crops)
    assert got_out.shape == (10, 13) and sorted(got_grads) == sorted(want_grads)
    for name, got, want in [("out", got_out, want_out)] + [
            (n, got_grads[n], want_grads[n]) for n in sorted(want_grads)]:
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=2e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.skipif(triton_skip_reason() is not None, reason=str(triton_skip_reason()))
def test_compile_fullgraph():
    """The packed pass traces with no graph break (the reference's per-sequence loop reads
    ``cu_seqlens`` on the host, so the Triton op is the one to compile)."""
    device = device_for("triton")
    model, crops = tiny_wrapper().to(device).eval(), make_crops(device)
    torch._dynamo.reset()
    try:
        with use_backend("triton"):
            want = packed_multicrop_forward(model, crops)
            compiled = torch.compile(packed_multicrop_forward, backend="aot_eager", fullgraph=True)
            got = compiled(model, crops)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_drop_path_is_per_crop():
    lengths = [3, 2, 4, 1] * 8
    packing = _Packing(lengths, torch.device("cpu"))
    ones = torch.ones(sum(lengths), 1)
    kept = packing.drop_path(ones, 0.5, training=True)[:, 0]  # (total,)
    per_crop = kept.split(lengths)
    assert all(len(set(c.tolist())) == 1 for c in per_crop), per_crop
    assert set(kept.tolist()) == {0.0, 2.0}  # 32 crops: both outcomes (fails with p 2**-31)
    assert torch.equal(packing.drop_path(ones, 0.5, training=False), ones)


def test_attention_dropout_is_refused():
    model = tiny_wrapper(attn_drop_rate=0.1)
    with pytest.raises(ValueError, match="attention dropout"):
        packed_multicrop_forward(model, make_crops("cpu"))
