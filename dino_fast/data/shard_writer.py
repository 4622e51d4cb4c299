"""Write an image folder as WebDataset tar shards (the layout is in :mod:`.shards`).

The plan is a function of the folder's file list, ``seed`` and ``shard_size``: the images in a
seeded random order (so that every shard mixes the classes), cut into shards of about
``shard_size`` bytes. The bytes of each shard are deterministic too (tar headers carry no
time, owner or mode of the source), so its checksum is.

Interrupted writes resume: the plan's fingerprint and each finished shard are recorded in
``dino_shards.progress.json``; a rerun with the same folder and flags keeps the shards recorded
there (when their size still matches) and writes the others; anything else in the output
folder is refused. The manifest is written last: a folder with a manifest is complete.
"""
import dataclasses
import hashlib
import io
import json
import os
import tarfile

import torch

from dino_fast.cli.errors import UserError
from dino_fast.cli.progress import Progress

from .folder import NO_CLASS, ImageFolderDataset
from .shards import (
    FORMAT,
    MANIFEST,
    ShardDataset,
    ShardSetError,
    index_line,
    read_manifest,
    write_atomically,
    write_index,
)

PROGRESS = "dino_shards.progress.json"
_HEADER = 512  # a ustar header; the keys are short, so every member has exactly one


@dataclasses.dataclass
class ShardPlan:
    """What goes into which shard: ``shards`` lists, per shard, indices into ``samples``
    (``(path, label)`` pairs of the source folder)."""
    root: str
    classes: list[str]
    samples: list[tuple[str, int]]
    shards: list[list[int]]
    fingerprint: str


def sample_key(root: str, path: str) -> str:
    """A stable key for the image at ``path``: a hash of its path relative to ``root``."""
    return hashlib.sha1(os.path.relpath(path, root).encode()).hexdigest()[:20]


def plan_shards(root: str, shard_size: int, seed: int = 0) -> ShardPlan:
    """The shards of the images under ``root`` (see the module docstring)."""
    folder = ImageFolderDataset(root)
    order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed)).tolist()
    sizes = [os.path.getsize(folder.samples[i][0]) for i in order]
    shards, current, filled = [], [], 0
    for index, size in zip(order, sizes):
        if current and filled + size > shard_size:
            shards.append(current)
            current, filled = [], 0
        current.append(index)
        filled += size + 2 * _HEADER
    shards.append(current)
    listing = json.dumps([folder.root, folder.classes, folder.samples, sizes, seed, shard_size])
    return ShardPlan(folder.root, folder.classes, folder.samples, shards,
                     hashlib.sha256(listing.encode()).hexdigest())


class _HashingWriter:
    """A write-only file that also hashes what goes through it."""

    def __init__(self, file):
        self.file, self.sha256 = file, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.file.tell()


def _member(tar: tarfile.TarFile, key: str, ext: str, data: bytes) -> tuple:
    """Append ``key.ext`` holding ``data``; return its index component
    ``(ext, data offset, size, name)``."""
    info = tarfile.TarInfo(f"{key}.{ext}")
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    offset = tar.offset + _HEADER
    tar.addfile(info, io.BytesIO(data))
    return ext, offset, len(data), info.name


def write_shard(plan: ShardPlan, number: int, tar_path: str, index_path: str) -> dict:
    """Write shard ``number`` of ``plan`` and its index; return its manifest entry."""
    lines = []
    partial = f"{tar_path}.partial"
    with open(partial, "wb") as raw:
        hashing = _HashingWriter(raw)
        with tarfile.open(fileobj=hashing, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for index in plan.shards[number]:
                path, label = plan.samples[index]
                key, ext = sample_key(plan.root, path), os.path.splitext(path)[1][1:].lower()
                with open(path, "rb") as f:
                    components = [_member(tar, key, ext, f.read())]
                if label != NO_CLASS:
                    components.append(_member(tar, key, "cls", str(label).encode()))
                lines.append(index_line(components))
    write_index(index_path, lines)
    os.replace(partial, tar_path)
    return {"name": os.path.basename(tar_path), "index": os.path.basename(index_path),
            "samples": len(lines), "bytes": os.path.getsize(tar_path),
            "sha256": hashing.sha256.hexdigest(),
            "labels": [plan.samples[i][1] for i in plan.shards[number]] if plan.classes else None}


def _finished_shards(output_dir: str, plan: ShardPlan) -> dict[int, dict]:
    """The shards an earlier, interrupted run of the same plan finished (refusing a folder
    that holds anything else)."""
    entries = set(os.listdir(output_dir)) if os.path.isdir(output_dir) else set()
    if MANIFEST in entries:
        manifest = read_manifest(os.path.join(output_dir, MANIFEST))
        if manifest.get("fingerprint") != plan.fingerprint:
            raise UserError(f"{output_dir!r} already holds a shard set of another folder or "
                            "other flags (or the folder changed since): choose another "
                            "--output_dir or delete it")
        return {number: shard for number, shard in enumerate(manifest["shards"])}
    if PROGRESS not in entries:
        if entries:
            raise UserError(f"--output_dir {output_dir!r} is not empty and holds no shard set "
                            "in progress: choose an empty or new folder")
        return {}
    with open(os.path.join(output_dir, PROGRESS)) as f:
        progress = json.load(f)
    if progress.get("fingerprint") != plan.fingerprint:
        raise UserError(f"{output_dir!r} holds a half-written shard set of another folder or "
                        "other flags (or the folder changed since it was started): delete it "
                        "or choose another --output_dir")
    return {int(number): shard for number, shard in progress["done"].items()
            if _size_matches(output_dir, shard)}


def _size_matches(output_dir: str, shard: dict) -> bool:
    tar = os.path.join(output_dir, shard["name"])
    return (os.path.isfile(tar) and os.path.getsize(tar) == shard["bytes"]
            and os.path.isfile(os.path.join(output_dir, shard["index"])))


def write_shards(root: str, output_dir: str, shard_size: int, seed: int = 0,
                 say=print) -> dict:
    """Write the shard set of ``root`` to ``output_dir`` (resuming an interrupted one); return
    its manifest."""
    plan = plan_shards(root, shard_size, seed)
    done = _finished_shards(output_dir, plan)
    if len(done) == len(plan.shards) and os.path.isfile(os.path.join(output_dir, MANIFEST)):
        say(f"{output_dir} already holds these {len(plan.shards)} shards: nothing to do")
        return read_manifest(os.path.join(output_dir, MANIFEST))
    os.makedirs(output_dir, exist_ok=True)
    say(f"{len(plan.samples)} images, {len(plan.classes)} classes -> {len(plan.shards)} shards "
        f"in {output_dir}" + (f" ({len(done)} already written)" if done else ""))
    progress = Progress(len(plan.shards), "shards", initial=len(done))
    for number in range(len(plan.shards)):
        if number in done:
            continue
        name = os.path.join(output_dir, f"shard-{number:06d}")
        try:
            done[number] = write_shard(plan, number, f"{name}.tar", f"{name}.idx")
        except OSError as err:  # a full disk, a source file that went away
            progress.close()
            raise UserError(f"cannot write shard {number} ({err.filename or name}: "
                            f"{err.strerror or err}); the {len(done)} shards written are kept: "
                            "rerun the same command to go on") from err
        write_atomically(os.path.join(output_dir, PROGRESS),
                         json.dumps({"fingerprint": plan.fingerprint, "done": done}))
        progress.update()
    progress.close()
    manifest = {"format": FORMAT, "fingerprint": plan.fingerprint, "source": plan.root,
                "seed": seed, "shard_size": shard_size, "classes": plan.classes,
                "num_samples": len(plan.samples),
                "shards": [done[number] for number in range(len(plan.shards))]}
    write_atomically(os.path.join(output_dir, MANIFEST), json.dumps(manifest))
    os.remove(os.path.join(output_dir, PROGRESS))
    return manifest


def verify_shards(path: str, say=print) -> int:
    """Check every shard of the set at ``path`` against its manifest checksum (reading them in
    full) after the quick checks of opening it; return the number of samples. A mismatch is a
    :class:`ShardSetError` naming the shard."""
    dataset = ShardDataset(path)
    manifest = read_manifest(os.path.join(dataset.root, MANIFEST))
    for tar, shard in zip(dataset.shards, manifest["shards"]):
        digest = hashlib.sha256()
        with open(tar, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != shard["sha256"]:
            raise ShardSetError(f"shard {tar!r} does not match its checksum in the manifest: "
                                "it was damaged or changed; write the set again")
    say(f"{len(dataset.shards)} shards, {len(dataset)} samples: every checksum matches")
    return len(dataset)
