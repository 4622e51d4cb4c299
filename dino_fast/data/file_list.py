"""One folder scan per job: rank 0 lists the images (or reads its cached list), the others
receive the list over the process group.

On a shared or network file system a scan costs a metadata round trip per file, and every
process of a job scanning the same tree multiplies it. Here rank 0 alone scans, and writes the
list to a cache file (:func:`cache_path`: one per image folder, in the user's cache folder, so
that a run's output folder keeps the official layout) with the modification time of every
folder the scan read. A later run over the same folder (a resume, an evaluation) takes the
cached list when every one of those folders still has its time: adding, removing or renaming
an entry changes its folder's time. Files edited in place keep their folder's time, which is
fine: the list holds names, not contents.
"""
import hashlib
import json
import os
import time

import torch.distributed as dist

from dino_fast.training import distributed as dist_utils

from .folder import scan_images
from .shards import write_atomically

CACHE_VERSION = 1
CACHE_ENV = "DINO_FAST_CACHE_DIR"


def cache_path(root: str) -> str:
    """Where the file list of the image folder ``root`` is cached: under ``$DINO_FAST_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/dino_fast``, else ``~/.cache/dino_fast``, named for the folder."""
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dino_fast")
    digest = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:24]
    return os.path.join(base, "file-lists", f"{digest}.json")


def folder_times(root: str, folders: list[str]) -> dict[str, int]:
    """``{folder relative to root: st_mtime_ns}`` (``""`` is ``root``)."""
    return {folder: os.stat(os.path.join(root, folder)).st_mtime_ns for folder in folders}


def read_cache(cache: str, root: str) -> list[str] | None:
    """The cached list of ``root``'s images when it is still valid, else None."""
    try:
        with open(cache) as f:
            cached = json.load(f)
        if cached.get("version") != CACHE_VERSION or cached.get("root") != root:
            return None
        if folder_times(root, list(cached["folders"])) != cached["folders"]:
            return None
        return cached["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing, damaged or stale: scan again


def write_cache(cache: str, root: str, files: list[str], folders: list[str]):
    """Record ``files`` (``root``'s images) and the times of the ``folders`` read in
    ``cache``."""
    os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
    record = {"version": CACHE_VERSION, "root": root, "folders": folder_times(root, folders),
              "files": files}
    write_atomically(cache, json.dumps(record))


def list_images(root: str, cache: str | None = None) -> tuple[list[str], str]:
    """``(find_images(root), how)`` computed once per job: by rank 0 (from ``cache``, by default
    :func:`cache_path`, when it is valid, else by a scan that refreshes it), then broadcast to
    the other ranks. ``how`` is a few words for the start line."""
    root = os.path.abspath(root)
    cache = cache or cache_path(root)
    payload = [None]
    if dist_utils.get_rank() == 0:
        try:
            payload = [_list_on_rank_zero(root, cache)]
        except Exception as err:  # noqa: BLE001 (the other ranks must hear of it, not hang)
            payload = [err]
    if dist_utils.is_dist():
        dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], Exception):
        raise payload[0]
    files, how = payload[0]
    if dist_utils.get_world_size() > 1:
        how += f", shared with {dist_utils.get_world_size() - 1} other process(es)"
    return files, how


def _list_on_rank_zero(root: str, cache: str) -> tuple[list[str], str]:
    started = time.perf_counter()
    files = read_cache(cache, root)
    if files is not None:
        return files, f"file list from {cache} ({time.perf_counter() - started:.2f} s)"
    files, folders = scan_images(root)
    how = f"scanned in {time.perf_counter() - started:.2f} s"
    try:
        write_cache(cache, root, files, folders)
    except OSError as err:  # a read-only cache folder costs the next run a scan, no more
        how += f" (file list not cached: {err.strerror})"
    return files, how
