"""Errors the user caused, and how every command reports them.

A user error (a bad path, too few images, a flag out of range, a wrong checkpoint) is reported
as one line, ``error: <cause>``, and a non-zero exit status, without a Python traceback: the
traceback would bury the cause and point into code the user did not write. ``--debug`` on any
command, or ``DINO_FAST_DEBUG=1``, shows it again. Anything else is a bug or an unforeseen
failure and keeps its traceback.
"""
import errno
import functools
import os
import sys

DEBUG_ENV = "DINO_FAST_DEBUG"

# Failures of the file system that name a path the user gave or a resource the user controls.
_USER_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
                errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP}


class UserError(Exception):
    """A failure the user caused and can fix; commands print it as one line (exit status 1)."""

    exit_code = 1


class FlagError(UserError, ValueError):
    """A command-line flag with a value outside its valid range (exit status 2, as argparse)."""

    exit_code = 2


class MissingDependencyError(UserError, ImportError):
    """An optional package that a flag asked for (``--loader dali``, ``--attn_backend
    xformers``) is not installed; the message says how to install it."""


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is the user's to fix: a :class:`UserError`, or a file-system error such as
    a missing file, a folder where a file was expected, a denied permission or a full disk."""
    return isinstance(err, UserError) or (isinstance(err, OSError) and err.errno in _USER_ERRNOS)


def debug_requested(argv) -> bool:
    """True when ``--debug`` is among ``argv`` or ``DINO_FAST_DEBUG`` is set (not ``0``)."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def add_debug_flag(parser):
    """Add ``--debug`` (read by :func:`command`) to a command's parser."""
    parser.add_argument("--debug", action="store_true",
                        help=f"show the Python traceback of errors (also: {DEBUG_ENV}=1)")


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line. An error re-raised from a DataLoader worker carries
    the worker's traceback in its message; its last line holds the cause."""
    message = str(err).strip()
    if "\nOriginal Traceback" in message:
        message = message.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(message.split())


def command(main):
    """Decorate a command's ``main(argv=None)``: a user error raised inside prints one line to
    stderr and exits with its status (``SystemExit``), unless debugging was asked for; other
    errors propagate with their traceback. Every way of starting the command (``python -m``,
    a console script, a call from Python) then behaves the same."""
    @functools.wraps(main)
    def checked_main(argv=None):
        try:
            return main(argv)
        except Exception as err:  # sorted below: the user's to fix, or a bug with its traceback
            if not is_user_error(err) or debug_requested(sys.argv[1:] if argv is None else argv):
                raise
            _close_progress_bars()
            print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
            sys.exit(getattr(err, "exit_code", 1))
    return checked_main


def _close_progress_bars():
    """Close the tqdm bars that the error left open, so that the error line starts a line of
    its own instead of continuing the bar's."""
    tqdm_module = sys.modules.get("tqdm")  # imported only if the command showed progress
    for bar in list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", ())):
        bar.close()
