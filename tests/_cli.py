"""Shared by the command tests: run a command's ``main`` on a user error and read its one line."""
import pytest


def user_error(capsys, main, argv, code: int = 1) -> str:
    """Call ``main(argv)``, which must exit with ``code`` after printing exactly one line,
    ``error: ...``, to stderr and no traceback; returns that line."""
    return user_error_and_output(capsys, main, argv, code)[0]


def user_error_and_output(capsys, main, argv, code: int = 1) -> tuple[str, str]:
    """:func:`user_error`, and what ``main`` printed to stdout before it exited."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == code, err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0], out
