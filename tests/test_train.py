"""The training command end to end on the CPU: a short run writes the official checkpoint and
log, lowers nothing to NaN, and resuming from a checkpoint reaches the same state as an
uninterrupted run.

The runs are on the CPU (``--device cpu``) even on a GPU machine: the resume test asserts
bit-exact equality, which CUDA does not give (bf16 by default, and the bicubic
position-embedding backward uses non-deterministic atomics)."""
import json
import os
import re
import shutil

import pytest
import torch

from dino_fast.cli.errors import UserError
from dino_fast.models.checkpoint import load_checkpoint
from dino_fast.train import build_parser, train
from tests._training import make_images, train_command
from tests._training import run as run_command

TINY = ["--arch", "vit_tiny", "--out_dim", "256", "--batch_size_per_gpu", "2",
        "--local_crops_number", "1", "--max_steps", "2", "--num_workers", "0",
        "--global_crops_size", "64", "--local_crops_size", "32",
        "--saveckp_freq", "1", "--warmup_epochs", "0", "--loader", "torch",  # lr > 0 from step 0
        "--device", "cpu", "--no-curves"]  # bit-exact resumes: see the module docstring


def run(output_dir, *extra):
    args = build_parser().parse_args(TINY + ["--output_dir", str(output_dir), *extra])
    train(args)
    return load_checkpoint(os.path.join(output_dir, "checkpoint.pth"))


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, run(out, "--epochs", "2")


def test_checkpoint_and_log_official_format(two_epochs):
    out, ckpt = two_epochs
    assert {"student", "teacher", "optimizer", "epoch", "args", "dino_loss"} <= set(ckpt)
    assert ckpt["epoch"] == 2
    assert ckpt["dino_loss"]["center"].shape == (1, 256)
    assert any(k.startswith("backbone.blocks.0.attn.qkv") for k in ckpt["teacher"])
    assert "head.last_layer.weight_g" in ckpt["student"]
    lines = [json.loads(line) for line in open(out / "log.txt")]
    assert [entry["epoch"] for entry in lines] == [0, 1]
    assert {"train_loss", "train_lr", "train_wd"} <= set(lines[0])
    for name, tensor in list(ckpt["student"].items()) + list(ckpt["teacher"].items()):
        assert torch.isfinite(tensor).all(), name
    assert os.path.exists(out / "checkpoint0000.pth")
    assert not (out / "checkpoint.pth.tmp").exists()  # no temporary leftovers


def test_teacher_moved_towards_student(two_epochs):
    _, ckpt = two_epochs
    differs = [not torch.equal(ckpt["student"][k], ckpt["teacher"][k])
               for k in ckpt["teacher"] if k.startswith("backbone.blocks")]
    assert any(differs)


def test_resume_equals_uninterrupted(two_epochs, tmp_path, capsys):
    out, full = two_epochs
    shutil.copy(out / "checkpoint0000.pth", tmp_path / "checkpoint.pth")  # state after epoch 0
    resumed = run(tmp_path, "--epochs", "2")
    assert "resuming from" in capsys.readouterr().out
    for part in ("student", "teacher", "dino_loss"):
        for key, value in full[part].items():
            torch.testing.assert_close(resumed[part][key], value, rtol=0, atol=0, msg=key)


def test_resume_with_another_arch_is_a_clear_error(two_epochs, tmp_path):
    out, _ = two_epochs
    shutil.copy(out / "checkpoint.pth", tmp_path / "checkpoint.pth")
    with pytest.raises(UserError, match=r"trained with --out_dim 256 \(this run: 128\)"):
        run(tmp_path, "--epochs", "3", "--out_dim", "128")


def test_a_finished_run_ends_with_a_closing_line(tmp_path, capsys):
    run(tmp_path, "--epochs", "1", "--max_steps", "1")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"training finished: all 1 epochs done \(0\.\.0 in this run, \d+m\d\ds\); "
                        rf"checkpoint: {re.escape(str(tmp_path / 'checkpoint.pth'))}", last), last


# One usable CPU for 2 workers: every DataLoader warns, the k-NN's once per epoch; and drawing
# curves.png resets Python's record of the warnings already shown (matplotlib changes the
# filters), so the warning would come back every epoch.
ONE_CPU_RUN = """
import os, sys
os.sched_getaffinity = lambda pid: {0}
os.cpu_count = lambda: 4
from dino_fast.train import main
main(sys.argv[1:])
"""


def test_a_warning_repeated_every_epoch_is_shown_once(tmp_path):
    pytest.importorskip("matplotlib")
    for label in ("a", "b"):
        make_images(tmp_path / "images" / label, 4, seed=len(label))
    cmd = train_command("--data_path", tmp_path / "images", "--batch_size_per_gpu", 4,
                        "--epochs", 3, "--max_steps", 1, "--num_workers", 2, "--knn_every", 1,
                        "--curves", "--output_dir", tmp_path / "out")
    cmd[1:3] = ["-c", ONE_CPU_RUN]
    done = run_command(cmd, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    warning = "This DataLoader will create 2 worker processes"
    first_epoch, later_epochs = done.stderr.split("epoch 1/3: step 1/1")
    assert warning in first_epoch and warning not in later_epochs, done.stderr
