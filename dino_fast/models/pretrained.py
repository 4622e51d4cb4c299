"""Load weights from our checkpoints and the official DINO layouts into a model.

Accepted: a full training checkpoint (``{'student', 'teacher', ...}``; ``teacher`` by default),
a ``MultiCropWrapper`` state dict (``backbone.*``/``head.*``), a plain backbone state dict, with or
without the ``module.`` prefix of DistributedDataParallel, and the parametrize form of the weight
norm (``parametrizations.weight.original0/1``), which is mapped to ``weight_g``/``weight_v``.
A path ending in ``.safetensors`` is read with safetensors (tensors only, nothing is unpickled):
the backbone files ``python -m dino_fast.export --format safetensors`` writes, and the
``model.safetensors`` of a ``--format timm`` export.
"""
import os
import warnings

import torch
import torch.nn as nn

from dino_fast.models.checkpoint import load_file
from dino_fast.models.vision_transformer import ARCH_DIMS, build_vit

SAFETENSORS_SUFFIX = ".safetensors"
_PARAMETRIZE_KEYS = {"parametrizations.weight.original0": "weight_g",
                     "parametrizations.weight.original1": "weight_v"}


def read_weights(path) -> dict:
    """What the checkpoint file ``path`` holds: the tensors of a ``.safetensors`` file, or the
    object of a PyTorch pickle read without running code (see :func:`load_file`)."""
    if not str(path).endswith(SAFETENSORS_SUFFIX):
        return load_file(path)
    from safetensors.torch import load_file as load_safetensors
    try:
        return load_safetensors(str(path), device="cpu")
    except Exception as err:  # SafetensorError, OSError: the file is missing or not safetensors
        raise RuntimeError(f"cannot read {path}: {err}") from err


def checkpoint_epoch(path) -> int | None:
    """The epochs trained that ``path`` records (a training checkpoint's ``epoch``, a
    ``.safetensors`` file's ``epoch`` metadata), or None when it records none."""
    if str(path).endswith(SAFETENSORS_SUFFIX):
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            epoch = (f.metadata() or {}).get("epoch", "")
        return int(epoch) if epoch.isdigit() else None
    checkpoint = load_file(path)
    epoch = checkpoint.get("epoch") if isinstance(checkpoint, dict) else None
    return int(epoch) if isinstance(epoch, int) else None


def extract_state_dict(checkpoint, key: str = "teacher") -> dict:
    """The state dict inside ``checkpoint`` (a path or a loaded object), under ``key`` if
    present."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_weights(checkpoint)
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


def detect_arch(state_dict: dict) -> tuple[str, int] | None:
    """``(arch, patch_size)`` of the ViT whose weights ``state_dict`` holds, or None if unknown."""
    state = {k.removeprefix("backbone."): v for k, v in state_dict.items()}
    weight = state.get("patch_embed.proj.weight")  # (dim, 3, p, p)
    if weight is None or weight.ndim != 4:
        return None
    arch = next((a for a, (dim, _) in ARCH_DIMS.items() if dim == weight.shape[0]), None)
    return (arch, int(weight.shape[-1])) if arch else None


def build_model(checkpoint=None, arch: str | None = None, patch_size: int | None = None,
                key: str = "teacher") -> torch.nn.Module:
    """The ViT of ``checkpoint`` in eval mode with eager attention (random weights when None).

    ``arch``/``patch_size`` default to what the checkpoint holds (vit_small/16 without one); when
    given and different from the checkpoint, the error says which model it holds.
    """
    state = None
    if checkpoint is None:
        warnings.warn("no checkpoint given: the ViT has random weights (demo only)", stacklevel=2)
    else:
        state = extract_state_dict(checkpoint, key)
        found = detect_arch(state)
        if found:
            if (arch or found[0], patch_size or found[1]) != found:
                raise ValueError(f"the checkpoint holds a {found[0]}/{found[1]} ViT, not "
                                 f"{arch or found[0]}/{patch_size or found[1]}: pass "
                                 f"--arch {found[0]} --patch_size {found[1]}")
            arch, patch_size = found
    model = build_vit(arch or "vit_small", patch_size or 16)
    if state is not None:
        load_pretrained(model, state)  # raises listing missing / unexpected keys
    model.set_attn_backend("eager")
    return model.eval()
