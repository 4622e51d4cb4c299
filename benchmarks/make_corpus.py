"""Build a benchmark corpus of ImageNet-like JPEGs from photographs available offline.

Each output is a random crop (30-100 % of the source area, aspect 3/4 to 4/3) of a random source
photo, resized so that its short side is 300-500 px (ImageNet's typical range), randomly
mirrored, saved as JPEG quality 90 in ten class folders. The same ``--seed``, count and sources
give the same corpus, so anyone can rebuild it:

    python benchmarks/make_corpus.py --count 2000 --out .corpus
    python benchmarks/make_corpus.py --source /usr/share/backgrounds   # higher-res originals too

Sources: the photographs bundled with dino_fast (always) plus every ``--source`` folder.
"""
import argparse
import os
import random

from PIL import Image, ImageOps

from dino_fast.data import ImageFolderDataset, bundled_data_path
from dino_fast.data.folder import load_rgb

CLASSES = 10


def source_files(extra_folders: list[str]) -> list[str]:
    """The bundled photos and the images under each extra folder, in a fixed order."""
    files = [path for path, _ in ImageFolderDataset(bundled_data_path()).samples]
    for folder in extra_folders:
        files += [path for path, _ in ImageFolderDataset(folder).samples]
    return files


def corpus_image(source: Image.Image, rng: random.Random) -> Image.Image:
    """One ImageNet-like image cut from ``source``."""
    area = source.width * source.height * rng.uniform(0.3, 1.0)
    aspect = rng.uniform(3 / 4, 4 / 3)
    w = min(source.width, round((area * aspect) ** 0.5))
    h = min(source.height, round((area / aspect) ** 0.5))
    left, top = rng.randint(0, source.width - w), rng.randint(0, source.height - h)
    crop = source.crop((left, top, left + w, top + h))
    scale = rng.randint(300, 500) / min(w, h)
    crop = crop.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    return ImageOps.mirror(crop) if rng.random() < 0.5 else crop


def build_corpus(out: str, count: int, seed: int = 0, extra_folders: list[str] = ()) -> int:
    """Write ``count`` JPEGs under ``out``; returns the total size in bytes."""
    rng = random.Random(seed)
    sources = source_files(list(extra_folders))
    cache: dict[str, Image.Image] = {}
    total = 0
    for i in range(count):
        path = sources[rng.randrange(len(sources))]
        if path not in cache:
            cache[path] = load_rgb(path)
        folder = os.path.join(out, f"class_{i % CLASSES:02d}")
        os.makedirs(folder, exist_ok=True)
        target = os.path.join(folder, f"img_{i:06d}.jpg")
        corpus_image(cache[path], rng).save(target, quality=90)
        total += os.path.getsize(target)
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".corpus", help="output folder (default .corpus)")
    parser.add_argument("--count", type=int, default=2000, help="number of JPEGs (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", action="append", default=[],
                        help="extra folder of source photos (repeatable)")
    args = parser.parse_args(argv)
    size = build_corpus(args.out, args.count, args.seed, args.source)
    print(f"wrote {args.count} JPEGs, {size / 2**20:.1f} MiB, to {args.out}")


if __name__ == "__main__":
    main()
