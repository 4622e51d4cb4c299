"""The valid range of every numeric flag of the commands, checked before anything starts.

argparse checks types only: ``--momentum_teacher 1.5``, ``--out_dim 0``, ``--lr nan`` or
``--max_steps 0`` parse, and then fail much later (a NaN loss after minutes) or silently mean
something else (``--max_steps 0`` as "no limit"). Each command looks its flags up in a table
here (flag -> :class:`Range`); a value outside its range, or a path flag given as an empty
string (an unset shell variable: ``--data_path "$DATA"``), is a :class:`FlagError` naming the
flag. A few rules relate two flags (a scale pair in order, crop sizes that are multiples of the
patch size); they follow the tables.
"""
import math
from dataclasses import dataclass

from dino_fast.cli.errors import FlagError

MAX_SEED = 2**63 - 1  # torch.manual_seed's range, and our per-step seeds are 63-bit


@dataclass(frozen=True)
class Range:
    """The numbers from ``low`` to ``high`` (None: unbounded); ``*_open`` excludes the bound.
    NaN and infinities are never in range."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return (f"in {'(' if self.low_open else '['}{self.low}, {self.high}"
                f"{')' if self.high_open else ']'}")


def at_least(low) -> Range:
    """``low`` or more."""
    return Range(low)


def positive() -> Range:
    """Greater than zero."""
    return Range(0, low_open=True)


def fraction(low_open=False, high_open=False) -> Range:
    """A number in [0, 1], bounds excluded as asked."""
    return Range(0, 1, low_open, high_open)


TRAIN = {
    "patch_size": at_least(1), "out_dim": at_least(1), "momentum_teacher": fraction(),
    "warmup_teacher_temp": positive(), "teacher_temp": positive(),
    "warmup_teacher_temp_epochs": at_least(0), "weight_decay": at_least(0),
    "weight_decay_end": at_least(0), "clip_grad": at_least(0), "batch_size_per_gpu": at_least(1),
    "epochs": at_least(1), "freeze_last_layer": at_least(0), "lr": positive(),
    "warmup_epochs": at_least(0), "min_lr": at_least(0), "drop_path_rate": fraction(high_open=True),
    "global_crops_scale": fraction(low_open=True), "local_crops_number": at_least(0),
    "local_crops_scale": fraction(low_open=True), "saveckp_freq": at_least(0),
    "seed": Range(0, MAX_SEED), "num_workers": at_least(0), "max_steps": at_least(1),
    "global_crops_size": at_least(1), "local_crops_size": at_least(1),
    "check_every": at_least(1), "knn_every": at_least(0),
}
TRAIN_PATHS = ("data_path", "output_dir")

EVAL_KNN = {
    "patch_size": at_least(1), "val_split": fraction(low_open=True, high_open=True),
    "nb_knn": at_least(1), "temperature": positive(), "image_size": at_least(1),
    "batch_size": at_least(1), "num_workers": at_least(0), "seed": Range(0, MAX_SEED),
}
EVAL_KNN_PATHS = ("checkpoint", "data_path", "val_path", "dump_features", "load_features")

EVAL_LINEAR = {
    "patch_size": at_least(1), "n_last_blocks": at_least(1), "epochs": at_least(1),
    "lr": positive(), "batch_size_per_gpu": at_least(1),
    "val_split": fraction(low_open=True, high_open=True), "image_size": at_least(1),
    "num_workers": at_least(0), "val_freq": at_least(1), "num_labels": at_least(1),
    "seed": Range(0, MAX_SEED),
}
EVAL_LINEAR_PATHS = ("checkpoint", "data_path", "val_path", "output_dir")

MAPS = {"patch_size": at_least(1), "threshold": fraction(low_open=True),
        "image_size": at_least(1), "threads": at_least(1)}  # visualize and infer
VISUALIZE_PATHS = ("checkpoint", "image_path", "output_dir")
INFER = {"max_pixels": at_least(1)}
INFER_PATHS = ("model", "images", "output_dir")
SERVE = {"port": Range(0, 65535), "max_batch": at_least(1), "max_wait_ms": at_least(0),
         "max_images": at_least(1), "max_pixels": at_least(1), "max_body_mb": positive(),
         "body_timeout_s": positive(), "max_connections": at_least(1)}
SERVE_PATHS = ("model", "host")

EXPORT = {"patch_size": at_least(1), "image_size": at_least(1),
          "opset": at_least(18)}  # torch's ONNX exporter writes opset 18 and newer
EXPORT_PATHS = ("checkpoint", "output")


def validate_args(args, ranges: dict, paths=(), parser=None):
    """Raise :class:`FlagError` for the first flag of ``args`` outside its range in ``ranges``
    (each element of a list flag is checked), or for an empty path among ``paths``. Flags left
    at None (not given, no default) are not checked. With ``parser``, the error names every
    spelling of the flag (``--batch_size/--batch_size_per_gpu``)."""
    for name, valid in ranges.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v not in valid for v in values):
            raise FlagError(f"{_flag(name, parser)} must be {valid}, got {_show(value)}")
    for name in paths:
        value = getattr(args, name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, str) and not v.strip() for v in values):
            raise FlagError(f"{_flag(name, parser)} was given an empty path (an unset shell "
                            "variable?); give a path or leave the flag out")


def _flag(dest: str, parser) -> str:
    """The option strings of the flag stored in ``dest``, joined by ``/``."""
    spellings = [action.option_strings for action in getattr(parser, "_actions", [])
                 if action.dest == dest and action.option_strings]
    return "/".join(spellings[0]) if spellings else f"--{dest}"


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def check_train_args(args):
    """Every flag of ``python -m dino_fast.train`` in range, and the rules between flags."""
    validate_args(args, TRAIN, TRAIN_PATHS)
    for name in ("global_crops_scale", "local_crops_scale"):
        low, high = getattr(args, name)
        if low > high:
            raise FlagError(f"--{name} takes MIN MAX with MIN <= MAX, got {low} {high}")
    for name in ("global_crops_size", "local_crops_size"):
        if getattr(args, name) % args.patch_size:
            raise FlagError(f"--{name} {getattr(args, name)} must be a multiple of --patch_size "
                            f"{args.patch_size}")
    if args.warmup_teacher_temp_epochs > args.epochs:
        raise FlagError(f"--warmup_teacher_temp_epochs {args.warmup_teacher_temp_epochs} must "
                        f"be at most --epochs {args.epochs}")
