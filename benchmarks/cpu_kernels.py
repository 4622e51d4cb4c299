"""The C++ CPU kernels against their baselines at the shapes of issue 4, in one table.

* DINO loss, forward + backward, batch 32, 2 + 10 crops, K = 65536, float32: ``cpp`` (the
  public op with the backend forced) against the eager reference (goal: >= 3x faster, lower peak
  memory).
* Teacher EMA over ViT-S/16 + DINOHead(65536) (~44M parameters): ``cpp`` on the flat buffers
  against the official per-parameter loop (goal: >= 2x faster) and ``torch._foreach_lerp_``
  over the parameter lists (goal: not slower).

Peak memory is the growth of the process's peak resident set (``VmHWM`` in
``/proc/self/status``, reset through ``/proc/self/clear_refs``) during one step, measured in a
fresh subprocess per provider after a small warm-up step, so that neither code paging nor memory
kept by the allocator from earlier runs counts. It covers every allocation (PyTorch's, the
kernel's scratch, the gradient), unlike an allocator counter. Linux only.

    python benchmarks/cpu_kernels.py [--repeats N] [--output FILE]
"""
import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import measure, print_table, write_results  # noqa: E402
from benchmarks.ops import dino_model  # noqa: E402
from benchmarks.train_step import PerParameterEMA  # noqa: E402
from dino_fast.ops import _backend, use_backend  # noqa: E402
from dino_fast.ops.dino_loss import dino_loss, dino_loss_reference  # noqa: E402
from dino_fast.ops.ema import ema_  # noqa: E402
from dino_fast.training.ema import flatten_parameters  # noqa: E402

BATCH, NCROPS, K = 32, 12, 65536
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
COLUMNS = ["op", "provider", "ms", "x baseline", "peak MiB", "goal"]


def loss_step(provider: str, batch: int, k: int):
    """A zero-argument DINO loss forward + backward on fresh float32 logits."""
    student = torch.randn(NCROPS * batch, k, requires_grad=True)  # (S, K)
    teacher, center = torch.randn(2 * batch, k), torch.randn(k) * 0.1  # (2B, K), (K,)

    def run():
        student.grad = None
        if provider == "reference":
            loss = dino_loss_reference(student, teacher, center, NCROPS, STUDENT_TEMP,
                                       TEACHER_TEMP)[0]
        else:
            with use_backend(provider):
                loss = dino_loss(student, teacher, center, NCROPS, STUDENT_TEMP, TEACHER_TEMP)[0]
        loss.backward()
    return run


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_growth_here(provider: str) -> float:
    """Peak RSS growth (MiB) of one full-size loss step in this process (see the docstring)."""
    loss_step(provider, 2, 1024)()  # page in the code paths
    step = loss_step(provider, BATCH, K)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
    before = _status_mib("VmRSS")
    step()
    return _status_mib("VmHWM") - before


def peak_growth(provider: str) -> float | None:
    """``peak_growth_here`` in a fresh interpreter; None where /proc cannot do it."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak-of", provider],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def loss_rows(repeats: int) -> list[dict]:
    rows = []
    for provider in ("reference", "cpp"):
        ms = measure(loss_step(provider, BATCH, K), warmup=1, repeats=repeats)
        rows.append({"op": f"dino_loss fwd+bwd B={BATCH} crops=2+10 K={K}",
                     "provider": provider, "ms": ms, "peak MiB": peak_growth(provider)})
    base = rows[0]
    rows[1]["x baseline"] = base["ms"] / rows[1]["ms"]
    memory_ok = rows[1]["peak MiB"] is None or rows[1]["peak MiB"] < base["peak MiB"]
    rows[1]["goal"] = "met" if rows[1]["x baseline"] >= 3 and memory_ok else "missed"
    rows[1]["goal"] += " (>= 3x faster, lower peak)"
    return rows


def ema_rows(repeats: int) -> list[dict]:
    student, teacher = dino_model("vit_small", K), dino_model("vit_small", K)
    per_parameter = PerParameterEMA(student, teacher)  # before flattening: same Parameters
    student_flat, teacher_flat = flatten_parameters(student), flatten_parameters(teacher)
    student_params, teacher_params = list(student.parameters()), list(teacher.parameters())
    momentum = 0.996
    momentum_t = torch.tensor(momentum)

    @torch.no_grad()
    def lerp():
        torch._foreach_lerp_(teacher_params, student_params, 1 - momentum)

    def cpp():
        with use_backend("cpp"):
            ema_(teacher_flat, student_flat, momentum_t)

    providers = {"per-parameter loop (official)": lambda: per_parameter.update(momentum),
                 "_foreach_lerp_": lerp, "cpp": cpp}
    op = f"ema_ vit_small/16+head({K}) {student_flat.numel() / 1e6:.1f}M"
    times = {name: measure(fn, warmup=3, repeats=repeats) for name, fn in providers.items()}
    loop_ms, lerp_ms = times["per-parameter loop (official)"], times["_foreach_lerp_"]
    rows = [{"op": op, "provider": name, "ms": ms, "x baseline": loop_ms / ms}
            for name, ms in times.items()]
    met = loop_ms / times["cpp"] >= 2 and times["cpp"] <= lerp_ms
    rows[-1]["goal"] = ("met" if met else "missed") + " (>= 2x loop, <= _foreach_lerp_)"
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", help="also write the table to this results file")
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)  # the subprocess of peak_growth
    args = parser.parse_args(argv)
    if args.peak_of:
        print(json.dumps(peak_growth_here(args.peak_of)))
        return
    if _backend.cpp_module() is None:
        sys.exit("dino_fast._C is not built: python setup.py build_ext --inplace")
    rows = loss_rows(args.repeats) + ema_rows(4 * args.repeats)
    text = print_table(rows, COLUMNS, f"C++ CPU kernels ({torch.get_num_threads()} threads; "
                                      "x baseline: against the eager reference / the loop)")
    if args.output:
        write_results(args.output, text)


if __name__ == "__main__":
    main()
