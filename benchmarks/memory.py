"""Memory of a DINO training process, measured where a CPU can (issue 26).

Section ``activations``: bytes the student forward leaves alive for its backward, per image
(2 x 224 + 10 x 96 crops, the DINO head with K = 65536, as training runs it), for each
``--activation_checkpointing`` mode, with the ratio to ``none``
(:class:`dino_fast.profiling.saved_memory.SavedMemory`). vit_large runs at one image.
Section ``state``: parameter, gradient and optimizer bytes per process (:func:`state_bytes`).

    python -m benchmarks.memory [--quick] [--output benchmarks/results/memory.md]

``--quick`` (CI): vit_tiny only, 1 image, 2 x 64 + 2 x 32 crops, K = 1024.
"""
import argparse

import torch

from benchmarks.common import print_table, write_results
from dino_fast.models import (
    ACTIVATION_CHECKPOINTING,
    ARCH_DIMS,
    DINOHead,
    MultiCropWrapper,
    apply_activation_checkpointing,
    build_vit,
)
from dino_fast.profiling.saved_memory import saved_bytes_per_image
from dino_fast.training.sharding import SHARDINGS

ACTIVATION_COLUMNS = ["arch", "images", "mode", "saved_MiB_per_image", "ratio_to_none"]
STATE_COLUMNS = ["arch", "sharding", "world_size", "params_MiB", "grads_MiB", "adamw_MiB",
                 "teacher_MiB", "total_MiB"]
MiB = 2 ** 20


def state_bytes(model: torch.nn.Module, world_size: int, sharding: str = "ddp",
                rank: int = 0) -> dict:
    """Bytes process ``rank`` holds of ``model``'s training state, from its parameter shapes:
    fp32 parameters, the gradients of the trainable ones, AdamW's two moments and step count
    per trainable tensor, and the fp32 teacher copy. DDP keeps a full replica on every
    process; FSDP2 splits each parameter along its first dimension as ``torch.chunk`` does
    (chunks of ``ceil(rows / world_size)`` rows, so the first ranks hold the larger ones)."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding {sharding!r} is not one of {SHARDINGS}")

    def held(p) -> int:  # elements of p on this rank
        if sharding == "ddp":
            return p.numel()
        rows = -(-p.shape[0] // world_size)
        return max(0, min(rows, p.shape[0] - rank * rows)) * (p.numel() // p.shape[0])

    trainable = [p for p in model.parameters() if p.requires_grad]
    params = sum(held(p) for p in model.parameters()) * 4
    grads = sum(held(p) for p in trainable) * 4
    return {"params": params, "grads": grads, "adamw": 2 * grads + 4 * len(trainable),
            "teacher": params}


def student(arch: str, out_dim: int) -> MultiCropWrapper:
    """The student as training builds it (stochastic depth 0.1, the official default)."""
    return MultiCropWrapper(build_vit(arch, 16, drop_path_rate=0.1),
                            DINOHead(ARCH_DIMS[arch][0], out_dim))


def crops(images: int, sizes: list[int]) -> list[torch.Tensor]:
    return [torch.randn(images, 3, size, size) for size in sizes]


def saved_per_image(model, batch: list[torch.Tensor], mode: str) -> float:
    """Bytes the forward keeps for the backward, per image, with checkpointing ``mode``."""
    return saved_bytes_per_image(apply_activation_checkpointing(model, mode), batch)


def activation_rows(arch: str, images: int, sizes: list[int], out_dim: int) -> list[dict]:
    """One row per ``--activation_checkpointing`` mode for ``arch``."""
    model, batch = student(arch, out_dim), crops(images, sizes)
    saved = {mode: saved_per_image(model, batch, mode) for mode in ACTIVATION_CHECKPOINTING}
    return [{"arch": arch, "images": images, "mode": mode,
             "saved_MiB_per_image": saved[mode] / MiB, "ratio_to_none": saved[mode] / saved["none"]}
            for mode in ACTIVATION_CHECKPOINTING]


def state_row(arch: str, out_dim: int, sharding: str, world_size: int) -> dict:
    """The ``state`` table's row of one arch and sharding (one function per case)."""
    with torch.device("meta"):
        state = state_bytes(student(arch, out_dim), world_size, sharding)
    row = {f"{k}_MiB": v / MiB for k, v in state.items()}
    return {"arch": arch, "sharding": sharding, "world_size": world_size, **row,
            "total_MiB": sum(state.values()) / MiB}


def settings(quick: bool) -> tuple[list, list[int], int]:
    """``[(arch, images)]``, crop sizes and K of the run."""
    if quick:
        return [("vit_tiny", 1)], [64, 64, 32, 32], 1024
    return ([("vit_small", 2), ("vit_base", 2), ("vit_large", 1)], [224] * 2 + [96] * 10,
            65536)


def run(quick: bool = False, world_size: int = 8) -> tuple[list[dict], list[dict], str]:
    """Both tables' rows and their markdown."""
    archs, sizes, out_dim = settings(quick)
    activations = [row for arch, images in archs
                   for row in activation_rows(arch, images, sizes, out_dim)]
    state = [state_row(arch, out_dim, "ddp", world_size) for arch, _ in archs]
    text = (print_table(activations, ACTIVATION_COLUMNS, "activations") + "\n\n"
            + print_table(state, STATE_COLUMNS, "state"))
    return activations, state, text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings, for CI")
    parser.add_argument("--world_size", type=int, default=8, help="processes of the state table")
    parser.add_argument("--output", default=None, help="write the tables to this markdown file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    _, _, text = run(args.quick, args.world_size)
    if args.output:
        write_results(args.output, text)


if __name__ == "__main__":
    main()
