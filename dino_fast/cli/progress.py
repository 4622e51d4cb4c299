"""Progress on stderr (training epochs, feature extraction): a live bar on a terminal, plain
lines everywhere else.

Logs, CI and Slurm capture stderr to a file, where a bar's carriage-return frames pile up into
one unreadable line. There the progress is one line per ``interval`` seconds or per tenth of the
work, whichever comes first, and one at the end.
"""
import sys
import time

from tqdm import tqdm


def _duration(seconds: float) -> str:
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
        print(f"{self.desc}: step {self.position}/{self.total} ({percent}%), {shown}"
              f"{_duration(time.monotonic() - self.start)}", file=self.stream, flush=True)
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
