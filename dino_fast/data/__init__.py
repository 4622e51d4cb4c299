"""Data for DINO training: the image-folder dataset, the multi-crop augmentation, the loaders."""
from .augment import DataAugmentationDINO
from .folder import IMAGE_EXTENSIONS, BadImageError, ImageFolderDataset, bundled_data_path
from .loader import build_loader

__all__ = ["IMAGE_EXTENSIONS", "BadImageError", "DataAugmentationDINO", "ImageFolderDataset",
           "build_loader", "bundled_data_path"]
