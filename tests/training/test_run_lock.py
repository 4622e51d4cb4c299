"""One training run per output folder: a second run is refused naming the holder, a lock left
by a dead process of this host is taken over with a note, one of another host is refused with
the way to remove it, and the lock (and a folder made only for it) is gone when the run ends."""
import json
import os
import subprocess
import sys

import pytest

from dino_fast.cli.errors import UserError
from dino_fast.training.run_lock import LOCK_NAME, RunLock, process_start
from tests._cli import user_error
from tests._training import TINY_RUN, make_images


def dead_pid() -> int:
    """The id of a process of this host that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(folder, **record):
    folder.mkdir(exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(record))


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    with RunLock(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match=rf"in use by another training run \(pid "
                                            rf"{os.getpid()} on this host"):
            RunLock(str(tmp_path)).acquire()
        assert (tmp_path / LOCK_NAME).exists()  # the refused run leaves the holder's lock
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path, capsys):
    pid = dead_pid()
    write_lock(tmp_path, host=RunLock(str(tmp_path)).host, pid=pid, start=None)
    with RunLock(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"left by a run that is no longer running (pid {pid} on this host" in \
        capsys.readouterr().out
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(process_start(os.getpid()) is None, reason="no /proc start times here")
def test_a_recycled_process_id_is_not_taken_for_the_holder(tmp_path):
    start = process_start(os.getpid())
    write_lock(tmp_path, host=RunLock(str(tmp_path)).host, pid=os.getpid(), start=start - 1)
    with RunLock(str(tmp_path)) as lock:
        assert lock.held


def test_a_lock_of_another_host_is_refused_with_the_way_out(tmp_path):
    write_lock(tmp_path, host="node7", pid=dead_pid(), start=None, since="2026-01-02 03:04:05")
    with pytest.raises(UserError) as refused:
        RunLock(str(tmp_path)).acquire()
    message = str(refused.value)
    assert "locked by a training run on host node7 (pid" in message
    assert f"remove {tmp_path / LOCK_NAME} and start again" in message
    assert (tmp_path / LOCK_NAME).exists()


def test_a_lock_that_names_no_run_is_refused(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")  # its writer died between creating and writing it
    with pytest.raises(UserError, match="does not say which training run holds it"):
        RunLock(str(tmp_path)).acquire()


def test_folders_made_for_the_lock_go_with_it_unless_written_to(tmp_path):
    with RunLock(str(tmp_path / "a" / "b")):
        assert (tmp_path / "a" / "b" / LOCK_NAME).exists()
    assert os.listdir(tmp_path) == []
    with RunLock(str(tmp_path / "a" / "b")):
        (tmp_path / "a" / "b" / "log.txt").write_text("")
    assert os.listdir(tmp_path / "a" / "b") == ["log.txt"]


def test_train_refuses_a_folder_in_use_and_unlocks_when_done(tmp_path, capsys):
    from dino_fast import train
    data = make_images(tmp_path / "images", 4)
    argv = [*TINY_RUN, "--data_path", data, "--batch_size_per_gpu", "4", "--epochs", "1",
            "--output_dir", str(tmp_path / "out")]
    with RunLock(str(tmp_path / "out")):  # as another run of this host would hold it
        assert "is in use by another training run" in user_error(capsys, train.main, argv)
        assert os.listdir(tmp_path / "out") == [LOCK_NAME]
    train.main(argv)
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint.pth", "log.txt"]
