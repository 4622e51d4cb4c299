"""Resuming training from ``--output_dir/checkpoint.pth``, and refusing what cannot be resumed.

Refused before any step, with the cause and what to do: a damaged or unreadable checkpoint
(naming the newest intact ``checkpointNNNN.pth`` to resume from instead), and a checkpoint of a
different model or optimizer (``--arch``, ``--patch_size``, ``--out_dim``, ``--optimizer``,
``--use_bn_in_head``, ``--norm_last_layer``), whose state would otherwise fail to load or fail at
the first step. The output folder is checked for writing before the first step too, without
creating it: a run that never starts leaves nothing behind.

A checkpoint written inside an epoch (``iteration`` > 0, after a stop signal) goes on at the exact
image it reached, even with another ``--batch_size_per_gpu`` or number of processes: each global
batch is the next slice of the epoch's one permutation of the data set
(:class:`dino_fast.data.sampling.EpochPlan`), so the images done are a prefix of it whatever the
batch. A prefix that is not a whole number of this run's global batches is refused, naming the
settings, rather than training an image twice or skipping one.
"""
import glob
import os
import tempfile

from dino_fast.cli.errors import UserError
from dino_fast.models.checkpoint import load_checkpoint, saved_args, verify_archive
from dino_fast.models.pretrained import normalize_keys

# Flags that change the shapes or the kind of the saved state.
STRUCTURAL_FLAGS = ("arch", "patch_size", "out_dim", "optimizer", "use_bn_in_head",
                    "norm_last_layer")


def check_output_dir(path: str):
    """Raise :class:`UserError` with the cause unless files can be created in ``path`` (or,
    when it does not exist yet, in its nearest existing parent, where it will be created).
    Creates nothing."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        if os.path.exists(folder):
            raise UserError(f"--output_dir {path}: {folder} exists and is not a folder")
        folder = os.path.dirname(folder)
    try:  # a real write: permission bits do not stop root, a read-only mount does
        fd, probe = tempfile.mkstemp(prefix=".dino_fast-write-test-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise UserError(f"--output_dir {path} is not writable ({folder}: {err.strerror}): "
                        "choose a folder you can write to") from err


def intact_periodic_checkpoint(folder: str):
    """The newest ``checkpointNNNN.pth`` in ``folder`` whose checksums verify, or None."""
    found = sorted(glob.glob(os.path.join(folder, "checkpoint[0-9][0-9][0-9][0-9].pth")),
                   reverse=True)
    for path in found:
        try:
            verify_archive(path)
        except RuntimeError:
            continue
        return path
    return None


def _optimizer_kind(state: dict):
    """``adamw``, ``sgd`` or ``lars`` from an optimizer state dict's hyper-parameters."""
    group = (state.get("param_groups") or [{}])[0]
    if "betas" in group:
        return "adamw"
    if "eta" in group:
        return "lars"
    return "sgd" if "momentum" in group else None


def _same(name: str, saved, wanted) -> bool:
    if name == "arch" and isinstance(saved, str):  # official checkpoints say deit_small
        saved = saved.replace("deit_", "vit_", 1)
    return saved == wanted


def check_compatible(path: str, ckpt: dict, args):
    """Raise :class:`UserError` naming every structural flag on which ``args`` and the
    checkpoint disagree."""
    saved = saved_args(ckpt)
    if "optimizer" not in saved and _optimizer_kind(ckpt["optimizer"]):
        saved = {**saved, "optimizer": _optimizer_kind(ckpt["optimizer"])}
    differ = [f"--{name} {saved[name]} (this run: {getattr(args, name)})"
              for name in STRUCTURAL_FLAGS
              if name in saved and hasattr(args, name)
              and not _same(name, saved[name], getattr(args, name))]
    if differ:
        raise UserError(f"cannot resume from {path}: it was trained with {', '.join(differ)}. "
                        "Use the checkpoint's values, or another --output_dir for a new run")


def _read(path: str) -> dict:
    """The checkpoint at ``path``; a damaged or unreadable one is refused naming the way out."""
    try:
        return load_checkpoint(path)
    except RuntimeError as err:
        folder = os.path.dirname(path)
        intact = intact_periodic_checkpoint(folder)
        if intact:
            way_out = (f"the newest intact checkpoint is {intact}: to resume from it, run "
                       f"mv {path} {path}.damaged && cp {intact} {path}")
        else:
            way_out = (f"no intact checkpointNNNN.pth in {folder}: move {path} away to start "
                       "over")
        raise UserError(f"refusing to resume: {err}; {way_out}") from err


def mid_epoch_step(path: str, ckpt: dict, batch_size: int, world_size: int) -> int:
    """The step of this run (``batch_size`` per process, ``world_size`` processes) at which the
    checkpoint's epoch goes on: its ``iteration`` steps, counted in images. Raise
    :class:`UserError` naming both settings when that is not a whole number of this run's
    steps. Checkpoints without ``world_size`` (written before it was saved) are taken to have
    this run's."""
    done = int(ckpt.get("iteration", 0))
    saved_batch = saved_args(ckpt).get("batch_size_per_gpu", batch_size)
    saved_world = int(ckpt.get("world_size", world_size))
    images = done * saved_batch * saved_world
    step, rest = divmod(images, batch_size * world_size)
    if rest:
        raise UserError(
            f"cannot resume {path} inside epoch {ckpt['epoch']}: it stopped after {images} "
            f"images of that epoch ({done} steps of --batch_size_per_gpu {saved_batch} x "
            f"{saved_world} process(es)), not a whole number of this run's steps of "
            f"{batch_size} x {world_size}: resume with --batch_size_per_gpu {saved_batch} on "
            f"{saved_world} process(es), or a global batch that divides {images}")
    return step


def load_state(student, teacher, optimizer, student_state, teacher_state, optimizer_state):
    """Load the three state dicts of a checkpoint into unsharded models and their optimizer."""
    student.load_state_dict(student_state)
    teacher.load_state_dict(teacher_state)
    optimizer.load_state_dict(optimizer_state)


def resume(path, args, world_size, student, teacher, optimizer, dino_loss,
           scaler, load=None) -> tuple[int, int]:
    """Restore the training state from ``path``; return the epoch and the step in it to start
    from (non-zero after a signal stopped training mid-epoch: :func:`mid_epoch_step` for this
    run's ``--batch_size_per_gpu`` and ``world_size``). ``load`` puts the models' and the
    optimizer's state dicts in place (:func:`load_state` by default; the sharded one under
    FSDP2)."""
    ckpt = _read(path)
    check_compatible(path, ckpt, args)
    step = mid_epoch_step(path, ckpt, args.batch_size_per_gpu, world_size)
    try:
        (load or load_state)(student, teacher, optimizer, normalize_keys(ckpt["student"]),
                             normalize_keys(ckpt["teacher"]), ckpt["optimizer"])
        if "dino_loss" in ckpt:
            dino_loss.load_state_dict(ckpt["dino_loss"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"{path} does not match this run's model/optimizer (different --arch, "
                        f"--out_dim, --patch_size or --optimizer?): {err}") from err
    if scaler is not None and "fp16_scaler" in ckpt:
        scaler.load_state_dict(ckpt["fp16_scaler"])
    return int(ckpt["epoch"]), step


def start_position(epoch: int, step: int, steps_per_epoch: int) -> tuple[int, int]:
    """Where to start: a mid-epoch checkpoint at or past this run's last step of the epoch
    (resumed with a smaller ``--max_steps``) counts as the end of that epoch."""
    return (epoch + 1, 0) if step >= steps_per_epoch else (epoch, step)

