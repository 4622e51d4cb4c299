"""Fault tolerance of ``python -m dino_fast.train``: killed (SIGKILL during a checkpoint write and
at a random point), stopped (SIGTERM) and restarted with the same command, it ends with exactly
the weights of a run that was never interrupted; a non-finite loss stops training with a report
and leaves the last checkpoint as it was; two signals during a checkpoint write leave no log line
without its checkpoint and no traceback; a console pipe whose reader died loses no checkpoint.

One run is 2 epochs of 2 steps (8 images, batch 4) of vit_tiny on 32/16 px crops with
drop-path on, so the resumed runs must also replay the random draws (CPU, deterministic).
"""
import json
import os
import random
import signal
import subprocess
import time

import pytest

from tests._training import (
    assert_same_state,
    load,
    make_images,
    run,
    run_in_process,
    single_thread_env,
    train_command,
)

STEPS_PER_EPOCH, EPOCHS = 2, 2


def start(cmd, log_path):
    """Start ``cmd``; stdout is piped (the log lines), stderr (tqdm) goes to ``log_path``."""
    return subprocess.Popen(cmd, env=single_thread_env(), stdout=subprocess.PIPE,
                            stderr=open(log_path, "w"), text=True)


def wait_for_line(proc, text, timeout=90):
    """Read stdout until a line contains ``text``; fail with the output so far otherwise."""
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"no line with {text!r}; stdout: {''.join(seen)}")


def kill_during_second_checkpoint_write(proc, out):
    """SIGKILL once ``checkpoint.pth.tmp`` is being written while ``checkpoint.pth`` exists."""
    ckpt, tmp = out / "checkpoint.pth", out / "checkpoint.pth.tmp"
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline:
        if ckpt.exists() and tmp.exists():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.001)
    proc.kill()
    raise AssertionError(f"never saw a second checkpoint write (rc {proc.poll()})")


def next_position(epoch, iteration):
    """Where a checkpoint stands after one more step than ``(epoch, iteration)``."""
    return (epoch, iteration + 1) if iteration + 1 < STEPS_PER_EPOCH else (epoch + 1, 0)


def test_killed_stopped_and_resumed_run_matches_uninterrupted(tmp_path):
    data = make_images(tmp_path / "images", 4 * STEPS_PER_EPOCH)
    flags = ["--data_path", data, "--batch_size_per_gpu", 4, "--epochs", EPOCHS]
    run_in_process(*flags, "--output_dir", tmp_path / "reference")
    out = tmp_path / "interrupted"
    cmd = train_command(*flags, "--output_dir", out)

    # 1. SIGKILL while the end-of-epoch-1 (last) checkpoint is being written: the torn file is
    #    the temporary, checkpoint.pth is still the complete one of epoch 0.
    kill_during_second_checkpoint_write(start(cmd, tmp_path / "run1.log"), out)
    assert (out / "checkpoint.pth.tmp").exists()
    assert load(out / "checkpoint.pth")["epoch"] == 1

    # 2. SIGTERM before the first step ends: that step is finished, checkpointed mid-epoch.
    proc = start(cmd, tmp_path / "run2.log")
    assert "taking it over" in wait_for_line(proc, "training vit_tiny")  # run 1's lock: SIGKILL
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, (tmp_path / "run2.log").read_text()[-2000:]
    assert "stopped by a signal" in stdout
    ckpt = load(out / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == next_position(1, 0) == (1, 1)
    assert not (out / "checkpoint.pth.tmp").exists()  # overwritten by the next write, renamed
    assert not (out / "train.lock").exists()  # removed on the way out after a signal

    # 3. SIGKILL at a random moment (printed for a replay), then 4. run to the end.
    delay = random.Random().uniform(0.0, 3.0)
    print(f"SIGKILL {delay:.2f} s after training starts")
    proc = start(cmd, tmp_path / "run3.log")
    wait_for_line(proc, "resuming from")
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    load(out / "checkpoint.pth")  # whatever was interrupted, the checkpoint reads
    final = run(cmd)
    assert final.returncode == 0, final.stderr[-2000:]

    got, want = load(out / "checkpoint.pth"), load(tmp_path / "reference" / "checkpoint.pth")
    assert (got["epoch"], got["iteration"]) == (want["epoch"], want["iteration"]) == (EPOCHS, 0)
    assert_same_state(got, want, atol=0.0)  # bit-exact on the CPU (TINY_RUN: --device cpu)
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()


def test_non_finite_loss_stops_with_a_report_and_keeps_the_checkpoint(tmp_path, capsys):
    # A real trigger: lr 1e38 gives finite weights of ~1e35 after step 0, then inf logits.
    data = make_images(tmp_path / "images", 4)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_in_process("--data_path", data, "--batch_size_per_gpu", 4, "--epochs", 3,
                       "--lr", "1e38", "--output_dir", out)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 1 (epoch 1)" in err
    assert "(t0,s1)=nan" in err and "(t1,s0)=" in err and "(t1,s2)=" in err  # per-pair terms
    assert "lower --lr" in err
    ckpt = load(out / "checkpoint.pth")  # the last good one, from epoch 0
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 0)
    assert all(v.isfinite().all() for part in ("student", "teacher")
               for v in ckpt[part].values())
    assert len((out / "log.txt").read_text().splitlines()) == 1
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "log.txt"]


def start_in_own_group(cmd, log_path):
    """``start`` in a new session, so that a group signal reaches the run and not pytest."""
    return subprocess.Popen(cmd, env=single_thread_env(), stdout=subprocess.PIPE,
                            stderr=open(log_path, "w"), text=True, start_new_session=True)


def with_flag(cmd, flag, value):
    """``cmd`` with ``flag`` set to ``value`` (the later of two equal flags wins)."""
    return [*cmd, flag, str(value)]


@pytest.mark.parametrize("loader,sig", [
    ("torch", signal.SIGTERM), pytest.param("dali", signal.SIGINT, marks=pytest.mark.slow)])
def test_group_signal_finishes_the_step_and_checkpoints(tmp_path, loader, sig):
    # As `timeout`, systemd or Slurm stop a job: the signal reaches the loader workers too.
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    data = make_images(tmp_path / "images", 16)
    out = tmp_path / "out"
    cmd = train_command("--data_path", data, "--batch_size_per_gpu", 4, "--epochs", 2,
                        "--num_workers", 2, "--loader", loader, "--output_dir", out)
    proc = start_in_own_group(cmd, tmp_path / "run.log")
    wait_for_line(proc, "training vit_tiny")
    time.sleep(1.0)
    os.killpg(proc.pid, sig)
    stdout, _ = proc.communicate(timeout=120)
    log = (tmp_path / "run.log").read_text()
    assert proc.returncode == 0, log[-2000:]
    assert "stopped by a signal" in stdout and "killed by signal" not in log
    ckpt = load(out / "checkpoint.pth")
    assert f"after step {ckpt['iteration']} of epoch {ckpt['epoch']}" in stdout


@pytest.mark.slow
def test_second_group_signal_exits_at_once(tmp_path):
    data = make_images(tmp_path / "images", 16)
    out = tmp_path / "out"
    cmd = train_command("--data_path", data, "--batch_size_per_gpu", 4, "--epochs", 2,
                        "--num_workers", 2, "--output_dir", out)
    proc = start_in_own_group(cmd, tmp_path / "run.log")
    wait_for_line(proc, "training vit_tiny")
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (tmp_path / "run.log").read_text()[-2000:]
    assert "stopped by a signal" not in stdout
    assert not (out / "checkpoint.pth.tmp").exists()


# Every image read blocks, as a FIFO that never delivers data would (patched in, so that the
# test does not depend on which files the folder scan accepts).
BLOCKING_RUN = """
import sys
from dino_fast.training import signals
from dino_fast.data.folder import ImageFolderDataset
from dino_fast.train import main

def never_delivers(self, index):
    with open({fifo!r}, "rb") as fifo:  # no writer: open() blocks forever
        fifo.read()

ImageFolderDataset.load = never_delivers
signals.WAIT_GRACE_S = 1.0
main(sys.argv[1:])
"""


@pytest.mark.parametrize("workers", [2, pytest.param(0, marks=pytest.mark.slow)])
def test_blocked_read_does_not_make_training_deaf(tmp_path, workers):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    data = make_images(tmp_path / "images", 8)
    out = tmp_path / "out"
    cmd = train_command("--data_path", data, "--batch_size_per_gpu", 4, "--epochs", 1,
                        "--num_workers", workers, "--output_dir", out)
    cmd[1:3] = ["-c", BLOCKING_RUN.format(fifo=str(fifo))]  # instead of -m dino_fast.train
    proc = start_in_own_group(cmd, tmp_path / "run.log")
    wait_for_line(proc, "training vit_tiny")
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    log = (tmp_path / "run.log").read_text()
    assert proc.returncode == 0, log[-2000:]
    assert "no batch arrived" in log
    assert "stopped by a signal after step 0 of epoch 0" in stdout
    ckpt = load(out / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (0, 0)


# The read blocks inside native code that never returns to Python, as DALI's reader does on such
# a file: only the watcher thread can notice, and it ends the process.
NATIVE_BLOCKING_RUN = """
import sys
import torch
from dino_fast.training import signals
from dino_fast.data.folder import ImageFolderDataset
from dino_fast.train import main

ImageFolderDataset.load = lambda self, index: torch.futures.Future().wait()
signals.WAIT_GRACE_S = 1.0
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_read_blocked_in_native_code_still_ends_on_sigterm(tmp_path):
    data = make_images(tmp_path / "images", 8)
    cmd = train_command("--data_path", data, "--batch_size_per_gpu", 4, "--epochs", 1,
                        "--output_dir", tmp_path / "out")
    cmd[1:3] = ["-c", NATIVE_BLOCKING_RUN]
    proc = start_in_own_group(cmd, tmp_path / "run.log")
    wait_for_line(proc, "training vit_tiny")
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "the loader cannot be interrupted" in (tmp_path / "run.log").read_text()


# Both signals arrive during the first checkpoint write (that of epoch 0): the second abandons
# it at once, so neither that checkpoint nor the epoch's log line may be left behind.
SIGNALLED_DURING_WRITE_RUN = """
import os, signal, sys
import torch
from dino_fast.train import main

real_save = torch.save

class SignalledFile:
    def __init__(self, f):
        self.f, self.writes = f, 0

    def write(self, data):
        self.writes += 1
        if self.writes in (2, 3):
            os.kill(os.getpid(), signal.SIGTERM)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

torch.save = lambda obj, f, *args, **kwargs: real_save(obj, SignalledFile(f), *args, **kwargs)
main(sys.argv[1:])
"""


def test_two_signals_during_the_first_checkpoint_write_leave_a_consistent_folder(tmp_path):
    data = make_images(tmp_path / "images", 8)
    out = tmp_path / "out"
    cmd = train_command("--data_path", data, "--batch_size_per_gpu", 4, "--epochs", 2,
                        "--output_dir", out)
    signalled = [*cmd[:1], "-c", SIGNALLED_DURING_WRITE_RUN, *cmd[3:]]
    done = run(signalled)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "received again: stopping at once" in done.stderr
    assert not out.exists()  # no checkpoint, no log line without it, no .tmp, no lock
    again = run(cmd)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [json.loads(line)["epoch"] for line in open(out / "log.txt")] == [0, 1]


def test_sigint_with_the_console_pipe_closed_still_checkpoints(tmp_path):
    # As Ctrl-C on `train ... 2>&1 | tee log`: tee dies of it, so stdout and stderr are a pipe
    # without a reader, and every later write raises BrokenPipeError.
    data = make_images(tmp_path / "images", 8)
    out = tmp_path / "out"
    cmd = train_command("--data_path", data, "--batch_size_per_gpu", 4, "--epochs", 50,
                        "--output_dir", out)
    proc = subprocess.Popen(cmd, env=single_thread_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_line(proc, "training vit_tiny")
    proc.stdout.close()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0
    ckpt = load(out / "checkpoint.pth")
    assert 0 < ckpt["epoch"] * STEPS_PER_EPOCH + ckpt["iteration"] < 50 * STEPS_PER_EPOCH
    assert sorted(os.listdir(out)) in (["checkpoint.pth"], ["checkpoint.pth", "log.txt"])
