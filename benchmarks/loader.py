"""Loader throughput: images/s of the DINO multi-crop loaders from an image folder and from its
WebDataset shards, the raw read rate of each way of reading shards, and the folder scan.

Each image becomes 2 global (224 px) + 10 local (96 px) crops. Compares the torchvision
reference (``--loader torch``, ``threads`` DataLoader workers) with the DALI pipeline (``threads``
DALI threads; CPU-only mode without a GPU, ``mixed`` GPU decoding with one), each reading the
folder and its shards, in one run, and prints one table with the speed-up over torch on the
folder. Build the corpus first (its shards are written next to it when missing):

    python -m benchmarks.make_corpus --count 2000 --out .corpus
    python -m benchmarks.loader --data .corpus --threads 2 --batch 32 --scan_files 200000

The figure is the steady state inside an epoch, as on a real data set (ImageNet has thousands of
steps per epoch): ``warmup`` batches, then ``steps`` timed ones, all in epoch 0, so the corpus
needs ``(warmup + steps) * batch`` images. The loaders take turns for ``rounds`` rounds and each
reports its median, so a drift in the machine's speed hits both.

Raw reads: the bytes of every image, no decoding: one file each (the folder), one ``pread``
each into open shards by the index (what the torch loader does), the shards streamed with the
standard library's ``tarfile``, and with the ``webdataset`` package when it is installed
(``pip install 'dino-fast[bench]'``). Scan: an ``--scan_files``-file tree of empty image
files, scanned as every process of a job did before (one scan each) and as one job does now
(rank 0 once, then the cached file list).
"""
import argparse
import os
import statistics
import tarfile
import tempfile
import time

import torch

from benchmarks.common import environment, print_table, write_results
from dino_fast.data import ImageFolderDataset, ShardDataset, build_loader
from dino_fast.data.dali import dali_available
from dino_fast.data.file_list import list_images
from dino_fast.data.folder import find_images
from dino_fast.data.shard_writer import write_shards


def images_per_second(kind: str, data: str, args, device: torch.device) -> float:
    """Images over the wall time of ``steps`` batches after ``warmup`` ones, inside one epoch
    (prefetching makes single-batch times bursty, so no median per batch)."""
    loader = build_loader(kind=kind, data_path=data, batch_size=args.batch,
                          num_workers=args.threads, local_crops_number=10, device=device)
    if len(loader) < args.warmup + args.steps:
        raise SystemExit(f"{data} gives {len(loader)} batches of {args.batch} per epoch, "
                         f"fewer than --warmup + --steps = {args.warmup + args.steps}: build a "
                         "bigger corpus (benchmarks/make_corpus.py --count) or time fewer steps")
    batches = iter(loader)
    for _ in range(args.warmup):
        next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch / (time.perf_counter() - start)


def loader_rows(args, shards: str, device: torch.device) -> list[dict]:
    """The multi-crop loaders on the folder and on the shards, alternating for ``rounds``."""
    kinds = ["torch"] + (["dali"] if dali_available() else [])
    configs = [(kind, source) for kind in kinds for source in ("folder", "shards")]
    rates = {config: [] for config in configs}
    for _ in range(args.rounds):
        for kind, source in configs:
            data = args.data if source == "folder" else shards
            rates[kind, source].append(images_per_second(kind, data, args, device))
    baseline = statistics.median(rates["torch", "folder"])
    return [{"loader": kind, "from": source, "device": device.type, "threads": args.threads,
             "images/s": statistics.median(rates[kind, source]),
             "per core": statistics.median(rates[kind, source]) / args.threads,
             "speed-up": statistics.median(rates[kind, source]) / baseline,
             "rounds": " ".join(f"{r:.1f}" for r in rates[kind, source])}
            for kind, source in configs]


def read_folder(folder: ImageFolderDataset) -> int:
    total = 0
    for path, _ in folder.samples:
        with open(path, "rb") as f:
            total += len(f.read())
    return total


def read_by_index(shards: ShardDataset) -> int:
    return sum(len(shards.read_bytes(ref)) for ref, _ in shards.samples)


def read_tarfile(shards: ShardDataset) -> int:
    total = 0
    for path in shards.shards:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.name.endswith(".cls"):
                    total += len(tar.extractfile(member).read())
    return total


def read_webdataset(shards: ShardDataset) -> int:
    import webdataset
    total = 0
    for sample in webdataset.WebDataset(shards.shards, shardshuffle=False, empty_check=False):
        total += sum(len(value) for key, value in sample.items()
                     if isinstance(value, bytes) and key != "cls")
    return total


def raw_read_rows(args, shards: str) -> list[dict]:
    """MB/s and images/s of each way of reading the image bytes (best of ``rounds``)."""
    folder, shard_set = ImageFolderDataset(args.data), ShardDataset(shards)
    readers = {"folder: a file each": lambda: read_folder(folder),
               "shards: pread by index": lambda: read_by_index(shard_set),
               "shards: tarfile stream": lambda: read_tarfile(shard_set)}
    try:
        import webdataset  # noqa: F401
        readers["shards: webdataset package"] = lambda: read_webdataset(shard_set)
    except ImportError:
        print("webdataset is not installed: pip install 'dino-fast[bench]' for its row")
    rows = []
    for name, read in readers.items():
        seconds, size = [], 0
        for _ in range(args.rounds):
            start = time.perf_counter()
            size = read()
            seconds.append(time.perf_counter() - start)
        rows.append({"reader": name, "images/s": len(folder) / min(seconds),
                     "MB/s": size / 1e6 / min(seconds)})
    return rows


def scan_rows(count: int, processes: int) -> list[dict]:
    """Seconds to list a tree of ``count`` empty image files: one scan per process of a job
    (before) against one per job, then the cached list (now). The files were just made, so
    the file system's metadata is in memory: a network file system pays more per file."""
    with tempfile.TemporaryDirectory(prefix="dino_fast_scan_") as root:
        per_folder = 1000
        for i in range(count):
            if i % per_folder == 0:
                folder = os.path.join(root, "tree", f"class_{i // per_folder:05d}")
                os.makedirs(folder)
            open(os.path.join(folder, f"img_{i:07d}.jpg"), "wb").close()
        tree, cache = os.path.join(root, "tree"), os.path.join(root, "out", "file_list.json")
        start = time.perf_counter()
        find_images(tree)
        scan = time.perf_counter() - start
        list_images(tree, cache)  # writes the cache
        start = time.perf_counter()
        files, how = list_images(tree, cache)
        cached = time.perf_counter() - start
        assert how.startswith("file list from") and len(files) == count, how
    return [{"how": f"before: every process scans ({processes} processes)", "files": count,
             "scans per job": processes, "seconds of listing": scan * processes},
            {"how": "now: rank 0 scans, the others receive", "files": count,
             "scans per job": 1, "seconds of listing": scan},
            {"how": "now, a later run: the cached list, folder times checked", "files": count,
             "scans per job": 0, "seconds of listing": cached}]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=".corpus", help="image folder (make_corpus.py output)")
    parser.add_argument("--shards", default=None,
                        help="its shard set (default: DATA.shards, written when missing)")
    parser.add_argument("--shard_size", type=int, default=16 << 20, help="bytes per shard")
    parser.add_argument("--threads", type=int, default=2, help="workers / DALI threads")
    parser.add_argument("--batch", type=int, default=32, help="images per batch")
    parser.add_argument("--steps", type=int, default=20, help="timed batches per loader")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--rounds", type=int, default=3, help="turns per loader; median kept")
    parser.add_argument("--scan_files", type=int, default=0,
                        help="also time the scan of a tree of this many files (0: no)")
    parser.add_argument("--processes", type=int, default=8, help="processes of the scanned job")
    parser.add_argument("--save", default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shards = args.shards or args.data.rstrip("/") + ".shards"
    write_shards(args.data, shards, args.shard_size)  # nothing to do when they are there
    text = print_table(loader_rows(args, shards, device),
                       ["loader", "from", "device", "threads", "images/s", "per core",
                        "speed-up", "rounds"],
                       title=f"multi-crop loader, 2x224 + 10x96 crops, {args.data} and its "
                             f"shards, median of {args.rounds} alternating rounds")
    text += "\n\n" + print_table(raw_read_rows(args, shards), ["reader", "images/s", "MB/s"],
                                 title="raw reads of the image bytes, no decoding, best of "
                                       f"{args.rounds} (page cache warm)")
    if args.scan_files:
        text += "\n\n" + print_table(scan_rows(args.scan_files, args.processes),
                                     ["how", "files", "scans per job", "seconds of listing"],
                                     title="listing an image folder of empty files")
    if not dali_available():
        print("DALI is not installed: pip install 'dino-fast[dali]' to compare it.")
    if args.save:
        write_results(args.save, text)
    print(environment())


if __name__ == "__main__":
    main()
