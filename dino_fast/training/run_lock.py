"""One training run per output folder: ``--output_dir/train.lock``.

Two runs on one folder would overwrite each other's checkpoints and interleave ``log.txt``.
Rank 0 takes the lock before it reads or writes anything there, creating the file with
``O_CREAT | O_EXCL`` so that of two runs starting together exactly one gets it. The file names
its holder: host, process id and the process's start time (from ``/proc`` where there is one, so
that a recycled process id is not taken for the holder). A second run is refused, naming the
holder. A lock left by a run that died without removing it (SIGKILL, a power cut) is taken over
with a note when its process is gone from this host; a lock of another host (a file system
shared by several nodes) cannot be checked, so the run is refused naming that host and process
and how to remove the lock if that run is dead. The holder removes the lock when it ends,
normally, with an error or on a signal, and also the folders it created for it if they are
still empty: a run refused before training leaves nothing behind.
"""
import json
import os
import socket
import sys
import time

from dino_fast.cli.errors import UserError
from dino_fast.cli.progress import say

LOCK_NAME = "train.lock"


def process_start(pid: int):
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or None
    where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()  # the name before ")" may hold spaces
        return int(fields[19])  # field 22 of stat(5); fields[0] is field 3
    except (OSError, ValueError, IndexError):
        return None


def is_running(pid: int, start) -> bool:
    """Whether process ``pid`` of this host exists and, when ``start`` is known, is the one that
    started then (not a later process given the same id)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, run by another user
    return start is None or process_start(pid) in (None, start)


def read_record(path: str):
    """The holder's record in the lock file ``path``, None when there is no such file; a
    ``ValueError`` when the file names no run (empty: its writer died before writing)."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.loads(f.read())
    except FileNotFoundError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        raise ValueError(f"{path} names no process")
    return record


class RunLock:
    """The lock on ``output_dir``: :meth:`acquire` (or ``with``) takes it or raises
    :class:`UserError` naming the run that holds it; :meth:`release` removes it."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.host = socket.gethostname()
        self.record = {"host": self.host, "pid": os.getpid(), "start": process_start(os.getpid()),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv}
        self.held = False
        self._created: list[str] = []  # folders made for the lock, deepest last

    def __enter__(self):
        return self if self.held else self.acquire()

    def __exit__(self, *exc_info):
        self.release()

    def acquire(self) -> "RunLock":
        """Take the lock, creating ``output_dir`` if needed; a lock of a run that is no longer
        running on this host is taken over with a note."""
        self._make_folders()
        try:
            for _ in range(3):  # a takeover can lose the race to another run: look again
                if self._create():
                    self.held = True
                    return self
                holder = self._holder()
                self._refuse_unless_dead(holder)
                self._take_over(holder)
            raise UserError(f"cannot take {self.path}: other runs keep taking it; is another "
                            f"training run starting on --output_dir {self.output_dir}?")
        except BaseException:
            self._remove_folders()
            raise

    def release(self):
        """Remove the lock if this run holds it, and the folders made for it if still empty."""
        try:
            ours = self.held and read_record(self.path) == self.record
        except ValueError:
            ours = False  # overwritten: never remove another run's lock
        if ours:
            os.remove(self.path)
        self.held = False
        self._remove_folders()

    def _make_folders(self):
        missing, folder = [], os.path.abspath(self.output_dir)
        while not os.path.isdir(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        for folder in reversed(missing):
            os.mkdir(folder)
            self._created.append(folder)

    def _remove_folders(self):
        while self._created:
            try:
                os.rmdir(self._created[-1])
            except OSError:  # training wrote there: the folder stays
                break
            self._created.pop()
        self._created.clear()

    def _create(self) -> bool:
        """Create the lock file holding this run's record; False when it exists already."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.record) + "\n")
        return True

    def _holder(self):
        """The record of the run holding the lock; None when the lock is gone."""
        try:
            return read_record(self.path)
        except ValueError as err:
            raise UserError(f"--output_dir {self.output_dir} has a lock, {self.path}, that does "
                            "not say which training run holds it: if no run uses that folder, "
                            "remove the lock and start again") from err

    def _refuse_unless_dead(self, holder):
        """Raise :class:`UserError` naming the holder unless it is known to be gone (None: the
        lock was removed since our attempt)."""
        if holder is None:
            return
        pid, host, since = holder["pid"], holder.get("host"), holder.get("since", "?")
        if host != self.host:
            raise UserError(
                f"--output_dir {self.output_dir} is locked by a training run on host {host} "
                f"(pid {pid}, since {since}), which cannot be checked from this host "
                f"({self.host}): if that run is no longer running, remove {self.path} and "
                "start again; otherwise choose another --output_dir")
        if is_running(pid, holder.get("start")):
            raise UserError(
                f"--output_dir {self.output_dir} is in use by another training run (pid {pid} "
                f"on this host, since {since}): wait for it to end, or choose another "
                "--output_dir")

    def _take_over(self, holder):
        """Remove the lock of ``holder``, a run that died; a lock that another run took in the
        meantime is put back."""
        if holder is None:
            return
        stale = f"{self.path}.stale-{os.getpid()}"
        try:
            os.rename(self.path, stale)  # atomic: of several runs taking over, one moves it
        except FileNotFoundError:
            return  # another run took it over first
        try:
            moved = read_record(stale)
        except ValueError:
            moved = None
        if moved != holder:  # a live run's lock, created after our read
            os.replace(stale, self.path)
            return
        os.remove(stale)
        say(f"note: {self.path} was left by a run that is no longer running (pid "
            f"{holder['pid']} on this host, since {holder.get('since', '?')}): taking it over")
