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

The official flags carry over: ``--pretrained_weights``, ``--checkpoint_key``, ``--arch``
(``deit_*`` as ``vit_*``), ``--patch_size``, ``--batch_size_per_gpu``, ``--nb_knn``,
``--temperature``, ``--num_workers`` (capped at the CPU count), ``--use_cuda``,
``--dump_features``, ``--load_features``, ``--data_path ROOT`` with ``ROOT/train`` and
``ROOT/val``, and ``--dist_url``/``--local_rank`` (``--local-rank``) under a launcher. The
evaluation runs in one process: under ``torchrun`` or ``torch.distributed.launch`` rank 0 does it
all and the other ranks return at once (no duplicate work, no two writers of
``--dump_features``).
"""
import argparse
import os

import torch

from dino_fast.cli.args import (
    add_launcher_args,
    add_model_args,
    bool_flag,
    launched_rank,
    load_model,
    resolve_device,
)
from dino_fast.cli.errors import FlagError, add_debug_flag, command
from dino_fast.cli.flags import EVAL_KNN, EVAL_KNN_PATHS, validate_args
from dino_fast.evaluation.knn import (
    build_datasets,
    dataset_features,
    knn_scores,
    load_features,
    save_features,
)
from dino_fast.models import build_vit


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (official ``eval_knn.py`` names where they exist)."""
    p = argparse.ArgumentParser("dino_fast.eval_knn", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--data_path", default=None,
                   help="ROOT with ROOT/train and ROOT/val (official layout), or a train folder "
                   "<root>/<class>/<image> (or its shard set: python -m dino_fast.shards) "
                   "with one of --val_path, --val_split, --leave_one_out")
    p.add_argument("--val_path", default=None,
                   help="val folder or shard set with the same classes")
    p.add_argument("--val_split", default=None, type=float,
                   help="without --val_path: this fraction of each class of --data_path is val")
    p.add_argument("--leave_one_out", action="store_true",
                   help="no val set: each image of --data_path is classified by the others")
    p.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int)
    p.add_argument("--temperature", default=0.07, type=float)
    p.add_argument("--image_size", default=224, type=int, help="center-crop size (224)")
    p.add_argument("--batch_size", "--batch_size_per_gpu", dest="batch_size", default=128,
                   type=int)
    p.add_argument("--num_workers", default=10, type=int, help="capped at the CPU count")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--use_cuda", default=True, type=bool_flag,
                   help="official: keep the features on the GPU for the vote (false: on the "
                   "CPU, for less GPU memory)")
    p.add_argument("--dump_features", default=None,
                   help="folder to save the features in (official file names)")
    p.add_argument("--load_features", default=None,
                   help="folder of saved features: no model, no images")
    p.add_argument("--seed", default=0, type=int, help="random init and the val split")
    add_launcher_args(p)
    add_debug_flag(p)
    return p


def check_image_size(image_size: int, patch_size: int | None):
    """A flag error unless ``--image_size`` is a multiple of the patch size (when known)."""
    if patch_size and image_size % patch_size:
        raise FlagError(f"--image_size {image_size} must be a multiple of the patch size "
                        f"{patch_size}")


def compute_features(args, device):
    """The features of the images named by ``args``, written to ``--dump_features`` if given."""
    if args.data_path is None:
        raise FlagError("--data_path is required (unless --load_features is given)")
    patch_size = args.patch_size or (16 if args.checkpoint is None else None)
    check_image_size(args.image_size, patch_size)  # a flag error before reading any data
    train_set, val_set = build_datasets(args.data_path, args.val_path, args.val_split,
                                        args.image_size, args.seed, args.leave_one_out)
    torch.manual_seed(args.seed)
    if args.checkpoint is None:
        model = build_vit(args.arch or "vit_small", patch_size)
    else:
        model = load_model(args.checkpoint, args.arch, args.patch_size, args.key)
    check_image_size(args.image_size, model.patch_embed.patch_size)
    queries = (f"leave-one-out on {len(train_set)}" if val_set is None
               else f"on {len(train_set)} train / {len(val_set)} val")
    print(f"k-NN {queries} images, {len(train_set.classes)} classes, "
          f"{args.checkpoint or 'random init'}", flush=True)
    workers = min(args.num_workers, os.cpu_count() or 1)
    features = dataset_features(model, train_set, val_set, args.batch_size, workers, device)
    if args.dump_features:
        save_features(features, args.dump_features)
    return features


@command
def main(argv=None) -> dict:
    """Entry point of ``python -m dino_fast.eval_knn``; prints and returns the accuracies (an
    empty dict on the ranks above 0 of a launcher, which leave the evaluation to rank 0)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(args, EVAL_KNN, EVAL_KNN_PATHS, parser)
    if launched_rank() != 0:
        return {}
    device = resolve_device(args.device)
    if args.load_features:
        features = load_features(args.load_features, args.leave_one_out).to(device)
        print(f"k-NN on the features in {args.load_features}: {len(features.train)} train / "
              f"{'leave-one-out' if features.val is None else len(features.val)} val, "
              f"{features.num_classes} classes", flush=True)
    else:
        features = compute_features(args, device)
    if not args.use_cuda:
        features = features.to("cpu")
    results = knn_scores(features, args.nb_knn, args.temperature)
    for k, acc in results.items():
        top5 = f", Top5: {acc['top5']:.2f}" if acc["top5"] is not None else ""
        print(f"{k}-NN classifier result: Top1: {acc['top1']:.2f}{top5}", flush=True)
    return results


if __name__ == "__main__":
    main()
