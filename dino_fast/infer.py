"""``python -m dino_fast.infer``: attention maps and masks of images with ONNX Runtime (or
OpenVINO, ``--runtime openvino``).

For each image (files, or folders searched recursively): resize (``--image_size``, rounded to a
multiple of the patch size; scaled down to at most ``--max_pixels``), run the exported model
(:class:`AttentionMapPredictor`), and write into ``OUTPUT_DIR/<image name>/`` the per-head
attention heat-map overlays, their mean, and the masks that keep ``--threshold`` of the attention
mass (see :mod:`dino_fast.evaluation.attention_maps`).

One image never stops the run: an unreadable image, or one that cannot fit ``--max_pixels``, is
skipped with its name; one whose model run or writing fails is reported as failed with its name
(a bug with its traceback); the others are processed. The last line counts the written, skipped
and failed images. Exit status 0 when at least one image was written and none failed (skipped
images do not count as failures), 1 otherwise.
"""
import argparse
import os
import sys
import traceback
from collections import Counter

from tqdm import tqdm

from dino_fast.cli.args import add_map_args, add_predictor_args, check_map_args, load_predictor
from dino_fast.cli.errors import UserError, add_debug_flag, command, debug_requested, one_line
from dino_fast.cli.flags import INFER, INFER_PATHS, validate_args
from dino_fast.data import BadImageError
from dino_fast.data.folder import load_rgb
from dino_fast.evaluation.attention_maps import (
    PixelBudgetError,
    find_images,
    prepare_image,
    resized_shape,
    save_attention_maps,
)
from dino_fast.export.predictor import (
    MEMORY_BUDGET,
    ORT_ERRORS,
    AttentionMapPredictor,
    attention_placement_note,
    pixel_budget,
)

FAILURES = (OSError, MemoryError, *ORT_ERRORS)  # writing, memory, ONNX Runtime: one line each


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dino_fast.infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_predictor_args(parser)
    parser.add_argument("--images", nargs="+", required=True, help="image files and folders")
    parser.add_argument("--output_dir", default="attention_maps")
    add_map_args(parser, [480])
    parser.add_argument(
        "--max_pixels", type=int, help="the most pixels (H x W) of one resized image; larger "
        "ones are scaled down, aspect ratio kept. One image's attention grows with N^2 for N = "
        "H*W/p^2 patches, so the default is sized from the model: the largest image whose "
        f"attention fits in {MEMORY_BUDGET // 2**30} GiB (a third of this project's 24 GiB "
        f"machines): {pixel_budget(12, 8):,} pixels for vit_base/8, {pixel_budget(6, 16):,} for "
        "vit_small/16")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    check_map_args(parser, args, INFER_PATHS)
    validate_args(args, INFER, (), parser)
    return args


def output_name(path: str, used: set[str]) -> str:
    """A folder name for ``path``'s maps: its stem, made unique among ``used``."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name, n = stem, 1
    while name in used:
        name, n = f"{stem}_{n}", n + 1
    used.add(name)
    return name


def pixel_limit(args, predictor: AttentionMapPredictor) -> int:
    """``--max_pixels``, or the model's :func:`pixel_budget`; a fixed-size model over it is a
    :class:`UserError`, as every image would be."""
    limit = args.max_pixels or pixel_budget(predictor.num_heads, predictor.patch_size)
    if predictor.image_size and predictor.image_size[0] * predictor.image_size[1] > limit:
        height, width = predictor.image_size
        raise UserError(f"{args.model} takes {height}x{width} images only, {height * width} "
                        f"pixels, over --max_pixels {limit}; pass --max_pixels {height * width} "
                        "if the memory allows, or export for a smaller --image_size")
    return limit


def make_output_dir(path: str):
    """Create ``--output_dir``; one that cannot be is a :class:`UserError` before any image,
    rather than a failure of every image."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --output_dir {path}: {err.strerror or err}") from err


def write_maps(predictor, path: str, output_dir: str, image_size, max_pixels: int,
               threshold: float) -> str | None:
    """Write the maps of the image at ``path`` into ``output_dir``; returns a note naming the
    image when it was scaled down to fit ``max_pixels``, else None."""
    img = load_rgb(path)
    wanted = resized_shape(img.height, img.width, image_size, predictor.patch_size)
    rgb, image = prepare_image(img, image_size, predictor.patch_size, max_pixels)
    attentions, _ = predictor.run(image[None])
    save_attention_maps(output_dir, rgb, attentions[0], predictor.patch_size, threshold)
    if rgb.shape[:2] == wanted:
        return None
    return (f"resized to fit --max_pixels {max_pixels}: {path}: {rgb.shape[0]}x{rgb.shape[1]} "
            f"instead of {wanted[0]}x{wanted[1]}")


def infer_image(predictor, path: str, output_dir: str, image_size, max_pixels: int,
                threshold: float, debug: bool) -> str:
    """Write one image's maps (:func:`write_maps`), reporting a skip, a failure or a resize on
    stderr; returns which it was: ``written``, ``resized``, ``skipped`` or ``failed``."""
    try:
        note = write_maps(predictor, path, output_dir, image_size, max_pixels, threshold)
    except BadImageError as err:  # its message names the file
        return _report("skipped", f"skipping: {one_line(err)}")
    except PixelBudgetError as err:
        return _report("skipped", f"skipping: {path}: {one_line(err)}")
    except Exception as err:  # one image's failure must not stop the others
        details = traceback.format_exc() if debug or not isinstance(err, FAILURES) else ""
        return _report("failed", f"failed: {path}: {type(err).__name__}: {one_line(err)}\n"
                       f"{details}".rstrip())
    return _report("resized", note) if note else "written"


def _report(outcome: str, line: str) -> str:
    tqdm.write(line, file=sys.stderr)
    return outcome


@command
def main(argv=None) -> int:
    """Command line entry point; returns the exit status (0 when at least one image was written
    and none failed, 1 otherwise)."""
    args = parse_args(argv)
    predictor = load_predictor(args)
    max_pixels = pixel_limit(args, predictor)
    print(f"running on {predictor.describe()}; at most {max_pixels:,} pixels an image")
    note = attention_placement_note(args.model, predictor.provider)
    if note:
        print(note, file=sys.stderr)
    paths = find_images(args.images)  # a folder without images is a user error
    make_output_dir(args.output_dir)
    image_size = predictor.image_size or args.image_size
    debug = debug_requested(sys.argv[1:] if argv is None else argv)
    used, outcomes = set(), Counter()
    for path in tqdm(paths, desc="attention maps", unit="img", disable=len(paths) < 2):
        output_dir = os.path.join(args.output_dir, output_name(path, used))
        outcomes[infer_image(predictor, path, output_dir, image_size, max_pixels,
                             args.threshold, debug)] += 1
    written = outcomes["written"] + outcomes["resized"]
    resized = (f" ({outcomes['resized']} resized to fit --max_pixels {max_pixels})"
               if outcomes["resized"] else "")
    print(f"{written} written{resized}, {outcomes['skipped']} skipped, {outcomes['failed']} "
          f"failed: attention maps in {args.output_dir}")
    return 0 if written and not outcomes["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
