"""Memory of a DINO training process, measured where a CPU can (issue 26).

Section ``activations``: bytes the student forward leaves alive for its backward (2 x 224 + 10 x
96 crops, the DINO head with K = 65536, as training runs it, fp32), for each
``--activation_checkpointing`` mode (:class:`dino_fast.profiling.saved_memory.SavedMemory`).
Measured at 1 and 2 images: the difference is the cost per image (with the ratio to ``none``'s),
the rest a cost per batch that does not grow with it (the head's weight-normalised last layer,
256 x K, is the largest part). A checkpointed backward also holds one block's activations while
it recomputes that block: ``recompute_MiB_per_image``, ``none``'s cost over the depth (an upper
bound: the head's share is counted in it too).
Section ``state``: parameter, gradient, AdamW and teacher bytes per process (:func:`state_bytes`)
under DDP (a full replica whatever the number of processes) and under FSDP2 at 2, 4 and 8
processes, with the share of DDP's. ``tests/training/test_fsdp_step.py`` checks the FSDP2
prediction against the bytes two Gloo processes hold.
Section ``fits``: from the two (activations plus recompute), the largest batch per GPU of
GPU_GIB memory for each arch, mode, DDP and FSDP2 at the largest world size, after RESERVE_GIB
for the CUDA context, the allocator's slack and the backward's temporaries (a round guess, not
measured). The activations are fp32 as measured; under bf16 autocast the matrix products keep
bf16 outputs, so a GPU fits more.

    python -m benchmarks.memory [--quick] [--output benchmarks/results/memory.md]

``--quick`` (CI): vit_tiny only, 2 x 64 + 2 x 32 crops, K = 1024.
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

ACTIVATION_COLUMNS = ["arch", "mode", "MiB_per_image", "ratio_to_none", "MiB_per_batch",
                      "recompute_MiB_per_image"]
STATE_COLUMNS = ["arch", "sharding", "world_size", "params_MiB", "grads_MiB", "adamw_MiB",
                 "teacher_MiB", "total_MiB", "share_of_ddp"]
WORLD_SIZES = (2, 4, 8)  # FSDP2's rows; DDP's replica is the same at any world size
GPU_GIB, RESERVE_GIB = (16, 24, 40, 80), 2
FIT_COLUMNS = ["arch", "sharding", "world_size", "mode", *(f"batch_{gib}GiB" for gib in GPU_GIB)]
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


def saved_bytes(model, images: int, sizes: list[int], mode: str) -> float:
    """Bytes the forward on ``images`` images keeps for the backward, with checkpointing
    ``mode``."""
    batch = crops(images, sizes)
    return images * saved_bytes_per_image(apply_activation_checkpointing(model, mode), batch)


def activation_rows(arch: str, sizes: list[int], out_dim: int) -> list[dict]:
    """One row per ``--activation_checkpointing`` mode for ``arch``: bytes per image and per
    batch, from the forwards on 1 and 2 images."""
    model, rows = student(arch, out_dim), []
    for mode in ACTIVATION_CHECKPOINTING:
        one, two = (saved_bytes(model, images, sizes, mode) for images in (1, 2))
        rows.append({"arch": arch, "mode": mode, "MiB_per_image": (two - one) / MiB,
                     "MiB_per_batch": (2 * one - two) / MiB})
    none = rows[0]["MiB_per_image"]
    for row in rows:
        row["ratio_to_none"] = row["MiB_per_image"] / none
        # the backward recomputes one checkpointed block at a time, holding its activations
        row["recompute_MiB_per_image"] = 0.0 if row["mode"] == "none" else none / len(
            model.backbone.blocks)
    return rows


def state_row(arch: str, out_dim: int, sharding: str, world_size: int) -> dict:
    """The ``state`` table's row of one arch, sharding and world size (rank 0, which holds the
    largest FSDP2 shards)."""
    with torch.device("meta"):
        model = student(arch, out_dim)
        state = state_bytes(model, world_size, sharding)
        replica = sum(state_bytes(model, 1, "ddp").values())
    row = {f"{k}_MiB": v / MiB for k, v in state.items()}
    return {"arch": arch, "sharding": sharding, "world_size": world_size, **row,
            "total_MiB": sum(state.values()) / MiB, "share_of_ddp": sum(state.values()) / replica}


def state_rows(arch: str, out_dim: int, world_sizes=WORLD_SIZES) -> list[dict]:
    """DDP's row (any world size), then FSDP2's at each of ``world_sizes``."""
    return [state_row(arch, out_dim, "ddp", 1),
            *(state_row(arch, out_dim, "fsdp2", world) for world in world_sizes)]


def fit_rows(activations: list[dict], state: list[dict]) -> list[dict]:
    """The ``fits`` table: per arch, DDP's and the last FSDP2 state row, per mode."""
    last_world = max(row["world_size"] for row in state)
    rows = []
    for held in state:
        if held["sharding"] == "fsdp2" and held["world_size"] != last_world:
            continue
        for saved in activations:
            if saved["arch"] != held["arch"]:
                continue
            fixed = held["total_MiB"] + saved["MiB_per_batch"] + RESERVE_GIB * 1024
            per_image = saved["MiB_per_image"] + saved["recompute_MiB_per_image"]
            rows.append({"arch": held["arch"], "sharding": held["sharding"],
                         "world_size": held["world_size"], "mode": saved["mode"],
                         **{f"batch_{gib}GiB": max(0, int((gib * 1024 - fixed) // per_image))
                            for gib in GPU_GIB}})
    return rows


def settings(quick: bool) -> tuple[list[str], list[int], int]:
    """Archs, crop sizes and K of the run."""
    if quick:
        return ["vit_tiny"], [64, 64, 32, 32], 1024
    return ["vit_small", "vit_base", "vit_large"], [224] * 2 + [96] * 10, 65536


def run(quick: bool = False, world_sizes=WORLD_SIZES) -> tuple[list[dict], list[dict], str]:
    """Both tables' rows and their markdown."""
    archs, sizes, out_dim = settings(quick)
    activations = [row for arch in archs for row in activation_rows(arch, sizes, out_dim)]
    state = [row for arch in archs for row in state_rows(arch, out_dim, world_sizes)]
    fits = fit_rows(activations, state)
    text = "\n\n".join([print_table(activations, ACTIVATION_COLUMNS, "activations"),
                        print_table(state, STATE_COLUMNS, "state"),
                        print_table(fits, FIT_COLUMNS, "fits")])
    return activations, state, text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings, for CI")
    parser.add_argument("--world_sizes", type=int, nargs="+", default=list(WORLD_SIZES),
                        help="processes of the state table's FSDP2 rows")
    parser.add_argument("--output", default=None, help="write the tables to this markdown file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    _, _, text = run(args.quick, args.world_sizes)
    if args.output:
        write_results(args.output, text)


if __name__ == "__main__":
    main()
