"""Per-epoch sums of the training step's device values (the loss and whatever else the step
returns), kept on the device so that no step waits on the host; the progress bar gets its
values through a non-blocking copy into pinned host memory, read once it has landed."""
import torch

from dino_fast.distributed import all_reduce_mean


class StepMeters:
    """Accumulates the step's ``{name: 0-d device tensor}`` dicts without a host sync."""

    def __init__(self):
        self.sums, self.count = {}, 0
        self._latest = None
        self._copy = None  # (names, pinned host values, CUDA event) of the copy in flight
        self.shown = {}  # the latest values that reached the host

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

    def host_values(self) -> dict:
        """The latest values as floats, for display, without waiting for the device: on CUDA a
        copy of the latest step's values is started and the previous copy's values returned
        once it has arrived (so they can be a few steps old); on the CPU the values now."""
        if self._latest is None:
            return self.shown
        names = sorted(self._latest)
        stacked = torch.stack([self._latest[n].detach().float() for n in names])
        if stacked.device.type != "cuda":
            self.shown = dict(zip(names, stacked.numpy().tolist()))
            return self.shown
        if self._copy is not None and self._copy[2].query():
            self.shown = dict(zip(self._copy[0], self._copy[1].tolist()))
            self._copy = None
        if self._copy is None:
            host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            host.copy_(stacked, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._copy = (names, host, event)
        return self.shown

    def means(self) -> dict:
        """The epoch means over the steps added and over all processes (one host read, a
        collective under torch.distributed)."""
        if not self.sums:
            return {}
        names = sorted(self.sums)
        means = all_reduce_mean(torch.stack([self.sums[n] for n in names]) / self.count)
        return dict(zip(names, means.tolist()))
