"""``python -m dino_fast.eval_knn``: weighted k-NN classification on frozen features (Caron et al.
2021, Sec. 4.1; official ``eval_knn.py``).

The teacher backbone's CLS features of the train and val images are L2-normalised; each val image
takes the ``k`` train images of highest cosine similarity, each votes for its class with weight
``exp(similarity / T)`` (T = 0.07), and the classes are ranked by their summed votes. Top-1 and
top-5 (top-5 only with at least 5 classes) are reported for every k in ``--nb_knn``; k is capped
at the number of train images. Images are resized (bicubic) to ``image_size * 256 / 224``,
center-cropped to ``image_size`` (224 by default, as official) and normalised.

With ``--leave_one_out`` (our addition, for small labelled sets) there is no val set: every image
of ``--data_path`` is a query whose neighbours are all the other images. Self-supervised training
never sees the labels, so this is fair on the very images DINO trained on, and it scores every
label instead of a held-out few.
"""
import argparse

import torch

from dino_fast.cli import load_model
from dino_fast.knn import build_datasets, knn_evaluate
from dino_fast.models import ARCHS, build_vit


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (official ``eval_knn.py`` names where they exist)."""
    p = argparse.ArgumentParser("dino_fast.eval_knn", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="training checkpoint or weights; none: random initialisation (--seed)")
    p.add_argument("--key", "--checkpoint_key", dest="key", default="teacher")
    p.add_argument("--arch", default=None, choices=sorted(ARCHS),
                   help="default: what the checkpoint holds (vit_small without one)")
    p.add_argument("--patch_size", default=None, type=int,
                   help="default: the checkpoint's (16 without one)")
    p.add_argument("--data_path", required=True, help="train folder: <root>/<class>/<image>")
    p.add_argument("--val_path", default=None, help="val folder with the same classes")
    p.add_argument("--val_split", default=None, type=float,
                   help="without --val_path: this fraction of each class of --data_path is val")
    p.add_argument("--leave_one_out", action="store_true",
                   help="no val set: each image of --data_path is classified by the others")
    p.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int)
    p.add_argument("--temperature", default=0.07, type=float)
    p.add_argument("--image_size", default=224, type=int, help="center-crop size")
    p.add_argument("--batch_size", "--batch_size_per_gpu", dest="batch_size", default=128,
                   type=int)
    p.add_argument("--num_workers", default=4, type=int)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--seed", default=0, type=int, help="random init and the val split")
    return p


def main(argv=None) -> dict:
    """Entry point of ``python -m dino_fast.eval_knn``; prints and returns the accuracies."""
    args = build_parser().parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but CUDA is not available")
    if min(args.nb_knn) < 1:
        raise SystemExit(f"--nb_knn values must be >= 1, got {args.nb_knn}")
    torch.manual_seed(args.seed)
    if args.checkpoint is None:
        model = build_vit(args.arch or "vit_small", args.patch_size or 16)
    else:
        model = load_model(args.checkpoint, args.arch, args.patch_size, args.key)
    try:
        train_set, val_set = build_datasets(args.data_path, args.val_path, args.val_split,
                                            args.image_size, args.seed, args.leave_one_out)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    queries = (f"leave-one-out on {len(train_set)}" if val_set is None
               else f"on {len(train_set)} train / {len(val_set)} val")
    print(f"k-NN {queries} images, {len(train_set.classes)} classes, "
          f"{args.checkpoint or 'random init'}", flush=True)
    results = knn_evaluate(model, train_set, val_set, args.nb_knn, args.temperature,
                           args.batch_size, args.num_workers, device)
    for k, acc in results.items():
        top5 = f", Top5: {acc['top5']:.2f}" if acc["top5"] is not None else ""
        print(f"{k}-NN classifier result: Top1: {acc['top1']:.2f}{top5}", flush=True)
    return results


if __name__ == "__main__":
    main()
