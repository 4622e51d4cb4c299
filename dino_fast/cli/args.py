"""What the command-line modules share: the model and map flags with their official aliases,
the official boolean and ``--arch`` parsing, the flags a distributed launcher passes, and
loading a model (a checkpoint, or an ONNX export in a runtime) for a command (a failure is a
one-line :class:`~dino_fast.cli.errors.UserError` naming the file). Commands import this;
nothing here imports a command."""
import argparse
import os

import torch

from dino_fast.cli.errors import FlagError, UserError
from dino_fast.cli.flags import MAPS, validate_args
from dino_fast.models import ARCHS, build_model


def bool_flag(value: str) -> bool:
    """Parse the official boolean flags (``true/false``, ``on/off``, ``1/0``)."""
    if value.lower() in {"on", "true", "1"}:
        return True
    if value.lower() in {"off", "false", "0"}:
        return False
    raise argparse.ArgumentTypeError(f"invalid value for a boolean flag: {value!r}")


def official_arch(value: str) -> str:
    """An ``--arch`` value as the official code reads it: ``deit_*`` names the same networks as
    ``vit_*`` (``main_dino.py``: "we changed the name DeiT-S for ViT-S")."""
    return value.replace("deit", "vit")


def add_model_args(parser: argparse.ArgumentParser):
    """``--checkpoint --arch --patch_size --key``, as the commands that load a model take them
    (``--pretrained_weights`` and ``--checkpoint_key`` are the official names)."""
    parser.add_argument("--checkpoint", "--pretrained_weights", dest="checkpoint",
                        help="our or an official DINO checkpoint, or a backbone state dict "
                        "(random weights when left out, for demos)")
    parser.add_argument("--arch", type=official_arch, choices=sorted(ARCHS),
                        help="default: what the checkpoint holds (vit_small without one); "
                        "deit_* is accepted for vit_*")
    parser.add_argument("--patch_size", type=int, help="default: the checkpoint's (16 without)")
    parser.add_argument("--key", "--checkpoint_key", dest="key", default="teacher",
                        help="which network of a training checkpoint: teacher (default) or "
                        "student")


def add_launcher_args(parser: argparse.ArgumentParser):
    """``--dist_url`` and ``--local_rank`` (also spelt ``--local-rank``), as the official scripts
    take them and ``python -m torch.distributed.launch`` passes them (``--local-rank=N``).
    Accepted and ignored: the rank and the device come from the environment the launcher sets
    (``RANK``, ``LOCAL_RANK``), as under ``torchrun``."""
    parser.add_argument("--dist_url", default="env://", help="accepted for compatibility")
    parser.add_argument("--local_rank", "--local-rank", default=0, type=int,
                        help="accepted for compatibility (torch.distributed.launch passes it)")


def launched_rank() -> int:
    """This process's global rank as a launcher (``torchrun``, ``torch.distributed.launch``)
    set it in ``RANK``; 0 when started alone."""
    return int(os.environ.get("RANK", 0))


def add_map_args(parser: argparse.ArgumentParser, default_size: list[int]):
    """``--threshold`` and ``--image_size``, as ``visualize`` and ``infer`` take them."""
    parser.add_argument("--threshold", type=float, default=0.6,
                        help="fraction of attention mass the masks keep (0.6 as the official "
                        "video tool)")
    parser.add_argument("--image_size", type=int, nargs="+", default=default_size,
                        metavar="SIZE", help="H W, or one value for the shorter side (aspect "
                        f"kept); rounded to a multiple of the patch size (default {default_size})")


def check_map_args(parser: argparse.ArgumentParser, args, paths=()):
    """Reject a map flag out of range (:data:`dino_fast.cli.flags.MAPS`) or an empty path among
    ``paths`` with a :class:`FlagError`."""
    if len(args.image_size) > 2:
        raise FlagError("--image_size takes one value (shorter side) or two (H W), got "
                        f"{len(args.image_size)}")
    validate_args(args, MAPS, paths, parser)


def load_model(checkpoint, arch, patch_size, key):
    """:func:`build_model` for a command line: a load failure is a :class:`UserError` with the
    reason."""
    try:
        return build_model(checkpoint, arch, patch_size, key)
    except (KeyError, RuntimeError, TypeError, ValueError, OSError) as err:
        reason = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        if str(checkpoint) not in reason:  # the readers name the file in some messages
            reason = f"cannot load {checkpoint}: {reason}"
        raise UserError(reason) from err


def add_predictor_args(parser: argparse.ArgumentParser):
    """``--model --runtime --threads --patch_size --arch``, as the commands that run an ONNX
    export (``infer``, ``serve``) take them."""
    from dino_fast.export.predictor import RUNTIMES
    parser.add_argument("--model", required=True, help="an .onnx file from dino_fast.export")
    parser.add_argument("--runtime", choices=RUNTIMES, default=RUNTIMES[0],
                        help="which library runs the model: ONNX Runtime (default) or OpenVINO "
                        "on the CPU (pip install 'dino-fast[openvino]')")
    parser.add_argument("--threads", type=int, help="CPU threads of the runtime")
    parser.add_argument("--patch_size", type=int, help="fail unless the model has this patch")
    parser.add_argument("--arch", type=official_arch, help="fail unless the model is this arch")


def load_predictor(args):
    """The model of ``--model`` in ``--runtime`` (:class:`AttentionMapPredictor`); a file that is
    not one of our ONNX exports is a :class:`UserError` saying what it is."""
    from dino_fast.export.predictor import AttentionMapPredictor
    if not os.path.exists(args.model):
        raise UserError(f"model not found: {args.model}")
    try:
        return AttentionMapPredictor(args.model, threads=args.threads, patch_size=args.patch_size,
                                     arch=args.arch, runtime=args.runtime)
    except ValueError as err:
        raise UserError(str(err)) from err


def resolve_device(name: str) -> str:
    """``cuda`` or ``cpu`` for ``--device`` (``auto``: CUDA when available)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available")
    return name
