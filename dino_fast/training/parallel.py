"""How a run spreads the student and the teacher over its processes (``--sharding``): FSDP2
sharding with its sharded EMA (:mod:`.sharding`), or DDP with the flat-buffer EMA
(:mod:`.ema`); and the checkpoint's state dicts, in the official layout either way."""
import torch.nn as nn

from dino_fast.cli.errors import UserError
from dino_fast.cli.progress import say
from dino_fast.training import distributed as dist_utils
from dino_fast.training.ema import TeacherEMA
from dino_fast.training.sharding import (
    ShardedTeacherEMA,
    full_training_state,
    shard_student_and_teacher,
)


def parallelize(student, teacher, device, sharded: bool, args):
    """``(student to train, student module, teacher, EMA)``: FSDP2-sharded models and their
    sharded EMA when ``sharded``; else the flat-buffer EMA, and the student in DDP under
    torchrun."""
    if sharded:
        if args.precision == "fp16":
            raise UserError("--sharding fsdp2 runs with --precision fp32 or bf16, not fp16 (its "
                            "loss scaler does not unscale sharded gradients)")
        if args.compile and args.compile_scope == "forward":
            raise UserError("--sharding fsdp2 compiles each block (FSDP2's gathers cannot be "
                            "traced into one graph): use --compile_scope blocks or auto")
        if args.compile and args.compile_mode == "reduce-overhead":
            raise UserError("--sharding fsdp2 compiles each block between FSDP2's gathers, "
                            "which CUDA graphs cannot capture: use another --compile_mode")
        if args.knn_every:
            raise UserError("--knn_every needs the whole teacher on rank 0: use --sharding ddp, "
                            "or run eval_knn on the checkpoint")
        student, teacher = shard_student_and_teacher(student, teacher, device, args.precision)
        return student, student, teacher, ShardedTeacherEMA(student, teacher)
    if args.sharding == "fsdp2":
        say("--sharding fsdp2 with one process: nothing to shard, training as with ddp")
    ema = TeacherEMA(student, teacher)  # flat buffers: before the optimizer and DDP
    if not dist_utils.is_dist():
        return student, student, teacher, ema
    ddp = nn.parallel.DistributedDataParallel(
        student, device_ids=[device.index] if device.type == "cuda" else None)
    return ddp, student, teacher, ema


def training_state(student, teacher, optimizer, sharded: bool) -> dict:
    """The ``student``, ``teacher`` and ``optimizer`` state dicts of a checkpoint, in the official
    layout whatever the sharding (under FSDP2 gathered on rank 0: call on every rank)."""
    if sharded:
        return full_training_state(student, teacher, optimizer)
    return {"student": student.state_dict(), "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict()}
