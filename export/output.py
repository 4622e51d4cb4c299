"""Export outputs that never destroy what was there: checked before any work, written to a
temporary sibling and renamed over the output only when complete.

:func:`check_output` refuses, as a one-line :class:`OutputError`, an output that is (or holds)
the input checkpoint, one that exists as the wrong kind (a folder where a file is written, or the
reverse), a folder holding files the export did not write (``overwrite`` allows these two), and
an output whose folder cannot be created or written. :func:`replacing` writes: the caller fills
a temporary file or folder beside the output; on success it gets the permissions the umask gives
(files ``0o666 & ~umask``, folders ``0o777 & ~umask``; libraries such as safetensors create 0600
files) and is renamed over the output. On any failure the temporary is removed and the output is
left as it was; a failure of the file system (a full disk, a read-only folder), whichever library
reported it, becomes a :class:`~dino_fast.models.checkpoint.WriteError` naming the output.
"""
import contextlib
import errno
import os
import re
import secrets
import shutil

from dino_fast.cli.errors import UserError
from dino_fast.models.checkpoint import WriteError, os_error_in

_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports one
# What writing can meet; not ENOENT, which a library may meet and handle on its own (a lookup)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES,
                 errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}


class OutputError(UserError, ValueError):
    """An export output refused before anything is written; the message says why."""


def check_output(path: str, folder_files=None, overwrite: bool = False, inputs=()):
    """Refuse ``path`` as the output of an export (``folder_files``: the names a folder export
    writes; None for a file) before any work; ``inputs`` are the files the export reads."""
    real = os.path.realpath(path)
    for source in filter(None, inputs):
        if _inside(os.path.realpath(source), real):
            raise OutputError(f"--output {path} is or holds the input {source}: writing it "
                              "would destroy the input; choose another output")
    expected = "file" if folder_files is None else "folder"
    found = "folder" if os.path.isdir(path) else "file" if os.path.lexists(path) else None
    if found and found != expected and not overwrite:
        raise OutputError(f"--output {path} is a {found}, and this export writes a {expected}; "
                          "choose another output, or pass --overwrite to replace it")
    if found == "folder" == expected and not overwrite:
        foreign = sorted(set(os.listdir(path)) - set(folder_files))
        if foreign:
            raise OutputError(f"--output {path} holds files this export does not write "
                              f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''})"
                              "; choose another folder, or pass --overwrite to replace it all")
    _check_parent(path)


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (both resolved)."""
    return os.path.commonpath([path, folder]) == folder


def _check_parent(path: str):
    """Refuse an output whose folder is a file or cannot be written (it may not exist yet: the
    nearest existing folder above it must be writable, as the folder will be created there)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"--output {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"--output {path}: cannot write in the folder {parent} "
                          "(read-only or permission denied)")


@contextlib.contextmanager
def replacing(path: str, folder_files=None, overwrite: bool = False):
    """Yield a temporary path beside ``path`` to write the output to (a created folder when
    ``folder_files`` names the files of a folder export, else a file name); when the block
    succeeds, give it the umask's permissions and rename it over ``path``. See the module
    docstring for the checks and for what a failure leaves."""
    check_output(path, folder_files, overwrite)
    temporary = None
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        temporary = _create_sibling(path, folder=folder_files is not None)
        mode = os.stat(temporary).st_mode & 0o777  # the umask's: see _create_sibling
        yield temporary
        for name in os.listdir(temporary) if folder_files is not None else ():
            _finish(os.path.join(temporary, name), mode & 0o666)  # a folder's, without execute
        _finish(temporary, mode)
        _rename_over(temporary, path)
        temporary = None
    except Exception as err:
        cause = write_failure(err)
        if cause is None:
            raise
        raise WriteError(cause, os.strerror(cause), path) from err
    finally:
        if temporary is not None:
            _remove(temporary)


def write_failure(err: BaseException) -> int | None:
    """The ``errno`` of the write failure behind ``err`` (a full disk, a read-only folder, ...):
    an ``OSError`` in its chain, or the ``(os error N)`` with which safetensors reports one;
    None for any other error."""
    found = os_error_in(err)
    code = None if found is None else found.errno
    if code == errno.EEXIST:  # makedirs met a file where a folder goes
        code = errno.ENOTDIR
    while code is None and err is not None:
        match = _RUST_OS_ERROR.search(str(err))
        code = int(match.group(1)) if match else None
        err = err.__cause__ or err.__context__
    return code if code in _WRITE_ERRNOS else None


def _create_sibling(path: str, folder: bool) -> str:
    """Create a new, uniquely named ``.<name>.tmp-<random>`` beside ``path``: a folder, or an
    empty file; created with modes 0o777 / 0o666, so that their permissions are the umask's
    (reading the umask itself means setting it, which is not thread-safe)."""
    folder_name, name = os.path.split(os.path.abspath(path))
    while True:
        temporary = os.path.join(folder_name, f".{name}.tmp-{secrets.token_hex(4)}")
        try:
            if folder:
                os.mkdir(temporary, 0o777)
            else:
                os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temporary
        except FileExistsError:
            continue


def _finish(path: str, mode: int):
    """Give ``path`` its permissions and, if it is a file, flush it to disk before it is renamed
    into place."""
    os.chmod(path, mode)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _rename_over(temporary: str, path: str):
    """Rename ``temporary`` to ``path``. What is there already (a file or a folder, checked by
    :func:`check_output`) is first renamed aside, and deleted once the new output is in place;
    if that rename fails, it is put back."""
    if not os.path.isdir(path) and not os.path.isdir(temporary):
        os.replace(temporary, path)  # atomic: a file over a file
        return
    aside = None
    if os.path.lexists(path):
        aside = _create_sibling(path, folder=os.path.isdir(path) and not os.path.islink(path))
        os.replace(path, aside)  # over the empty sibling of its own kind
    try:
        os.rename(temporary, path)
    except OSError:
        if aside is not None:
            os.replace(aside, path)
        raise
    if aside is not None:
        _remove(aside)


def _remove(path: str):
    """Delete a file or a folder tree, if it is there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)
