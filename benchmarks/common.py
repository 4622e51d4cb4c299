"""Timing and reporting shared by every benchmark runner (and importable by tests).

Times are medians over repeats after a warm-up: CUDA events on a GPU, ``perf_counter`` on the
CPU. Each runner builds rows (dicts) and prints one table with :func:`print_table`;
speed-ups are always against a baseline measured in the same run.
"""
import json
import platform
import statistics
import subprocess
import time

import torch


def measure(fn, warmup: int = 3, repeats: int = 10, device: torch.device | None = None) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn, device: torch.device) -> float | None:
    """Peak device memory of one ``fn()`` call in MiB (CUDA only; None on the CPU)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def environment() -> dict:
    """Device, versions and commit, for the header of a results file."""
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = "cpu"
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return info


def print_table(rows: list[dict], columns: list[str], title: str = "") -> str:
    """Print ``rows`` as an aligned markdown table (missing cells blank) and return it."""
    text = format_table(rows, columns, title)
    print(text, flush=True)
    return text


def format_table(rows: list[dict], columns: list[str], title: str = "") -> str:
    """``rows`` as an aligned markdown table (missing cells blank), under a ``## title``."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return "" if value is None else str(value)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    return (f"## {title}\n\n" if title else "") + "\n".join(lines)


def write_results(path: str, text: str):
    """Write a results file: the environment as a JSON header line, then the tables."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("environment: " + json.dumps(environment()) + "\n\n" + text + "\n")


def write_json(path: str, rows: list[dict], title: str = ""):
    """Write ``rows`` (one dict per table row) with the environment, for tools to read."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"title": title, "environment": environment(), "rows": rows}, f, indent=1)


def report(rows: list[dict], columns: list[str], title: str, output: str | None = None,
           json_path: str | None = None) -> list[dict]:
    """Print the table of ``rows``, write it to ``output`` and the rows to ``json_path`` when
    given (:func:`write_results`, :func:`write_json`); returns ``rows``."""
    table = print_table(rows, columns, title=title)
    if output:
        write_results(output, table)
    if json_path:
        write_json(json_path, rows, title)
    return rows
