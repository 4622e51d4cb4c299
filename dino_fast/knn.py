"""Weighted k-NN classification on frozen features (Caron et al. 2021, Sec. 4.1; official
``eval_knn.py``): the datasets, the feature extraction and the vote. ``python -m
dino_fast.eval_knn`` is the command over it.

CLS features are L2-normalised; each query takes the ``k`` train images of highest cosine
similarity, each votes for its class with weight ``exp(similarity / T)`` (T = 0.07), and the
classes are ranked by their summed votes. Images are resized (bicubic) to
``image_size * 256 / 224``, center-cropped to ``image_size`` and normalised.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms

from dino_fast.data.augment import MEAN, STD
from dino_fast.data.folder import ImageFolderDataset
from dino_fast.progress import track


def eval_transform(image_size: int = 224):
    """Resize ``image_size * 256 / 224`` bicubic, center crop ``image_size``, normalise."""
    return transforms.Compose([
        transforms.Resize(int(image_size * 256 / 224),
                          interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def labelled_dataset(root: str, image_size: int = 224) -> ImageFolderDataset:
    """The images under ``root`` with their class-folder labels; an error if some have none."""
    dataset = ImageFolderDataset(root, transform=eval_transform(image_size))
    unlabelled = [path for path, label in dataset.samples if label < 0]
    if not dataset.classes or unlabelled:
        raise ValueError(f"{root!r}: k-NN needs every image inside a class sub-folder "
                         f"(root/<class>/<image>); {len(unlabelled)} image(s) have no class, "
                         f"e.g. {unlabelled[:3]}")
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


def knn_evaluate(model, train_set, val_set, nb_knn=(10, 20, 100, 200), temperature=0.07,
                 batch_size=128, num_workers=4, device="cpu") -> dict:
    """``{k: {'top1': %, 'top5': % or None}}`` of the weighted k-NN on ``model``'s features;
    leave-one-out over ``train_set`` when ``val_set`` is None."""
    num_classes = len(train_set.classes)
    train_feats, train_labels = extract_features(model, train_set, batch_size, num_workers,
                                                 device, "train features")
    if val_set is None:
        val_feats, val_labels = train_feats, train_labels
    else:
        val_feats, val_labels = extract_features(model, val_set, batch_size, num_workers, device,
                                                 "val features")
    results = {}
    for k in nb_knn:
        scores = knn_classify(train_feats, train_labels, val_feats, k, temperature, num_classes,
                              leave_one_out=val_set is None)
        top1, top5 = topk_accuracy(scores, val_labels, ks=(1, min(5, k)))  # official: min(5, k)
        results[k] = {"top1": top1, "top5": top5 if num_classes >= 5 else None}
    return results


def build_datasets(data_path, val_path=None, val_split=None, image_size=224, seed=0,
                   leave_one_out=False):
    """Train and val ``ImageFolderDataset``s: two folders, or one split per class; with
    ``leave_one_out``, the whole folder and no val set (None)."""
    if leave_one_out + (val_path is not None) + (val_split is not None) != 1:
        raise ValueError("give exactly one of --val_path, --val_split and --leave_one_out")
    train_set = labelled_dataset(data_path, image_size)
    if leave_one_out:
        if len(train_set) < 2:
            raise ValueError(f"{data_path!r}: leave-one-out needs at least 2 images")
        return train_set, None
    if val_path is not None:
        val_set = labelled_dataset(val_path, image_size)
        if val_set.classes != train_set.classes:
            raise ValueError(f"train classes {train_set.classes} and val classes "
                             f"{val_set.classes} differ")
        return train_set, val_set
    val_set = labelled_dataset(data_path, image_size)
    train_set.samples, val_set.samples = split_samples(train_set.samples, val_split, seed)
    return train_set, val_set
