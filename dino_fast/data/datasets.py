"""Open ``--data_path`` whatever it holds: an image folder or a shard set, with the epoch plan
that reads it.

A path is a shard set when it is a folder holding ``dino_shards.json`` or that file itself
(:mod:`.shards`); anything else is an image folder (:mod:`.folder`), listed once per job
(:mod:`.file_list`).
"""
from .file_list import list_images
from .folder import ImageDataset, ImageFolderDataset
from .sampling import EpochPlan, ShardEpochPlan
from .shards import ShardDataset, manifest_path


def open_dataset(path: str, transform=None, skip_bad_images: bool = False) -> ImageDataset:
    """The images at ``path``: a :class:`ShardDataset` or an :class:`ImageFolderDataset`
    (listed once per job, the list cached between runs: :func:`list_images`)."""
    if manifest_path(path) is not None:
        return ShardDataset(path, transform, skip_bad_images)
    files, how = list_images(path)
    return ImageFolderDataset(path, transform, skip_bad_images, relative_paths=files, origin=how)


def epoch_plan(dataset: ImageDataset, batch_size: int, rank: int = 0, world_size: int = 1,
               seed: int = 0) -> EpochPlan:
    """The plan that deals ``dataset`` out to the ranks, epoch by epoch."""
    if isinstance(dataset, ShardDataset):
        return ShardEpochPlan(dataset.shard_sizes, batch_size, rank, world_size, seed,
                              root=dataset.root)
    return EpochPlan(len(dataset), batch_size, rank, world_size, seed, root=dataset.root)
