"""Activation checkpointing (``dino_fast.models.checkpointing``): the same loss and gradients as
without it, on the unpacked and packed forwards, eager and compiled, with stochastic depth; and
the memory it saves, measured by ``dino_fast.profiling.saved_memory.SavedMemory``.

Equality is checked in fp32 to 1e-6 relative (atol 1e-7): the recompute runs the same kernels on
the same values, so the differences, if any, are rounding in the gradient sums.
"""
import copy

import pytest
import torch

from dino_fast.models import (
    ACTIVATION_CHECKPOINTING,
    DINOHead,
    MultiCropWrapper,
    apply_activation_checkpointing,
    vit_small,
)
from dino_fast.models.packed import packed_multicrop_forward
from dino_fast.profiling.saved_memory import saved_bytes_per_image
from tests.models.test_packed import make_crops, tiny_wrapper

MODES = [m for m in ACTIVATION_CHECKPOINTING if m != "none"]
FORWARDS = {"unpacked": lambda model, crops: model(crops),
            "packed_varlen": lambda model, crops: packed_multicrop_forward(model, crops, "varlen"),
            "packed_sdpa_split": lambda model, crops: packed_multicrop_forward(model, crops,
                                                                               "sdpa_split")}


def loss_and_grads(model, forward, crops, seed=0):
    """The loss of one training-mode step from RNG seed ``seed``, and every parameter's grad."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = forward(model, crops).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def assert_same(got, want):
    (got_loss, got_grads), (want_loss, want_grads) = got, want
    assert sorted(got_grads) == sorted(want_grads)
    for name, g, w in [("loss", got_loss, want_loss)] + [
            (n, got_grads[n], want_grads[n]) for n in sorted(want_grads)]:
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("forward", sorted(FORWARDS))
@pytest.mark.parametrize("mode", MODES)
def test_loss_and_gradients_equal_none_with_stochastic_depth(mode, forward):
    """The recompute sees the forward's random draws: with drop_path_rate 0.5 the step equals
    ``none`` run from the same seed, while another seed gives another loss (the draws matter)."""
    model, crops = tiny_wrapper(drop_path_rate=0.5), make_crops("cpu")
    want = loss_and_grads(model, FORWARDS[forward], crops)
    other_seed = loss_and_grads(model, FORWARDS[forward], crops, seed=1)
    assert not torch.allclose(other_seed[0], want[0])
    apply_activation_checkpointing(model, mode)
    assert_same(loss_and_grads(model, FORWARDS[forward], crops), want)


def compiled_loss_and_grads(model, mode, crops):
    apply_activation_checkpointing(model, mode)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        return loss_and_grads(model, lambda _, c: compiled(c), crops)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("mode", MODES)
def test_compiled_step_equals_compiled_none(mode):
    """``torch.compile`` (aot_eager) traces the checkpointed blocks with no graph break, forward
    and backward, with stochastic depth (compiled against compiled: compiling alone reorders
    some sums)."""
    model, crops = tiny_wrapper(drop_path_rate=0.5), make_crops("cpu")
    want = compiled_loss_and_grads(model, "none", crops)
    assert_same(compiled_loss_and_grads(model, mode, crops), want)


@pytest.mark.parametrize("mode", MODES)
def test_evaluation_and_attention_maps_are_unaffected(mode):
    model, crops = tiny_wrapper(), make_crops("cpu")
    checkpointed = apply_activation_checkpointing(copy.deepcopy(model), mode).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(checkpointed(crops), model(crops), rtol=0, atol=0)
        image = crops[0]
        torch.testing.assert_close(checkpointed.backbone.get_last_selfattention(image),
                                   model.backbone.get_last_selfattention(image), rtol=0, atol=0)


def test_applies_to_a_bare_vit_and_names_are_unchanged():
    model = tiny_wrapper()
    names = list(model.state_dict())
    apply_activation_checkpointing(model.backbone, "blocks")
    assert all(blk.activation_checkpointing == "blocks" for blk in model.backbone.blocks)
    assert list(model.state_dict()) == names


def test_unknown_modes_and_models_are_refused():
    with pytest.raises(ValueError, match="'layers' is not one of"):
        apply_activation_checkpointing(tiny_wrapper(), "layers")
    with pytest.raises(TypeError, match="Linear has no ViT blocks"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2), "blocks")


def test_blocks_keeps_at_most_a_quarter_of_the_activations_of_none():
    """The issue's goal, on vit_small/16 (one 224 px and two 96 px crops of one image, with a
    small head): ``blocks`` keeps <= 1/4 of the bytes ``none`` keeps, ``selective`` in between."""
    torch.manual_seed(0)
    model = MultiCropWrapper(vit_small(drop_path_rate=0.1), DINOHead(384, 1024))
    crops = [torch.randn(1, 3, 224, 224)] + [torch.randn(1, 3, 96, 96)] * 2
    saved = {mode: saved_bytes_per_image(apply_activation_checkpointing(model, mode), crops)
             for mode in ACTIVATION_CHECKPOINTING}
    assert saved["blocks"] <= saved["none"] / 4, saved
    assert saved["blocks"] < saved["selective"] < saved["none"], saved
