"""Stopping on a non-finite step without a host sync per step.

The official loop reads the loss on the host every step (``math.isfinite(loss.item())``), which
makes the CPU wait for the GPU. Here each step only records, on the device, whether it went
non-finite and the index of the first one that did; the host reads that flag every few steps and
at the end of every epoch (:meth:`NonFiniteWatch.first_bad_step`), and training then stops with
the same report, naming the first non-finite step. The training step leaves the weights of a
non-finite step untouched (see ``dino_fast.training.step``), and the loop checks before every
checkpoint, so a checkpoint never holds a state that a non-finite step produced.
"""
import torch

from dino_fast.training import distributed as dist_utils

NO_BAD_STEP = 2**62  # "no non-finite step yet" (the MIN over processes keeps real indices)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training must stop."""


class NonFiniteWatch:
    """Device-side record of the first non-finite step, read by the host on demand."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=device)
        self.first_bad_loss = torch.zeros((), dtype=torch.float32, device=device)
        self.labels = {}  # host: step index -> (global step, epoch), kept until a clean check
        self.recorded = 0  # steps recorded (the index the next one gets)

    def any_bad(self) -> torch.Tensor:
        """0-d device bool: a recorded step went non-finite on this process."""
        return self.first_bad != NO_BAD_STEP

    @torch.no_grad()
    def record(self, bad: torch.Tensor, loss: torch.Tensor, step, epoch):
        """Record one step: ``bad`` a 0-d device bool, ``loss`` its loss (all on the device)."""
        first = bad & ~self.any_bad()
        self.first_bad.copy_(torch.where(first, self.recorded, self.first_bad))
        self.first_bad_loss.copy_(torch.where(first, loss.float(), self.first_bad_loss))
        self.labels[self.recorded] = (step, epoch)
        self.recorded += 1

    def first_bad_step(self):
        """``(global step, epoch, loss on this process)`` of the first non-finite step on any
        process, or None. One host read (a collective under torch.distributed): call it every
        few steps and before saving, on every process at the same step."""
        first = dist_utils.all_reduce_min(self.first_bad.clone())
        index = int(first.item())
        if index == NO_BAD_STEP:
            self.labels.clear()
            return None
        step, epoch = self.labels[index]
        return step, epoch, float(self.first_bad_loss.item())
