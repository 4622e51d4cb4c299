"""Training you can watch, end to end on tiny CPU runs: the health fields of ``log.txt`` and the
progress bar, the online k-NN (which must not change the trained weights), TensorBoard event
files, ``curves.png`` and ``--stop_on_collapse``; and the device-side meter."""
import contextlib
import json
import math
import os
import re

import pytest
import torch

from dino_fast.monitoring import monitor
from dino_fast.monitoring.health import CollapseDetector, CollapseRule
from dino_fast.monitoring.online_knn import OnlineKNN
from tests._cli import user_error
from tests._training import TINY_RUN, assert_same_state, load, make_images, run_in_process

RUN = ["--batch_size_per_gpu", "4", "--max_steps", "2", "--epochs", "2"]
HEALTH_FIELDS = {"train_teacher_entropy", "train_teacher_entropy_ratio", "train_kl",
                 "train_batch_entropy", "train_prototypes_used", "train_center_norm"}


def labelled_folder(root):
    """8 train and 4 val images in two classes."""
    for split, count in (("train", 4), ("val", 2)):
        for label in ("a", "b"):
            make_images(root / split / label, count, seed=hash((split, label)) % 1000)
    return root / "train", root / "val"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run without and with the online k-NN (every epoch), TensorBoard and
    curves; the console output of the second (stdout and the progress bar's stderr)."""
    root = tmp_path_factory.mktemp("monitor")
    train_dir, val_dir = labelled_folder(root)
    plain, watched = root / "plain", root / "watched"
    run_in_process(*RUN, "--data_path", train_dir, "--output_dir", plain)
    console = root / "console.txt"
    with open(console, "w") as f, contextlib.redirect_stderr(f), contextlib.redirect_stdout(f):
        run_in_process(*RUN, "--data_path", train_dir, "--output_dir", watched,
                       "--knn_every", 1, "--val_path", val_dir, "--tensorboard", "--curves")
    return plain, watched, console.read_text()


def read_log(folder):
    return [json.loads(line) for line in open(folder / "log.txt")]


def test_log_keeps_official_fields_and_adds_health(runs):
    plain, _, _ = runs
    for entry in read_log(plain):
        assert {"train_loss", "train_lr", "train_wd", "epoch"} <= set(entry)
        assert HEALTH_FIELDS <= set(entry)
        assert 0 < entry["train_teacher_entropy_ratio"] <= 1 + 1e-6
        assert entry["train_kl"] > -1e-4  # a KL divergence, up to float32 rounding
        assert entry["train_teacher_entropy"] == pytest.approx(
            entry["train_teacher_entropy_ratio"] * math.log(32))
        assert 1 <= entry["train_prototypes_used"] <= 32
        assert entry["train_prototypes_used"] == pytest.approx(
            math.exp(entry["train_batch_entropy"]))


def test_progress_bar_shows_entropy_and_kl(runs):
    # stderr is not a terminal here: plain progress lines, "name value" (a bar shows name=value)
    assert re.search(r"H/lnK[ =]0\.\d", runs[2]) and re.search(r"KL[ =]\d", runs[2]), runs[2]


def test_online_knn_is_logged_and_leaves_the_weights_bit_identical(runs):
    plain, watched, _ = runs
    entries = read_log(watched)
    assert [0 <= e["train_knn_top1"] <= 100 for e in entries] == [True, True]
    assert_same_state(load(watched / "checkpoint.pth"), load(plain / "checkpoint.pth"), atol=0)
    for a, b in zip(read_log(plain), entries):  # the same losses and health too
        assert {k: v for k, v in b.items() if k != "train_knn_top1"} == a


def test_online_knn_is_shown_on_the_console(runs):
    _, watched, console = runs
    for entry in read_log(watched):
        assert f"epoch {entry['epoch']}: teacher k-NN top-1 {entry['train_knn_top1']:.2f}%" \
            in console, console


def test_tensorboard_event_files(runs):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, watched, _ = runs
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(watched))
    events = EventAccumulator(str(watched))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "train_lr", "train_wd", "train_kl", "train_teacher_entropy_ratio",
            "train_knn_top1", "teacher_temp", "momentum", "images_per_s"} <= tags
    assert [s.step for s in events.Scalars("train_loss")] == [0, 1]
    assert events.Scalars("train_loss")[1].value == pytest.approx(
        read_log(watched)[1]["train_loss"])


def test_curves_png_redrawn(runs):
    pytest.importorskip("matplotlib")
    plain, watched, _ = runs
    assert not (plain / "curves.png").exists()  # --no-curves
    with open(watched / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_leave_one_out_on_a_labelled_data_path(tmp_path):
    """Without --val_path: each image of the labelled --data_path classified by the others; the
    model's train mode and the random state come back as they were."""
    train_dir, _ = labelled_folder(tmp_path)
    knn = OnlineKNN(str(train_dir), None, 32, 4, 0, "cpu")
    assert knn.val_set is None and len(knn.train_set) == 8

    class MeanColour(torch.nn.Module):
        """A stand-in backbone: the image's mean colour as its feature."""

        def forward(self, x):
            return x.mean(dim=(2, 3))

    model = MeanColour().train()
    state = torch.random.get_rng_state()
    top1 = knn(model)
    assert 0 <= top1 <= 100 and model.training
    assert torch.equal(torch.random.get_rng_state(), state)


def test_bad_knn_flags_are_one_line_errors(tmp_path, capsys):
    from dino_fast import train
    unlabelled = make_images(tmp_path / "flat", 4)
    argv = [*TINY_RUN, *RUN, "--data_path", unlabelled, "--output_dir", str(tmp_path / "o")]
    line = user_error(capsys, train.main, [*argv, "--knn_every", "1"])
    assert re.search("--knn_every: .*class sub-folder", line), line
    line = user_error(capsys, train.main, [*argv, "--val_path", unlabelled])
    assert "--val_path is only used by the online k-NN" in line
    assert "--knn_every" in user_error(capsys, train.main, [*argv, "--knn_every", "-1"], code=2)


def test_stop_on_collapse_stops_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    """A rule that calls every epoch a uniform collapse: one warning, training stops after the
    first epoch with its checkpoint and log line written."""
    always = CollapseRule(patience=1, uniform_ratio=0.0, kl_ratio=1e9)
    monkeypatch.setattr(monitor, "CollapseDetector",
                        lambda out_dim, start_epoch: CollapseDetector(out_dim, always))
    run_in_process(*RUN, "--epochs", 5, "--output_dir", tmp_path, "--stop_on_collapse")
    out = capsys.readouterr().out
    assert out.count("WARNING: uniform collapse at epoch 0") == 1
    assert "stopped by --stop_on_collapse after epoch 0" in out
    assert load(tmp_path / "checkpoint.pth")["epoch"] == 1
    assert [e["epoch"] for e in read_log(tmp_path)] == [0]


def test_meter_means_and_bar_reads():
    meter = monitor.HealthMeter(out_dim=100)
    assert meter.postfix() == {}  # no step yet
    for step in range(4):
        meter.add({name: torch.tensor(float(step + i))
                   for i, name in enumerate(monitor.STEP_METRICS)})
        if step == 0:
            first = meter.postfix()
    assert first == {"H/lnK": f"{0 / math.log(100):.3f}", "KL": "1.000"}
    assert meter.postfix() == {"H/lnK": f"{3 / math.log(100):.3f}", "KL": "4.000"}  # the latest
    means = meter.epoch_means()
    assert means == {name: 1.5 + i for i, name in enumerate(monitor.STEP_METRICS)}


def test_missing_tensorboard_and_matplotlib_are_said_once(tmp_path, monkeypatch, capsys):
    """Without the optional packages: one line each, no event files, no curves, no error."""
    import builtins

    real_import = builtins.__import__

    def no_optional(name, *args, **kwargs):
        if name.startswith(("torch.utils.tensorboard", "matplotlib")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optional)
    (tmp_path / "log.txt").write_text('{"train_loss": 1.0, "epoch": 0}\n')
    assert monitor.open_tensorboard(str(tmp_path)) is None
    assert monitor.redraw_curves(str(tmp_path)) is False
    out = capsys.readouterr().out
    assert out.count("TensorBoard is not installed") == 1
    assert out.count("matplotlib is not installed") == 1
    assert not (tmp_path / "curves.png").exists()


def test_collapse_history_survives_a_resume(tmp_path, monkeypatch, capsys):
    """A signature held over epochs 0-1, then (after a restart) epoch 2: flagged at epoch 2."""
    always = CollapseRule(patience=3, uniform_ratio=0.0, kl_ratio=1e9)
    monkeypatch.setattr(monitor, "CollapseDetector",
                        lambda out_dim, start_epoch: CollapseDetector(out_dim, always))
    run_in_process(*RUN, "--output_dir", tmp_path)  # epochs 0 and 1
    assert "collapse at epoch" not in capsys.readouterr().out  # (the folder's name has one)
    run_in_process(*RUN[:-1], 3, "--output_dir", tmp_path)  # resumes at epoch 2
    out = capsys.readouterr().out
    assert "resuming from" in out and "WARNING: uniform collapse at epoch 2" in out
