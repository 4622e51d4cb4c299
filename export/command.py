"""``python -m dino_fast.export``: write a checkpoint's ViT backbone in another format.

``--format`` chooses what is written to ``--output``:

* ``onnx`` (default): an ONNX attention-map model, images in, last-block CLS attentions and
  features out (:mod:`.onnx_export`; the ``--image_size --fp16 --int8 --opset --optimize`` flags);
* ``safetensors``: the backbone's weights only, no pickle, with metadata (arch, patch size,
  embed dim, epoch, dino_fast version) (:mod:`.safetensors_export`);
* ``hf``: a folder that ``transformers.ViTModel.from_pretrained(folder,
  add_pooling_layer=False)`` loads (:mod:`.hf_export`);
* ``timm``: a folder with ``model.safetensors`` and timm's ``config.json`` (:mod:`.timm_export`).

The checkpoint is ours, an official DINO one (``teacher`` by default, ``--key student``), a plain
backbone state dict or a ``.safetensors`` file; arch and patch size are read from it. Every
format but ``safetensors`` is loaded back by its runtime (ONNX Runtime, transformers, timm) and
compared with PyTorch before the command returns (``--no_check`` skips that).

Nothing is destroyed (:mod:`.output`): the output is written beside ``--output`` and renamed over
it when complete and checked. An output that is the checkpoint, that exists as the wrong kind,
or a folder holding files the export does not write, is refused before any work (``--overwrite``
replaces the last two).
"""
import argparse
import os

from dino_fast.cli.args import add_model_args, load_model
from dino_fast.cli.errors import FlagError, add_debug_flag, command
from dino_fast.cli.flags import EXPORT, EXPORT_PATHS, validate_args
from dino_fast.export.hf_export import HF_FILES
from dino_fast.export.output import check_output
from dino_fast.export.timm_export import TIMM_FILES
from dino_fast.models import checkpoint_epoch, detect_arch
from dino_fast.models.pretrained import SAFETENSORS_SUFFIX

FORMATS = ("onnx", "safetensors", "hf", "timm")
ONNX_ONLY = ("image_size", "fp16", "int8", "opset", "optimize")
FOLDER_FILES = {"hf": HF_FILES, "timm": TIMM_FILES}  # what each folder format writes
FILE_SUFFIXES = {"onnx": ".onnx", "safetensors": SAFETENSORS_SUFFIX}
NAMED_BY_SUFFIX = {".onnx": "an ONNX file", SAFETENSORS_SUFFIX: "a safetensors file",
                   ".pth": "a PyTorch checkpoint", ".pt": "a PyTorch checkpoint",
                   ".ckpt": "a checkpoint", ".json": "a JSON file"}


def parse_args(argv=None):
    """The flags; ONNX's own flags with another ``--format`` are a usage error."""
    parser = argparse.ArgumentParser(prog="python -m dino_fast.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="default: onnx")
    parser.add_argument("--output", required=True, help="the file (onnx, safetensors) or "
                        "folder (hf, timm) to write")
    onnx = parser.add_argument_group("onnx only")
    onnx.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"),
                      help="fix the input size (default: dynamic batch and size)")
    precision = onnx.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="compute in float16 (for GPUs)")
    precision.add_argument("--int8", action="store_true",
                           help="int8 weights, dynamically quantised inputs (for CPUs)")
    onnx.add_argument("--opset", type=int, help="ONNX opset (default 23)")
    onnx.add_argument("--optimize", "--simplify", action="store_true",
                      help="save ONNX Runtime's optimised graph (fusions, constant folding)")
    parser.add_argument("--no_check", action="store_true",
                        help="do not load the export back to compare it with PyTorch")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output of the wrong kind (a folder where a file is "
                        "written, or the reverse) or a folder holding other files")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    validate_args(args, EXPORT, EXPORT_PATHS, parser)
    given = [f"--{name}" for name in ONNX_ONLY if getattr(args, name) not in (None, False)]
    if args.format != "onnx" and given:
        parser.error(f"{', '.join(given)}: for --format onnx only, not {args.format}")
    mismatch = suffix_mismatch(args.output, args.format)
    if mismatch:
        parser.error(mismatch)
    return args


def suffix_mismatch(output: str, fmt: str) -> str | None:
    """Why ``output``'s suffix disagrees with ``--format fmt``, or None: a safetensors file not
    named ``*.safetensors`` (the loaders tell the format by the suffix), a folder format given a
    file's name, an ONNX file named as another format or a checkpoint. Another suffix, or none,
    is a valid ONNX file name; the command's last line says what it wrote."""
    suffix = os.path.splitext(output.rstrip("/"))[1].lower()
    if fmt == "safetensors" and suffix != SAFETENSORS_SUFFIX:
        return (f"--output {output}: name the file *{SAFETENSORS_SUFFIX} (the loaders tell the "
                "format by its suffix)")
    named = NAMED_BY_SUFFIX.get(suffix)
    if named is None or suffix == FILE_SUFFIXES.get(fmt):
        return None
    if fmt in FOLDER_FILES:
        return f"--output {output} names {named}, but --format {fmt} writes a folder"
    other = next((name for name, known in FILE_SUFFIXES.items() if known == suffix), None)
    hint = f"add --format {other}" if other else "name it *.onnx"
    return f"--output {output} names {named}, but --format onnx writes an ONNX file: {hint}"


def write(args, vit, arch: str, epoch: int | None):
    """Write ``vit`` in ``args.format`` to ``args.output``; returns a short description."""
    check, overwrite = not args.no_check, args.overwrite
    if args.format == "onnx":
        from dino_fast.export.onnx_export import DEFAULT_OPSET, export_onnx, precision_name

        size = tuple(args.image_size) if args.image_size else None
        export_onnx(vit, args.output, size, args.fp16, args.opset or DEFAULT_OPSET, arch,
                    args.optimize, check=check, int8=args.int8, overwrite=overwrite)
        return (f"ONNX model, {'fixed ' + 'x'.join(map(str, size)) if size else 'dynamic'} "
                f"size, {precision_name(args.fp16, args.int8)}")
    if args.format == "safetensors":
        from dino_fast.export.safetensors_export import export_safetensors

        export_safetensors(vit, args.output, arch, epoch, overwrite)
        return "safetensors weights and metadata"
    if args.format == "hf":
        from dino_fast.export.hf_export import export_hf

        export_hf(vit, args.output, arch, epoch, check, overwrite)
        return "transformers ViTModel folder"
    from dino_fast.export.timm_export import export_timm, timm_model

    export_timm(vit, args.output, arch, epoch, check, overwrite)
    return f"timm {timm_model(vit, arch)[0]} folder"


@command
def main(argv=None):
    """Command line entry point of ``python -m dino_fast.export``."""
    args = parse_args(argv)
    check_output(args.output, FOLDER_FILES.get(args.format), args.overwrite, [args.checkpoint])
    vit = load_model(args.checkpoint, args.arch, args.patch_size, args.key)
    arch = args.arch or detect_arch(vit.state_dict())[0]
    patch = vit.patch_embed.patch_size
    if args.image_size and any(s % patch for s in args.image_size):
        raise FlagError(f"--image_size {' '.join(map(str, args.image_size))} must be multiples "
                        f"of the patch size {patch}")
    epoch = checkpoint_epoch(args.checkpoint) if args.checkpoint else None
    what = write(args, vit, arch, epoch)
    print(f"wrote {args.output} ({arch}/{vit.patch_embed.patch_size}, {what})")
