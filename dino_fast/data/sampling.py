"""Which images each process sees in each epoch, derived from ``(seed, epoch)`` alone.

Both loaders take their order from :class:`EpochPlan`, so an epoch's batches do not depend on
anything that happened before it (a run resumed at epoch ``e`` sees the same batches as one that
never stopped). Per epoch: one permutation of the whole data set, cut to a whole number of global
batches (drop-last), dealt to the ranks as ``DistributedSampler`` does (``rank::world_size``),
then cut into per-process batches. Each image also gets a 62-bit augmentation seed per epoch,
keyed by its data-set index, so its crops do not depend on worker count or world size.

Shards (:class:`ShardEpochPlan`) change only the order: per epoch the shards are shuffled and
their samples laid end to end, the same global-batch cut is made, each rank takes one
contiguous stretch (so it opens a few shards, and a shard is split between two ranks at most),
and the samples of each shard within a rank's stretch are shuffled. Shards of any sizes divide
this way: the ranks get equal numbers of samples, never whole shards.
"""
import torch

from dino_fast.cli.errors import UserError

_EPOCH_STRIDE = 1_000_003  # prime; keeps the generator seeds of (seed, epoch) pairs apart


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 63-bit seed for everything random in ``epoch`` (and on ``rank``, when it matters)."""
    return ((seed * _EPOCH_STRIDE + epoch) * _EPOCH_STRIDE + rank) % (2**63 - 1)


class TooFewImagesError(UserError, ValueError):
    """Fewer images than one global batch: not a single step could be taken."""


class EpochPlan:
    """Per-epoch batches of ``(data-set index, augmentation seed)`` for one rank."""

    def __init__(self, num_images: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, root: str = "the data set"):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        global_batch = batch_size * world_size
        if num_images < global_batch:
            raise TooFewImagesError(
                f"{root} has {num_images} images, fewer than one global batch of {global_batch} "
                f"({batch_size} per process x {world_size} processes); lower the batch size or "
                "add images")
        self.num_images, self.batch_size = num_images, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps = num_images // global_batch  # drop-last

    def rank_indices(self, epoch: int) -> torch.Tensor:
        """This rank's data-set indices for ``epoch`` in reading order,
        ``(steps * batch_size,)``."""
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(self.num_images, generator=gen)
        used = order[: self.steps * self.batch_size * self.world_size]
        return used[self.rank:: self.world_size]

    def augmentation_seeds(self, epoch: int) -> torch.Tensor:
        """One seed per data-set index for ``epoch``, ``(num_images,)``, the same on all ranks."""
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, rank=2**20))
        return torch.randint(0, 2**62, (self.num_images,), generator=gen)

    def batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """``steps`` batches of ``batch_size`` pairs ``(index, augmentation seed)``."""
        indices = self.rank_indices(epoch)
        seeds = self.augmentation_seeds(epoch)[indices]
        pairs = list(zip(indices.tolist(), seeds.tolist()))
        return [pairs[i: i + self.batch_size] for i in range(0, len(pairs), self.batch_size)]


class ShardEpochPlan(EpochPlan):
    """:class:`EpochPlan` over shards of ``shard_sizes`` samples (data-set indices numbered
    shard after shard), read shard by shard (see the module docstring)."""

    def __init__(self, shard_sizes: list[int], batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, root: str = "the data set"):
        super().__init__(sum(shard_sizes), batch_size, rank, world_size, seed, root)
        self.shard_sizes = torch.tensor(shard_sizes)
        self.shard_starts = torch.cumsum(self.shard_sizes, 0) - self.shard_sizes

    def rank_indices(self, epoch: int) -> torch.Tensor:
        """This rank's stretch of the epoch's shard order, shuffled within each shard."""
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        shard_order = torch.randperm(len(self.shard_sizes), generator=gen)
        stream = torch.cat([torch.arange(self.shard_starts[s], self.shard_starts[s] + size)
                            for s, size in zip(shard_order.tolist(),
                                               self.shard_sizes[shard_order].tolist())])
        per_rank = self.steps * self.batch_size
        mine = stream[self.rank * per_rank: (self.rank + 1) * per_rank]
        shard_of = torch.searchsorted(self.shard_starts, mine, right=True)  # (per_rank,)
        new_run = torch.ones_like(shard_of, dtype=torch.bool)
        new_run[1:] = shard_of[1:] != shard_of[:-1]
        run = torch.cumsum(new_run.long(), 0)  # the number of each sample's shard stretch
        rank_gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, self.rank + 1))
        key = run.double() + torch.rand(len(mine), generator=rank_gen, dtype=torch.float64)
        return mine[torch.argsort(key)]  # each stretch shuffled, the stretches in order
