"""Run a backbone over crops of several resolutions, then the head once on all of them
(official ``utils.py`` ``MultiCropWrapper``)."""
import torch
import torch.nn as nn


class MultiCropWrapper(nn.Module):
    """``backbone`` once per run of equal-size crops, ``head`` once on the concatenated outputs.

    Crops are a list of ``[B, 3, H, W]`` tensors; the output rows follow the list order.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()  # as official
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        if not isinstance(x, (list, tuple)):
            x = [x]
        outputs, start = [], 0
        for end in _equal_size_runs(x):
            out = self.backbone(torch.cat(x[start:end]))
            outputs.append(out[0] if isinstance(out, tuple) else out)
            start = end
        return self.head(torch.cat(outputs))


def _equal_size_runs(crops):
    """End indices of the runs of consecutive crops with the same spatial size."""
    ends = []
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[i - 1].shape[-2:]:
            ends.append(i)
    return ends
