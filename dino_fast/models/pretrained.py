"""Load weights from our checkpoints and the official DINO layouts into a model.

Accepted: a full training checkpoint (``{'student', 'teacher', ...}``; ``teacher`` by default),
a ``MultiCropWrapper`` state dict (``backbone.*``/``head.*``), a plain backbone state dict, with or
without the ``module.`` prefix of DistributedDataParallel, and the parametrize form of the weight
norm (``parametrizations.weight.original0/1``), which is mapped to ``weight_g``/``weight_v``.
A path ending in ``.safetensors`` is read with safetensors (tensors only, nothing is unpickled):
the backbone files ``python -m dino_fast.export --format safetensors`` writes, and the
``model.safetensors`` of a ``--format timm`` export.

What is loaded is checked for what it claims to be: a file that is not a checkpoint says what it
is instead (empty, ONNX, text, ...); the weights of a Hugging Face ``transformers`` ViT are
recognised and the error says how to load them; tensors that are not floating point, or that
hold NaN or infinite values, are refused by name.
"""
import os
import re
import warnings

import torch
import torch.nn as nn

from dino_fast.models.checkpoint import file_kind, load_file
from dino_fast.models.vision_transformer import ARCH_DIMS, build_vit

SAFETENSORS_SUFFIX = ".safetensors"
_HF_NAMES = re.compile(r"^(vit\.|dinov2\.)?(embeddings\.patch_embeddings\.|encoder\.layer\.\d+\.)")
_PARAMETRIZE_KEYS = {"parametrizations.weight.original0": "weight_g",
                     "parametrizations.weight.original1": "weight_v"}


def read_weights(path) -> dict:
    """What the checkpoint file ``path`` holds: the tensors of a ``.safetensors`` file, or the
    object of a PyTorch pickle read without running code (see :func:`load_file`). A folder is
    refused, saying what it holds."""
    if os.path.isdir(path):
        raise RuntimeError(_folder_message(str(path)))
    if not str(path).endswith(SAFETENSORS_SUFFIX):
        return load_file(path)
    from safetensors.torch import load_file as load_safetensors
    try:
        return load_safetensors(str(path), device="cpu")
    except Exception as err:  # SafetensorError, OSError: the file is missing or not safetensors
        raise RuntimeError(f"cannot read {path}: {_safetensors_cause(str(path), err)}") from err


def _safetensors_cause(path: str, err: Exception) -> str:
    """Why safetensors could not read ``path``, in words (its own message when no better)."""
    if not os.path.isfile(path):
        return str(err)
    if os.path.getsize(path) == 0:
        return "empty file"
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return "not safetensors: looks like a PyTorch checkpoint (name it *.pth)"
    kind = file_kind(head)
    if kind is None or "safetensors" in kind:
        return f"a damaged or truncated safetensors file ({err})"
    return f"not safetensors: {kind}"


def _folder_message(folder: str) -> str:
    """Why the folder ``folder`` is not read as a checkpoint, and what to give instead."""
    weights = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(weights):
        return f"{folder} is a folder, not a checkpoint file"
    from safetensors import safe_open
    try:
        with safe_open(weights, framework="pt") as f:
            names = list(f.keys())
    except Exception:  # not readable: the plain answer below still holds
        names = []
    if is_hf_vit(names):
        return hf_vit_message(folder)
    return f"{folder} is a folder: give its weights file, {weights}"


def is_hf_vit(names) -> bool:
    """Whether the tensor ``names`` are those of a Hugging Face ``transformers`` ViT
    (``embeddings.patch_embeddings...``, ``encoder.layer.N...``)."""
    return any(_HF_NAMES.match(name) for name in names)


def hf_vit_message(source) -> str:
    """What to say when ``source`` holds a Hugging Face ``transformers`` ViT's weights."""
    return (f"{source} holds a Hugging Face transformers ViT (embeddings.patch_embeddings..., "
            "encoder.layer.N...): load it with transformers (ViTModel.from_pretrained(folder)); "
            "dino_fast reads its own, official DINO or timm weights")


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
    present; a Hugging Face ``transformers`` ViT's is refused, saying how to load it."""
    source = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else "the checkpoint"
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_weights(checkpoint)
    if not isinstance(checkpoint, dict):
        raise TypeError(f"a checkpoint must be a dict, got {type(checkpoint).__name__}")
    if key in checkpoint and isinstance(checkpoint[key], dict):
        checkpoint = checkpoint[key]
    elif any(isinstance(v, dict) for v in checkpoint.values()) and \
            not any(torch.is_tensor(v) for v in checkpoint.values()):
        raise KeyError(f"checkpoint has no {key!r} entry; it has {sorted(checkpoint)}")
    state = normalize_keys(checkpoint)
    if is_hf_vit(state):
        raise ValueError(hf_vit_message(source))
    return state


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
    check_values(state, own)
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


def check_values(state: dict, own: dict):
    """Refuse, by name, the entries of ``state`` for the model's tensors ``own`` that are not
    tensors, that are not floating point where the model's are (integer, bool: a cast would
    silently truncate, or make 0/1 weights), or that hold NaN or infinite values (the weights of
    a diverged run, which make every output NaN)."""
    loaded = {k: v for k, v in state.items() if k in own}
    wrong = [f"{k} ({v.dtype if torch.is_tensor(v) else type(v).__name__})"
             for k, v in loaded.items() if not torch.is_tensor(v)
             or (own[k].is_floating_point() and not v.is_floating_point())]
    if wrong:
        raise RuntimeError(f"checkpoint entries that are not floating-point tensors as the "
                           f"model's ({len(wrong)}): {', '.join(wrong[:20])}")
    nonfinite = [k for k, v in loaded.items()
                 if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise RuntimeError(f"checkpoint tensors with NaN or infinite values ({len(nonfinite)}; "
                           f"a diverged run?): {', '.join(nonfinite[:20])}")


def detect_arch(state_dict: dict) -> tuple[str, int] | None:
    """``(arch, patch_size)`` of the ViT whose weights ``state_dict`` holds, or None if unknown."""
    state = {k.removeprefix("backbone."): v for k, v in state_dict.items()}
    weight = state.get("patch_embed.proj.weight")  # (dim, 3, p, p)
    if not torch.is_tensor(weight) or weight.ndim != 4:
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
