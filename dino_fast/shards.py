"""``python -m dino_fast.shards``: write an image folder as WebDataset tar shards, or check a
shard set.

    python -m dino_fast.shards --data_path /data/imagenet/train --output_dir /data/shards/train
    python -m dino_fast.shards --verify /data/shards/train

The shards hold the image bytes unchanged, the class of each image's top-level folder and a
stable key, with DALI's index files and a manifest (:mod:`dino_fast.data.shards`). Every command
that takes ``--data_path`` accepts the shard folder in place of the image folder. An interrupted
run resumes when started again with the same flags.
"""
import argparse
import re
import sys

from dino_fast.cli.errors import FlagError, add_debug_flag, command
from dino_fast.data.shard_writer import verify_shards, write_shards

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def byte_size(text: str) -> int:
    """``256M``, ``1G``, ``65536``: a size in bytes (K, M, G are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not match or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 256M, 1G or 65536")
    return int(match[1]) * _UNITS[match[2].upper()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", help="the image folder to write (searched as training does)")
    p.add_argument("--output_dir", help="the shard folder: new, empty, or an interrupted run's")
    p.add_argument("--shard_size", type=byte_size, default="256M",
                   help="about this many bytes per shard (K, M, G suffixes)")
    p.add_argument("--seed", type=int, default=0, help="the order of the images in the shards")
    p.add_argument("--verify", metavar="SHARDS",
                   help="instead: read every shard of this set and check its checksum")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if args.verify is None and (args.data_path is None or args.output_dir is None):
        raise FlagError("give --data_path and --output_dir (to write shards) or --verify SHARDS")
    return args


@command
def main(argv=None):
    """Entry point of ``python -m dino_fast.shards``."""
    args = parse_args(argv)
    if args.verify is not None:
        verify_shards(args.verify)
        return 0
    manifest = write_shards(args.data_path, args.output_dir, args.shard_size, args.seed)
    print(f"{manifest['num_samples']} samples in {len(manifest['shards'])} shards: "
          f"--data_path {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
