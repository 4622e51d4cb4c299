"""DINO projection head (official ``vision_transformer.py`` ``DINOHead``): an MLP to a bottleneck,
L2 normalisation, and a weight-normalised linear layer to the K prototypes.

The weight-normalised layer is our own small module with the official parameter names
(``weight_g [K, 1]``, ``weight_v [K, bottleneck]``) instead of ``nn.utils.weight_norm``, which is
deprecated and, in its parametrize form, renames the keys.

Under bf16 autocast (``--precision bf16``) that layer writes fp32 logits: the teacher's logits
are divided by a temperature of 0.04, and a bf16 logit (8 mantissa bits) near ``|z| = 1`` is
rounded by up to 2^-9 / 0.04 = 0.05 nats, more than the error of its bf16 input (a unit vector:
its rounding moves each logit by about 2^-9 / sqrt(bottleneck)). The product still takes bf16
inputs (on CUDA one bf16 matrix product with an fp32 output, ``mm(out_dtype=float32)``, at bf16
speed; the CPU has no such kernel and multiplies the same bf16 values in fp32), and the backward
is autocast's bf16 one. fp16 autocast keeps the official fp16 logits (11 mantissa bits).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose weight is ``weight_g * weight_v / ||weight_v||`` per row."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        init = nn.Linear(in_features, out_features, bias=False).weight.detach()  # default init
        self.weight_g = nn.Parameter(init.norm(dim=1, keepdim=True))  # (out, 1)
        self.weight_v = nn.Parameter(init.clone())  # (out, in)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x):
        device = x.device.type
        if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16:
            with torch.autocast(device, enabled=False):  # fp32 logits (module docstring)
                return Bf16LinearFp32Output.apply(x.to(torch.bfloat16),
                                                  self.weight.to(torch.bfloat16))
        return F.linear(x, self.weight)


class Bf16LinearFp32Output(torch.autograd.Function):
    """``x @ weight.T`` of bf16 ``x (..., in)`` and ``weight (out, in)`` as fp32 ``(..., out)``;
    the gradients are bf16, as autocast's bf16 linear layer gives them."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        rows = x.reshape(-1, x.shape[-1])  # (N, in)
        if rows.is_cuda:
            out = torch.mm(rows, weight.t(), out_dtype=torch.float32)
        else:  # no bf16 -> fp32 kernel: the same bf16 values, multiplied in fp32
            out = torch.mm(rows.float(), weight.float().t())
        return out.reshape(*x.shape[:-1], weight.shape[0])  # (..., out)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.to(torch.bfloat16)  # (..., out)
        grad_weight = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return grad @ weight, grad_weight


class DINOHead(nn.Module):
    """MLP (``nlayers`` linear layers, GELU, optional BN) -> L2 norm -> weight-normed prototypes."""

    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3,
                 hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            for _ in range(nlayers - 2):
                layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
                layers += [nn.GELU(), nn.Linear(hidden_dim, hidden_dim)]
            layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
            layers += [nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim)]
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


def _init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
