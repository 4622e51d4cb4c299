"""Watching a training run: the health metrics of every step averaged per epoch, the collapse
warning, the online k-NN, TensorBoard event files and ``curves.png``.

``train.py`` makes one :class:`TrainingMonitor` and calls it at four points: after each step
(:meth:`TrainingMonitor.step`, no host sync), for the progress bar (:meth:`postfix`, a read
of the latest step, called at the training loop's periodic checks), at the end of an epoch on
every process
(:meth:`end_epoch`: one all-reduce, the k-NN on rank 0, the collapse rule) and after rank 0 wrote
``log.txt`` (:meth:`after_log`: TensorBoard and ``curves.png``). TensorBoard and matplotlib are
optional: without them a line says so once and training goes on. A warning raised by this
per-epoch work (the k-NN's DataLoader, every epoch) is shown the first time only.
"""
import argparse
import contextlib
import math
import os
import time
import warnings

import torch

from dino_fast.cli.errors import UserError
from dino_fast.cli.progress import say
from dino_fast.monitoring.health import CollapseDetector, epoch_health, log_record
from dino_fast.training import distributed as dist_utils

STEP_METRICS = ("teacher_entropy", "kl", "batch_entropy", "center_norm")  # DINOLoss.health


def add_monitor_args(parser):
    """The flags of this module, for ``dino_fast.train``."""
    parser.add_argument("--knn_every", default=0, type=int,
                        help="every N epochs (and after the last), log the teacher's 20-NN "
                             "top-1: --data_path against --val_path, or leave-one-out over "
                             "the labelled --data_path; 0: never")
    parser.add_argument("--val_path", default=None, type=str,
                        help="labelled val folder for --knn_every (same classes as --data_path)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="write TensorBoard event files to --output_dir")
    parser.add_argument("--stop_on_collapse", action="store_true",
                        help="stop (after the epoch's checkpoint) when a collapse is detected")
    parser.add_argument("--curves", default=True, action=argparse.BooleanOptionalAction,
                        help="redraw --output_dir/curves.png after every epoch (matplotlib)")


def build_monitor(args, device) -> "TrainingMonitor":
    """The run's monitor; a ``--val_path`` without ``--knn_every`` or a k-NN folder without
    classes is a one-line error (on every process alike, before training starts; the flags'
    ranges are checked by :mod:`dino_fast.cli.flags`)."""
    if args.val_path is not None and not args.knn_every:
        raise UserError("--val_path is only used by the online k-NN: add --knn_every N")
    knn = None
    if args.knn_every:
        from dino_fast.monitoring.online_knn import OnlineKNN

        knn = OnlineKNN(args.data_path, args.val_path, args.global_crops_size,
                        args.batch_size_per_gpu, min(args.num_workers, os.cpu_count() or 1),
                        device)
    return TrainingMonitor(args, knn)


class HealthMeter:
    """Sums the step metrics on the device; the host reads them only when asked."""

    def __init__(self, out_dim: int):
        self.ln_k = math.log(out_dim) if out_dim > 1 else 1.0
        self.reset()

    def reset(self):
        """Start a new epoch."""
        self.total, self.count, self.latest = None, 0, None

    def add(self, health: dict):
        """Add one step's metrics (0-d device tensors)."""
        values = torch.stack([health[name].detach().float() for name in STEP_METRICS])
        self.total = values if self.total is None else self.total + values
        self.count += 1
        self.latest = values

    def postfix(self) -> dict:
        """``{'H/lnK': ..., 'KL': ...}`` of the latest step: a read from the device, for the
        loop's periodic checks (where the host has waited for the device already)."""
        if self.latest is None:
            return {}
        entropy, kl = self.latest[:2].tolist()
        return {"H/lnK": f"{entropy / self.ln_k:.3f}", "KL": f"{kl:.3f}"}

    def epoch_means(self) -> dict:
        """The epoch's means over steps and processes (one all-reduce and one read)."""
        if self.total is None:
            return {}
        means = dist_utils.all_reduce_mean(self.total / self.count).tolist()
        return dict(zip(STEP_METRICS, means))


class TrainingMonitor:
    """Health metrics, collapse warning, online k-NN, TensorBoard and curves for ``train``."""

    def __init__(self, args, knn=None):
        self.out_dim, self.output_dir = args.out_dim, args.output_dir
        self.meter = HealthMeter(args.out_dim)
        self.detector = CollapseDetector(args.out_dim,
                                         start_epoch=min(args.warmup_epochs, args.epochs))
        self.stop_on_collapse = args.stop_on_collapse
        self.knn, self.knn_every = knn, args.knn_every
        self.main = dist_utils.is_main_process()
        self.writer = open_tensorboard(args.output_dir) if args.tensorboard and self.main else None
        self.draw_curves = self.main and args.curves
        self.should_stop = False
        self._epoch_start, self._train_seconds = time.perf_counter(), 0.0
        self._warned: set = set()  # the warnings shown, for shown_once

    def start_epoch(self):
        """Reset the meter and the clock."""
        self.meter.reset()
        self._epoch_start = time.perf_counter()

    def step(self, dino_loss):
        """Record the step the loss module just computed (``DINOLoss.health``)."""
        self.meter.add(dino_loss.health)

    def postfix(self) -> dict:
        """The progress bar's entropy and KL fields."""
        return self.meter.postfix()

    def end_epoch(self, epoch: int, last_epoch: bool, teacher_backbone) -> dict:
        """Per-epoch metrics for ``log.txt`` (every process gets the same ones); runs the k-NN
        when due and the collapse rule, logging the warning once (rank 0)."""
        self._train_seconds = time.perf_counter() - self._epoch_start  # before the k-NN
        means = self.meter.epoch_means()
        if not means:
            return {}
        device = self.meter.total.device
        record = epoch_health(means, self.out_dim)
        if self.knn is not None and ((epoch + 1) % self.knn_every == 0 or last_epoch):
            with shown_once(self._warned):
                top1 = self.knn(teacher_backbone) if self.main else None
            if top1 is not None:
                record["knn_top1"] = top1
                say(f"epoch {epoch}: teacher k-NN top-1 {top1:.2f}%")
        message = self.detector.update(epoch, record)
        if message and self.main:
            say(message + ("" if self.stop_on_collapse else
                           " Training goes on (--stop_on_collapse would stop it)."))
        if self.stop_on_collapse:  # every process stops at the same epoch
            self.should_stop = dist_utils.any_process(message is not None, device)
        return record

    def resumed(self, start_epoch: int):
        """After a resume: feed the collapse rule the epochs before ``start_epoch`` from
        ``log.txt``, so that a signature held across the restart still counts."""
        from dino_fast.monitoring.curves import read_log

        path = os.path.join(self.output_dir, "log.txt")
        try:
            entries = read_log(path)
        except (OSError, ValueError):
            return  # no earlier epochs (e.g. stopped inside the first one)
        for entry in entries:
            if entry.get("epoch", start_epoch) < start_epoch and "train_kl" in entry:
                self.detector.update(entry["epoch"], log_record(entry))

    def after_log(self, entry: dict, epoch: int, extra_scalars: dict):
        """Rank 0, after the ``log.txt`` line: TensorBoard scalars and ``curves.png``."""
        if not self.main:
            return
        with shown_once(self._warned):
            self._write_epoch(entry, epoch, extra_scalars)

    def _write_epoch(self, entry: dict, epoch: int, extra_scalars: dict):
        if self.writer is not None:
            scalars = {**{k: v for k, v in entry.items() if k != "epoch"}, **extra_scalars}
            if "images" in scalars:
                scalars["images_per_s"] = scalars.pop("images") / max(self._train_seconds,
                                                                       1e-9)
            for name, value in scalars.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, epoch)
            self.writer.flush()
        if self.draw_curves:
            self.draw_curves = redraw_curves(self.output_dir)

    def close(self):
        """Flush and close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()


@contextlib.contextmanager
def shown_once(seen: set):
    """Show the warnings raised inside whose text and category are not in ``seen`` (then added),
    and drop the others. Python's own "show once" forgets what it showed whenever the warning
    filters change (matplotlib changes them when drawing), so a warning of work redone every
    epoch, such as the k-NN's DataLoader, would otherwise come back every epoch."""
    with warnings.catch_warnings(record=True) as caught:  # the filters in force still apply
        yield
    for warning in caught:
        key = (str(warning.message), warning.category)
        if key not in seen:
            seen.add(key)
            warnings.showwarning(warning.message, warning.category, warning.filename,
                                 warning.lineno)


def open_tensorboard(output_dir: str):
    """A ``SummaryWriter`` on ``output_dir`` (event files there), or None with one line when
    TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        say("--tensorboard: TensorBoard is not installed (pip install 'dino-fast[monitor]'); "
            "no event files are written")
        return None
    return SummaryWriter(log_dir=output_dir)


def redraw_curves(output_dir: str) -> bool:
    """Draw ``output_dir/curves.png`` from its ``log.txt``; False (and one line) when matplotlib
    is missing, so the caller stops trying."""
    from dino_fast.monitoring import curves  # matplotlib is imported inside, when drawing

    try:
        curves.draw({os.path.basename(os.path.abspath(output_dir)):
                     curves.read_log(os.path.join(output_dir, "log.txt"))},
                    os.path.join(output_dir, "curves.png"))
    except ImportError:
        say("matplotlib is not installed: curves.png is not drawn (pip install "
            "'dino-fast[monitor]')")
        return False
    return True
