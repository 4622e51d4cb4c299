"""Data for DINO training: image folders and shard sets, the multi-crop augmentation, the
loaders."""
from .augment import DataAugmentationDINO
from .datasets import epoch_plan, open_dataset
from .folder import (
    IMAGE_EXTENSIONS,
    BadImageError,
    ImageDataset,
    ImageFolderDataset,
    bundled_data_path,
)
from .loader import build_loader
from .shards import ShardDataset

__all__ = ["IMAGE_EXTENSIONS", "BadImageError", "DataAugmentationDINO",
           "ImageDataset", "ImageFolderDataset", "ShardDataset", "build_loader",
           "bundled_data_path", "epoch_plan", "open_dataset"]
