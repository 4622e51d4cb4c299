"""Activation checkpointing of the ViT blocks: trade compute in the backward for the memory of
the activations saved for it (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost").

Three modes (``ACTIVATION_CHECKPOINTING``), set per block by :func:`apply_activation_checkpointing`:

* ``none``: autograd saves what each op needs, as without checkpointing.
* ``blocks``: each block keeps only its input; its forward runs again in the backward
  (``torch.utils.checkpoint``, non-reentrant).
* ``selective``: each block keeps the outputs of its matrix products and of its attention, and
  recomputes the rest (norms, GELU, residual adds, stochastic depth) in the backward, as DINOv3
  does (``torch.utils.checkpoint.create_selective_checkpoint_contexts``).

The recompute restores the RNG state of the forward (``torch.utils.checkpoint``'s default), so
stochastic depth draws the same masks twice: losses and gradients equal those of ``none``. Both
the unpacked (``VisionTransformer.forward``) and the packed (``models/packed.py``) forwards run
their blocks through :func:`checkpointed`; without gradients (evaluation, the teacher) it is a
plain call.
"""
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

import dino_fast.ops.attention  # noqa: F401  (registers torch.ops.dino_fast.attention_fwd)

ACTIVATION_CHECKPOINTING = ("none", "blocks", "selective")

_aten = torch.ops.aten
SELECTIVE_SAVED_OPS = [  # outputs kept by ``selective``; every other op is recomputed
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.dino_fast.attention_fwd.default,
]


def _check_mode(mode: str):
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation checkpointing {mode!r} is not one of "
                         f"{ACTIVATION_CHECKPOINTING}")


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Set activation checkpointing ``mode`` (``none``, ``blocks``, ``selective``) on every block
    of ``model``: a ``VisionTransformer``, or a wrapper with one as ``backbone``
    (``MultiCropWrapper``, ``PackedMultiCropWrapper``). The parameters, their names and the
    outputs are unchanged; returns ``model``."""
    _check_mode(mode)
    vit = getattr(model, "backbone", model)
    if not hasattr(vit, "blocks"):
        raise TypeError(f"{type(model).__name__} has no ViT blocks to checkpoint")
    for blk in vit.blocks:
        blk.activation_checkpointing = mode
    return model


def checkpointed(mode: str, function, *args):
    """``function(*args)``, checkpointed as ``mode`` says when gradients are recorded."""
    if mode == "none" or not torch.is_grad_enabled():
        return function(*args)
    _check_mode(mode)
    if mode == "blocks":
        return checkpoint(function, *args, use_reentrant=False)
    context_fn = partial(create_selective_checkpoint_contexts, SELECTIVE_SAVED_OPS)
    return checkpoint(function, *args, use_reentrant=False, context_fn=context_fn)
