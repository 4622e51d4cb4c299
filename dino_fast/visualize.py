"""``python -m dino_fast.visualize``: last-block attention maps of one image with PyTorch.

As the official ``visualize_attention.py`` (Caron et al. 2021): the image resized to
``--image_size`` (rounded to a multiple of the patch size), the CLS-to-patch attention of each
head from ``get_last_selfattention``, and the masks keeping ``--threshold`` of the attention
mass, written as PNG files (see :mod:`dino_fast.attention_maps`). Without ``--checkpoint`` the
ViT has random weights, for demos.
"""
import argparse

import torch

from dino_fast.attention_maps import cls_patch_attention, load_image, save_attention_maps
from dino_fast.models import ARCHS, build_model
from dino_fast.ops import use_backend


def add_model_args(parser: argparse.ArgumentParser):
    """``--checkpoint --arch --patch_size --key``, as this command and the export take them."""
    parser.add_argument("--checkpoint", help="our or an official DINO checkpoint, or a backbone "
                        "state dict (random weights when left out, for demos)")
    parser.add_argument("--arch", choices=sorted(ARCHS), help="default: what the checkpoint "
                        "holds (vit_small without one)")
    parser.add_argument("--patch_size", type=int, help="default: the checkpoint's (16 without)")
    parser.add_argument("--key", default="teacher", help="which network of a training "
                        "checkpoint: teacher (default) or student")


def add_map_args(parser: argparse.ArgumentParser, default_size: list[int]):
    """``--threshold`` and ``--image_size``, as this command and ``dino_fast.infer`` take them."""
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dino_fast.visualize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--image_path", required=True)
    parser.add_argument("--output_dir", default=".")
    add_map_args(parser, [480, 480])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    check_map_args(parser, args)
    return args


def last_cls_attention(model, image: torch.Tensor) -> torch.Tensor:
    """CLS-to-patch attention ``[heads, N]`` of the last block for one image ``[3, H, W]``."""
    with use_backend("reference"), torch.no_grad():
        attn = model.get_last_selfattention(image[None])  # (1, heads, 1 + N, 1 + N)
    return cls_patch_attention(attn[0]).float().cpu()


def load_model(checkpoint, arch, patch_size, key):
    """:func:`build_model` for a command line: a load failure exits with the reason."""
    try:
        return build_model(checkpoint, arch, patch_size, key)
    except (KeyError, RuntimeError, TypeError, ValueError, OSError) as err:
        raise SystemExit(f"cannot load {checkpoint}: {err}") from err


def main(argv=None) -> list[str]:
    """Command line entry point; returns the written files."""
    args = parse_args(argv)
    model = load_model(args.checkpoint, args.arch, args.patch_size, args.key).to(args.device)
    patch = model.patch_embed.patch_size
    rgb, image = load_image(args.image_path, args.image_size, patch)
    attentions = last_cls_attention(model, torch.from_numpy(image).to(args.device))
    written = save_attention_maps(args.output_dir, rgb, attentions.numpy(), patch, args.threshold)
    print(f"wrote {len(written)} files to {args.output_dir}")
    return written


if __name__ == "__main__":
    main()
