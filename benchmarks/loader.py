"""Loader throughput: images/s of the DINO multi-crop loaders on the same files and CPU count.

Each image becomes 2 global (224 px) + 10 local (96 px) crops. Compares the torchvision
reference (``--loader torch``, ``threads`` DataLoader workers) with the DALI pipeline (``threads``
DALI threads; CPU-only mode without a GPU, ``mixed`` GPU decoding with one), in one run, and
prints one table with the speed-up over torch. Build the corpus first:

    python -m benchmarks.make_corpus --count 2000 --out .corpus
    python -m benchmarks.loader --data .corpus --threads 2 --batch 32

The figure is the steady state inside an epoch, as on a real data set (ImageNet has thousands of
steps per epoch): ``warmup`` batches, then ``steps`` timed ones, all in epoch 0, so the corpus
needs ``(warmup + steps) * batch`` images. The loaders take turns for ``rounds`` rounds and each
reports its median, so a drift in the machine's speed hits both.
"""
import argparse
import statistics
import time

import torch

from benchmarks.common import environment, print_table, write_results
from dino_fast.data import build_loader
from dino_fast.data.dali import dali_available


def images_per_second(kind: str, args, device: torch.device) -> float:
    """Images over the wall time of ``steps`` batches after ``warmup`` ones, inside one epoch
    (prefetching makes single-batch times bursty, so no median per batch)."""
    loader = build_loader(kind=kind, data_path=args.data, batch_size=args.batch,
                          num_workers=args.threads, local_crops_number=10, device=device)
    if len(loader) < args.warmup + args.steps:
        raise SystemExit(f"{args.data} gives {len(loader)} batches of {args.batch} per epoch, "
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=".corpus", help="image folder (make_corpus.py output)")
    parser.add_argument("--threads", type=int, default=2, help="workers / DALI threads")
    parser.add_argument("--batch", type=int, default=32, help="images per batch")
    parser.add_argument("--steps", type=int, default=20, help="timed batches per loader")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--rounds", type=int, default=3, help="turns per loader; median kept")
    parser.add_argument("--save", default=None, help="also write the table to this file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kinds = ["torch"] + (["dali"] if dali_available() else [])
    rates = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            rates[kind].append(images_per_second(kind, args, device))
    rows, baseline = [], statistics.median(rates["torch"])
    for kind in kinds:
        rate = statistics.median(rates[kind])
        rows.append({"loader": kind, "device": device.type, "threads": args.threads,
                     "batch": args.batch, "images/s": rate, "speed-up": rate / baseline,
                     "rounds": " ".join(f"{r:.1f}" for r in rates[kind])})
    text = print_table(rows, ["loader", "device", "threads", "batch", "images/s", "speed-up",
                              "rounds"],
                       title=f"multi-crop loader, 2x224 + 10x96 crops, {args.data}, median of "
                             f"{args.rounds} alternating rounds")
    if len(kinds) == 1:
        print("DALI is not installed: pip install 'dino-fast[dali]' to compare it.")
    if args.save:
        write_results(args.save, text)
    print(environment())


if __name__ == "__main__":
    main()
