"""``python -m dino_fast.eval_linear``: DINO's linear evaluation (Caron et al. 2021; official
``eval_linear.py``): a linear classifier trained on the frozen teacher backbone's features.

Features: the CLS tokens of the last ``--n_last_blocks`` blocks, concatenated, and with
``--avgpool_patchtokens true`` the last block's average-pooled patch tokens (official settings,
the defaults here: n = 4 without pooling for vit_tiny and vit_small, n = 1 with pooling for
vit_base). The classifier (weights N(0, 0.01), bias 0) is trained with SGD (momentum 0.9, no
weight decay, lr ``--lr`` x global batch / 256, cosine to 0 over ``--epochs``, 100 by default) on
RandomResizedCrop + flip crops, and validated on resize 256 (bicubic) + center crop 224 every
``--val_freq`` epochs: top-1, and top-5 with at least 5 classes. Data as ``eval_knn`` takes it:
``--data_path ROOT`` with ``ROOT/train`` and ``ROOT/val`` (official), ``--data_path`` with
``--val_path``, or ``--val_split`` of one labelled folder.

``--output_dir`` receives ``checkpoint.pth.tar`` after every epoch (the official layout) and
``log.txt`` (one JSON line per epoch); started again on the same folder, training resumes from it
(refused if the saved classifier was trained on another backbone; another ``--epochs`` moves the
cosine schedule onto the new length). ``--evaluate`` only validates the saved classifier. Under
``torchrun`` (or ``torch.distributed.launch``, whose ``--local-rank`` is accepted) each process
reads its shard of every epoch and the classifier is DistributedDataParallel, as official.

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

from dino_fast.cli.args import (
    add_launcher_args,
    add_model_args,
    bool_flag,
    load_model,
    resolve_device,
)
from dino_fast.cli.errors import UserError, add_debug_flag, command
from dino_fast.cli.flags import EVAL_LINEAR, EVAL_LINEAR_PATHS, validate_args
from dino_fast.evaluation.knn import build_datasets
from dino_fast.evaluation.linear import (
    CHECKPOINT_NAME,
    LinearClassifier,
    backbone_record,
    build_optimizer,
    check_feature_args,
    default_feature_args,
    extract_features,
    feature_dim,
    frozen_features,
    restore_state,
    save_state,
    stretch_schedule,
    train_one_epoch,
    train_transform,
    validate,
)
from dino_fast.models import build_vit, detect_arch
from dino_fast.training import distributed as dist_utils

CACHED_NOTE = ("--cached_features: features extracted once without augmentation; a fast proxy, "
               "not the official linear-evaluation number")
SPLIT_FLAGS = ("--val_path", "--val_split")  # the flags that choose the val set


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
    p.add_argument("--data_path", required=True,
                   help="ROOT with ROOT/train and ROOT/val (official layout), or a train folder "
                   "<root>/<class>/<image> (or its shard set: python -m dino_fast.shards) "
                   "with one of --val_path and --val_split")
    p.add_argument("--val_path", default=None,
                   help="val folder or shard set with the same classes")
    p.add_argument("--val_split", type=float, default=None,
                   help="without --val_path: this fraction of each class of --data_path is val")
    p.add_argument("--image_size", type=int, default=224,
                   help="crop size (val images are resized to image_size * 256 / 224 first)")
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--val_freq", type=int, default=1, help="validate every N epochs")
    p.add_argument("--output_dir", default=".", help="checkpoint.pth.tar and log.txt")
    p.add_argument("--evaluate", action="store_true",
                   help="only validate the classifier saved in --output_dir")
    p.add_argument("--cached_features", action="store_true",
                   help="extract features once, without augmentation, and train on them (fast; "
                   "not the official number)")
    p.add_argument("--num_labels", type=int, default=None,
                   help="official flag; the classes are those of --data_path, so it must agree")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--seed", type=int, default=0,
                   help="classifier init, shuffling, crops, the val split, a random backbone")
    add_launcher_args(p)
    add_debug_flag(p)
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


def backbone_name(args, arch: str, patch_size: int) -> str:
    """How the messages and the saved classifier name the backbone."""
    if args.checkpoint is None:
        return f"a random {arch}/{patch_size} (--seed {args.seed})"
    return f"{os.path.abspath(args.checkpoint)} (key {args.key})"


def loaders(args, train_data, val_data, device):
    """The train loader (sharded and shuffled per epoch by its sampler; None without train
    data) and the val loader."""
    workers = min(args.num_workers, os.cpu_count() or 1)
    common = {"batch_size": args.batch_size_per_gpu, "num_workers": workers,
              "pin_memory": device.type == "cuda"}
    val_loader = torch.utils.data.DataLoader(val_data, shuffle=False, **common)
    if train_data is None:
        return None, val_loader
    sampler = torch.utils.data.distributed.DistributedSampler(
        train_data, num_replicas=dist_utils.get_world_size(), rank=dist_utils.get_rank(),
        shuffle=True, seed=args.seed)
    return torch.utils.data.DataLoader(train_data, sampler=sampler, **common), val_loader


def feature_settings(args, arch: str, depth: int) -> tuple[int, bool]:
    """``(n_last_blocks, avgpool_patchtokens)``: the flags, else the official ones for ``arch``."""
    n_blocks, avgpool = default_feature_args(arch)
    n_blocks = args.n_last_blocks if args.n_last_blocks is not None else n_blocks
    avgpool = args.avgpool_patchtokens if args.avgpool_patchtokens is not None else avgpool
    check_feature_args(n_blocks, avgpool, depth)
    return n_blocks, avgpool


def labelled_data(args):
    """The train and val image sets of the data flags (checked before any model is loaded)."""
    train_set, val_set = build_datasets(args.data_path, args.val_path, args.val_split,
                                        args.image_size, args.seed, split_flags=SPLIT_FLAGS)
    if args.num_labels is not None and args.num_labels != len(train_set.classes):
        raise UserError(f"--num_labels {args.num_labels}, but {args.data_path} has "
                        f"{len(train_set.classes)} classes")
    if dist_utils.is_main_process():
        print(f"{len(train_set)} train / {len(val_set)} val images, {len(train_set.classes)} "
              f"classes{'; ' + CACHED_NOTE if args.cached_features else ''}", flush=True)
    return train_set, val_set


def prepare_data(args, train_set, val_set, featurize, device):
    """``(train data, val data, featurizer)``: augmented images and ``featurize``, or
    (``--cached_features``) features extracted once and the identity; with ``--evaluate`` there
    is nothing to extract from the train set (None)."""
    if not args.cached_features:
        train_set.transform = train_transform(args.image_size)
        return train_set, val_set, featurize
    extract = partial(extract_features, featurize, batch_size=args.batch_size_per_gpu,
                      num_workers=min(args.num_workers, os.cpu_count() or 1), device=device)
    train_data = None if args.evaluate else extract(train_set, desc="train features")
    return train_data, extract(val_set, desc="val features"), nn.Identity()


def fit(args, featurize, classifier, optimizer, scheduler, train_data, val_data, device,
        start_epoch: int, best_acc: float, backbone: dict) -> dict:
    """The official epoch loop from ``start_epoch``: train, validate every ``--val_freq``
    epochs and at the end, log and save (rank 0, with the ``backbone`` record). Returns the
    last validation with ``best_acc``."""
    train_loader, val_loader = loaders(args, train_data, val_data, device)
    trained = classifier
    if dist_utils.is_dist():
        trained = nn.parallel.DistributedDataParallel(
            classifier, device_ids=[device.index] if device.type == "cuda" else None)
    main, stats = dist_utils.is_main_process(), {}
    for epoch in range(start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        torch.manual_seed(args.seed + 1000 * epoch + dist_utils.get_rank())  # crops, workers
        log = {f"train_{k}": v for k, v in train_one_epoch(
            featurize, trained, optimizer, train_loader, device, f"epoch {epoch}").items()}
        scheduler.step()
        log["epoch"] = epoch
        if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
            stats = validate(featurize, classifier, val_loader, classifier.num_labels, device)
            best_acc = max(best_acc, stats["acc1"])
            top5 = f", top-5 {stats['acc5']:.2f}%" if "acc5" in stats else ""
            if main:
                print(f"epoch {epoch}: top-1 {stats['acc1']:.2f}%{top5} on {len(val_data)} "
                      f"val images (best top-1 {best_acc:.2f}%)", flush=True)
            log.update({f"test_{k}": v for k, v in stats.items()})
        if main:
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps(log) + "\n")
            save_state(os.path.join(args.output_dir, CHECKPOINT_NAME), classifier, optimizer,
                       scheduler, epoch + 1, best_acc, args.cached_features, backbone)
    return {**stats, "best_acc": best_acc}


def resume(args, path, classifier, optimizer, scheduler, backbone) -> tuple[int, float]:
    """``(start epoch, best top-1)``: those of the classifier saved at ``path`` (refused when
    trained on another backbone than ``backbone``), after printing what the resumed run does;
    ``(0, 0.0)`` when there is none."""
    if not os.path.isfile(path):
        return 0, 0.0
    restored = restore_state(path, classifier, optimizer, scheduler, args.cached_features,
                             backbone)
    lines = [f"resumed from {path} at epoch {restored.epoch}", restored.note]
    if not args.evaluate and restored.saved_epochs not in (None, args.epochs):
        lines.append(schedule_change(args.epochs, restored, optimizer, scheduler))
    if dist_utils.is_main_process():
        print("\n".join(line for line in lines if line), flush=True)
    return restored.epoch, restored.best_acc


def schedule_change(epochs: int, restored, optimizer, scheduler) -> str:
    """Put the restored cosine schedule on ``--epochs`` and say so in one line."""
    if restored.epoch >= epochs:
        return (f"note: --epochs {epochs}, and the classifier has trained {restored.epoch} "
                "epochs: nothing left to train")
    old_lr = optimizer.param_groups[0]["lr"]
    new_lr = stretch_schedule(optimizer, scheduler, epochs)
    return (f"note: --epochs {epochs}, the saved schedule was for {restored.saved_epochs}: the "
            f"cosine lr now anneals to 0 at epoch {epochs}, as if started with --epochs "
            f"{epochs} (epoch {restored.epoch} at lr {new_lr:.4g} instead of {old_lr:.4g})")


def run(args, device) -> dict:
    """Train (or, with ``--evaluate``, only validate) the linear classifier; returns the last
    validation's statistics with ``best_acc``."""
    path = os.path.join(args.output_dir, CHECKPOINT_NAME)
    if args.evaluate and not os.path.isfile(path):
        raise UserError(f"--evaluate: no classifier at {path}")
    train_set, val_set = labelled_data(args)
    model, arch = frozen_backbone(args, device)
    patch_size = model.patch_embed.patch_size
    try:
        n_blocks, avgpool = feature_settings(args, arch, len(model.blocks))
        backbone = backbone_record(model, backbone_name(args, arch, patch_size))
        if dist_utils.is_main_process():
            print(f"linear evaluation of {backbone['name']}: {arch}/{patch_size}, last "
                  f"{n_blocks} CLS tokens{' + pooled patch tokens' if avgpool else ''}",
                  flush=True)
        torch.manual_seed(args.seed)
        classifier = LinearClassifier(feature_dim(model.embed_dim, n_blocks, avgpool),
                                      len(train_set.classes)).to(device)
        optimizer, scheduler = build_optimizer(classifier, args.lr, args.batch_size_per_gpu,
                                               args.epochs)
        start_epoch, best_acc = resume(args, path, classifier, optimizer, scheduler, backbone)
    except ValueError as err:
        raise UserError(str(err)) from err
    featurize = partial(frozen_features, model, n_last_blocks=n_blocks, avgpool=avgpool)
    train_data, val_data, featurize = prepare_data(args, train_set, val_set, featurize, device)
    if args.evaluate:
        val_loader = loaders(args, None, val_data, device)[1]
        stats = validate(featurize, classifier, val_loader, classifier.num_labels, device)
        print(f"Accuracy of the network on the {len(val_data)} test images: "
              f"{stats['acc1']:.1f}%", flush=True)
        return {**stats, "best_acc": best_acc}
    result = fit(args, featurize, classifier, optimizer, scheduler, train_data, val_data, device,
                 start_epoch, best_acc, backbone)
    if dist_utils.is_main_process():
        print(f"Linear classifier on frozen features trained. Top-1 test accuracy: "
              f"{result['best_acc']:.1f}{' (' + CACHED_NOTE + ')' if args.cached_features else ''}",
              flush=True)
    return result


@command
def main(argv=None) -> dict:
    """Entry point of ``python -m dino_fast.eval_linear``; returns the last validation's stats."""
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(args, EVAL_LINEAR, EVAL_LINEAR_PATHS, parser)
    args.device = resolve_device(args.device)
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
