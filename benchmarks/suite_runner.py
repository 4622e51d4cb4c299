"""Running the GPU suite's commands one by one, each with a time limit, its failure isolated.

A :class:`Job` is one command line, ``python -m MODULE ARGS``. :func:`run_job` runs it as a
subprocess killed at its deadline (with its whole process group), or, in the dry run, inside this
process (``runpy``, a ``SIGALRM`` deadline), its output captured in a log file either way. A
crash, a non-zero exit or a timeout becomes the job's status; the caller goes on with the next.
Results are appended to ``results.jsonl`` as they come (:class:`Recorder`), so a killed run keeps
what it measured. Also here: reading the tables that the benchmark runners print, and
pytest's JUnit reports.
"""
import contextlib
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Job:
    """One command of a stage: ``python -m module *args`` with ``env`` added, at most
    ``seconds`` (scaled by the budget)."""
    name: str
    module: str
    args: list
    seconds: float
    env: dict = field(default_factory=dict)


@dataclass
class JobResult:
    name: str
    status: str  # "ok", "failed (exit N)", "timeout after N s", "error: ..."
    seconds: float
    log: str  # path of the captured output

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def output(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()


class JobTimeout(BaseException):
    """Raised inside an in-process job when its deadline passes (a BaseException, as
    KeyboardInterrupt, so that the job's own ``except Exception`` does not swallow it)."""


def run_job(job: Job, limit: float, log_path: str, in_process: bool) -> JobResult:
    """Run ``job`` for at most ``limit`` seconds; never raises for the job's own failures."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.perf_counter()
    if limit <= 1:
        status = "skipped: no time left"
        open(log_path, "w").close()
    elif in_process:
        status = _run_in_process(job, limit, log_path)
    else:
        status = _run_subprocess(job, limit, log_path)
    return JobResult(job.name, status, time.perf_counter() - start, log_path)


def _run_subprocess(job: Job, limit: float, log_path: str) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **job.env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ python -m {job.module} {' '.join(map(str, job.args))}\n")
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", job.module, *map(str, job.args)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own group: kill its workers too
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"timeout after {limit:.0f} s"
    return "ok" if code == 0 else f"failed (exit {code})"


@contextlib.contextmanager
def _environment(extra: dict):
    saved = {key: os.environ.get(key) for key in extra}
    os.environ.update({key: str(value) for key, value in extra.items()})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise :class:`JobTimeout` after ``seconds`` (main thread only; elsewhere no deadline)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not \
            threading.main_thread() or signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL,
                                                                               None):
        yield
        return

    def expire(signum, frame):
        raise JobTimeout()
    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def _run_in_process(job: Job, limit: float, log_path: str) -> str:
    argv = sys.argv
    with open(log_path, "w", encoding="utf-8") as log, _environment(job.env), \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"$ python -m {job.module} {' '.join(map(str, job.args))}  (in process)")
        sys.argv = [job.module, *map(str, job.args)]
        try:
            with _deadline(limit):
                runpy.run_module(job.module, run_name="__main__", alter_sys=False)
            return "ok"
        except JobTimeout:
            return f"timeout after {limit:.0f} s"
        except SystemExit as stop:
            if stop.code in (None, 0):
                return "ok"
            if not isinstance(stop.code, int):  # a message: the command's one-line error
                print(stop.code)
                return "failed (exit 1)"
            return f"failed (exit {stop.code})"
        except Exception as error:  # the job's bug: report it, run the next one
            traceback.print_exc()
            first_line = (str(error).splitlines() or [""])[0][:160]
            return f"error: {type(error).__name__}: {first_line}"
        finally:
            sys.argv = argv


class Recorder:
    """Appends each job's result (status, time, rows) to ``out/results.jsonl`` as it comes."""

    def __init__(self, out: str):
        self.path = os.path.join(out, "results.jsonl")
        os.makedirs(out, exist_ok=True)
        open(self.path, "w").close()

    def record(self, stage: str, result: JobResult, rows: list | None = None, **extra):
        entry = {"stage": stage, "job": result.name, "status": result.status,
                 "seconds": round(result.seconds, 1), "log": result.log, "rows": rows or [],
                 **extra}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=str) + "\n")
        print(f"[{stage}] {result.name}: {result.status} ({result.seconds:.0f} s)", flush=True)


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text if text else None


def parse_tables(text: str) -> list[dict]:
    """The rows of every markdown table in ``text`` (as ``benchmarks.common.print_table``
    prints them), numbers as floats, empty cells as None."""
    rows, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not re.fullmatch(r"-*", "".join(cells)):
            rows.append({key: _number(value) for key, value in zip(header, cells)})
    return rows


def read_rows(json_path: str, output: str) -> list[dict]:
    """A runner's rows: from its ``--json`` file when it wrote one (a list of rows, or an object
    with ``rows``), else from the tables it printed."""
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return parse_tables(output)
    rows = data.get("rows") if isinstance(data, dict) else data
    if isinstance(rows, list) and all(isinstance(row, dict) for row in rows):
        return rows
    return parse_tables(output)


def junit_summary(path: str) -> dict:
    """Counts (and the first failures) of a pytest ``--junitxml`` report."""
    if not os.path.exists(path):
        return {"check": "kernel tests", "verdict": "no report"}
    cases = ET.parse(path).getroot().iter("testcase")
    counts, failures = {"passed": 0, "failed": 0, "skipped": 0}, []
    for case in cases:
        outcome = next((child.tag for child in case if child.tag in
                        ("failure", "error", "skipped")), "passed")
        key = {"failure": "failed", "error": "failed"}.get(outcome, outcome)
        counts[key] += 1
        if key == "failed":
            failures.append(f"{case.get('classname')}::{case.get('name')}")
    verdict = "pass" if counts["passed"] and not counts["failed"] else "FAIL"
    return {"check": "kernel tests", **counts, "verdict": verdict,
            "first failures": ", ".join(failures[:5]) or None}
