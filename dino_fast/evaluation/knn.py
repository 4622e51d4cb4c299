"""Weighted k-NN classification on frozen features (Caron et al. 2021, Sec. 4.1; official
``eval_knn.py``): the datasets, the feature extraction and the vote. ``python -m
dino_fast.eval_knn`` is the command over it.

CLS features are L2-normalised; each query takes the ``k`` train images of highest cosine
similarity, each votes for its class with weight ``exp(similarity / T)`` (T = 0.07), and the
classes are ranked by their summed votes. Images are resized (bicubic) to
``image_size * 256 / 224``, center-cropped to ``image_size`` and normalised.
"""
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms

from dino_fast.cli.errors import UserError
from dino_fast.cli.progress import track
from dino_fast.data.augment import MEAN, STD
from dino_fast.data.datasets import open_dataset
from dino_fast.data.folder import ImageDataset
from dino_fast.data.shards import manifest_path

# Official eval_knn.py's --dump_features / --load_features files (test = val).
FEATURE_FILES = {"train": "trainfeat.pth", "train_labels": "trainlabels.pth",
                 "val": "testfeat.pth", "val_labels": "testlabels.pth"}
# The flags of eval_knn that choose the val set; eval_linear has the first two.
KNN_SPLIT_FLAGS = ("--val_path", "--val_split", "--leave_one_out")


def eval_transform(image_size: int = 224):
    """Resize ``image_size * 256 / 224`` bicubic, center crop ``image_size``, normalise."""
    return transforms.Compose([
        transforms.Resize(int(image_size * 256 / 224),
                          interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def labelled_dataset(root: str, image_size: int = 224) -> ImageDataset:
    """The images under ``root`` (an image folder or a shard set) with their class labels; a
    :class:`UserError` if some have none, if a class folder holds no image (official
    ``ImageFolder`` refuses it too), or if there are fewer than two classes (every vote would
    be right)."""
    dataset = open_dataset(root, transform=eval_transform(image_size))
    unlabelled = [dataset.name(ref) for ref, label in dataset.samples if label < 0]
    if not dataset.classes or unlabelled:
        raise UserError(f"{root!r}: evaluation needs every image inside a class sub-folder "
                        f"(root/<class>/<image>); {len(unlabelled)} image(s) have no class, "
                        f"e.g. {unlabelled[:3]}")
    empty = sorted(entry.name for entry in os.scandir(dataset.root) if entry.is_dir()
                   and not entry.name.startswith(".") and entry.name not in dataset.classes)
    if empty:
        raise UserError(f"{root!r}: class folder(s) {empty} hold no image; add their images or "
                        "remove the folders (a class without images cannot be evaluated)")
    if len(dataset.classes) < 2:
        raise UserError(f"{root!r} has {len(dataset.classes)} class folder "
                        f"({dataset.classes[0]!r}): evaluation needs at least two classes")
    return dataset


def split_samples(samples: list, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Split ``(path, label)`` pairs into train and val, per class, deterministically from
    ``seed``: ``round(val_fraction * n)`` images of each class go to val (at least one, and at
    least one stays in train when the class has two or more)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val_split must be in (0, 1), got {val_fraction}")
    by_class = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in sorted(by_class):
        members = by_class[label]
        order = torch.randperm(len(members), generator=gen).tolist()
        n_val = min(max(1, round(val_fraction * len(members))), max(len(members) - 1, 1))
        val += [members[i] for i in order[:n_val]]
        train += [members[i] for i in order[n_val:]]
    return train, val


@torch.no_grad()
def extract_features(model: nn.Module, dataset, batch_size: int = 128, num_workers: int = 4,
                     device="cpu", desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised CLS features ``(N, D)`` of ``dataset`` (in order) and its labels ``(N,)``."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers,
                                         pin_memory=torch.device(device).type == "cuda")
    model.eval().to(device)
    features, labels = [], []
    for images, targets in track(loader, desc):
        out = model(images.to(device, non_blocking=True)).float()  # (B, D)
        features.append(F.normalize(out, dim=1, p=2))
        labels.append(targets.to(device))
    return torch.cat(features), torch.cat(labels)


def knn_classify(train_features, train_labels, test_features, k: int, temperature: float = 0.07,
                 num_classes: int | None = None, chunk: int = 1024,
                 leave_one_out: bool = False) -> torch.Tensor:
    """Class scores ``(N_test, C)`` of the weighted k-NN vote: the ``k`` most cosine-similar train
    features each add ``exp(similarity / temperature)`` to their class. Features must be
    L2-normalised; ``k`` is capped at the number of candidate neighbours. ``leave_one_out``: the
    test rows are the train rows, and no row may be its own neighbour."""
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_features.shape[0] - int(leave_one_out))
    scores = []
    for start in range(0, test_features.shape[0], chunk):
        similarity = test_features[start:start + chunk] @ train_features.T  # (b, N_train)
        if leave_one_out:
            rows = torch.arange(similarity.shape[0], device=similarity.device)
            similarity[rows, start + rows] = float("-inf")
        top_sim, top_idx = similarity.topk(k, dim=1, largest=True, sorted=True)  # (b, k)
        weights = (top_sim / temperature).exp()
        votes = weights.new_zeros(top_sim.shape[0], num_classes)
        scores.append(votes.scatter_add_(1, train_labels[top_idx], weights))  # (b, C)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[float]:
    """Percentages of rows whose label is among the ``k`` highest scores, for each k."""
    ranked = scores.argsort(dim=1, descending=True, stable=True)
    correct = ranked.eq(labels.view(-1, 1))  # (N, C)
    return [100.0 * correct[:, :k].any(dim=1).sum().item() / len(labels) for k in ks]


@dataclass
class Features:
    """L2-normalised features ``(N, D)`` and labels ``(N,)`` of the train set and of the val set
    (None for leave-one-out, where the train images are the queries)."""

    train: torch.Tensor
    train_labels: torch.Tensor
    val: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        labels = [self.train_labels] + ([] if self.val_labels is None else [self.val_labels])
        return int(torch.cat([y.cpu() for y in labels]).max()) + 1

    def to(self, device) -> "Features":
        """The same features on ``device``."""
        return Features(*(None if t is None else t.to(device) for t in
                          (self.train, self.train_labels, self.val, self.val_labels)))


def dataset_features(model, train_set, val_set, batch_size=128, num_workers=4,
                     device="cpu") -> Features:
    """:class:`Features` of ``model`` on ``train_set`` and ``val_set`` (None: leave-one-out)."""
    train, train_labels = extract_features(model, train_set, batch_size, num_workers, device,
                                           "train features")
    if val_set is None:
        return Features(train, train_labels)
    return Features(train, train_labels, *extract_features(model, val_set, batch_size,
                                                           num_workers, device, "val features"))


def save_features(features: Features, folder: str):
    """Write ``features`` to ``folder`` with the official ``eval_knn.py`` file names (no val
    files for leave-one-out)."""
    os.makedirs(folder, exist_ok=True)
    for field, name in FEATURE_FILES.items():
        if getattr(features, field) is not None:
            torch.save(getattr(features, field).cpu(), os.path.join(folder, name))


def load_features(folder: str, leave_one_out: bool = False) -> Features:
    """The features that :func:`save_features` or the official ``--dump_features`` wrote to
    ``folder`` (only the train files for leave-one-out)."""
    fields = list(FEATURE_FILES)[:2] if leave_one_out else list(FEATURE_FILES)
    paths = {field: os.path.join(folder, FEATURE_FILES[field]) for field in fields}
    missing = [path for path in paths.values() if not os.path.isfile(path)]
    if missing:
        raise UserError(f"--load_features {folder!r} lacks {', '.join(missing)} (written by "
                        "--dump_features)")
    loaded = {field: torch.load(path, map_location="cpu", weights_only=True)
              for field, path in paths.items()}
    return Features(**loaded)


def knn_scores(features: Features, nb_knn=(10, 20, 100, 200), temperature=0.07) -> dict:
    """``{k: {'top1': %, 'top5': % or None}}`` of the weighted k-NN vote on ``features``
    (top-5 with at least 5 classes); leave-one-out when there is no val set."""
    num_classes = features.num_classes
    if len(features.train_labels.unique()) < 2:
        raise UserError("k-NN needs train images of at least two classes")
    leave_one_out = features.val is None
    queries, labels = ((features.train, features.train_labels) if leave_one_out
                       else (features.val, features.val_labels))
    results = {}
    for k in nb_knn:
        scores = knn_classify(features.train, features.train_labels, queries, k, temperature,
                              num_classes, leave_one_out=leave_one_out)
        top1, top5 = topk_accuracy(scores, labels, ks=(1, min(5, k)))  # official: min(5, k)
        results[k] = {"top1": top1, "top5": top5 if num_classes >= 5 else None}
    return results


def official_layout(root: str) -> bool:
    """Whether ``root`` holds ``train/`` and ``val/`` folders, as official ``eval_knn.py``
    expects its ``--data_path``."""
    return all(os.path.isdir(os.path.join(root, split)) for split in ("train", "val"))


def _one_of(flags) -> str:
    """``--a``, ``--a and --b``, ``--a, --b and --c``."""
    return " and ".join([", ".join(flags[:-1]), flags[-1]] if len(flags) > 1 else flags)


def build_datasets(data_path, val_path=None, val_split=None, image_size=224, seed=0,
                   leave_one_out=False, split_flags=KNN_SPLIT_FLAGS):
    """Train and val data sets: ``data_path/train`` and ``data_path/val`` (the official
    layout, see :func:`official_layout`), two folders, or one split per class (each an image
    folder or a shard set); with
    ``leave_one_out``, the whole folder and no val set (None). ``split_flags``: the command's
    flags that choose the val set, as its errors name them."""
    if not os.path.isdir(data_path) and manifest_path(data_path) is None:
        raise UserError(f"--data_path {data_path!r} does not exist or is not a folder")
    choices = leave_one_out + (val_path is not None) + (val_split is not None)
    if official_layout(data_path):
        if choices:
            raise UserError(f"{data_path!r} holds train/ and val/ (the official layout), which "
                            f"are used as they are: leave out {_one_of(split_flags)}, or give "
                            "--data_path its train folder")
        data_path, val_path = (os.path.join(data_path, split) for split in ("train", "val"))
    elif choices != 1:
        raise UserError(f"{data_path!r} has no train/ and val/ folders (the official layout): "
                        f"give exactly one of {_one_of(split_flags)}")
    train_set = labelled_dataset(data_path, image_size)
    if leave_one_out:
        if len(train_set) < 2:
            raise UserError(f"{data_path!r}: leave-one-out needs at least 2 images")
        return train_set, None
    if val_path is not None:
        val_set = labelled_dataset(val_path, image_size)
        if val_set.classes != train_set.classes:
            raise UserError(_classes_differ(data_path, train_set.classes, val_path,
                                            val_set.classes))
        return train_set, val_set
    val_set = labelled_dataset(data_path, image_size)
    train_set.samples, val_set.samples = split_samples(train_set.samples, val_split, seed)
    return train_set, val_set


def _classes_differ(train_path, train_classes, val_path, val_classes) -> str:
    """The error of a val folder whose class folders are not the train folder's."""
    only_val = sorted(set(val_classes) - set(train_classes))
    only_train = sorted(set(train_classes) - set(val_classes))
    return (f"the class folders of val {val_path!r} and train {train_path!r} differ (labels are "
            f"class indices, so both need the same classes): only in val: {only_val or 'none'}, "
            f"only in train: {only_train or 'none'}")
