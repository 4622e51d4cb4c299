"""``python -m dino_fast.plot``: draws from an official ``main_dino.py`` log.txt and from ours,
compares runs, and turns bad input into one-line errors."""
import json
import re

import pytest

from dino_fast.monitoring.curves import PANELS, read_log
from dino_fast.plot import main
from tests._cli import user_error

pytest.importorskip("matplotlib")

# the official log format: train_loss, train_lr, train_wd, epoch, n_parameters
OFFICIAL = [{"train_loss": 10.9 - 0.5 * e, "train_lr": 1e-4 * e, "train_wd": 0.04 + 0.01 * e,
             "epoch": e, "n_parameters": 21_000_000} for e in range(4)]
OURS = [{**entry, "train_teacher_entropy": 8.0 - e, "train_teacher_entropy_ratio": (8.0 - e) / 8.3,
         "train_kl": 0.5, "train_batch_entropy": 8.0, "train_prototypes_used": 2981.0,
         "train_center_norm": 1.0 + e, "train_knn_top1": 20.0 + e}
        for e, entry in enumerate(OFFICIAL)]


def write_log(folder, entries):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.txt").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return folder


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_official_log_alone(tmp_path):
    run = write_log(tmp_path / "official", OFFICIAL)
    assert main([str(run)]) == str(run / "curves.png") and is_png(run / "curves.png")


def test_compare_official_and_ours(tmp_path, capsys):
    official = write_log(tmp_path / "official", OFFICIAL)
    ours = write_log(tmp_path / "ours", OURS)
    out = tmp_path / "both.png"
    main([str(official), str(ours / "log.txt"), "--output", str(out), "--title", "t"])
    assert is_png(out) and f"wrote {out}" in capsys.readouterr().out


def test_every_logged_metric_has_a_panel():
    """Each health field we log (and the k-NN) is drawn when present."""
    drawn = {key for key, _ in PANELS}
    logged = {key for key in OURS[0] if key.startswith("train_")} - {"train_teacher_entropy",
                                                                     "train_batch_entropy"}
    assert logged <= drawn


@pytest.mark.parametrize("content,message", [
    (None, "cannot read .*log.txt"),
    ("", "no log lines yet"),
    ('{"train_loss": 1, "epoch": 0}\nnot json\n', "line 2: not a JSON log line"),
    ('{"n_parameters": 5}\n', "none of the runs logged a metric"),
])
def test_bad_logs_are_one_line_errors(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "log.txt").write_text(content)
    assert re.search(message, user_error(capsys, main, [str(run)]))


def test_labels_must_match_the_runs(tmp_path):
    run = write_log(tmp_path / "a", OFFICIAL)
    with pytest.raises(SystemExit):
        main([str(run), "--labels", "x", "y"])
    with pytest.raises(SystemExit):
        main([str(run), str(run)])  # two runs with the same label


def test_read_log_skips_blank_lines(tmp_path):
    path = write_log(tmp_path / "r", OFFICIAL) / "log.txt"
    path.write_text(path.read_text() + "\n\n")
    assert read_log(str(path)) == OFFICIAL
