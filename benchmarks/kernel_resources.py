"""The static resource table: every Triton kernel and candidate compiled for sm_90 (and sm_80)
without a GPU, with registers per thread, spill bytes, shared memory and occupancy.

    python -m benchmarks.kernel_resources                    # the table (sm_90, every candidate)
    python -m benchmarks.kernel_resources --set ci --json F  # what the CI compile test checks
    python -m benchmarks.kernel_resources --set pinned-tests # tests/ops/test_attention.py on CUDA
                                                             # with DINO_FAST_AUTOTUNE=off

The case sets are chosen here; the cases and the compile path live in
``benchmarks/kernel_compile.py``. Runs without ``TRITON_INTERPRET`` (removed before the kernels
are imported). Occupancy follows the CUDA occupancy rules of :func:`resident_warps`.
"""
import argparse
import json
import os
import sys
import time

from benchmarks.common import print_table, write_results
from benchmarks.kernel_compile import (
    Case,
    attention_cases,
    attention_inputs,
    clip_cases,
    compile_all,
    ema_cases,
    loss_cases,
)


def table_cases() -> list[Case]:
    """The resource table (sm_90, every candidate): every dtype class at DINO's head dim 64,
    batched and (bf16) packed; bfloat16 and both float32 classes at the padded head dims 80
    (to 128) and 256 (float16 compiles as bfloat16 there); the loss, the EMA and the gradient
    clipping."""
    return (attention_cases(attention_inputs(layouts=("batched",)))
            + attention_cases(attention_inputs(("bf16",), layouts=("packed",)))
            + attention_cases(attention_inputs(("bf16", "fp32"), (80, 256), ("batched",)))
            + loss_cases() + ema_cases() + clip_cases())


def _classes(inputs, *classes):
    return [v for v in inputs if dict(v)["class"] in classes]


def ci_cases() -> list[Case]:
    """What CI checks (tests/kernels/test_kernel_compile.py). sm_90: every candidate of the training
    dtypes (bf16, fp16) and of exact float32 at DINO's head dim (64); the pinned candidate of
    TF32 float32, of bf16 packed and of bf16 at the padded head dims 80 and 256. sm_80: the
    pinned bf16 and exact-float32 candidates. The loss, the EMA and the gradient clipping on
    both. The resource table covers every candidate of every class on sm_90."""
    batched = attention_inputs(layouts=("batched",))
    pinned = (_classes(batched, "tf32") + attention_inputs(("bf16",), layouts=("packed",))
              + attention_inputs(("bf16",), (80, 256), ("batched",)))
    return (attention_cases(_classes(batched, "half", "ieee"))
            + attention_cases(pinned, pinned=True)
            + attention_cases(_classes(attention_inputs(("bf16", "fp32"), layouts=("batched",)),
                                       "half", "ieee"), archs=(80,), pinned=True)
            + loss_cases((90, 80)) + ema_cases((90, 80)) + clip_cases((90, 80)))


def attention_test_inputs() -> list[tuple]:
    """The attention inputs ``tests/ops/test_attention.py`` launches on a CUDA machine (float32
    there means exact products, torch's default), to count what its first run compiles."""
    def batched(dtype, batch, heads, seqlen, head_dim, qkv="vit"):
        return (("dtype", dtype), ("class", "half" if dtype != "fp32" else "ieee"),
                ("head_dim", head_dim), ("layout", "batched"), ("batch", batch),
                ("heads", heads), ("seqlen", seqlen), ("qkv", qkv))

    def packed(dtype, heads, head_dim, lengths):
        return (("dtype", dtype), ("class", "half" if dtype != "fp32" else "ieee"),
                ("head_dim", head_dim), ("layout", "packed"), ("heads", heads),
                ("lengths", tuple(lengths)))

    inputs = [batched("fp32", *shape) for shape in [  # matches_reference, large logits, lse...
        (2, 2, 1, 32), (2, 3, 37, 48), (1, 2, 37, 64), (1, 1, 37, 80), (1, 1, 197, 64),
        (1, 1, 197, 32), (1, 2, 37, 32), (1, 2, 19, 32), (1, 2, 37, 48), (2, 2, 37, 32),
        (2, 2, 17, 48), (2, 2, 10, 48)]]
    inputs += [batched("fp32", 2, 2, 37, 32, qkv) for qkv in ("transposed", "contiguous")]
    inputs += [packed("fp32", 2, 32, [37, 1, 0, 20, 5]), packed("fp32", 2, 48, [17, 10, 10]),
               packed("fp32", 2, 32, [7, 12]), packed("fp32", 2, 32, [37, 37])]
    inputs += [batched(dtype, 4, 3, seqlen, head_dim) for dtype in ("fp16", "bf16")
               for seqlen in (1, 37, 197, 785) for head_dim in (32, 48, 64, 80, 96, 128)]
    inputs += [packed(dtype, 6, 64, [197, 197, 37, 37, 37, 1]) for dtype in ("fp16", "bf16")]
    inputs.append(batched("fp16", 1, 2, 37, 64))  # the autotune-off test
    inputs.append(batched("fp16", 1, 2, 37, 64))  # the DINO_FAST_AUTOTUNE=off test
    return inputs


def pinned_test_cases() -> list[Case]:
    """The distinct sm_90 compilations of ``tests/ops/test_attention.py`` on CUDA with
    ``DINO_FAST_AUTOTUNE=off``."""
    return attention_cases(attention_test_inputs(), pinned=True)


CASE_SETS = {"table": table_cases, "ci": ci_cases, "pinned-tests": pinned_test_cases}


def resident_warps(registers: int, warps: int, shared: int, arch: int = 90) -> dict:
    """Resident warps per SM and what limits them (CUDA occupancy rules for sm_80/sm_90: 64K
    registers allocated per warp in units of 256, 64 warps, 32 blocks, shared memory per SM
    (228 KiB sm_90, 164 KiB sm_80) with 1 KiB reserved per block)."""
    regs_per_warp = -(-registers * 32 // 256) * 256
    limits = {"registers": (65536 // regs_per_warp) // warps if regs_per_warp else 32,
              "warps": 64 // warps, "blocks": 32,
              "shared": ({90: 228, 80: 164}[arch] * 1024) // (shared + 1024)}
    blocks = min(limits.values())
    limiter = min(limits, key=limits.get)
    return {"warps": blocks * warps, "limit": limiter}


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
            occupancy = resident_warps(row["registers"], _warps(row),
                                                      row["shared"], row["arch"])
            line.update({"regs": row["registers"],
                         "spill st/ld B": f"{row['spill_stores']}/{row['spill_loads']}",
                         "stack B": row["stack"], "shared KiB": round(row["shared"] / 1024, 1),
                         "warps/SM": occupancy["warps"], "limit": occupancy["limit"]})
        lines.append(line)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=sorted(CASE_SETS), default="table",
                        help="which cases (default: the resource table)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: "
                        "min(4, CPUs))")
    parser.add_argument("--json", help="write the rows as JSON to this file")
    parser.add_argument("--output", help="write the markdown table to this file")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # before a kernel module is imported
    cases = CASE_SETS[args.set]()
    start = time.perf_counter()
    rows = compile_all(cases, args.jobs)
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
