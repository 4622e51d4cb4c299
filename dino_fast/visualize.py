"""``python -m dino_fast.visualize``: last-block attention maps of one image with PyTorch.

As the official ``visualize_attention.py`` (Caron et al. 2021): the image resized to
``--image_size`` (rounded to a multiple of the patch size), the CLS-to-patch attention of each
head from ``get_last_selfattention``, and the masks keeping ``--threshold`` of the attention
mass, written as PNG files (see :mod:`dino_fast.evaluation.attention_maps`). Without
``--checkpoint`` the ViT has random weights, for demos. The official flags carry over
(``--pretrained_weights``, ``--checkpoint_key``, ``--arch`` with ``deit_*`` as ``vit_*``,
``--patch_size``, ``--image_path``, ``--image_size``, ``--output_dir``, ``--threshold``); the arch
and patch size default to the checkpoint's, and masks are always written (``--threshold`` 0.6 by
default, where the official default writes none).
"""
import argparse

import torch

from dino_fast.cli.args import add_map_args, add_model_args, check_map_args, load_model
from dino_fast.cli.errors import add_debug_flag, command
from dino_fast.cli.flags import VISUALIZE_PATHS
from dino_fast.evaluation.attention_maps import cls_patch_attention, load_image, save_attention_maps
from dino_fast.ops import use_backend


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dino_fast.visualize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--image_path", required=True)
    parser.add_argument("--output_dir", default=".")
    add_map_args(parser, [480, 480])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    check_map_args(parser, args, VISUALIZE_PATHS)
    return args


def last_cls_attention(model, image: torch.Tensor) -> torch.Tensor:
    """CLS-to-patch attention ``[heads, N]`` of the last block for one image ``[3, H, W]``."""
    with use_backend("reference"), torch.no_grad():
        attn = model.get_last_selfattention(image[None])  # (1, heads, 1 + N, 1 + N)
    return cls_patch_attention(attn[0]).float().cpu()


@command
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
