"""Linear classification on frozen features: DINO's linear evaluation (Caron et al. 2021; official
``eval_linear.py``). ``python -m dino_fast.eval_linear`` is the command over it.

The backbone is frozen. Features: the CLS tokens of the last ``n_last_blocks`` blocks (each
through the final norm) concatenated, and with ``avgpool_patchtokens`` the last block's patch
tokens averaged, interleaved with its CLS token as the official reshape does (the layout of
official linear weights). Official settings: n = 4 without pooling for ViT-S (and tiny), n = 1 with
pooling for ViT-B. A linear layer (weights N(0, 0.01), bias 0) is trained with cross-entropy by SGD
(momentum 0.9, no weight decay) at ``lr * global batch / 256``, cosine-annealed to 0 per epoch.

The saved classifier records the backbone it was trained on (:func:`backbone_record`: a name and
a SHA-256 of the backbone's weights), so that a resume or ``--evaluate`` on another backbone is
refused instead of mixing two backbones' features in one classifier.
"""
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

from dino_fast.cli.progress import track
from dino_fast.data.augment import MEAN, STD
from dino_fast.models.checkpoint import load_file, save_atomic
from dino_fast.training.distributed import get_world_size, is_dist

CHECKPOINT_NAME = "checkpoint.pth.tar"  # as official


def default_feature_args(arch: str) -> tuple[int, bool]:
    """``(n_last_blocks, avgpool_patchtokens)`` of the official evaluation of ``arch``; the
    paper gives none for vit_large, which is treated as vit_base (the wide model)."""
    return (1, True) if arch in ("vit_base", "vit_large") else (4, False)


def check_feature_args(n_last_blocks: int, avgpool: bool, depth: int):
    """Reject settings the official feature code cannot compute (it pools with n = 1 only)."""
    if not 1 <= n_last_blocks <= depth:
        raise ValueError(f"--n_last_blocks must be in [1, {depth}], got {n_last_blocks}")
    if avgpool and n_last_blocks != 1:
        raise ValueError("--avgpool_patchtokens true needs --n_last_blocks 1 (the official "
                         "feature layout pools only then)")


def feature_dim(embed_dim: int, n_last_blocks: int, avgpool: bool) -> int:
    """Width of :func:`frozen_features`."""
    return embed_dim * (n_last_blocks + int(avgpool))


@torch.no_grad()
def frozen_features(model, images, n_last_blocks: int, avgpool: bool) -> torch.Tensor:
    """The official linear-evaluation features of ``images``: ``(B, feature_dim)``."""
    blocks = model.get_intermediate_layers(images, n_last_blocks)  # n x (B, 1 + N, D)
    output = torch.cat([tokens[:, 0] for tokens in blocks], dim=-1)  # (B, n * D)
    if avgpool:  # (B, D, 2) flattened: CLS and pooled values interleaved, as official
        pooled = blocks[-1][:, 1:].mean(dim=1)
        output = torch.stack((output, pooled), dim=-1).reshape(output.shape[0], -1)
    return output


class LinearClassifier(nn.Module):
    """One linear layer on flattened features, initialised as official (N(0, 0.01), bias 0)."""

    def __init__(self, dim: int, num_labels: int = 1000):
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x):
        return self.linear(x.view(x.size(0), -1))


def train_transform(image_size: int = 224):
    """RandomResizedCrop (torchvision defaults: scale (0.08, 1), bilinear), flip, normalise."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def build_optimizer(classifier: nn.Module, lr: float, batch_size_per_gpu: int, epochs: int):
    """SGD at the linearly scaled lr (momentum 0.9, no weight decay) and its per-epoch cosine
    annealing to 0, as official."""
    optimizer = torch.optim.SGD(classifier.parameters(),
                                lr * batch_size_per_gpu * get_world_size() / 256.0,
                                momentum=0.9, weight_decay=0)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)


def _sum_over_processes(values: list[float], device) -> list[float]:
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    if is_dist():
        torch.distributed.all_reduce(totals)
    return totals.tolist()


def train_one_epoch(featurize, classifier, optimizer, loader, device, desc="train") -> dict:
    """One epoch of the official loop: frozen features, cross-entropy, SGD step per batch.
    ``featurize`` maps a batch of the loader to features (the identity on cached features).
    Returns the loss averaged over all processes' batches and the lr."""
    classifier.train()
    loss_sum, count = 0.0, 0
    for inputs, target in track(loader, desc):
        inputs = inputs.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with torch.no_grad():
            features = featurize(inputs)
        loss = F.cross_entropy(classifier(features), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum, count = loss_sum + loss.item(), count + 1
    loss_sum, count = _sum_over_processes([loss_sum, count], device)
    return {"loss": loss_sum / max(count, 1), "lr": optimizer.param_groups[0]["lr"]}


@torch.no_grad()
def validate(featurize, classifier, loader, num_labels: int, device, desc="val") -> dict:
    """Top-1 (and top-5 with at least 5 classes) in percent, and the mean loss, over ``loader``
    (every process evaluates the whole val set, as official)."""
    classifier.eval()
    loss_sum = correct1 = correct5 = seen = 0.0
    for inputs, target in track(loader, desc):
        inputs, target = inputs.to(device), target.to(device)
        output = classifier(featurize(inputs))
        loss_sum += F.cross_entropy(output, target, reduction="sum").item()
        top = output.topk(min(5, num_labels), dim=1).indices  # (B, k)
        hits = top.eq(target.view(-1, 1))
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        seen += len(target)
    stats = {"acc1": 100.0 * correct1 / seen, "loss": loss_sum / seen}
    if num_labels >= 5:
        stats["acc5"] = 100.0 * correct5 / seen
    return stats


@torch.no_grad()
def extract_features(featurize, dataset, batch_size: int, num_workers: int, device,
                     desc: str) -> torch.utils.data.TensorDataset:
    """``featurize`` over ``dataset`` in order, once: a dataset of (features, label) on the CPU
    (``--cached_features``)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers)
    features, labels = [], []
    for images, target in track(loader, desc):
        features.append(featurize(images.to(device)).cpu())
        labels.append(torch.as_tensor(target))
    return torch.utils.data.TensorDataset(torch.cat(features), torch.cat(labels))


def state_fingerprint(state_dict: dict) -> str:
    """SHA-256 (hex) of the names, dtypes, shapes and bytes of a state dict's tensors: the same
    weights give the same digest wherever the file lies and whatever its date."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def backbone_record(model: nn.Module, name: str) -> dict:
    """What identifies the backbone a classifier is trained on, saved with it: ``name`` (the
    checkpoint and the network in it, for the messages) and the weights' fingerprint."""
    return {"name": name, "sha256": state_fingerprint(model.state_dict())}


def check_backbone(path: str, saved: dict | None, current: dict) -> str | None:
    """Refuse (``ValueError`` naming both) the classifier at ``path`` when it was trained on
    another backbone than ``current``; a note when ``path`` records none (official files)."""
    if saved is None:
        return (f"note: {path} does not record its backbone (an official or older file); "
                f"using it with {current['name']} unchecked")
    if saved["sha256"] != current["sha256"]:
        raise ValueError(f"{path} holds a classifier trained on {saved['name']} (weights "
                         f"{saved['sha256'][:12]}), not on {current['name']} (weights "
                         f"{current['sha256'][:12]}): evaluate that backbone, or give this one "
                         "another --output_dir")
    return None


def save_state(path: str, classifier, optimizer, scheduler, epoch: int, best_acc: float,
               cached_features: bool, backbone: dict | None = None):
    """Write the official ``checkpoint.pth.tar`` (``epoch`` = the next epoch, ``state_dict`` with
    DistributedDataParallel's ``module.`` names, ``optimizer``, ``scheduler``, ``best_acc``), plus
    ours: whether the classifier was trained on cached features, and ``backbone``
    (:func:`backbone_record`). Atomic (temporary file, rename)."""
    state = {f"module.{k}": v for k, v in classifier.state_dict().items()}
    save_atomic({"epoch": epoch, "state_dict": state, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "best_acc": best_acc,
                 "cached_features": cached_features, "backbone": backbone}, path)


@dataclass
class Restored:
    """What :func:`restore_state` read besides the weights."""

    epoch: int  # the next epoch
    best_acc: float
    saved_epochs: int | None  # the --epochs of the saved cosine schedule (None: no scheduler)
    note: str | None  # one line to print, or None


def restore_state(path: str, classifier, optimizer=None, scheduler=None,
                  cached_features: bool | None = None, backbone: dict | None = None) -> Restored:
    """Load :func:`save_state`'s file (or the official one) into ``classifier`` and, when given,
    ``optimizer`` and ``scheduler``. A classifier of another shape, trained in the other feature
    mode, or (with ``backbone``) on another backbone, is an error that says so."""
    checkpoint = load_file(path)
    saved_mode = checkpoint.get("cached_features")
    if cached_features is not None and saved_mode is not None and saved_mode != cached_features:
        raise ValueError(f"{path} was trained {'with' if saved_mode else 'without'} "
                         "--cached_features; resume it the same way or use another --output_dir")
    note = None if backbone is None else check_backbone(path, checkpoint.get("backbone"),
                                                         backbone)
    state = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    try:
        classifier.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path} holds another classifier (different --n_last_blocks, "
                         f"--avgpool_patchtokens, arch or classes?): {err}") from err
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])
    saved_epochs = checkpoint.get("scheduler", {}).get("T_max")
    return Restored(int(checkpoint["epoch"]), float(checkpoint["best_acc"]), saved_epochs, note)


def stretch_schedule(optimizer, scheduler, epochs: int) -> float:
    """Move a restored per-epoch cosine schedule onto the one of ``epochs`` epochs, at the epoch
    it is at: from there the lr is what a run started with ``--epochs epochs`` would have.
    Returns the lr of the next epoch."""
    scheduler.T_max = epochs
    progress = min(scheduler.last_epoch, epochs) / epochs
    for group in optimizer.param_groups:  # the closed form, eta_min 0; steps recur from it
        group["lr"] = group["initial_lr"] * (1 + math.cos(math.pi * progress)) / 2
    return optimizer.param_groups[0]["lr"]
