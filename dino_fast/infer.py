"""``python -m dino_fast.infer``: attention maps and masks of images with ONNX Runtime.

For each image (files, or folders searched recursively): resize (``--image_size``, rounded to a
multiple of the patch size), run the exported model (:class:`AttentionMapPredictor`), and write
into ``OUTPUT_DIR/<image name>/`` the per-head attention heat-map overlays, their mean, and the
masks that keep ``--threshold`` of the attention mass (see
:mod:`dino_fast.evaluation.attention_maps`). An unreadable image is reported by name and skipped.
"""
import argparse
import os
import sys

from tqdm import tqdm

from dino_fast.cli.args import add_map_args, check_map_args, official_arch
from dino_fast.cli.errors import UserError, add_debug_flag, command
from dino_fast.cli.flags import INFER_PATHS
from dino_fast.data import BadImageError
from dino_fast.evaluation.attention_maps import find_images, load_image, save_attention_maps
from dino_fast.export.predictor import AttentionMapPredictor, attention_placement_note


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dino_fast.infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an .onnx file from dino_fast.export")
    parser.add_argument("--images", nargs="+", required=True, help="image files and folders")
    parser.add_argument("--output_dir", default="attention_maps")
    add_map_args(parser, [480])
    parser.add_argument("--patch_size", type=int, help="fail unless the model has this patch")
    parser.add_argument("--arch", type=official_arch, help="fail unless the model is this arch")
    parser.add_argument("--threads", type=int, help="ONNX Runtime CPU threads")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    check_map_args(parser, args, INFER_PATHS)
    return args


def output_name(path: str, used: set[str]) -> str:
    """A folder name for ``path``'s maps: its stem, made unique among ``used``."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name, n = stem, 1
    while name in used:
        name, n = f"{stem}_{n}", n + 1
    used.add(name)
    return name


@command
def main(argv=None) -> int:
    """Command line entry point; returns the exit status (1 when no image could be read)."""
    args = parse_args(argv)
    if not os.path.exists(args.model):
        raise UserError(f"model not found: {args.model}")
    try:
        predictor = AttentionMapPredictor(args.model, threads=args.threads,
                                          patch_size=args.patch_size, arch=args.arch)
    except ValueError as err:
        raise UserError(str(err)) from err
    print(f"running on {predictor.describe()}")
    note = attention_placement_note(args.model, predictor.provider)
    if note:
        print(note, file=sys.stderr)
    paths = find_images(args.images)  # a folder without images is a user error
    image_size = predictor.image_size or args.image_size
    used, written, skipped = set(), 0, []
    for path in tqdm(paths, desc="attention maps", unit="img", disable=len(paths) < 2):
        try:
            rgb, image = load_image(path, image_size, predictor.patch_size)
        except BadImageError as err:
            tqdm.write(f"skipping: {err}", file=sys.stderr)
            skipped.append(path)
            continue
        attentions, _ = predictor.run(image[None])
        save_attention_maps(os.path.join(args.output_dir, output_name(path, used)), rgb,
                            attentions[0], predictor.patch_size, args.threshold)
        written += 1
    print(f"wrote attention maps of {written} image(s) to {args.output_dir}"
          + (f"; skipped {len(skipped)} unreadable: {', '.join(skipped)}" if skipped else ""))
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
