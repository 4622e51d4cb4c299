"""``python -m dino_fast.train``: DINO self-supervised training (Caron et al. 2021).

Flags, defaults, checkpoint and log formats follow the official ``main_dino.py``; our own flags
(``--compile``, ``--attn_backend``, ``--loader``, ``--precision``, ``--max_steps``, ``--device``,
``--sharding``, ``--activation_checkpointing``) come last. Without ``--data_path`` it trains on
the small set of photos bundled with the package. Run under ``torchrun`` to train on several
processes (DistributedDataParallel, or FSDP2 with ``--sharding fsdp2``).
"""
import argparse
import contextlib
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn

from dino_fast.cli.args import add_launcher_args, bool_flag, official_arch, resolve_device
from dino_fast.cli.errors import UserError, add_debug_flag, command
from dino_fast.cli.flags import check_train_args
from dino_fast.cli.progress import Progress, duration, say
from dino_fast.data import build_loader
from dino_fast.data.sampling import epoch_seed
from dino_fast.models import ARCHS, ATTN_BACKENDS, DINOHead, MultiCropWrapper, build_vit
from dino_fast.models.checkpoint import WriteError, save_atomic
from dino_fast.models.checkpointing import ACTIVATION_CHECKPOINTING, apply_activation_checkpointing
from dino_fast.models.packed import PACK_ATTENTION, PackedMultiCropWrapper
from dino_fast.monitoring.monitor import add_monitor_args, build_monitor
from dino_fast.training import distributed as dist_utils
from dino_fast.training.loss import DINOLoss
from dino_fast.training.optim import build_optimizer, get_params_groups
from dino_fast.training.parallel import parallelize, training_state
from dino_fast.training.resume import check_output_dir, resume, start_position
from dino_fast.training.run_lock import RunLock
from dino_fast.training.schedules import cosine_scheduler
from dino_fast.training.sharding import SHARDINGS, load_training_state
from dino_fast.training.signals import StopRequest
from dino_fast.training.step import (
    COMPILE_MODES,
    COMPILE_SCOPES,
    PRECISIONS,
    NonFiniteLossError,
    TrainStep,
)
from dino_fast.training.step_meters import StepMeters


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags: the official ``main_dino.py`` ones, then ours."""
    p = argparse.ArgumentParser("dino_fast.train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Model
    p.add_argument("--arch", default="vit_small", type=official_arch, choices=sorted(ARCHS))
    p.add_argument("--patch_size", default=16, type=int)
    p.add_argument("--out_dim", default=65536, type=int, help="K, the number of prototypes")
    p.add_argument("--norm_last_layer", default=True, type=bool_flag)
    p.add_argument("--momentum_teacher", default=0.996, type=float)
    p.add_argument("--use_bn_in_head", default=False, type=bool_flag)
    # Temperature teacher
    p.add_argument("--warmup_teacher_temp", default=0.04, type=float)
    p.add_argument("--teacher_temp", default=0.04, type=float)
    p.add_argument("--warmup_teacher_temp_epochs", default=0, type=int)
    # Training / optimisation
    p.add_argument("--use_fp16", default=None, type=bool_flag,
                   help="official flag (default true there); here --precision decides unless "
                        "this is given: true -> fp16, false -> fp32")
    p.add_argument("--weight_decay", default=0.04, type=float)
    p.add_argument("--weight_decay_end", default=0.4, type=float)
    p.add_argument("--clip_grad", default=3.0, type=float, help="per-parameter; 0 disables")
    p.add_argument("--batch_size_per_gpu", default=64, type=int)
    p.add_argument("--epochs", default=100, type=int)
    p.add_argument("--freeze_last_layer", default=1, type=int)
    p.add_argument("--lr", default=0.0005, type=float, help="at batch 256; scaled linearly")
    p.add_argument("--warmup_epochs", default=10, type=int)
    p.add_argument("--min_lr", default=1e-6, type=float)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "lars"])
    p.add_argument("--drop_path_rate", default=0.1, type=float)
    # Multi-crop
    p.add_argument("--global_crops_scale", type=float, nargs=2, default=(0.4, 1.0))
    p.add_argument("--local_crops_number", type=int, default=8)
    p.add_argument("--local_crops_scale", type=float, nargs=2, default=(0.05, 0.4))
    # Misc
    p.add_argument("--data_path", default=None, type=str,
                   help="image folder (recursive) or shard set (python -m dino_fast.shards); "
                        "default: the bundled demo photos")
    p.add_argument("--output_dir", default=".", type=str)
    p.add_argument("--saveckp_freq", default=20, type=int)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--num_workers", default=10, type=int, help="capped at the CPU count")
    add_launcher_args(p)
    # dino_fast
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the forward passes (what: --compile_scope)")
    p.add_argument("--compile_mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode with --compile (reduce-overhead: CUDA graphs)")
    p.add_argument("--compile_scope", default="auto", choices=["auto", *COMPILE_SCOPES],
                   help="with --compile: forward (teacher and student forwards as one graph) "
                        "or blocks (each transformer block: a shorter cold compile); auto: "
                        "forward, blocks under --sharding fsdp2")
    p.add_argument("--attn_backend", default="sdpa", choices=ATTN_BACKENDS)
    p.add_argument("--pack_crops", action="store_true",
                   help="student: all crops' tokens as one sequence (off by default until a "
                        "GPU has measured it faster)")
    p.add_argument("--pack_attention", default="sdpa_split", choices=PACK_ATTENTION,
                   help="attention with --pack_crops: varlen (one packed call; the Triton "
                        "kernel on CUDA) or sdpa_split (one SDPA call per crop size)")
    p.add_argument("--check_every", default=10, type=int,
                   help="steps between host reads: progress bar, non-finite check, stop vote")
    p.add_argument("--loader", default="auto", choices=["auto", "torch", "dali"])
    p.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                   help="auto: bf16 on CUDA, fp32 on CPU (see --use_fp16)")
    p.add_argument("--max_steps", default=None, type=int,
                   help="at most this many steps per epoch (short runs); schedules follow")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--sharding", default="ddp", choices=SHARDINGS,
                   help="under torchrun: ddp (replicated models) or fsdp2 (parameters, "
                        "gradients and optimizer state split across processes)")
    p.add_argument("--activation_checkpointing", default="none", choices=ACTIVATION_CHECKPOINTING,
                   help="student blocks: recompute activations in the backward to save memory")
    p.add_argument("--skip_bad_images", action="store_true",
                   help="skip unreadable images (counted in the log) instead of stopping")
    p.add_argument("--global_crops_size", default=224, type=int,
                   help="global crop side in pixels (official 224); smaller for quick CPU runs")
    p.add_argument("--local_crops_size", default=96, type=int,
                   help="local crop side in pixels (official 96)")
    add_debug_flag(p)
    add_monitor_args(p)  # --knn_every --val_path --tensorboard --stop_on_collapse --curves
    return p


def resolve_device_and_precision(args):
    """Fill ``args.device`` and ``args.precision`` from ``auto``, with clear errors."""
    args.device = resolve_device(args.device)
    if args.precision == "auto":
        if args.use_fp16 is not None:
            args.precision = "fp16" if args.use_fp16 else "fp32"
        else:
            args.precision = "bf16" if args.device == "cuda" else "fp32"


def seed_everything(seed: int):
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_models(args, device):
    """Student and teacher ``MultiCropWrapper``s; the teacher starts as a copy of the student."""
    def backbone(drop_path_rate):
        return build_vit(args.arch, args.patch_size, drop_path_rate=drop_path_rate,
                         attn_backend=args.attn_backend)

    student_bb = backbone(args.drop_path_rate)
    embed_dim = student_bb.embed_dim
    student_head = DINOHead(embed_dim, args.out_dim, use_bn=args.use_bn_in_head,
                            norm_last_layer=args.norm_last_layer)
    if args.pack_crops:
        student = PackedMultiCropWrapper(student_bb, student_head, args.pack_attention)
    else:
        student = MultiCropWrapper(student_bb, student_head)
    teacher = MultiCropWrapper(backbone(0.0), DINOHead(embed_dim, args.out_dim,
                                                       use_bn=args.use_bn_in_head))
    student, teacher = student.to(device), teacher.to(device)
    if args.use_bn_in_head and dist_utils.is_dist():
        if device.type == "cuda":
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        else:  # PyTorch's SyncBatchNorm runs on GPUs only
            log("--use_bn_in_head on the CPU: the head's BatchNorm statistics are per process "
                "(SyncBatchNorm, which averages them over processes, needs CUDA)")
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def checkpoint_on_every_rank(path, device) -> bool:
    """Whether ``path`` exists. Every process resumes from it, so all must see it or none (an
    ``--output_dir`` that all nodes share); otherwise every process stops with that cause."""
    exists = os.path.isfile(path)
    if dist_utils.any_process(exists, device) and dist_utils.any_process(not exists, device):
        raise UserError(f"{path} exists for some processes only (rank {dist_utils.get_rank()} "
                        f"{'sees' if exists else 'does not see'} it): --output_dir must be a "
                        "folder that every node shares")
    return exists


def lock_output_dir(output_dir: str, device):
    """Rank 0 checks that ``output_dir`` can be written and takes its :class:`RunLock` (a run
    already training there is refused) before anything is read or written there; when it
    cannot, every rank stops alike. The lock, a null context on the other ranks."""
    lock, refusal = contextlib.nullcontext(), None
    if dist_utils.is_main_process():
        try:
            check_output_dir(output_dir)
            lock = RunLock(output_dir).acquire()
        except UserError as err:
            refusal = err
    if dist_utils.any_process(refusal is not None, device):
        raise refusal or UserError(f"rank 0 cannot train in --output_dir {output_dir}; its "
                                   "error line says why")
    return lock


def train(args) -> dict:
    """Train as ``args`` say, holding ``--output_dir``'s lock; return the last epoch's log
    entry."""
    check_train_args(args)  # every flag in range before anything starts
    resolve_device_and_precision(args)
    device = dist_utils.init_distributed(args.device)
    seed_everything(args.seed)  # the same initial weights on every rank
    with lock_output_dir(args.output_dir, device):  # removed at exit, error and signal too
        return train_in_output_dir(args, device)


def train_in_output_dir(args, device) -> dict:
    """The body of :func:`train`, once ``--output_dir`` is this run's."""
    started, rank, world = time.perf_counter(), dist_utils.get_rank(), dist_utils.get_world_size()
    loader = build_loader(
        kind=args.loader, data_path=args.data_path, batch_size=args.batch_size_per_gpu,
        num_workers=min(args.num_workers, os.cpu_count() or 1),
        global_crops_scale=tuple(args.global_crops_scale),
        local_crops_scale=tuple(args.local_crops_scale),
        local_crops_number=args.local_crops_number, rank=rank, world_size=world,
        seed=args.seed, device=device, skip_bad_images=args.skip_bad_images,
        global_size=args.global_crops_size, local_size=args.local_crops_size)
    iters_per_epoch = min(len(loader), args.max_steps or len(loader))

    student, teacher = build_models(args, device)
    apply_activation_checkpointing(student, args.activation_checkpointing)
    sharded = args.sharding == "fsdp2" and dist_utils.is_dist()
    student, student_module, teacher, ema = parallelize(student, teacher, device, sharded, args)
    dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp,
                         args.teacher_temp, args.warmup_teacher_temp_epochs,
                         args.epochs).to(device)
    optimizer = build_optimizer(args.optimizer, get_params_groups(student_module))
    step = TrainStep(student, teacher, dino_loss, optimizer, ema, precision=args.precision,
                     clip_grad=args.clip_grad, freeze_last_layer=args.freeze_last_layer,
                     compile=args.compile, compile_mode=args.compile_mode,
                     compile_scope=None if args.compile_scope == "auto" else args.compile_scope,
                     sharded=sharded)

    warmup_epochs = min(args.warmup_epochs, args.epochs)
    lr_schedule = cosine_scheduler(args.lr * args.batch_size_per_gpu * world / 256.0,
                                   args.min_lr, args.epochs, iters_per_epoch,
                                   warmup_epochs=warmup_epochs)
    wd_schedule = cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs,
                                   iters_per_epoch)
    momentum_schedule = cosine_scheduler(args.momentum_teacher, 1, args.epochs, iters_per_epoch)

    start_epoch, start_step = 0, 0
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    if checkpoint_on_every_rank(ckpt_path, device):
        start_epoch, start_step = start_position(
            *resume(ckpt_path, args, world, student_module, teacher, optimizer, dino_loss,
                    step.scaler, load_training_state if sharded else None), iters_per_epoch)
        if start_epoch >= args.epochs:
            log(f"training has finished: {ckpt_path} holds all {args.epochs} epochs (raise "
                "--epochs to train longer)")
            return {}
        log(f"resuming from {ckpt_path} at epoch {start_epoch}, step {start_step}")
    monitor = build_monitor(args, device)  # checks the k-NN folders; TensorBoard writes there
    if start_epoch or start_step:
        monitor.resumed(start_epoch)  # the collapse rule's history, from log.txt
    stats = {}
    with StopRequest(interrupt_waits=world == 1) as stop:
        log(f"training {args.arch}/{args.patch_size} on {device} ({args.precision}, loader "
            f"{loader.kind}, {len(loader.dataset)} images: {loader.dataset.origin}, {world} "
            "process(es)) for epochs "
            f"{start_epoch}..{args.epochs - 1}, {iters_per_epoch} steps each")
        for epoch in range(start_epoch, args.epochs):
            first = start_step if epoch == start_epoch else 0
            loader.set_epoch(epoch, first)
            monitor.start_epoch()
            stats, done = train_one_epoch(step, loader, epoch, first, iters_per_epoch,
                                          lr_schedule, wd_schedule, momentum_schedule, args,
                                          stop, monitor)
            finished = done >= iters_per_epoch
            if finished:  # health metrics, k-NN when due, collapse rule
                stats.update(monitor.end_epoch(epoch, epoch == args.epochs - 1,
                                               teacher.backbone))
            save_dict = {**training_state(student, teacher, optimizer, sharded),
                         "epoch": epoch + 1 if finished else epoch, "args": dict(vars(args)),
                         "dino_loss": dino_loss.state_dict(), "iteration": 0 if finished else done,
                         "world_size": world}
            if step.scaler is not None:
                save_dict["fp16_scaler"] = step.scaler.state_dict()
            if dist_utils.is_main_process():
                stats = save_and_log(save_dict, stats, epoch, finished, args)
                if finished:
                    monitor.after_log(stats, epoch, {
                        "teacher_temp": dino_loss.teacher_temp_schedule[epoch],
                        "momentum": float(momentum_schedule[(epoch + 1) * iters_per_epoch - 1]),
                        "images": done * args.batch_size_per_gpu * world})
            if stop.agreed(device):
                log(f"stopped by a signal after step {save_dict['iteration']} of epoch "
                    f"{save_dict['epoch']} (where it resumes); {ckpt_path} written: run the "
                    "same command to resume")
                break
            if monitor.should_stop:
                log(f"stopped by --stop_on_collapse after epoch {epoch}; {ckpt_path} written")
                break
        else:
            log(f"training finished: all {args.epochs} epochs done ({start_epoch}.."
                f"{args.epochs - 1} in this run, {duration(time.perf_counter() - started)}); "
                f"checkpoint: {ckpt_path}")
        monitor.close()
    return stats


def save_and_log(save_dict, stats, epoch, finished, args) -> dict:
    """Write ``checkpoint.pth``; after a whole epoch also the ``log.txt`` line, which is
    returned, and the periodic copy. The line goes with its checkpoint: it is written once the
    checkpoint is, or when it could not be (a full disk: the epoch's numbers are kept), never
    after a second stop signal abandoned the write."""
    try:
        save_atomic(save_dict, os.path.join(args.output_dir, "checkpoint.pth"))
    except WriteError:
        if finished:
            append_log_line(stats, epoch, args.output_dir)
        raise
    if not finished:
        return stats
    stats = append_log_line(stats, epoch, args.output_dir)
    if args.saveckp_freq and epoch % args.saveckp_freq == 0:
        save_atomic(save_dict, os.path.join(args.output_dir, f"checkpoint{epoch:04}.pth"))
    return stats


def append_log_line(stats: dict, epoch: int, output_dir: str) -> dict:
    """Append epoch ``epoch``'s line to ``log.txt`` (the ``train_``-prefixed ``stats``) and
    return it; a failed write raises :class:`WriteError` naming the file."""
    entry = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch}
    log_path = os.path.join(output_dir, "log.txt")
    try:
        with open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
    except OSError as err:
        raise WriteError(err.errno, err.strerror, log_path) from err
    return entry


def train_one_epoch(step, loader, epoch, first, iters_per_epoch, lr_schedule, wd_schedule,
                    momentum_schedule, args, stop, monitor) -> tuple[dict, int]:
    """Steps ``first`` .. ``iters_per_epoch - 1`` of ``epoch``, fewer when ``stop`` is requested
    (the current step is finished first); returns the means over the steps run and the index
    of the next step. The host reads device values at the first step, every ``--check_every``
    steps and at the end (progress bar, non-finite check, and under torchrun the stop vote),
    not every step."""
    meters, totals, shown = StepMeters(), {"lr": 0.0, "wd": 0.0}, {}
    n_images, start, done = 0, time.perf_counter(), 0
    progress = Progress(iters_per_epoch, f"epoch {epoch}/{args.epochs}", initial=first,
                        enabled=dist_utils.is_main_process())
    # the loader starts at step first; a stop signal ends a wait for data that may never end
    for i, (crops, _) in enumerate(stop.until_stopped(loader), start=first):
        if i >= iters_per_epoch:
            break
        it = epoch * iters_per_epoch + i  # global iteration
        # Random draws (drop-path) depend on (seed, step, rank) only: exact mid-epoch resumes.
        seed_everything(epoch_seed(args.seed, it, dist_utils.get_rank()))
        meters.add(step(crops, epoch, float(lr_schedule[it]), float(wd_schedule[it]),
                        float(momentum_schedule[it]), it))  # Python floats: plain checkpoints
        monitor.step(step.dino_loss)  # health metrics, summed on the device
        totals["lr"] += float(lr_schedule[it])
        totals["wd"] += float(wd_schedule[it])
        done += 1
        n_images += crops[0].shape[0] * dist_utils.get_world_size()
        # the epoch's first step too: the progress shows values from its first line on
        check = done % args.check_every == 0 or done == 1 or i == iters_per_epoch - 1
        if check:
            step.check_finite()
            loss = meters.host_values()["loss"]
            shown = {"loss": f"{loss:.4f}", "lr": f"{lr_schedule[it]:.2e}",
                     "img_s": f"{n_images / (time.perf_counter() - start):.1f}",
                     **monitor.postfix()}
        progress.update(**shown)
        if (check or not dist_utils.is_dist()) and stop.agreed(crops[0].device):
            break
    progress.close()
    step.check_finite()  # before the checkpoint: none holds a non-finite step's state
    means = {**meters.means(), **{k: v / max(done, 1) for k, v in totals.items()}}
    return means, first + done


def log(message: str):
    """Print on the main process only (:func:`say`: a console that went away is not an
    error)."""
    if dist_utils.is_main_process():
        say(message)


@command
def main(argv=None):
    """Entry point of ``python -m dino_fast.train``."""
    args = build_parser().parse_args(argv)
    all_ranks_done = False
    try:
        train(args)
        all_ranks_done = True
    except NonFiniteLossError as err:
        all_ranks_done = True  # the loss is averaged over ranks: all stop at the same step
        say(f"error: {err}", sys.stderr)
        sys.exit(1)
    except WriteError as err:  # only rank 0 writes
        say(f"error: cannot write {err.filename} (the file there before, if any, is "
            f"intact): {err.strerror}", sys.stderr)
        sys.exit(1)
    finally:
        dist_utils.cleanup(all_ranks_done)


if __name__ == "__main__":
    dist_utils.run_command(main)
