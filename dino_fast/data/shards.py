"""WebDataset tar shards as a data set: the manifest, the DALI index files, random access.

A shard set is a folder written by ``python -m dino_fast.shards`` (:mod:`.shard_writer`):

* ``shard-000000.tar`` ...: WebDataset shards (plain tar). Each sample is ``<key>.<ext>``, the
  image's bytes unchanged (``ext`` one of the image extensions, lower case), and, when the
  source folder had class folders, ``<key>.cls``, the class index in ASCII. ``key`` is stable:
  a hash of the image's path in the source folder;
* ``shard-000000.idx`` ...: DALI's index of each shard (the ``wds2idx`` format, v1.2): per
  sample, per component, ``ext offset size name``;
* ``dino_shards.json``: the manifest: classes, and per shard its sample count, byte size,
  SHA-256 and the samples' labels.

Every sample is addressable through its index (``offset``, ``size``), so the shard set is read
like a folder: the same :class:`~dino_fast.data.folder.ImageDataset` rules, and an epoch plan
(:class:`~dino_fast.data.sampling.ShardEpochPlan`) that deals out samples, reading each shard
from one process at a time. A sample costs one ``pread`` into a shard that stays open, not a
file open and its metadata round trips.

Checks when a set is opened (cheap: one ``stat`` and one index read per shard): every shard and
index exists, each shard has the manifest's byte size (a truncated or replaced shard fails),
each index lists the manifest's number of samples and no byte past its shard's end (a stale
index fails). The checksums are read in full by ``python -m dino_fast.shards --verify``.
"""
import io
import json
import os

from PIL import Image

from dino_fast.cli.errors import UserError

from .folder import IMAGE_EXTENSIONS, NO_CLASS, BadImageError, ImageDataset, to_rgb

MANIFEST = "dino_shards.json"
FORMAT = "dino_fast.shards/1"
INDEX_VERSION = "v1.2"
IMAGE_EXTS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
_OPEN_SHARDS = 8  # descriptors a process keeps open (thousands of shards must not exhaust them)


class ShardSetError(UserError, ValueError):
    """A shard set that cannot be read: a missing or damaged manifest, shard or index."""


def manifest_path(path: str) -> str | None:
    """The manifest of the shard set at ``path`` (its folder or the manifest itself), or None
    when ``path`` is not a shard set."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    candidate = os.path.join(path, MANIFEST) if os.path.isdir(path) else path
    return candidate if os.path.basename(candidate) == MANIFEST and os.path.isfile(
        candidate) else None


def read_manifest(path: str) -> dict:
    """The manifest at ``path``, checked for its format; :class:`ShardSetError` otherwise."""
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise ShardSetError(f"cannot read the shard manifest {path!r}: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardSetError(f"{path!r} is not a dino_fast shard manifest (format {FORMAT!r})")
    return manifest


def index_line(components: list[tuple[str, int, int, str]]) -> str:
    """One sample's line of a v1.2 index: ``ext offset size name`` per component."""
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in components)


def write_atomically(path: str, text: str):
    """Write ``text`` to ``path`` through a ``.partial`` file: ``path`` is whole or absent."""
    with open(f"{path}.partial", "w") as f:
        f.write(text)
    os.replace(f"{path}.partial", path)


def write_index(path: str, lines: list[str]):
    """Write a v1.2 index of the sample ``lines`` (:func:`index_line`) to ``path``, atomically."""
    write_atomically(path, f"{INDEX_VERSION} {len(lines)}\n" + "\n".join(lines) + "\n")


def read_index(path: str) -> list[tuple[str, int, int, str]]:
    """``(ext, offset, size, name)`` of each sample's image in the index at ``path``."""
    try:
        with open(path) as f:
            header, *lines = f.read().splitlines()
    except (OSError, ValueError) as err:
        raise ShardSetError(f"cannot read the shard index {path!r}: {err}") from err
    version, _, count = header.partition(" ")
    if version != INDEX_VERSION or not count.isdigit() or int(count) != len(lines):
        raise ShardSetError(f"{path!r} is not a {INDEX_VERSION} index of {count or '?'} samples")
    images = []
    for number, line in enumerate(lines, 2):
        fields = line.split(" ")
        parts = [fields[i:i + 4] for i in range(0, len(fields), 4)]
        found = [(ext, int(offset), int(size), name) for ext, offset, size, name in parts
                 if ext in IMAGE_EXTS and offset.isdigit() and size.isdigit()]
        if len(found) != 1 or len(fields) % 4:
            raise ShardSetError(f"{path!r} line {number}: not one image component: {line!r}")
        images.append(found[0])
    return images


class ShardDataset(ImageDataset):
    """The samples of the shard set at ``path`` (folder or manifest); ``samples`` holds
    ``((shard number, offset, size, name), label)``."""

    def __init__(self, path: str, transform=None, skip_bad_images: bool = False):
        manifest_file = manifest_path(path)
        if manifest_file is None:
            raise ShardSetError(f"{path!r} is not a shard set (no {MANIFEST})")
        manifest = read_manifest(manifest_file)
        root = os.path.dirname(manifest_file)
        self.shards = [os.path.join(root, shard["name"]) for shard in manifest["shards"]]
        self.index_files = [os.path.join(root, shard["index"]) for shard in manifest["shards"]]
        self.shard_sizes = [shard["samples"] for shard in manifest["shards"]]
        samples = []
        for number, shard in enumerate(manifest["shards"]):
            images = self._checked_index(number, shard)
            labels = shard.get("labels") or [NO_CLASS] * len(images)
            samples += [((number, offset, size, name), label)
                        for (_, offset, size, name), label in zip(images, labels)]
        if not samples:
            raise ShardSetError(f"the shard set {root!r} holds no sample")
        super().__init__(root, samples, list(manifest.get("classes", [])), transform,
                         skip_bad_images, origin=f"{len(self.shards)} shards")
        self._files: dict[int, int] = {}  # shard number -> descriptor, in this process
        self._pid = os.getpid()

    def _checked_index(self, number: int, shard: dict) -> list:
        """The image components of shard ``number``'s index, checked against the manifest
        and the shard's size (see the module docstring)."""
        tar, index = self.shards[number], self.index_files[number]
        for path in (tar, index):
            if not os.path.isfile(path):
                raise ShardSetError(f"{path!r} is missing (listed in the shard manifest)")
        size = os.path.getsize(tar)
        if size != shard["bytes"]:
            raise ShardSetError(f"shard {tar!r} has {size} bytes, the manifest says "
                                f"{shard['bytes']}: it is truncated or was replaced")
        images = read_index(index)
        if len(images) != shard["samples"] or (
                images and max(offset + length for _, offset, length, _ in images) > size):
            raise ShardSetError(f"index {index!r} does not match shard {tar!r} (stale index?): "
                                f"{len(images)} samples, the manifest says {shard['samples']}")
        return images

    def _descriptor(self, number: int) -> int:
        if self._pid != os.getpid():  # a forked loader worker: open its own files
            self._files, self._pid = {}, os.getpid()
        if number not in self._files:
            if len(self._files) == _OPEN_SHARDS:  # a rank reads shard after shard: drop the oldest
                os.close(self._files.pop(next(iter(self._files))))
            self._files[number] = os.open(self.shards[number], os.O_RDONLY)
        return self._files[number]

    def name(self, ref) -> str:
        """Where the sample ``ref`` lies, for messages: ``shard.tar:member``."""
        return f"{self.shards[ref[0]]}:{ref[3]}"

    def read_bytes(self, ref) -> bytes:
        """The encoded image of sample ``ref``: one read into its open shard."""
        number, offset, size, _ = ref
        data = os.pread(self._descriptor(number), size, offset)
        if len(data) != size:
            raise OSError(f"shard ends after {len(data)} of the sample's {size} bytes")
        return data

    def decode(self, ref) -> Image.Image:
        """The RGB image of sample ``ref``, or :class:`BadImageError` naming it."""
        try:
            with Image.open(io.BytesIO(self.read_bytes(ref))) as img:
                return to_rgb(img)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise BadImageError(f"cannot decode image {self.name(ref)!r}: "
                                f"{type(err).__name__}: {err}") from err

    def dali_source(self, indices: list[int], folder: str, tag: str) -> dict:
        """DALI webdataset reader arguments that read the samples ``indices`` in that order:
        one path per run of consecutive samples of one shard, with an index file of that run
        written to ``folder`` (names start with ``tag``)."""
        runs: list[tuple[int, list]] = []
        for index in indices:
            ref = self.samples[index][0]
            if not runs or runs[-1][0] != ref[0]:
                runs.append((ref[0], []))
            runs[-1][1].append(index_line([(ref[3].rpartition(".")[2], ref[1], ref[2],
                                            ref[3])]))
        paths, index_paths = [], []
        for count, (number, lines) in enumerate(runs):
            index_paths.append(os.path.join(folder, f"{tag}-{count}.idx"))
            write_index(index_paths[-1], lines)
            paths.append(self.shards[number])
        return {"paths": paths, "index_paths": index_paths}
