"""User errors end every command with one line and a non-zero status, without a traceback;
``--debug`` or ``DINO_FAST_DEBUG=1`` shows it; unexpected errors keep their traceback."""
import errno
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from dino_fast.cli.errors import DEBUG_ENV, FlagError, UserError, command, one_line
from tests._cli import user_error
from tests._training import TINY_RUN, make_images, single_thread_env


@command
def fake_main(argv=None):
    """Raises what ``argv[0]`` names."""
    raise {"user": UserError("the folder 'x' holds 1 image"), "flag": FlagError("--lr bad"),
           "missing": FileNotFoundError(errno.ENOENT, "No such file or directory", "/nope"),
           "bug": ZeroDivisionError("division by zero"),
           "oserror": OSError(errno.EIO, "Input/output error")}[argv[0]]


@pytest.mark.parametrize("kind,code,text", [
    ("user", 1, "error: the folder 'x' holds 1 image"), ("flag", 2, "error: --lr bad"),
    ("missing", 1, "error: [Errno 2] No such file or directory: '/nope'")])
def test_user_errors_are_one_line(capsys, monkeypatch, kind, code, text):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert user_error(capsys, fake_main, [kind], code) == text


@pytest.mark.parametrize("kind", ["bug", "oserror"])
def test_unexpected_errors_keep_their_traceback(monkeypatch, kind):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises((ZeroDivisionError, OSError)):
        fake_main([kind])


def test_debug_flag_and_variable_show_the_traceback(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(UserError):
        fake_main(["user", "--debug"])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(UserError):
        fake_main(["user"])
    monkeypatch.setenv(DEBUG_ENV, "0")
    with pytest.raises(SystemExit):
        fake_main(["user"])


def test_error_from_a_loader_worker_keeps_only_its_cause():
    # What torch's DataLoader re-raises: the worker's traceback inside the message.
    message = ("Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most "
               "recent call last):\n  File \"x.py\", line 1, in f\n    g()\n"
               "dino_fast.data.folder.BadImageError: cannot decode image '/d/b.png': bad\n")
    assert one_line(UserError(message)) == "cannot decode image '/d/b.png': bad"


# Each command started as `python -m`, with one user error each; all in one interpreter.
RUNNER = """
import contextlib, io, json, runpy, sys, warnings
warnings.simplefilter("ignore")
results = []
for module, argv in json.loads(sys.argv[1]):
    sys.argv = [module, *argv]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def test_every_command_reports_user_errors_in_one_line(tmp_path):
    good = make_images(tmp_path / "good", 3)
    bad = make_images(tmp_path / "bad", 3)
    (tmp_path / "bad" / "001.png").write_bytes(b"not a png")  # met by a loader worker
    one_class = make_images(tmp_path / "one" / "only", 3)
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    run = [*TINY_RUN, "--output_dir", str(tmp_path / "out")]
    cases = [  # (module, argv, what the line says, exit status)
        ("dino_fast.train", [*run, "--data_path", str(tmp_path / "nope")], "does not exist", 1),
        ("dino_fast.train", [*run, "--data_path", good, "--batch_size_per_gpu", "4"],
         "3 images, fewer than one global batch", 1),
        ("dino_fast.train", [*run, "--data_path", bad, "--batch_size_per_gpu", "3",
                             "--num_workers", "1"], "cannot decode image", 1),
        ("dino_fast.train", [*run, "--momentum_teacher", "1.5"], "--momentum_teacher", 2),
        ("dino_fast.eval_knn", ["--data_path", os.path.dirname(one_class), "--leave_one_out",
                                "--device", "cpu"], "at least two classes", 1),
        ("dino_fast.visualize", ["--checkpoint", str(garbage), "--image_path", good],
         "garbage.pth: not a PyTorch checkpoint: looks like text", 1),
    ]
    if importlib.util.find_spec("onnxruntime"):
        cases += [("dino_fast.export", ["--checkpoint", str(garbage), "--output",
                                        str(tmp_path / "m.onnx")], "not a PyTorch checkpoint", 1),
                  ("dino_fast.infer", ["--model", str(tmp_path / "m.onnx"), "--images", good],
                   "model not found", 1)]
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps([case[:2] for case in cases])],
        env={**single_thread_env(), "PYTHONPATH": os.getcwd()}, capture_output=True, text=True,
        timeout=300, check=True)
    results = json.loads(done.stdout.splitlines()[-1])  # after what the commands print
    assert len(results) == len(cases)
    for (module, _, says, status), (code, err) in zip(cases, results):
        lines = [line for line in err.splitlines() if line.startswith("error")]
        assert code == status and "Traceback" not in err, (module, says, err)
        assert len(lines) == 1 and says in lines[0] and err.rstrip().endswith(lines[0]), err
