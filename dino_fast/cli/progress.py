"""Progress on stderr (training epochs, feature extraction): a live bar on a terminal, plain
lines everywhere else; and :func:`say`, the console lines of a long run.

Logs, CI and Slurm capture stderr to a file, where a bar's carriage-return frames pile up into
one unreadable line. There the progress is one line per ``interval`` seconds or per tenth of the
work, whichever comes first, and one at the end.

A console can go away while training runs: Ctrl-C on ``train ... | tee log`` ends ``tee`` too,
and every later write to the pipe raises ``BrokenPipeError`` (Python ignores SIGPIPE). A message
nobody can read must not end the run before it writes its checkpoint, so :func:`say` sends such a
stream to ``/dev/null`` and goes on.
"""
import os
import sys
import time

from tqdm import tqdm


def say(message: str, stream=None):
    """Print ``message`` to ``stream`` (stdout by default) and flush it; when the stream's
    reader has gone (``BrokenPipeError``) the stream is sent to ``/dev/null`` from then on."""
    stream = stream or sys.stdout
    try:
        print(message, file=stream, flush=True)
    except BrokenPipeError:
        _discard(stream)


def _discard(stream):
    """Point ``stream``'s file descriptor at ``/dev/null``: what is still buffered there, and
    all later output, is dropped without an error (at exit too)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # an in-memory stream: nothing to point
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def duration(seconds: float) -> str:
    """``seconds`` as ``1h02m03s`` or ``2m03s``."""
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02}m{seconds:02}s" if hours else f"{minutes}m{seconds:02}s"


class Progress:
    """Progress of ``total`` steps: ``update(**values)`` after each, ``close()`` at the end.

    ``stream``: where to write (stderr); a bar when it is a terminal, plain lines otherwise.
    ``enabled``: False on the processes that should stay quiet (ranks other than 0).
    """

    def __init__(self, total: int, desc: str, initial: int = 0, enabled: bool = True,
                 stream=None, interval: float = 30.0):
        self.stream = stream or sys.stderr
        self.total, self.position, self.desc = total, initial, desc
        self.enabled, self.interval = enabled, interval
        self.values: dict = {}
        self.start = self.last_time = time.monotonic()
        self.last_position = initial
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                            file=self.stream)

    def update(self, **values):
        """One more step done; ``values`` (already formatted strings) describe it."""
        self.position += 1
        self.values = values
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)
            self.bar.update()
        elif self.enabled and self._line_due():
            self._write_line()

    def _line_due(self) -> bool:
        tenth = max(1, self.total // 10)
        return (time.monotonic() - self.last_time >= self.interval
                or self.position - self.last_position >= tenth)

    def _write_line(self):
        percent = 100 * self.position // max(self.total, 1)
        shown = "".join(f"{key} {value}, " for key, value in self.values.items())
        say(f"{self.desc}: step {self.position}/{self.total} ({percent}%), {shown}"
            f"{duration(time.monotonic() - self.start)}", self.stream)
        self.last_time, self.last_position = time.monotonic(), self.position

    def close(self):
        """End the epoch's progress (plain output: a last line unless one was just written)."""
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.position != self.last_position:
            self._write_line()


def track(iterable, desc: str, total: int | None = None):
    """Yield from ``iterable`` (of ``len`` ``total``, by default its own) with :class:`Progress`."""
    progress = Progress(len(iterable) if total is None else total, desc)
    try:
        for item in iterable:
            yield item
            progress.update()
    finally:
        progress.close()
