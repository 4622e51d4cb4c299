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

import numpy as np
from PIL import Image

from dino_fast.cli.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
NO_CLASS = -1
log = logging.getLogger(__name__)


class BadImageError(UserError, RuntimeError):
    """An image file that exists but cannot be decoded (corrupt, truncated, not an image)."""


class NoImagesError(UserError, FileNotFoundError):
    """An image folder that does not exist, or holds no image file."""


def bundled_data_path() -> str:
    """The folder of demo photographs shipped inside the package (see its ATTRIBUTION.md)."""
    return str(resources.files("dino_fast.data").joinpath("images"))


def find_images(root: str) -> list[str]:
    """Sorted paths (relative to ``root``) of every image file under ``root``, recursively.

    Links are followed, but each real folder is read once and each file listed once (a link
    to a parent folder, or two links pointing at each other, neither loops nor multiplies the
    images): a link to a folder or file inside ``root`` is skipped, as what it points to is
    listed at its own path, and what links lead to outside ``root`` is listed once, at the
    first path in depth-first name order. Entries with an image extension that are not
    regular files (FIFOs, sockets, devices, broken links) and folders that cannot be read are
    skipped, counted in a warning, and never opened.
    """
    return scan_images(root)[0]


def scan_images(root: str) -> tuple[list[str], list[str]]:
    """``(find_images(root), the folders read)``, both relative to ``root``; the folders
    (``""`` for ``root``) are those whose change could change the list."""
    if not os.path.isdir(root):
        raise NoImagesError(f"image folder {root!r} does not exist or is not a folder")
    files, skipped, folders = _scan(root)
    if skipped:
        log.warning("skipped %d entries under %s that are not readable regular files or "
                    "folders: %s", len(skipped), root, ", ".join(skipped[:5]))
    if not files:
        raise NoImagesError(
            f"no images found under {root!r} (looked recursively for files ending in "
            f"{', '.join(IMAGE_EXTENSIONS)}, any case)")
    return files, folders


def _scan(root: str) -> tuple[list[str], list[str], list[str]]:
    """``(image files, skipped entries, folders read)`` under ``root``, relative to it (see
    find_images)."""
    real_root = os.path.realpath(root)
    seen_folders = {_identity(os.stat(root))}
    seen_files = set()  # identities of the files reached through links leading outside root
    files, skipped, read = [], [], []
    pending = [("", False)]  # (folder, whether it lies outside root)
    while pending:
        folder, outside = pending.pop()
        read.append(folder)
        try:
            entries = sorted(os.scandir(os.path.join(root, folder)), key=lambda e: e.name)
        except OSError:
            skipped.append(folder or ".")
            continue
        subfolders = []
        for entry in entries:
            relative = os.path.join(folder, entry.name)
            try:
                linked_inside = entry.is_symlink() and _inside(os.path.realpath(entry.path),
                                                               real_root)
                if entry.is_dir():  # follows links
                    identity = _identity(entry.stat())
                    if not linked_inside and identity not in seen_folders:
                        seen_folders.add(identity)
                        subfolders.append((relative, outside or entry.is_symlink()))
                elif not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                elif not entry.is_file():  # FIFO, socket, device, broken link: never opened
                    skipped.append(relative)
                elif outside or entry.is_symlink():  # may be reached by several paths
                    identity = _identity(entry.stat())
                    if not linked_inside and identity not in seen_files:
                        seen_files.add(identity)
                        files.append(relative)
                else:  # the common case costs no system call (d_type)
                    files.append(relative)
            except OSError:  # an entry removed while scanning
                skipped.append(relative)
        pending.extend(reversed(subfolders))  # depth first, in name order
    return sorted(files), sorted(skipped), read


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB. As the official loader (PIL's ``convert``): grayscale, palette,
    CMYK and bilevel images are expanded and alpha is dropped. Integer images wider than 8 bits
    (16-bit PNGs open as ``I;16`` or ``I``) are scaled from 0..65535 to 0..255; PIL's own
    conversion clips them, turning most of the image white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img).astype(np.float64)  # (H, W)
        eight_bit = np.clip(wide, 0, 65535) * (255 / 65535)
        img = Image.fromarray(eight_bit.round().astype(np.uint8))  # mode L
    return img.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully into an RGB PIL image (:func:`to_rgb`), or raise
    :class:`BadImageError` naming it."""
    try:
        with Image.open(path) as img:
            return to_rgb(img)  # the conversion forces the full decode: truncation shows here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot decode image {path!r}: {type(err).__name__}: {err}") from err


class ImageDataset:
    """Images with class labels, however stored: ``samples`` is a list of ``(ref, label)``
    where ``ref`` says where an image lies (a path, a place in a shard) and :meth:`decode`
    reads it. Shared by the folder and the shard data sets: the bad-image rules live here.

    Attributes: ``root``, ``classes`` (sorted class names, possibly empty), ``samples``
    (label ``-1`` for images without a class), ``origin`` (how the list was obtained, for the
    start line). ``dataset[i]`` is ``(transform(image), label)``.
    """

    def __init__(self, root: str, samples: list, classes: list[str], transform=None,
                 skip_bad_images: bool = False, origin: str = ""):
        self.root, self.samples, self.classes, self.origin = root, samples, classes, origin
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.bad_files: set = set()  # refs found bad in this process (with skip_bad_images)

    def decode(self, ref) -> Image.Image:
        """The RGB image at ``ref``, or :class:`BadImageError` naming it."""
        raise NotImplementedError

    def name(self, ref) -> str:
        """Where the image ``ref`` lies, for messages."""
        return str(ref)

    def __len__(self) -> int:
        return len(self.samples)

    def _first_readable(self, index: int) -> tuple[int, Image.Image]:
        """The first index at or after ``index`` (wrapping) whose image decodes, with its
        image; without ``skip_bad_images`` a bad image raises :class:`BadImageError` instead."""
        for offset in range(len(self.samples)):
            candidate = (index + offset) % len(self.samples)
            ref = self.samples[candidate][0]
            if ref in self.bad_files:
                continue
            try:
                return candidate, self.decode(ref)
            except BadImageError as err:
                if not self.skip_bad_images:
                    raise
                self.bad_files.add(ref)
                log.warning("skipping %s (%d bad image(s) skipped so far in this process)",
                            err, len(self.bad_files))
        raise BadImageError(f"none of the {len(self.samples)} images under {self.root!r} "
                            "could be decoded")

    def load(self, index: int) -> tuple[Image.Image, int]:
        """The RGB image and label at ``index``; a bad image is an error or, when skipping, the
        next readable image (wrapping around) with that image's label."""
        found, image = self._first_readable(index)
        return image, self.samples[found][1]

    def readable_index(self, index: int) -> int:
        """``index`` when its image decodes, else (when skipping) the next readable index."""
        return self._first_readable(index)[0]

    def __getitem__(self, index: int):
        image, label = self.load(index)
        return (self.transform(image) if self.transform is not None else image), label


class ImageFolderDataset(ImageDataset):
    """The images under ``root`` (see the module docstring); ``samples`` holds
    ``(absolute path, label)``. ``relative_paths``: the list :func:`find_images` would return,
    when it is already known (a job shares one scan, see :mod:`dino_fast.data.file_list`)."""

    def __init__(self, root: str, transform=None, skip_bad_images: bool = False,
                 relative_paths: list[str] | None = None, origin: str = ""):
        root = os.path.abspath(os.path.expanduser(str(root)))
        relative = find_images(root) if relative_paths is None else relative_paths
        classes = sorted({p.split(os.sep)[0] for p in relative if os.sep in p})
        class_index = {name: i for i, name in enumerate(classes)}
        samples = [(os.path.join(root, p),
                    class_index[p.split(os.sep)[0]] if os.sep in p else NO_CLASS)
                   for p in relative]
        super().__init__(root, samples, classes, transform, skip_bad_images, origin)

    def decode(self, ref: str) -> Image.Image:
        """The RGB image in file ``ref`` (:func:`load_rgb`)."""
        return load_rgb(ref)

    def dali_source(self, indices: list[int], folder: str, tag: str) -> dict:
        """DALI file reader arguments that read the images ``indices`` in that order
        (``folder`` and ``tag`` are unused: a file list needs no index)."""
        return {"files": [self.samples[i][0] for i in indices]}
