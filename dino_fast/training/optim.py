"""Optimisation pieces of the official recipe: parameter groups, LARS, per-parameter gradient
clipping and freezing the last layer (official ``utils.py``)."""
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from dino_fast.ops.clip import clip_gradients_


def get_params_groups(model: nn.Module) -> list[dict]:
    """Regularised parameters first, then biases and 1-D parameters (norms) with no weight decay."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al. 2017), skipping 1-D params."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim != 1:  # weight decay and trust ratio only for weight matrices
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(update)
                    ratio = torch.where((p_norm > 0) & (u_norm > 0),
                                        group["eta"] * p_norm / u_norm, torch.ones_like(p_norm))
                    update = update.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(state["mu"], alpha=-group["lr"])


def fused_supported(params_groups: list[dict]) -> bool:
    """Whether PyTorch has a fused (single-kernel) AdamW/SGD for all these parameters: floating
    point, on one device type that its fused kernels support (CUDA and the CPU among them)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        supported = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a PyTorch without the helper
        supported = {"cuda", "cpu"}
    params = [p for group in params_groups for p in group["params"]]
    return bool(params) and len({p.device.type for p in params}) == 1 and all(
        p.device.type in supported and p.is_floating_point() for p in params)


def build_optimizer(name: str, params_groups: list[dict]) -> torch.optim.Optimizer:
    """``adamw``, ``sgd`` (momentum 0.9) or ``lars``; lr and weight decay are set per step.

    AdamW and SGD take PyTorch's fused implementation where it has one for the parameters'
    device (:func:`fused_supported`), else the foreach one. Both give the official update; the
    fused one also skips a step on a device-side flag (``optimizer.found_inf``) without a host
    sync, which the training step uses to leave the weights untouched by a non-finite step.
    """
    fused = fused_supported(params_groups)
    if name == "sgd" and any(isinstance(p, DTensor) for g in params_groups for p in g["params"]):
        fused = False  # FSDP2's DTensors have a sharding rule for fused AdamW, not fused SGD
    impl = {"fused": True} if fused else {"foreach": True}
    if name == "adamw":
        return torch.optim.AdamW(params_groups, **impl)
    if name == "sgd":
        return torch.optim.SGD(params_groups, lr=0, momentum=0.9, **impl)
    if name == "lars":
        return LARS(params_groups)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw, sgd or lars")


@torch.no_grad()
def gradient_norms(model: nn.Module, clip: float = 0.0) -> torch.Tensor:
    """The L2 norm of each parameter's gradient, as one device tensor (no host sync); with
    ``clip`` > 0 each gradient is then clipped to norm ``clip`` on its own (not a global norm,
    as official: ``coef = clip / (norm + 1e-6)``, applied when below 1), by the fused op
    :func:`dino_fast.ops.clip.clip_gradients_`."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads, 2))
    if clip:
        clip_gradients_(grads, norms, clip)  # one kernel for all the gradients
    return norms


def clip_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """Clip each parameter's gradient to norm ``clip`` on its own; return the norms before."""
    return gradient_norms(model, clip)


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int):
    """Drop the gradients of ``last_layer`` during the first ``freeze_last_layer`` epochs."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None
