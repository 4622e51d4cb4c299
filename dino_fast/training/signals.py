"""Stopping training cleanly on SIGTERM / SIGINT, however the signal is sent.

Schedulers stop a job by signalling every process of it (``timeout``, systemd and Slurm signal
the whole process group or cgroup; a terminal's Ctrl-C reaches the foreground group). The main
process then finishes its step, writes a checkpoint and exits 0 (:class:`StopRequest`); the
DataLoader workers must survive that signal, or the main process dies of their death before it
can write (:func:`leave_signals_to_main`). A second signal stops at once.

A wait for the next batch can last forever (a read that never returns data: a FIFO, a hung
network file system). When no batch arrives within :data:`WAIT_GRACE_S` seconds of the first
signal, the wait is abandoned (:class:`StopTraining`) instead of waiting for a step that never
comes. No state changes while waiting for data, so the checkpoint then holds every finished step.
A wait inside native code that Python cannot interrupt (DALI's reader stuck on such a file) is
noticed by a watcher thread instead, which ends the process after twice that time, saying that
the last checkpoint written is the one to resume from.
"""
import contextlib
import os
import select
import signal
import sys
import threading
import time

from dino_fast.cli.progress import say
from dino_fast.training import distributed as dist_utils

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
WAIT_GRACE_S = 5.0  # how long a batch may still take to arrive after a stop signal


class StopTraining(Exception):
    """A stop was requested while training waited for its next batch."""


class StopRequest:
    """While active, SIGTERM and SIGINT only raise a flag, so that training finishes the current
    step, writes a checkpoint and exits cleanly; a second signal stops at once.

    ``interrupt_waits``: a wait for data (:meth:`waiting_for_data`) still going on
    :data:`WAIT_GRACE_S` seconds after a first signal raises :class:`StopTraining` there. Only
    for one process: under DDP every rank must stop at the same step, which :meth:`agreed`
    decides after a step.
    """

    def __init__(self, interrupt_waits: bool = True):
        self.requested = False
        self.interrupt_waits = interrupt_waits
        self._waiting = False
        self._wait_id = 0  # counts the waits for data, so the watcher sees one that never ends
        self._previous = {}
        self._wakeup = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
            if self.interrupt_waits and hasattr(signal, "setitimer"):
                self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._wait_over)
                self._start_watcher()
        return self

    def __exit__(self, *exc_info):
        if signal.SIGALRM in self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._wakeup[1])
            os.close(self._wakeup[0])  # the watcher sees the end of its pipe and returns
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            say(f"\n{name} received again: stopping at once (a checkpoint being written is "
                "abandoned; the last complete one is intact)", sys.stderr)
            raise SystemExit(128 + signum)
        self.requested = True
        say(f"\n{name} received: finishing the current step, then writing a checkpoint (send "
            "it again to stop at once)", sys.stderr)
        if self._waiting:
            self._start_grace()

    def _start_grace(self):
        if signal.SIGALRM in self._previous:
            signal.setitimer(signal.ITIMER_REAL, WAIT_GRACE_S)  # a real signal: ends a blocked read
        else:
            raise StopTraining

    def _wait_over(self, signum, frame):
        if self._waiting:
            say(f"no batch arrived within {WAIT_GRACE_S:g} s of the stop signal (a read that "
                "never returns?): stopping before the next step", sys.stderr)
            raise StopTraining

    @contextlib.contextmanager
    def waiting_for_data(self):
        """Around the wait for the next batch: when ``interrupt_waits``, it ends with
        :class:`StopTraining` if it lasts :data:`WAIT_GRACE_S` seconds past a stop signal."""
        self._wait_id += 1
        self._waiting = self.interrupt_waits
        if self._waiting and self.requested:
            self._start_grace()
        try:
            yield
        finally:
            self._waiting = False

    def until_stopped(self, iterable):
        """Yield from ``iterable`` (a loader) until it ends or a wait for its next item is
        abandoned (:class:`StopTraining`)."""
        items = iter(iterable)
        while True:
            try:
                with self.waiting_for_data():
                    item = next(items)
            except (StopIteration, StopTraining):
                return
            yield item

    def _start_watcher(self):
        """Python's C-level handler writes each signal's number to a wakeup pipe even while the
        main thread is stuck in native code; a thread reads it."""
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        self._wakeup = (write_end, signal.set_wakeup_fd(write_end, warn_on_full_buffer=False))
        threading.Thread(target=self._watch, args=(read_end,), daemon=True,
                         name="dino_fast-stop-watcher").start()

    def _watch(self, read_end: int):
        deadline, wait_id, signum = None, None, None
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if select.select([read_end], [], [], timeout)[0]:
                data = os.read(read_end, 64)
                if not data:
                    os.close(read_end)
                    return
                stops = [number for number in data if number in STOP_SIGNALS]
                if not stops:
                    continue  # SIGALRM, SIGCHLD, ...
                if deadline is not None or len(stops) > 1:  # a second signal: at once
                    self._abandon_stuck_wait(wait_id, stops[-1])
                deadline = time.monotonic() + 2 * WAIT_GRACE_S
                wait_id, signum = self._wait_id, stops[-1]
            else:
                self._abandon_stuck_wait(wait_id, signum)
                deadline = None

    def _abandon_stuck_wait(self, wait_id: int, signum: int):
        """End the process if the main thread is still in the wait for data ``wait_id``."""
        if self._waiting and self._wait_id == wait_id:
            say(f"no batch arrived within {2 * WAIT_GRACE_S:g} s of the stop signal and the "
                "loader cannot be interrupted (a read that never returns?): exiting without "
                "a new checkpoint; the last one written is intact, resume from it", sys.stderr)
            os._exit(128 + signum)

    def agreed(self, device) -> bool:
        """True when any process was asked to stop (all ranks then stop at the same step)."""
        return dist_utils.any_process(self.requested, device)


def leave_signals_to_main(worker_id: int):
    """``worker_init_fn`` for DataLoader workers: SIGTERM and SIGINT sent to the whole process
    group or cgroup are left to the main process, which finishes its step and checkpoints.

    Only the parent's own SIGTERM (the DataLoader stopping a worker that did not exit, e.g. one
    stuck in a read) still ends the worker, so shutting down never hangs. Where the sender of a
    signal cannot be known (no ``sigwaitinfo``: macOS, Windows), only SIGINT is ignored."""
    if not hasattr(signal, "sigwaitinfo"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return
    # Blocked here, in the worker's only thread, so in every thread it starts later; the watcher
    # takes the pending signals one by one.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_exit_on_parent_signal, args=(os.getppid(),), daemon=True,
                     name="dino_fast-signals").start()


def _exit_on_parent_signal(parent: int):
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_pid == parent:
            os._exit(128 + info.si_signo)
