"""An image-folder dataset: the file list, the labels and RGB decoding shared by every loader.

Rules (the DALI loader reads the very same list, so both loaders see the same files):

* every file under ``root``, recursively, whose extension is one of :data:`IMAGE_EXTENSIONS`
  (any case), sorted by path relative to ``root`` so the order is the same on every machine;
* the top-level sub-folders that hold at least one image are the classes, sorted by name, as
  torchvision's ``ImageFolder``; an image in a class folder gets that class's index. Images lying
  directly in ``root`` get the label ``-1`` ("no class"), and so does every image when there are
  no class folders at all (self-supervised training does not need labels);
* images are decoded with PIL and converted to RGB as the official loader does
  (grayscale, palette, CMYK and alpha images included; alpha is dropped).

A file that cannot be decoded raises :class:`BadImageError` naming it. With
``skip_bad_images=True`` it is replaced, deterministically, by the next readable image in the
list; each bad file is logged once per process.
"""
import logging
import os
from importlib import resources

from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
NO_CLASS = -1
log = logging.getLogger(__name__)


class BadImageError(RuntimeError):
    """An image file that exists but cannot be decoded (corrupt, truncated, not an image)."""


def bundled_data_path() -> str:
    """The folder of demo photographs shipped inside the package (see its ATTRIBUTION.md)."""
    return str(resources.files("dino_fast.data").joinpath("images"))


def find_images(root: str) -> list[str]:
    """Sorted paths (relative to ``root``) of every image file under ``root``, recursively."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist or is not a folder")
    found = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders.sort()
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(folder, name), root))
    if not found:
        raise FileNotFoundError(
            f"no images found under {root!r} (looked recursively for files ending in "
            f"{', '.join(IMAGE_EXTENSIONS)}, any case)")
    return sorted(found)


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully into an RGB PIL image, or raise :class:`BadImageError` naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() forces the full decode, so truncation shows here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot decode image {path!r}: {type(err).__name__}: {err}") from err


class ImageFolderDataset:
    """The images under ``root`` with their class labels; ``transform`` maps a PIL image.

    Attributes: ``root``, ``classes`` (sorted class-folder names, possibly empty), ``samples``
    (list of ``(absolute path, label)``, label ``-1`` for images outside class folders).
    ``dataset[i]`` is ``(transform(image), label)``.
    """

    def __init__(self, root: str, transform=None, skip_bad_images: bool = False):
        self.root = os.path.abspath(os.path.expanduser(str(root)))
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        relative = find_images(self.root)
        self.classes = sorted({p.split(os.sep)[0] for p in relative if os.sep in p})
        class_index = {name: i for i, name in enumerate(self.classes)}
        self.samples = [(os.path.join(self.root, p),
                         class_index[p.split(os.sep)[0]] if os.sep in p else NO_CLASS)
                        for p in relative]
        self.bad_files: set[str] = set()  # found in this process (with skip_bad_images)

    def __len__(self) -> int:
        return len(self.samples)

    def _first_readable(self, index: int) -> tuple[int, Image.Image]:
        """The first index at or after ``index`` (wrapping) whose file decodes, with its image;
        without ``skip_bad_images`` a bad file raises :class:`BadImageError` instead."""
        for offset in range(len(self.samples)):
            candidate = (index + offset) % len(self.samples)
            path = self.samples[candidate][0]
            if path in self.bad_files:
                continue
            try:
                return candidate, load_rgb(path)
            except BadImageError as err:
                if not self.skip_bad_images:
                    raise
                self.bad_files.add(path)
                log.warning("skipping %s (%d bad image(s) skipped so far in this process)",
                            err, len(self.bad_files))
        raise BadImageError(f"none of the {len(self.samples)} images under {self.root!r} "
                            "could be decoded")

    def load(self, index: int) -> tuple[Image.Image, int]:
        """The RGB image and label at ``index``; a bad file is an error or, when skipping, the
        next readable image (wrapping around) with that image's label."""
        found, image = self._first_readable(index)
        return image, self.samples[found][1]

    def readable_index(self, index: int) -> int:
        """``index`` when its file decodes, else (when skipping) the next readable index."""
        return self._first_readable(index)[0]

    def __getitem__(self, index: int):
        image, label = self.load(index)
        return (self.transform(image) if self.transform is not None else image), label
