"""Per-epoch sums of the training step's device values (the loss and whatever else the step
returns), kept on the device so that no step waits on the host; the progress bar reads the
latest values only where the host has just waited for the device anyway (the periodic check)."""
import torch

from dino_fast.training.distributed import all_reduce_mean


class StepMeters:
    """Accumulates the step's ``{name: 0-d device tensor}`` dicts without a host sync."""

    def __init__(self):
        self.sums, self.count = {}, 0
        self._latest = None

    @torch.no_grad()
    def add(self, values: dict):
        """Add one step's values (device tensors) to the epoch sums."""
        for name, value in values.items():
            value = value.detach().float()
            if name in self.sums:
                self.sums[name].add_(value)
            else:
                self.sums[name] = value.clone()
        self.count += 1
        self._latest = values

    @torch.no_grad()
    def host_values(self) -> dict:
        """The latest step's values as floats, for display. A read from the device: call it
        right after a host read that has waited for the step already (``check_finite``), where
        it adds no wait of its own."""
        if self._latest is None:
            return {}
        names = sorted(self._latest)
        return dict(zip(names, torch.stack([self._latest[n].float() for n in names]).tolist()))

    def means(self) -> dict:
        """The epoch means over the steps added and over all processes (one host read, a
        collective under torch.distributed)."""
        if not self.sums:
            return {}
        names = sorted(self.sums)
        means = all_reduce_mean(torch.stack([self.sums[n] for n in names]) / self.count)
        return dict(zip(names, means.tolist()))
