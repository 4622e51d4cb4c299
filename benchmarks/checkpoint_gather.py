"""The cost of one-file checkpoints under ``--sharding fsdp2`` (issue 26): the time and host memory
of gathering the sharded student, teacher and AdamW state on rank 0
(:func:`dino_fast.training.sharding.full_training_state`, as every checkpoint does), and of
writing the file (:func:`dino_fast.models.checkpoint.save_atomic`). Run it under torchrun, on
the CPU with Gloo or on GPUs with NCCL::

    torchrun --nproc_per_node=2 -m benchmarks.checkpoint_gather --arch vit_large \
        [--out_dim 65536] [--output benchmarks/results/gather.md]

The AdamW state is made by one step on a 32 px crop (its values do not matter, its size does).
``rss_before_GiB`` is rank 0's resident memory before the gather, ``peak_rise_GiB`` how far the
gather and the write raised its peak above that (``ru_maxrss``: an upper bound when the process
had peaked higher before).
"""
import argparse
import os
import resource
import tempfile
import time

import torch
import torch.distributed as dist

from benchmarks.common import print_table, write_results
from benchmarks.memory import student
from dino_fast.models import ARCHS
from dino_fast.models.checkpoint import save_atomic
from dino_fast.training.distributed import run_command
from dino_fast.training.optim import build_optimizer, get_params_groups
from dino_fast.training.sharding import full_training_state, shard_student_and_teacher

COLUMNS = ["arch", "out_dim", "processes", "gather_s", "save_s", "file_GiB", "rss_before_GiB",
           "peak_rise_GiB"]
GiB = 2 ** 30


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    """This process's peak resident memory so far (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sharded_training_state(arch: str, out_dim: int, device: torch.device):
    """Sharded student and teacher and an AdamW whose state exists (one step)."""
    torch.manual_seed(0)
    model = student(arch, out_dim)
    teacher = student(arch, out_dim)
    teacher.load_state_dict(model.state_dict())
    teacher.requires_grad_(False)
    model, teacher = shard_student_and_teacher(model.to(device), teacher.to(device), device,
                                               "fp32")
    optimizer = build_optimizer("adamw", get_params_groups(model))
    model([torch.randn(1, 3, 32, 32, device=device)]).sum().backward()
    optimizer.step()
    return model, teacher, optimizer


def measure(arch: str, out_dim: int, device: torch.device) -> dict:
    """One gather and one write on rank 0; the row (rank 0's numbers)."""
    model, teacher, optimizer = sharded_training_state(arch, out_dim, device)
    dist.barrier()
    before, started = resident_bytes(), time.perf_counter()
    state = full_training_state(model, teacher, optimizer)
    gathered = time.perf_counter() - started
    row = {"arch": arch, "out_dim": out_dim, "processes": dist.get_world_size(),
           "gather_s": gathered, "rss_before_GiB": before / GiB}
    if dist.get_rank() == 0:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "checkpoint.pth")
            started = time.perf_counter()
            save_atomic(state, path)
            row.update(save_s=time.perf_counter() - started,
                       file_GiB=os.path.getsize(path) / GiB)
        row["peak_rise_GiB"] = (peak_bytes() - before) / GiB
    dist.barrier()
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_large", choices=sorted(ARCHS))
    parser.add_argument("--out_dim", default=65536, type=int)
    parser.add_argument("--output", default=None, help="write the table to this markdown file")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("run it under torchrun (--nproc_per_node=2 or more)")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        row = measure(args.arch, args.out_dim, device)
        if dist.get_rank() == 0:
            text = print_table([row], COLUMNS, "checkpoint gather")
            if args.output:
                write_results(args.output, text)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_command(main)
