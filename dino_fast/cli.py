"""What the command-line modules share: the model and map flags, and loading a model for a
command (a failure exits with one line naming the file). Commands import this; nothing here
imports a command."""
import argparse

from dino_fast.models import ARCHS, build_model


def bool_flag(value: str) -> bool:
    """Parse the official boolean flags (``true/false``, ``on/off``, ``1/0``)."""
    if value.lower() in {"on", "true", "1"}:
        return True
    if value.lower() in {"off", "false", "0"}:
        return False
    raise argparse.ArgumentTypeError(f"invalid value for a boolean flag: {value!r}")


def add_model_args(parser: argparse.ArgumentParser):
    """``--checkpoint --arch --patch_size --key``, as the commands that load a model take them."""
    parser.add_argument("--checkpoint", help="our or an official DINO checkpoint, or a backbone "
                        "state dict (random weights when left out, for demos)")
    parser.add_argument("--arch", choices=sorted(ARCHS), help="default: what the checkpoint "
                        "holds (vit_small without one)")
    parser.add_argument("--patch_size", type=int, help="default: the checkpoint's (16 without)")
    parser.add_argument("--key", default="teacher", help="which network of a training "
                        "checkpoint: teacher (default) or student")


def add_map_args(parser: argparse.ArgumentParser, default_size: list[int]):
    """``--threshold`` and ``--image_size``, as ``visualize`` and ``infer`` take them."""
    parser.add_argument("--threshold", type=float, default=0.6,
                        help="fraction of attention mass the masks keep (0.6 as the official "
                        "video tool)")
    parser.add_argument("--image_size", type=int, nargs="+", default=default_size,
                        metavar="SIZE", help="H W, or one value for the shorter side (aspect "
                        f"kept); rounded to a multiple of the patch size (default {default_size})")


def check_map_args(parser: argparse.ArgumentParser, args):
    """Reject a bad ``--threshold`` or ``--image_size`` with a usage error."""
    if len(args.image_size) > 2:
        parser.error("--image_size takes one value (shorter side) or two (H W)")
    if not 0 < args.threshold <= 1:
        parser.error(f"--threshold must be in (0, 1], got {args.threshold}")


def load_model(checkpoint, arch, patch_size, key):
    """:func:`build_model` for a command line: a load failure exits with the reason."""
    try:
        return build_model(checkpoint, arch, patch_size, key)
    except (KeyError, RuntimeError, TypeError, ValueError, OSError) as err:
        raise SystemExit(f"cannot load {checkpoint}: {err}") from err
