"""The whole DINO training step (student on all crops, teacher on the 2 globals, loss, backward,
clipping, optimizer, EMA) with the crops already on the device: images/s, and what a CPU can
measure for a GPU: operators dispatched and host syncs per step.

Configurations, measured in one run:
* ``official``: what ``main_dino.py`` executes (../shared/REFERENCE.md): eager attention; the
  eager (reference) loss with its separate center update (``DINO_FAST_BACKEND=reference``);
  PyTorch's default AdamW; ``utils.clip_gradients``, per parameter, whose ``if clip_coef < 1``
  reads each parameter's coefficient on the host (:func:`official_clip_gradients`); the
  per-parameter EMA loop (:class:`PerParameterEMA`); the backbone run once per crop resolution
  (the eager ``MultiCropWrapper`` path); fp16 autocast with ``GradScaler`` on CUDA (fp32 on the
  CPU, as official without a GPU); and the loss read on the host every step
  (``math.isfinite(loss.item())``);
* ``fast``: our step: fused ops (``DINO_FAST_BACKEND=auto``), SDPA attention, fused AdamW, the
  flat-buffer EMA, no host sync (the non-finite check every ``--check_every`` steps, amortised
  in the sync column), ``--precision`` (auto: bf16 on CUDA), packed crops with ``--pack_crops``;
* ``fast+pack``: ``fast`` with packed crops whatever ``--pack_crops`` says;
* ``fast+compile``: ``fast`` with ``torch.compile(mode=--compile_mode)`` over the whole forward
  (``--compile_scope forward``, ``fullgraph=True``) or each transformer block (``blocks``); its
  row also gives the kernels inductor generated (forward and backward graphs, each run once per
  step).

``first_step_s`` is the wall time of each row's first step: with ``fast+compile``, the cold
compile (run with an empty inductor cache to measure it: ``TORCHINDUCTOR_CACHE_DIR``).

``host_cpu_ms`` is the CPU time this process spent per step (median): on a GPU the host's
launch work, on a shared CPU a measure that other processes' load does not inflate (run with
one thread). ``ops_per_step`` counts dispatched ATen operators (each at least one kernel
launch on a GPU), ``syncs_per_step`` the values read back to the host
(``dino_fast.profiling.dispatch_count``), the fast configurations' periodic check amortised. Neither
is counted for ``fast+compile``: compiled frames do not run under the counter's dispatch mode
(Dynamo refuses them), so that row gives the kernels inductor generated instead. On the CPU the
official count includes reads of CPU-resident scalars (the default AdamW's for-loop reads each
parameter's step count), which on a GPU are no device sync. On CUDA with ``--gpu_counts``
every row also gives ``gpu_kernels_per_step`` (kernels, copies and memsets that ran on the
GPU) and ``cuda_syncs_per_step`` (the host's waits on CUDA), both from ``torch.profiler``,
which sees compiled and CUDA-graph steps too: the launches the whole step costs; and where
the GPU time goes, in percent of the step (``matmul_pct``, ``attention_pct``, ``optimizer_pct``
with clipping and the EMA, ``other_pct``, ``idle_pct``: no kernel running) with the attention
kernels that ran (``attention_backend``: SDPA's ``flash``, ``efficient`` or ``cudnn``, our
``triton``; ``none`` for eager attention), :mod:`dino_fast.profiling.gpu_time`.

``sync_check`` (CUDA, fast rows): after two warm-up steps the timed steps run under
``torch.cuda.set_sync_debug_mode("error")``, so any hidden host sync raises where it happens.
``ok``, or ``FAILED: file:line (function): message``; such a row is timed again without the
check (its figures stand) and the command exits with status 1 after writing its results.

MFU (CUDA only) = images/s x ``dino_fast.profiling.flops.dino_step_flops`` / 790 TFLOP/s, the bf16
dense matmul rate measured on an H100/H200 (../shared/GPU.md).

    python benchmarks/train_step.py                      # CPU defaults: small and quick
    python benchmarks/train_step.py --arch vit_small --batch 64 --local_crops 10 \\
        --out_dim 65536 --precision bf16 --pack_crops --compile_mode default --json out.json

``--json PATH`` writes ``{"environment": {...}, "args": {...}, "rows": [{config, arch, batch,
crops, K, precision, pack, compile_mode, compile_scope, step_ms, host_cpu_ms, images_s,
speedup, gflop_per_image, mfu_pct, ops_per_step, syncs_per_step, generated_kernels,
gpu_kernels_per_step, cuda_syncs_per_step, first_step_s, sync_check, matmul_pct, attention_pct,
optimizer_pct, other_pct, idle_pct, attention_backend}, ...]}`` (absent values are null).
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import environment, measure, print_table, write_results  # noqa: E402
from dino_fast.models.packed import PACK_ATTENTION  # noqa: E402
from dino_fast.ops import use_backend  # noqa: E402
from dino_fast.profiling.dispatch_count import DispatchCounter  # noqa: E402
from dino_fast.profiling.flops import dino_step_flops  # noqa: E402
from dino_fast.profiling.gpu_time import gpu_kernels, gpu_time_breakdown  # noqa: E402
from dino_fast.train import build_models, build_parser  # noqa: E402
from dino_fast.training.ema import TeacherEMA  # noqa: E402
from dino_fast.training.loss import DINOLoss  # noqa: E402
from dino_fast.training.optim import build_optimizer, get_params_groups  # noqa: E402
from dino_fast.training.step import (  # noqa: E402
    COMPILE_MODES,
    COMPILE_SCOPES,
    PRECISIONS,
    TrainStep,
)

PEAK_TFLOPS = 790.0
COLUMNS = ["config", "arch", "batch", "crops", "K", "precision", "pack", "step_ms", "host_cpu_ms",
           "images_s", "speedup", "mfu_pct", "ops_per_step", "syncs_per_step", "generated_kernels",
           "gpu_kernels_per_step", "cuda_syncs_per_step", "first_step_s", "sync_check"]
GPU_TIME_COLUMNS = ["config", "matmul_pct", "attention_pct", "optimizer_pct", "other_pct",
                    "idle_pct", "attention_backend"]


class PerParameterEMA:
    """The official EMA: a Python loop over parameter pairs (the baseline)."""

    def __init__(self, student, teacher):
        self.pairs = list(zip(student.parameters(), teacher.parameters()))

    @torch.no_grad()
    def update(self, momentum):
        for q, k in self.pairs:
            k.data.mul_(momentum).add_((1 - momentum) * q.detach().data)


def official_clip_gradients(model, clip: float) -> torch.Tensor:
    """``main_dino.py``'s ``utils.clip_gradients`` as it executes: each parameter's gradient
    norm, and ``if clip_coef < 1`` on a tensor, a host read per parameter; returns the norms
    (as :func:`dino_fast.training.optim.gradient_norms` does, for the step's finite check)."""
    norms = []
    for p in model.parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm)
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return torch.stack(norms)


def build_step(args, device, cfg):
    """A TrainStep over fresh models for one configuration."""
    flags = ["--arch", args.arch, "--patch_size", str(args.patch_size), "--out_dim",
             str(args.out_dim), "--local_crops_number", str(args.local_crops), "--attn_backend",
             cfg["attn_backend"], "--pack_attention", args.pack_attention]
    train_args = build_parser().parse_args(flags + (["--pack_crops"] if cfg["pack"] else []))
    torch.manual_seed(0)
    student, teacher = build_models(train_args, device)
    groups = get_params_groups(student)
    if cfg["official"]:
        ema, optimizer = PerParameterEMA(student, teacher), torch.optim.AdamW(groups)
    else:
        ema, optimizer = TeacherEMA(student, teacher), build_optimizer("adamw", groups)
    loss = DINOLoss(args.out_dim, args.local_crops + 2, 0.04, 0.04, 0, 10).to(device)
    step = TrainStep(student, teacher, loss, optimizer, ema, precision=cfg["precision"],
                     compile=cfg["compile"], compile_mode=args.compile_mode,
                     compile_scope=args.compile_scope)
    if cfg["official"]:
        step.gradient_norms = official_clip_gradients
    return step


def random_crops(args, device):
    """2 global and ``local_crops`` local crops of ``batch`` images, on the device."""
    side = [args.global_size] * 2 + [args.local_size] * args.local_crops
    return [torch.randn(args.batch, 3, s, s, device=device) for s in side]


def configurations(args, cuda: bool) -> dict:
    fast_precision = args.precision if args.precision != "auto" else ("bf16" if cuda else "fp32")
    fast = dict(attn_backend="sdpa", precision=fast_precision, official=False, compile=False,
                backend="auto", pack=args.pack_crops)
    return {
        "official": dict(attn_backend="eager", precision="fp16" if cuda else "fp32",
                         official=True, compile=False, backend="reference", pack=False),
        "fast": fast,
        "fast+pack": {**fast, "pack": True},
        "fast+compile": {**fast, "compile": True},
    }


def run_config(args, device, name, cfg, crops) -> dict:
    """Time one configuration, then count its operators and syncs over 2 warm steps (not for
    a compiled one: there the generated kernels are counted instead) and, on CUDA with
    ``--gpu_counts``, what the profiler sees: GPU kernels, CUDA syncs, where the GPU time
    goes. On CUDA the fast rows' timed steps run with host syncs forbidden
    (:func:`forbid_host_syncs`); one that syncs is timed again without, and its row says where
    (``sync_check``)."""
    state = {"it": 0, "host_s": [], "guard": False}
    with use_backend(cfg["backend"]):
        step = build_step(args, device, cfg)

        def one_step():
            start = time.process_time()
            with forbid_host_syncs(state["guard"]):
                step(crops, 1, 1e-4, 0.04, 0.996, state["it"])
            state["it"] += 1
            if cfg["official"] or state["it"] % args.check_every == 0:
                step.check_finite()  # official: every step, as main_dino.py reads the loss
            state["host_s"].append(time.process_time() - start)

        kernels_before = _generated_kernels()
        started = time.perf_counter()
        one_step()  # the first step: a compiled row's cold compile
        if device.type == "cuda":
            torch.cuda.synchronize()
        first_step_s = time.perf_counter() - started
        one_step()  # a CUDA-graph row records its graphs here, which syncs
        state["guard"] = device.type == "cuda" and not cfg["official"]
        ms, sync_check = time_guarded(one_step, state, args.repeats, device)
        kernels = _generated_kernels() - kernels_before if cfg["compile"] else None
        ops = syncs = None
        if not cfg["compile"]:  # a dispatch mode stops compiled frames from running at all
            ops, syncs = count_dispatches(step, crops, cfg["official"], args.check_every)
        gpu = {}
        if device.type == "cuda" and args.gpu_counts:
            gpu = profile_gpu_work(step, crops, cfg["official"], args.check_every)
    images_s = args.batch / (ms / 1e3)
    gflop = dino_step_flops(args.arch, args.patch_size, args.global_size, args.local_size,
                            args.local_crops, args.out_dim) / 1e9
    return {"config": name, "arch": f"{args.arch}/{args.patch_size}", "batch": args.batch,
            "crops": f"2x{args.global_size}+{args.local_crops}x{args.local_size}",
            "K": args.out_dim, "precision": cfg["precision"],
            "pack": args.pack_attention if cfg["pack"] else "off",
            "compile_mode": args.compile_mode if cfg["compile"] else None,
            "compile_scope": args.compile_scope if cfg["compile"] else None,
            "first_step_s": first_step_s,
            "step_ms": ms, "images_s": images_s, "gflop_per_image": gflop,
            "host_cpu_ms": 1e3 * statistics.median(state["host_s"][-args.repeats:]),
            "mfu_pct": (100 * images_s * gflop / 1e3 / PEAK_TFLOPS
                        if device.type == "cuda" else None),
            "ops_per_step": ops, "syncs_per_step": syncs, "generated_kernels": kernels,
            "sync_check": sync_check, **gpu}


@contextlib.contextmanager
def forbid_host_syncs(active: bool):
    """While ``active`` (CUDA), any operation that makes the host wait for the device raises
    (``torch.cuda.set_sync_debug_mode("error")``), where it happens."""
    if not active:
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def time_guarded(one_step, state: dict, repeats: int, device) -> tuple[float, str | None]:
    """``(ms, sync_check)``: the median step time, its steps run under the guard when
    ``state["guard"]`` is on. ``sync_check`` is ``None`` without the guard, ``ok``, or where a
    hidden host sync was raised (:func:`sync_site`); the steps are then timed again without
    the guard, so that the row keeps its figures."""
    def timed():
        return measure(one_step, warmup=1, repeats=repeats, device=device)

    if not state["guard"]:
        return timed(), None
    try:
        return timed(), "ok"
    except RuntimeError as err:
        if "synchronizing" not in str(err):
            raise
        where = sync_site(err)
        print(f"error: a host sync inside the timed step: {where}", file=sys.stderr)
    state["guard"] = False
    return timed(), f"FAILED: {where}"


def sync_site(err: BaseException) -> str:
    """``file:line (function): message`` of the innermost frame of ``err`` in dino_fast (else
    the innermost frame)."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if f"{os.sep}dino_fast{os.sep}" in f.filename] or frames
    frame = ours[-1]
    path = os.path.relpath(frame.filename) if frame.filename.startswith(os.sep) else frame.filename
    return f"{path}:{frame.lineno} ({frame.name}): {str(err).splitlines()[0]}"


def two_warm_steps(step, crops, official: bool):
    """Two more steps; no periodic check falls on them (callers count it amortised)."""
    for it in (1, 2):
        step(crops, 1, 1e-4, 0.04, 0.996, it)
        if official:
            step.check_finite()


def amortised_check(official: bool, check_every: int) -> float:
    """Host syncs per step of the fast configurations' periodic check."""
    return 0 if official else 1 / check_every


def count_dispatches(step, crops, official: bool, check_every: int) -> tuple[float, float]:
    """Operators dispatched and host syncs per step over 2 warm steps (eager steps only)."""
    with DispatchCounter() as counter:
        two_warm_steps(step, crops, official)
    return counter.total_ops / 2, counter.total_syncs / 2 + amortised_check(official, check_every)


# CUDA runtime calls with which the host waits for the device
CUDA_SYNC_CALLS = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize",
                             "cudaEventSynchronize"})


def profile_gpu_work(step, crops, official: bool, check_every: int) -> dict:
    """What ``torch.profiler`` sees of 2 warm steps: ``gpu_kernels_per_step`` (kernels, copies
    and memsets), ``cuda_syncs_per_step`` (host waits on CUDA) and where the GPU time goes
    (:func:`dino_fast.profiling.gpu_time.gpu_time_breakdown`: shares of matrix products,
    attention, optimizer and EMA, other kernels, idle, and the attention backend that ran).
    It sees compiled and CUDA-graph steps too, which the dispatch counter cannot observe.
    Empty when the profiler saw no GPU activity (no CUPTI in this environment)."""
    from torch.profiler import ProfilerActivity, profile
    try:  # an auxiliary measurement: its failure must not cost the row its timings
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            two_warm_steps(step, crops, official)
            torch.cuda.synchronize()  # every kernel finished inside the window; not counted
        events = prof.events()
        kernels, syncs = count_gpu_events(events)
        breakdown = gpu_time_breakdown(events)
    except Exception as err:  # noqa: BLE001 (reported, and the row keeps its other values)
        print(f"note: profiling the step failed ({type(err).__name__}: {err}); kernel counts "
              "left out", file=sys.stderr)
        return {}
    if kernels == 0:
        print("note: the profiler recorded no GPU activity; kernel counts left out",
              file=sys.stderr)
        return {}
    return {"gpu_kernels_per_step": kernels / 2,
            "cuda_syncs_per_step": (syncs - 1) / 2 + amortised_check(official, check_every),
            **breakdown}


def count_gpu_events(events) -> tuple[int, int]:
    """``(GPU activities other than annotations, CUDA sync calls)`` among profiler events."""
    kernels = len(gpu_kernels(events))
    syncs = sum(1 for e in events if e.name in CUDA_SYNC_CALLS)
    return kernels, syncs


def _generated_kernels() -> int:
    """Kernels inductor has generated in this process so far."""
    from torch._inductor import metrics
    return metrics.generated_kernel_count


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--arch", default="vit_small" if cuda else "vit_tiny")
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64 if cuda else 4)
    parser.add_argument("--local_crops", type=int, default=10 if cuda else 2)
    parser.add_argument("--global_size", type=int, default=224)
    parser.add_argument("--local_size", type=int, default=96)
    parser.add_argument("--out_dim", type=int, default=65536 if cuda else 4096)
    parser.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                        help="of the fast configurations (official: fp16 on CUDA, else fp32)")
    parser.add_argument("--pack_crops", action="store_true",
                        help="the fast configurations run the student packed")
    parser.add_argument("--pack_attention", default="sdpa_split", choices=PACK_ATTENTION)
    parser.add_argument("--compile_mode", default="default", choices=COMPILE_MODES)
    parser.add_argument("--compile_scope", default="forward", choices=COMPILE_SCOPES,
                        help="fast+compile: the whole forward as one graph, or each block")
    parser.add_argument("--check_every", type=int, default=10,
                        help="fast configurations: steps between non-finite checks")
    parser.add_argument("--gpu_counts", action="store_true",
                        help="CUDA: profile 2 more steps per row for the GPU kernels and CUDA "
                        "syncs per step (some seconds per row)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--repeats", type=int, default=10 if cuda else 3)
    parser.add_argument("--configs", default="official,fast,fast+compile")
    parser.add_argument("--output", default=None, help="write the table to this markdown file")
    parser.add_argument("--json", default=None, help="write the rows as JSON to this file")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if cuda else "cpu"
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda was asked for but CUDA is not available")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    configs = configurations(args, device.type == "cuda")
    unknown = set(args.configs.split(",")) - set(configs)
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; choose from {sorted(configs)}")
    crops = random_crops(args, device)
    rows = [run_config(args, device, name, configs[name], crops)
            for name in args.configs.split(",")]
    baseline = next((r for r in rows if r["config"] == "official"), rows[0])["images_s"]
    for row in rows:
        row["speedup"] = row["images_s"] / baseline  # against the official style when measured
    table = print_table(rows, COLUMNS, title="DINO training step")
    if any("idle_pct" in row for row in rows):
        table += "\n\n" + print_table(rows, GPU_TIME_COLUMNS,
                                       title="Where the GPU time goes (percent of the step)")
    if args.output:
        write_results(args.output, table)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": environment(), "args": vars(args),
                       "rows": [{c: row.get(c) for c in dict.fromkeys(
                           COLUMNS + GPU_TIME_COLUMNS + ["compile_mode", "compile_scope",
                                                         "gflop_per_image"])}
                                for row in rows]}, f, indent=1)
    failed = [row["config"] for row in rows if (row["sync_check"] or "").startswith("FAILED")]
    if failed:
        raise SystemExit(f"error: a host sync in the timed step of {', '.join(failed)} (see "
                         "sync_check; the figures are from steps timed without the check)")

if __name__ == "__main__":
    main()
