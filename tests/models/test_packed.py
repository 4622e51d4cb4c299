"""All crops in one packed pass (``dino_fast.models.packed``) against ``MultiCropWrapper``."""
import copy

import pytest
import torch

from dino_fast.models import DINOHead, MultiCropWrapper, VisionTransformer
from dino_fast.models.packed import Packing, packed_multicrop_forward
from dino_fast.models.vision_transformer import drop_path
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


@pytest.mark.parametrize("backend,mode", [(b, "varlen") for b in BACKENDS]
                         + [("reference", "sdpa_split")])
def test_matches_multicrop_wrapper(backend, mode):
    """Head outputs and every parameter gradient equal the unpacked wrapper run in float64."""
    device = device_for(backend)
    model = tiny_wrapper().to(device)
    oracle = copy.deepcopy(model).double().cpu()
    crops = make_crops(device)
    want_out, want_grads = output_and_grads(lambda m, c: m(c), oracle,
                                            [c.double().cpu() for c in crops])
    with use_backend(backend):
        got_out, got_grads = output_and_grads(
            lambda m, c: packed_multicrop_forward(m, c, mode), model, crops)
    assert got_out.shape == (10, 13) and sorted(got_grads) == sorted(want_grads)
    for name, got, want in [("out", got_out, want_out)] + [
            (n, got_grads[n], want_grads[n]) for n in sorted(want_grads)]:
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=2e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def _compile_marks(backend: str) -> list:
    if backend == "reference":
        return [pytest.mark.slow]
    if backend == "triton":
        return [pytest.mark.skipif(triton_skip_reason() is not None,
                                   reason=str(triton_skip_reason()))]
    return []


@pytest.mark.parametrize("backend,mode", [
    pytest.param(b, "varlen", marks=_compile_marks(b))
    for b in BACKENDS] + [pytest.param("reference", "sdpa_split", marks=pytest.mark.slow)])
def test_compile_fullgraph(backend, mode):
    """The packed pass traces with no graph break in both attention modes (the layout is
    static; the reference path never reads ``cu_seqlens`` on the host). 30-40 s each on a CI
    core: the CPU-reference cases run with the slow tests (test_train_step.py compiles the
    whole step with sdpa_split in CI)."""
    device = device_for(backend)
    model, crops = tiny_wrapper().to(device).eval(), make_crops(device)
    torch._dynamo.reset()
    try:
        with use_backend(backend):
            want = packed_multicrop_forward(model, crops, mode)
            compiled = torch.compile(packed_multicrop_forward, backend="aot_eager", fullgraph=True)
            got = compiled(model, crops, mode)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_drop_path_is_per_crop():
    runs = ((8, 3), (8, 2), (16, 1))
    packing = Packing(runs)
    lengths = [length for count, length in runs for _ in range(count)]
    ones = torch.ones(packing.total, 1)
    kept = packing.drop_path(ones, 0.5, training=True)[:, 0]  # (total,)
    per_crop = kept.split(lengths)
    assert all(len(set(c.tolist())) == 1 for c in per_crop), per_crop
    assert set(kept.tolist()) == {0.0, 2.0}  # 32 crops: both outcomes (fails with p 2**-31)
    assert torch.equal(packing.drop_path(ones, 0.5, training=False), ones)


def test_drop_decisions_follow_the_unpacked_distribution():
    """Each crop kept with probability 1 - p and scaled by 1 / (1 - p), independently of the
    other crops, packed as unpacked: per-crop and per-pair keep rates within 5 sigma of the
    Bernoulli law over 2000 draws (seeded, so not flaky)."""
    p, draws, runs = 0.3, 2000, ((2, 4), (6, 2))
    packing = Packing(runs)
    ones = torch.ones(packing.total, 1)
    lengths = [length for count, length in runs for _ in range(count)]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]  # the first token of each crop
    torch.manual_seed(0)
    packed = torch.stack([packing.drop_path(ones, p, True)[starts, 0] for _ in range(draws)])
    unpacked = torch.stack([torch.cat([drop_path(torch.ones(count, length, 1), p, True)[:, 0, 0]
                                       for count, length in runs]) for _ in range(draws)])
    for name, scales in (("packed", packed), ("unpacked", unpacked)):  # (draws, crops)
        assert set(scales.unique().tolist()) == {0.0, float(torch.tensor(1 / (1 - p)))}, name
        kept = (scales > 0).double()
        sigma = ((1 - p) * p / draws) ** 0.5
        assert (kept.mean(0) - (1 - p)).abs().max() < 5 * sigma, (name, kept.mean(0))
        both = kept.T @ kept / draws  # (crops, crops): P(crop i and crop j kept)
        off_diagonal = both[~torch.eye(len(starts), dtype=torch.bool)]
        pair_sigma = ((1 - p) ** 2 * (1 - (1 - p) ** 2) / draws) ** 0.5
        assert (off_diagonal - (1 - p) ** 2).abs().max() < 5 * pair_sigma, name


def test_packing_offsets_are_copied_once_per_layout_and_are_constants_when_compiled():
    """Item 8 of the GPU review: no host-to-device copy of the offsets per eager forward. Under
    torch.compile no cache either: a cache is state that Dynamo guards on, so the second step
    recompiled once it was filled (issue 23); error_on_recompile holds that."""
    layout = ((4, 17), (6, 5))  # 2 x 2 crops of 17 tokens, 3 x 2 crops of 5
    want = [0, 17, 34, 51, 68, 73, 78, 83, 88, 93, 98]
    offsets = Packing(layout).cu_seqlens(torch.device("cpu"))
    assert offsets is Packing(layout).cu_seqlens(torch.device("cpu"))
    assert offsets.dtype == torch.int32 and offsets.tolist() == want
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda x: x + Packing(layout).cu_seqlens(x.device),
                                 fullgraph=True, backend="aot_eager")
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(2):
                assert compiled(torch.zeros(11, dtype=torch.int32)).tolist() == want
    finally:
        torch._dynamo.reset()


def test_attention_dropout_is_refused():
    model = tiny_wrapper(attn_drop_rate=0.1)
    with pytest.raises(ValueError, match="attention dropout"):
        packed_multicrop_forward(model, make_crops("cpu"))
