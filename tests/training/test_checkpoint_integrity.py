"""What training writes and reads is checked: damaged checkpoints and checkpoints of another
model or optimizer are refused before training, naming the cause; a full disk names the file and
keeps the last checkpoint and the log line; the output folder is checked before the first step
and not created by a run that never starts; checkpoints load with a plain ``torch.load``; a
resumed or finished run writes no invented log line.

One tiny run (2 epochs of 2 steps, a periodic checkpoint per epoch) is shared; each test copies
what it needs."""
import argparse
import errno
import json
import os
import shutil
import subprocess
import zipfile

import pytest
import torch

from tests._cli import user_error_and_output
from tests._training import load, make_images, run_in_process

FLAGS = ["--batch_size_per_gpu", "4", "--saveckp_freq", "1"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """(image folder, output folder) of a finished 2-epoch run."""
    root = tmp_path_factory.mktemp("run")
    data = make_images(root / "images", 8)
    run_in_process("--data_path", data, *FLAGS, "--epochs", 2, "--output_dir", root / "out")
    return data, root / "out"


def copy_run(finished_run, tmp_path, *names):
    """The run's image folder and a new output folder holding copies of ``names``."""
    data, out = finished_run
    target = tmp_path / "out"
    target.mkdir()
    for name in names:
        shutil.copy(out / name, target / name)
    return data, target


def refused(capsys, run, *flags) -> str:
    """The one ``error:`` line with which ``run(*flags)`` (a ``train.main`` call) refuses,
    before training started."""
    line, out = user_error_and_output(capsys, lambda argv: run(*argv), flags)
    assert "training vit_tiny" not in out
    return line


def train_again(data, out, *flags):
    run_in_process("--data_path", data, *FLAGS, "--output_dir", out, *flags)


def damage(path):
    """Flip a block of bytes inside the largest tensor of a checkpoint (its zip CRC then fails)."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 30 + len(info.filename) + len(info.extra))  # local header
        f.seek(info.file_size // 2, os.SEEK_CUR)
        block = f.read(64)
        f.seek(-64, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in block))


def test_damaged_checkpoint_is_refused_naming_an_intact_one(finished_run, tmp_path, capsys):
    data, out = copy_run(finished_run, tmp_path, "checkpoint.pth", "checkpoint0000.pth",
                         "checkpoint0001.pth")
    damage(out / "checkpoint.pth")
    damage(out / "checkpoint0001.pth")
    before = (out / "checkpoint.pth").read_bytes()
    message = refused(capsys, train_again, data, out, "--epochs", 3)
    assert "damaged" in message
    assert str(out / "checkpoint.pth") in message
    assert f"newest intact checkpoint is {out / 'checkpoint0000.pth'}" in message
    assert (out / "checkpoint.pth").read_bytes() == before  # nothing trained, nothing written


def test_damaged_checkpoint_is_refused_by_the_model_loaders(finished_run, tmp_path):
    from dino_fast.cli.args import load_model
    from dino_fast.cli.errors import UserError
    _, out = copy_run(finished_run, tmp_path, "checkpoint.pth")
    load_model(str(out / "checkpoint.pth"), None, None, "teacher")  # intact: loads
    damage(out / "checkpoint.pth")
    with pytest.raises(UserError, match="is damaged"):  # a command prints it as one line
        load_model(str(out / "checkpoint.pth"), None, None, "teacher")


@pytest.mark.parametrize("keep_args", [True, False])
def test_resume_with_another_optimizer_is_refused_before_training(finished_run, tmp_path,
                                                                  capsys, keep_args):
    data, out = copy_run(finished_run, tmp_path, "checkpoint.pth")
    if not keep_args:  # the optimizer's kind is then read from its saved state
        ckpt = load(out / "checkpoint.pth")
        del ckpt["args"]
        torch.save(ckpt, out / "checkpoint.pth")
    assert "trained with --optimizer adamw (this run: sgd)" in refused(
        capsys, train_again, data, out, "--epochs", 3, "--optimizer", "sgd")


def test_checkpoints_load_with_plain_torch_load_and_old_ones_still_resume(finished_run,
                                                                          tmp_path, capsys):
    data, out = copy_run(finished_run, tmp_path, "checkpoint.pth")
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)  # the safe default
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["arch"] == "vit_tiny"
    ckpt["args"] = argparse.Namespace(**ckpt["args"])  # as older versions and official code save
    torch.save(ckpt, out / "checkpoint.pth")
    train_again(data, out, "--epochs", 2, "--optimizer", "adamw")  # read, checked, finished
    assert "training has finished" in capsys.readouterr().out
    assert "--optimizer adamw" in refused(  # its args are read too
        capsys, train_again, data, out, "--epochs", 3, "--optimizer", "lars")


def test_finished_run_started_again_says_so(finished_run, tmp_path, capsys):
    data, out = copy_run(finished_run, tmp_path, "checkpoint.pth", "log.txt")
    before = (out / "checkpoint.pth").read_bytes(), (out / "log.txt").read_text()
    train_again(data, out, "--epochs", 2)  # returns normally: exit status 0
    assert "training has finished" in capsys.readouterr().out
    assert ((out / "checkpoint.pth").read_bytes(), (out / "log.txt").read_text()) == before


def test_resume_past_a_shorter_epoch_invents_no_log_line(finished_run, tmp_path, capsys):
    # A checkpoint written by a signal at step 3 of epoch 1 (of 4-step epochs), resumed with
    # --max_steps 2: epoch 1 counts as done (no line for it, it was not trained here).
    data, out = copy_run(finished_run, tmp_path, "checkpoint0000.pth")
    ckpt = load(out / "checkpoint0000.pth")
    ckpt["iteration"] = 3
    torch.save(ckpt, out / "checkpoint.pth")
    train_again(data, out, "--epochs", 3, "--max_steps", 2)
    entries = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in entries] == [2]
    assert entries[0]["train_loss"] > 0
    assert "resuming from" in capsys.readouterr().out


def full_disk_save(real_save, fail_after: int):
    """``torch.save`` that fails as on a full disk after ``fail_after`` good calls (torch reports
    the ``OSError`` as the context of an internal ``RuntimeError``)."""
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) <= fail_after:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"\0" * 1000)
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None
    return save


def small_tmpfs(path, size: str) -> bool:
    """Mount a tmpfs of ``size`` at ``path``; False where mounting is not allowed."""
    path.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              check=False, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.parametrize("disk", ["simulated", pytest.param("tmpfs", marks=pytest.mark.slow)])
def test_full_disk_names_the_file_and_keeps_checkpoint_and_log(finished_run, tmp_path, capsys,
                                                               monkeypatch, disk):
    data, _ = finished_run
    out = tmp_path / "out"
    if disk == "tmpfs":
        # room for one checkpoint and a half: the second write runs out of space
        size = (finished_run[1] / "checkpoint.pth").stat().st_size * 3 // 2
        if not small_tmpfs(out, str(size)):
            pytest.skip("cannot mount a tmpfs here")
    else:
        monkeypatch.setattr(torch, "save", full_disk_save(torch.save, fail_after=1))
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_in_process("--data_path", data, "--batch_size_per_gpu", 4, "--epochs", 3,
                           "--output_dir", out)
        assert exit_info.value.code == 1
        last_line = capsys.readouterr().err.strip().splitlines()[-1]
        assert "No space left on device" in last_line
        assert str(out / "checkpoint.pth") in last_line
        assert load(out / "checkpoint.pth")["epoch"] == 1  # the previous one, intact
        entries = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
        assert [entry["epoch"] for entry in entries] == [0, 1]  # epoch 1's line still written
        assert not (out / "checkpoint.pth.tmp").exists()
    finally:
        if disk == "tmpfs":
            subprocess.run(["umount", str(out)], check=False, capture_output=True, timeout=30)


def test_unwritable_output_dir_is_refused_before_the_first_step(finished_run, tmp_path,
                                                                 capsys):
    data, _ = finished_run
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert "a_file exists and is not a folder" in refused(
        capsys, run_in_process, "--data_path", data, "--epochs", 1, "--output_dir",
        blocker / "out")
    read_only = tmp_path / "read_only"
    if os.geteuid() == 0:  # permission bits do not stop root: a read-only mount does
        read_only.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs",
                                  str(read_only)], check=False, capture_output=True, timeout=30)
        if mounted.returncode != 0:
            pytest.skip("cannot mount a read-only folder here")
    else:
        read_only.mkdir(mode=0o555)
    try:
        assert "is not writable" in refused(capsys, run_in_process, "--data_path", data,
                                            "--epochs", 1, "--output_dir", read_only)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(read_only)], check=False, capture_output=True, timeout=30)


def test_run_that_never_starts_creates_no_output_dir(tmp_path):
    data = make_images(tmp_path / "images", 2)  # fewer than one batch of 4
    with pytest.raises((SystemExit, ValueError, RuntimeError)):
        run_in_process("--data_path", data, "--batch_size_per_gpu", 4, "--epochs", 1,
                       "--output_dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()
