"""k-NN accuracy of the teacher during training (``--knn_every N``): the official weighted k-NN
(k = 20, T = 0.07; ``dino_fast.evaluation.knn``) on the teacher backbone's CLS features, on rank 0
only.

Train bank and queries: ``--data_path`` and ``--val_path`` when given, else leave-one-out over the
labelled ``--data_path`` (or the bundled photos, whose sub-folders are classes). Images are
resized and center-cropped to ``--global_crops_size``. The evaluation never touches the
training's random streams (they are saved and restored around it) nor the teacher's train/eval
mode, so a run with and without it trains the same weights.
"""
import contextlib
import random

import numpy as np
import torch

from dino_fast.cli.errors import UserError
from dino_fast.data.folder import bundled_data_path
from dino_fast.evaluation.knn import build_datasets, dataset_features, knn_scores

K, TEMPERATURE = 20, 0.07


class OnlineKNN:
    """Callable scoring a backbone: 20-NN top-1 (%) on the datasets fixed at construction."""

    def __init__(self, data_path: str | None, val_path: str | None, image_size: int,
                 batch_size: int, num_workers: int, device):
        root = data_path or bundled_data_path()
        try:
            self.train_set, self.val_set = build_datasets(
                root, val_path=val_path, image_size=image_size, leave_one_out=val_path is None)
        except (UserError, ValueError, OSError) as err:
            raise UserError(f"--knn_every: {err}") from err
        self.batch_size, self.num_workers, self.device = batch_size, num_workers, device

    def __call__(self, backbone: torch.nn.Module) -> float:
        """20-NN top-1 of ``backbone`` (restored to its modes, RNG streams untouched)."""
        modes = [(module, module.training) for module in backbone.modules()]
        try:
            with preserved_random_state(self.device):
                features = dataset_features(backbone, self.train_set, self.val_set,
                                            self.batch_size, self.num_workers, self.device)
                results = knn_scores(features, nb_knn=(K,), temperature=TEMPERATURE)
        finally:
            for module, training in modes:
                module.training = training
        return results[K]["top1"]


@contextlib.contextmanager
def preserved_random_state(device):
    """Restore Python's, NumPy's and torch's (CPU and ``device``) random states on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
