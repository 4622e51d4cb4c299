"""The training loaders behind one factory, :func:`build_loader`.

``kind="torch"``: the torchvision reference (PIL decoding and :class:`DataAugmentationDINO` in
DataLoader workers). ``kind="dali"``: the NVIDIA DALI pipeline (``dino_fast.data.dali``).
``kind="auto"``: DALI when it is installed and the training device is CUDA, else torch.

Both yield, per step, ``(crops, labels)``: ``crops`` the list ``[global_1, global_2, local_1 ..
local_N]`` of ``(B, 3, H, W)`` normalised tensors on ``device`` in ``dtype``, ``labels`` a
``(B,)`` int64 tensor (``-1`` for images without a class folder). Call ``set_epoch(e)`` before
each epoch: the order and the crops are a function of ``(seed, epoch)`` only.
``set_epoch(e, first_step)`` starts the epoch at that step (a mid-epoch resume) with the very
batches an uninterrupted epoch yields there; the torch loader does not decode the skipped ones.
"""
import torch
from torch.utils.data import DataLoader, Dataset

from dino_fast.training.signals import leave_signals_to_main

from .augment import DataAugmentationDINO
from .datasets import epoch_plan, open_dataset
from .folder import ImageDataset, bundled_data_path
from .prefetch import DeviceCopier
from .sampling import EpochPlan

KINDS = ("auto", "torch", "dali")
CPU = torch.device("cpu")


class _SeededViews(Dataset):
    """``item = (index, seed)`` -> (the multi-crop views of image ``index``, its label)."""

    def __init__(self, dataset: ImageDataset, augment: DataAugmentationDINO):
        self.dataset, self.augment = dataset, augment

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        image, label = self.dataset.load(index)
        return self.augment(image, torch.Generator().manual_seed(seed)), label


class _EpochBatches:
    """The DataLoader's batch sampler: the plan's batches for the current epoch."""

    def __init__(self, plan: EpochPlan):
        self.plan, self.epoch, self.first_step = plan, 0, 0

    def __len__(self):
        return self.plan.steps - self.first_step

    def __iter__(self):
        return iter(self.plan.batches(self.epoch)[self.first_step:])


class TorchLoader:
    """The torchvision reference loader (see the module docstring for the contract)."""

    kind = "torch"

    def __init__(self, dataset: ImageDataset, plan: EpochPlan, augment: DataAugmentationDINO,
                 num_workers: int, device: torch.device, dtype: torch.dtype):
        self.dataset, self.device, self.dtype = dataset, torch.device(device), dtype
        self._to_device = DeviceCopier(self.device, dtype)  # CUDA: side stream, one ahead
        self._batches = _EpochBatches(plan)
        self._loader = DataLoader(
            _SeededViews(dataset, augment), batch_sampler=self._batches, num_workers=num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
            worker_init_fn=leave_signals_to_main)

    def __len__(self) -> int:
        return self._batches.plan.steps

    def set_epoch(self, epoch: int, first_step: int = 0):
        """Select the epoch whose order and crops the next iteration yields, from
        ``first_step``."""
        self._batches.epoch, self._batches.first_step = epoch, first_step

    def __iter__(self):
        return self._to_device(self._loader)


def resolve_kind(kind: str, device: torch.device) -> str:
    """``torch`` or ``dali``: ``auto`` is DALI when it imports and ``device`` is CUDA."""
    if kind not in KINDS:
        raise ValueError(f"loader kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    from .dali import dali_available
    return "dali" if torch.device(device).type == "cuda" and dali_available() else "torch"


def build_loader(kind="auto", data_path=None, batch_size=64, num_workers=4,
                 global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4),
                 local_crops_number=8, rank=0, world_size=1, seed=0,
                 device=CPU, dtype=torch.float32, skip_bad_images=False,
                 global_size=224, local_size=96):
    """A multi-crop DINO loader over ``data_path``: an image folder or a shard set (the bundled
    photos when None).

    ``batch_size`` is per process; each of the ``world_size`` ranks reads a disjoint part.
    ``num_workers`` is DataLoader workers (torch) or decoding threads (DALI). ``len(loader)`` is
    the number of steps per epoch (drop-last). A bad image is an error naming the file, or,
    with ``skip_bad_images``, replaced by the next readable one and logged.
    """
    kind = resolve_kind(kind, device)
    dataset = open_dataset(data_path or bundled_data_path(), skip_bad_images=skip_bad_images)
    plan = epoch_plan(dataset, batch_size, rank, world_size, seed)
    augment = DataAugmentationDINO(global_crops_scale, local_crops_scale, local_crops_number,
                                   global_size, local_size)
    if kind == "dali":
        from .dali import DaliLoader
        return DaliLoader(dataset, plan, augment.specs, num_threads=max(1, num_workers),
                          device=device, dtype=dtype)
    return TorchLoader(dataset, plan, augment, num_workers, device, dtype)
