"""DINO's per-parameter gradient clipping as one in-place op over the list of gradients: each
gradient scaled by ``min(clip / (norm + 1e-6), 1)`` of its own norm (official ``utils.py``
``clip_gradients``; not a global norm).

1. ``clip_gradients_reference``: the readable spec and test oracle, the foreach code it replaces.
   Its ``_foreach_mul_`` takes one 0-d tensor per gradient, whose shapes differ, so PyTorch's
   foreach fast path does not apply: one multiply kernel per parameter (~158 for ViT-S + head).
2. ``dino_fast::clip_gradients_``: a ``torch.library`` custom op that mutates ``grads``
   (declared), run by the Triton multi-tensor kernel (``dino_fast.kernels.clip``: one launch),
   the C++ kernel (``dino_fast.ops._cpp``) or the reference, as dispatched.

Kernel contract (Triton and C++ alike)::

    clip_gradients_(grads: list of T contiguous tensors of one dtype on norms' device, scaled in
                    place; norms [T]; clip: float) -> None

The coefficients are computed and applied on the device, from ``norms`` in device memory: no
value goes to the host, so there is no sync. What the kernels take (:func:`kernel_accepts`):
float32 gradients and norms (both kernels), bfloat16 and float16 (Triton); anything else (mixed
dtypes, a non-contiguous gradient, a gradient on another device) runs the reference, which
gives the same values, one kernel per gradient.
"""
import torch

from dino_fast.ops import _backend

_KERNEL_DTYPES = {"triton": (torch.float32, torch.bfloat16, torch.float16),
                  "cpp": (torch.float32,)}


def clip_gradients_reference(grads: list[torch.Tensor], norms: torch.Tensor,
                             clip: float) -> None:
    """``grads[i] *= min(clip / (norms[i] + 1e-6), 1)``, in place."""
    if not grads:
        return  # _foreach_mul_ refuses an empty list
    coefs = torch.clamp(clip / (norms + 1e-6), max=1.0)  # scale only above clip
    torch._foreach_mul_(grads, list(coefs.unbind()))


def check_norms(grads: list[torch.Tensor], norms: torch.Tensor):
    """Raise a clear error unless ``norms`` is one value per gradient."""
    if norms.dim() != 1 or norms.shape[0] != len(grads):
        raise ValueError(f"norms must be [{len(grads)}] (one per gradient), "
                         f"got {tuple(norms.shape)}")


def kernel_accepts(grads: list[torch.Tensor], norms: torch.Tensor, backend: str) -> bool:
    """Whether ``backend``'s kernel takes these tensors: one dtype it handles for all gradients
    and the norms, every gradient contiguous and on the norms' device."""
    dtype = norms.dtype
    return dtype in _KERNEL_DTYPES[backend] and all(
        g.dtype == dtype and g.device == norms.device and g.is_contiguous() for g in grads)


@torch.library.custom_op("dino_fast::clip_gradients_", mutates_args=("grads",))
def clip_gradients_op(grads: list[torch.Tensor], norms: torch.Tensor, clip: float) -> None:
    """Scale each gradient in place by its clipping coefficient (see the module docstring)."""
    check_norms(grads, norms)
    backend = _backend.resolve("clip_gradients", norms.device)
    if backend == "triton" and kernel_accepts(grads, norms, backend):
        from dino_fast.kernels.clip import clip_gradients_ as triton_clip_gradients_
        triton_clip_gradients_(grads, norms, clip)
    elif backend == "cpp" and kernel_accepts(grads, norms, backend):
        from dino_fast.ops import _cpp
        _cpp.clip_gradients_(grads, norms, clip)
    else:
        clip_gradients_reference(grads, norms, clip)


@clip_gradients_op.register_fake
def _(grads, norms, clip):
    check_norms(grads, norms)
    return None


def clip_gradients_(grads: list[torch.Tensor], norms: torch.Tensor, clip: float) -> None:
    """Clip each gradient to norm ``clip`` on its own, in place, given its norm ``norms[i]``
    (official: ``coef = clip / (norm + 1e-6)``, applied when below 1). One kernel for all the
    gradients where a kernel takes them; dispatched by ``DINO_FAST_BACKEND``."""
    check_norms(grads, norms)
    if _backend.resolve("clip_gradients", norms.device) == "reference":
        clip_gradients_reference(grads, norms, clip)
        return
    clip_gradients_op(grads, norms, float(clip))
