"""Load weights from our checkpoints and the official DINO layouts into a model.

Accepted: a full training checkpoint (``{'student', 'teacher', ...}``; ``teacher`` by default),
a ``MultiCropWrapper`` state dict (``backbone.*``/``head.*``), a plain backbone state dict, with or
without the ``module.`` prefix of DistributedDataParallel, and the parametrize form of the weight
norm (``parametrizations.weight.original0/1``), which is mapped to ``weight_g``/``weight_v``.
"""
import os

import torch
import torch.nn as nn

from dino_fast.checkpoint import load_file

_PARAMETRIZE_KEYS = {"parametrizations.weight.original0": "weight_g",
                     "parametrizations.weight.original1": "weight_v"}


def extract_state_dict(checkpoint, key: str = "teacher") -> dict:
    """The state dict inside ``checkpoint`` (a path or a loaded object), under ``key`` if present."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_file(checkpoint)
    if not isinstance(checkpoint, dict):
        raise TypeError(f"a checkpoint must be a dict, got {type(checkpoint).__name__}")
    if key in checkpoint and isinstance(checkpoint[key], dict):
        checkpoint = checkpoint[key]
    elif any(isinstance(v, dict) for v in checkpoint.values()) and \
            not any(torch.is_tensor(v) for v in checkpoint.values()):
        raise KeyError(f"checkpoint has no {key!r} entry; it has {sorted(checkpoint)}")
    return normalize_keys(checkpoint)


def normalize_keys(state_dict: dict) -> dict:
    """Strip ``module.`` and map the parametrize weight-norm names to the official ones."""
    out = {}
    for name, value in state_dict.items():
        name = name.removeprefix("module.")
        for new_form, official in _PARAMETRIZE_KEYS.items():
            name = name.replace(new_form, official)
        out[name] = value
    return out


def load_pretrained(model: nn.Module, checkpoint, key: str = "teacher", strict: bool = True):
    """Load ``checkpoint`` into ``model`` (a backbone, or a ``MultiCropWrapper``).

    ``backbone.`` prefixes are stripped when ``model`` is a bare backbone (its ``head.*`` keys
    are then ignored). With ``strict``, any missing, unexpected or mis-shaped key raises an error
    that lists them; otherwise they are returned as ``(missing, unexpected)``.
    """
    state = extract_state_dict(checkpoint, key)
    own = model.state_dict()
    if not any(k.startswith("backbone.") for k in own):
        if any(k.startswith("backbone.") for k in state):
            state = {k.removeprefix("backbone."): v for k, v in state.items()
                     if k.startswith("backbone.")}
    shape_errors = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected or shape_errors):
        raise RuntimeError(
            "checkpoint does not match the model (wrong --arch or --patch_size?)\n"
            f"  missing keys ({len(missing)}): {missing[:20]}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}\n"
            f"  shape mismatches ({len(shape_errors)}): {shape_errors[:20]}")
    if shape_errors:
        raise RuntimeError("checkpoint shapes do not match the model: " + "; ".join(shape_errors))
    model.load_state_dict(state, strict=False)
    return missing, unexpected
