"""DINO projection head (official ``vision_transformer.py`` ``DINOHead``): an MLP to a bottleneck,
L2 normalisation, and a weight-normalised linear layer to the K prototypes.

The weight-normalised layer is our own small module with the official parameter names
(``weight_g [K, 1]``, ``weight_v [K, bottleneck]``) instead of ``nn.utils.weight_norm``, which is
deprecated and, in its parametrize form, renames the keys.
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
        return F.linear(x, self.weight)


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
