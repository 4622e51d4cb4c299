"""torch.distributed plumbing: one process needs no process group (unlike the official code);
under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) we join one, NCCL on GPUs and Gloo
on CPUs."""
import os
import sys

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    """True on rank 0: the process that writes checkpoints and logs."""
    return get_rank() == 0


def init_distributed(device_type: str) -> torch.device:
    """Join the process group when launched by torchrun; return this process's device.

    ``device_type`` is ``cuda`` or ``cpu``. Without torchrun's variables nothing is initialised.
    """
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if launched and int(os.environ["WORLD_SIZE"]) > 1 and not is_dist():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return device


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` in place over all processes (a no-op for one process)."""
    if is_dist():
        dist.all_reduce(tensor)
        tensor.div_(get_world_size())
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """The minimum of ``tensor`` over all processes, in place (a no-op for one process)."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def any_process(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on at least one process, so that all ranks take the same
    branch (e.g. stop after a signal that reached only one of them); ``flag`` itself for one
    process. ``device`` is this process's device (NCCL reduces CUDA tensors only). A collective
    and a host read: the training loop votes every few steps, not every step."""
    if not is_dist():
        return flag
    votes = torch.full((1,), float(flag), device=device)  # a fill, not a host-to-device copy
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes.item())


def cleanup(all_ranks_done: bool = False):
    """Leave the process group, if any.

    ``all_ranks_done``: every rank got here the same way, so wait for all of them first (tearing
    Gloo down while a peer still finishes its last collective aborts that peer). Leave it False
    after an error on this rank only: a barrier would then wait for ranks that never come.
    """
    if is_dist():
        if all_ranks_done:
            dist.barrier()
        dist.destroy_process_group()


def run_command(main):
    """Run a command's ``main()`` as the whole life of this process, then exit with its status.

    Under torchrun (``WORLD_SIZE`` > 1) the exit skips the interpreter's finalization
    (``os._exit``, after flushing the console): PyTorch keeps FSDP2's sharded modules referenced
    from C++ until then, and destroying them there aborted a Gloo process now and then
    (SIGABRT or SIGSEGV after a finished run, about 1 run in 30 on a 2-core CPU), which torchrun
    reports as a failed job. ``main`` has closed its files and left the process group by then.
    An exception other than ``SystemExit`` (a bug) propagates with its traceback as usual.
    """
    try:
        main()
        status = 0
    except SystemExit as stop:
        status = stop.code
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(status)
    if isinstance(status, str):  # as sys.exit prints a message
        print(status, file=sys.stderr)
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status or 0)
