"""The static resource table: every Triton kernel and candidate compiled for sm_90 (and sm_80)
without a GPU, with registers per thread, spill bytes, shared memory and occupancy.

    python -m benchmarks.kernel_resources                     # the table (sm_90, every candidate)
    python -m benchmarks.kernel_resources --set ci --json F   # what tests/test_kernel_compile.py checks
    python -m benchmarks.kernel_resources --set pinned-tests  # DINO_FAST_AUTOTUNE=off, test keys

Runs without ``TRITON_INTERPRET`` (removed before the kernels are imported). The cases and the compile path live in
``benchmarks/kernel_compile.py``.
"""
import argparse
import json
import os
import sys
import time

from benchmarks import kernel_compile
from benchmarks.common import print_table, write_results

COLUMNS = ["kernel", "input", "tile", "arch", "regs", "spill st/ld B", "stack B", "shared KiB",
           "warps/SM", "limit", "compile s"]


def _warps(row) -> int:
    return row["tile"][2] if len(row["tile"]) == 4 else row["tile"][0]


def table_rows(rows: list[dict]) -> list[dict]:
    """One table line per compiled case: ``tile`` is (BLOCK_M, BLOCK_N, warps, stages) or the
    warps alone; resident warps per SM and their limit from :func:`resident_warps`."""
    lines = []
    for row in rows:
        line = {"kernel": row["kernel"], "input": row["variant"],
                "tile": ", ".join(map(str, row["tile"])), "arch": f"sm_{row['arch']}",
                "compile s": row["compile_s"]}
        if "error" in row:
            line["regs"] = "error: " + row["error"]
        else:
            occupancy = kernel_compile.resident_warps(row["registers"], _warps(row),
                                                      row["shared"], row["arch"])
            line.update({"regs": row["registers"],
                         "spill st/ld B": f"{row['spill_stores']}/{row['spill_loads']}",
                         "stack B": row["stack"], "shared KiB": round(row["shared"] / 1024, 1),
                         "warps/SM": occupancy["warps"], "limit": occupancy["limit"]})
        lines.append(line)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=sorted(kernel_compile.CASE_SETS), default="table",
                        help="which cases (default: the resource table)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: "
                        "min(4, CPUs))")
    parser.add_argument("--json", help="write the rows as JSON to this file")
    parser.add_argument("--output", help="write the markdown table to this file")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # before a kernel module is imported
    cases = kernel_compile.CASE_SETS[args.set]()
    start = time.perf_counter()
    rows = kernel_compile.compile_all(cases, args.jobs)
    elapsed = time.perf_counter() - start
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "seconds": elapsed}, f)
    compile_s = sum(row["compile_s"] for row in rows)
    summary = (f"{len(rows)} compilations, {sum('error' in r for r in rows)} errors, "
               f"{sum(r.get('spill_stores', 0) > 0 for r in rows)} spilling; "
               f"{compile_s:.0f} s of compilation (sum), {elapsed:.0f} s wall")
    text = print_table(table_rows(rows), COLUMNS)
    print(summary)
    if args.output:
        write_results(args.output, text + "\n\n" + summary)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
