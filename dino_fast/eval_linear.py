"""``python -m dino_fast.eval_linear``: DINO's linear evaluation (Caron et al. 2021; official
``eval_linear.py``): a linear classifier trained on the frozen teacher backbone's features.

Features: the CLS tokens of the last ``--n_last_blocks`` blocks, concatenated, and with
``--avgpool_patchtokens true`` the last block's average-pooled patch tokens (official settings,
the defaults here: n = 4 without pooling for vit_tiny and vit_small, n = 1 with pooling for
vit_base). The classifier (weights N(0, 0.01), bias 0) is trained with SGD (momentum 0.9, no
weight decay, lr ``--lr`` x global batch / 256, cosine to 0 over ``--epochs``, 100 by default) on
RandomResizedCrop + flip crops, and validated on resize 256 (bicubic) + center crop 224 every
``--val_freq`` epochs: top-1, and top-5 with at least 5 classes. Data as ``eval_knn`` takes it:
``--data_path`` with ``--val_path``, or ``--val_split`` of one labelled folder.

``--output_dir`` receives ``checkpoint.pth.tar`` after every epoch (the official layout) and
``log.txt`` (one JSON line per epoch); started again on the same folder, training resumes from it.
``--evaluate`` only validates the saved classifier. Under ``torchrun`` each process reads its
shard of every epoch and the classifier is DistributedDataParallel, as official.

``--cached_features`` (ours): features are extracted once, without augmentation (train images are
resized and center-cropped like the val images), and the classifier trains on them. Much faster,
but not the official protocol, so not its number.
"""
import argparse
import json
import os
from functools import partial

import torch
from torch import nn

from dino_fast import distributed as dist_utils
from dino_fast.cli import add_model_args, bool_flag, load_model
from dino_fast.knn import build_datasets
from dino_fast.linear import (CHECKPOINT_NAME, LinearClassifier, build_optimizer,
                              check_feature_args, default_feature_args, extract_features,
                              feature_dim, frozen_features, restore_state, save_state,
                              train_one_epoch, train_transform, validate)
from dino_fast.models import build_vit, detect_arch

CACHED_NOTE = ("--cached_features: features extracted once without augmentation; a fast proxy, "
               "not the official linear-evaluation number")


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (the official ``eval_linear.py`` names where they exist)."""
    p = argparse.ArgumentParser("dino_fast.eval_linear", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--n_last_blocks", type=int, default=None,
                   help="concatenate the CLS tokens of the last n blocks (default: 4, 1 for "
                   "vit_base)")
    p.add_argument("--avgpool_patchtokens", type=bool_flag, default=None,
                   help="true: add the last block's average-pooled patch tokens (default: "
                   "false, true for vit_base)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.001, help="for a global batch of 256 (scaled)")
    p.add_argument("--batch_size_per_gpu", type=int, default=128)
    p.add_argument("--data_path", required=True, help="train folder: <root>/<class>/<image>")
    p.add_argument("--val_path", default=None, help="val folder with the same classes")
    p.add_argument("--val_split", type=float, default=None,
                   help="without --val_path: this fraction of each class of --data_path is val")
    p.add_argument("--image_size", type=int, default=224,
                   help="crop size (val images are resized to image_size * 256 / 224 first)")
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--val_freq", type=int, default=1, help="validate every N epochs")
    p.add_argument("--output_dir", default=".", help="checkpoint.pth.tar and log.txt")
    p.add_argument("--evaluate", action="store_true",
                   help="only validate the classifier saved in --output_dir")
    p.add_argument("--cached_features", action="store_true", help=CACHED_NOTE)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--seed", type=int, default=0,
                   help="classifier init, shuffling, crops, the val split, a random backbone")
    return p


def frozen_backbone(args, device):
    """The backbone to evaluate, frozen, and its arch name."""
    torch.manual_seed(args.seed)
    if args.checkpoint is None:
        model = build_vit(args.arch or "vit_small", args.patch_size or 16)
    else:
        model = load_model(args.checkpoint, args.arch, args.patch_size, args.key)
    model.set_attn_backend("sdpa")  # the eager softmax's result, without the N x N tensor
    arch = args.arch or detect_arch(model.state_dict())[0]
    return model.eval().requires_grad_(False).to(device), arch


def loaders(args, train_data, val_data, device):
    """The train loader (sharded and shuffled per epoch by its sampler) and the val loader."""
    sampler = torch.utils.data.distributed.DistributedSampler(
        train_data, num_replicas=dist_utils.get_world_size(), rank=dist_utils.get_rank(),
        shuffle=True, seed=args.seed)
    workers = min(args.num_workers, os.cpu_count() or 1)
    common = {"batch_size": args.batch_size_per_gpu, "num_workers": workers,
              "pin_memory": device.type == "cuda"}
    return (torch.utils.data.DataLoader(train_data, sampler=sampler, **common),
            torch.utils.data.DataLoader(val_data, shuffle=False, **common))


def run(args, device) -> dict:
    """Train (or, with ``--evaluate``, only validate) the linear classifier; returns the last
    validation's statistics with ``best_acc``."""
    model, arch = frozen_backbone(args, device)
    n_blocks, avgpool = default_feature_args(arch)
    n_blocks = args.n_last_blocks if args.n_last_blocks is not None else n_blocks
    avgpool = args.avgpool_patchtokens if args.avgpool_patchtokens is not None else avgpool
    try:
        check_feature_args(n_blocks, avgpool, len(model.blocks))
        train_set, val_set = build_datasets(args.data_path, args.val_path, args.val_split,
                                            args.image_size, args.seed)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    num_labels = len(train_set.classes)
    featurize = partial(frozen_features, model, n_last_blocks=n_blocks, avgpool=avgpool)
    main = dist_utils.is_main_process()
    if main:
        print(f"linear evaluation of {args.checkpoint or 'a random ' + arch}: {arch}/"
              f"{model.patch_embed.patch_size}, last {n_blocks} CLS tokens"
              f"{' + pooled patch tokens' if avgpool else ''}, {len(train_set)} train / "
              f"{len(val_set)} val images, {num_labels} classes", flush=True)
    if args.cached_features:
        if main:
            print(CACHED_NOTE, flush=True)
        extract = partial(extract_features, featurize, batch_size=args.batch_size_per_gpu,
                          num_workers=min(args.num_workers, os.cpu_count() or 1), device=device)
        train_data, val_data = extract(train_set, desc="train features"), extract(
            val_set, desc="val features")
        featurize = nn.Identity()
    else:
        train_set.transform = train_transform(args.image_size)
        train_data, val_data = train_set, val_set
    train_loader, val_loader = loaders(args, train_data, val_data, device)

    torch.manual_seed(args.seed)
    classifier = LinearClassifier(feature_dim(model.embed_dim, n_blocks, avgpool),
                                  num_labels).to(device)
    optimizer, scheduler = build_optimizer(classifier, args.lr, args.batch_size_per_gpu,
                                           args.epochs)
    path = os.path.join(args.output_dir, CHECKPOINT_NAME)
    start_epoch, best_acc = 0, 0.0
    if os.path.isfile(path):
        try:
            start_epoch, best_acc = restore_state(path, classifier, optimizer, scheduler,
                                                  args.cached_features)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from err
        if main:
            print(f"resumed from {path} at epoch {start_epoch}", flush=True)
    elif args.evaluate:
        raise SystemExit(f"error: --evaluate: no classifier at {path}")
    if args.evaluate:
        stats = validate(featurize, classifier, val_loader, num_labels, device)
        print(f"Accuracy of the network on the {len(val_data)} test images: "
              f"{stats['acc1']:.1f}%", flush=True)
        return {**stats, "best_acc": best_acc}
    trained = classifier
    if dist_utils.is_dist():
        trained = nn.parallel.DistributedDataParallel(
            classifier, device_ids=[device.index] if device.type == "cuda" else None)
    stats = {}
    for epoch in range(start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        torch.manual_seed(args.seed + 1000 * epoch + dist_utils.get_rank())  # crops, workers
        log = {f"train_{k}": v for k, v in train_one_epoch(
            featurize, trained, optimizer, train_loader, device, f"epoch {epoch}").items()}
        scheduler.step()
        log["epoch"] = epoch
        if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
            stats = validate(featurize, classifier, val_loader, num_labels, device)
            best_acc = max(best_acc, stats["acc1"])
            top5 = f", top-5 {stats['acc5']:.2f}%" if "acc5" in stats else ""
            if main:
                print(f"epoch {epoch}: top-1 {stats['acc1']:.2f}%{top5} on {len(val_data)} "
                      f"val images (best top-1 {best_acc:.2f}%)", flush=True)
            log.update({f"test_{k}": v for k, v in stats.items()})
        if main:
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps(log) + "\n")
            save_state(path, classifier, optimizer, scheduler, epoch + 1, best_acc,
                       args.cached_features)
    if main:
        print(f"Linear classifier on frozen features trained. Top-1 test accuracy: "
              f"{best_acc:.1f}{' (' + CACHED_NOTE + ')' if args.cached_features else ''}",
              flush=True)
    return {**stats, "best_acc": best_acc}


def main(argv=None) -> dict:
    """Entry point of ``python -m dino_fast.eval_linear``; returns the last validation's stats."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.val_path is None) == (args.val_split is None):
        parser.error("give one of --val_path and --val_split")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but CUDA is not available")
    device = dist_utils.init_distributed(args.device)
    if dist_utils.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
    all_ranks_done = False
    try:
        result = run(args, device)
        all_ranks_done = True
        return result
    finally:
        dist_utils.cleanup(all_ranks_done)


if __name__ == "__main__":
    main()
