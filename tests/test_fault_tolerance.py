"""Fault tolerance of ``python -m dino_fast.train``: killed (SIGKILL during a checkpoint write and
at a random point), stopped (SIGTERM) and restarted with the same command, it ends with exactly
the weights of a run that was never interrupted; a non-finite loss stops training with a report
and leaves the last checkpoint as it was.

One run is 2 epochs of 2 steps (8 images, batch 4) of vit_tiny on 32/16 px crops with
drop-path on, so the resumed runs must also replay the random draws (CPU, deterministic).
"""
import os
import random
import signal
import subprocess
import time

import pytest

from _training import (assert_same_state, load, make_images, run, run_in_process,
                       single_thread_env, train_command)

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
    wait_for_line(proc, "training vit_tiny")
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, (tmp_path / "run2.log").read_text()[-2000:]
    assert "stopped by a signal" in stdout
    ckpt = load(out / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == next_position(1, 0) == (1, 1)
    assert not (out / "checkpoint.pth.tmp").exists()  # overwritten by the next write, renamed

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
