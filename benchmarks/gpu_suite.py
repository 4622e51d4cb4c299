"""``python -m benchmarks.gpu_suite``: the whole GPU programme in one command, within a budget.

    python -m benchmarks.gpu_suite --budget 540 --out DIR        # on a GPU machine
    python -m benchmarks.gpu_suite --dry-run --out DIR           # on a CPU: tiny shapes, seconds

Where only a few files can leave the machine, add ``--results FOLDER``: the report (and its JSON)
go there, and the report carries the last lines of every failed command's log.

Stages, in order, the headline first; every command runs as its own subprocess with a
deadline, so a hang or crash is reported and the next command runs (logs in
``DIR/<stage>/<job>.log``, results appended to ``DIR/results.jsonl`` as they come); then one
markdown report (and JSON) is written to ``benchmarks/results/<date>-<gpu>.md`` and printed last.
``--plan`` prints the commands a GPU run would get, in order, with their shares, and runs none.

1. environment: GPU, driver, CUDA, torch, triton, numpy, DALI, ONNX Runtime (and its
   providers), xformers, the commit.
2. smoke: four CUDA kernel tests (attention, loss, EMA) with ``DINO_FAST_AUTOTUNE=off``; two
   steps of ``dino_fast.train``, the reference configuration (eager attention, reference ops,
   fp32) against the fast bf16 default on the same crops (:mod:`benchmarks.train_parity`).
3. headline (:mod:`benchmarks.train_step`, synthetic crops on the GPU): ViT-S/16,
   2 x 224 + 10 x 96, K = 65536, bf16, batch 64, one command a row: official, fast eager, fast
   compiled (``default``, the whole forward), fast compiled per block (``--compile_scope
   blocks``: regional compilation), fast compiled ``reduce-overhead`` (CUDA graphs), packed
   crops. Each row has its first step's seconds (the cold compile of a compiled one), the
   profiler's kernels and CUDA syncs per step and where the GPU time goes (matrix products,
   attention and its backend, optimizer and EMA, other, idle); the fast rows' timed steps run
   with host syncs forbidden (``sync_check``).
4. ops (:mod:`benchmarks.ops` ``--quick``): attention at ``[128, 6, 197, 64]``,
   ``[640, 6, 37, 64]`` and packed ``64 x (2 x 197 + 10 x 37)`` against SDPA with each backend
   forced (and xformers when installed); the DINO loss at K = 65536, batch 64, 12 crops against
   eager and compiled eager; the EMA over ViT-S/16 + head (44M parameters) against the
   per-parameter loop, ``_foreach_lerp_`` and a plain copy; the per-parameter gradient
   clipping over the same 158 gradients against the foreach code (a kernel per gradient). One
   command per op.
5. kernel tests: all of them (attention forward and backward, batched and packed, at 197, 37 and
   odd lengths; the loss and its health outputs; the EMA; the clipping; the packed pass) with
   ``DINO_FAST_AUTOTUNE=off`` (one candidate per shape class: compile, don't autotune), on
   several pytest-xdist workers where it is installed.
6. attention-map inference (:mod:`benchmarks.inference`): PyTorch eager fp32 / bf16 and ONNX
   Runtime fp32 with whatever provider it has (and fp16 when that is CUDA), batch 1 and 32.
7. loaders: ``dino_fast.train`` on a generated JPEG corpus with the torch loader, and with DALI
   when it is installed, from the folder and from its WebDataset shards (``dino_fast.shards``;
   images/s of the second epoch, from its progress bar).

Plan for 9 minutes on an H100 (seconds; ``--budget`` scales every share; time a command leaves
unused passes to the next; 538 planned, 2 spare): environment a few, outside the plan; smoke 60
(tests 25, reference 15, fast 20); headline 280 (the runner's ``--help`` 5; official 35, fast
30, compiled 90 (one cold inductor compile of teacher and student: likely 60-150 s cold, which
is why it has the largest share), compiled per block 30, ``reduce-overhead`` 60 (a second
compile plus graph capture), packed 30); ops 58 (attention 20, loss 15, EMA 15, clipping 8);
kernel tests 90 (compiling one candidate per kernel and key, no autotuning, most of it, and near
zero with a warm Triton cache; measured without a GPU with ``python -m
benchmarks.kernel_resources --set pinned-tests``: 143 sm_90 compilations before the clipping
and the loss's column kernel added a few, median 6.9 s each on a loaded 2-core CPU, shared over
the xdist workers; a cold run without xdist may time out, and a second run with the same
``--out`` starts warm); inference 30; loaders 25 (corpus 7, shards 3, torch 15; DALI, from the
folder and from the shards, takes what is left). The per-block share comes from the CPU
(inductor's C++ backend, ViT-S/16, 12 crops): cold, the whole forward took 78 s and 1612
generated kernels, the blocks 31 s and 230 (``benchmarks/results/2026-12-06-cpu.md``). The
batch-128 rows and ``max-autotune`` do not fit and are dropped. Triton's cache and autotuning
results (``DIR/triton-cache``: ``TRITON_CACHE_DIR``, ``TRITON_CACHE_AUTOTUNING=1``) and
inductor's (``DIR/inductor-cache``) stay under ``--out``, so a second run compiles less.

``--dry-run`` runs every stage on the CPU with tiny shapes and CPU baselines, inside this process
where it can (the kernel tests still run in a pytest subprocess), so that this script cannot rot
between the rare GPU windows; CI runs it (tests/benchmarks/test_gpu_suite.py).
"""
import argparse
import datetime
import importlib
import importlib.util
import json
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.common import environment, format_table
from benchmarks.suite_runner import (
    ROOT,
    Job,
    JobResult,
    Recorder,
    junit_summary,
    read_rows,
    run_job,
)
from benchmarks.train_parity import compare_runs, images_per_second, run_flags

PLANNED_SECONDS = 540
FAILURE_LINES = 25  # of each failed command's log, in the report
KERNEL_TESTS = ["tests/ops/test_attention.py", "tests/ops/test_dino_loss.py",
                "tests/ops/test_loss_health.py", "tests/ops/test_ema.py", "tests/ops/test_clip.py",
                "tests/models/test_packed.py"]
SMOKE_TESTS = ["tests/ops/test_attention.py::test_large_logits_are_stable",
               "tests/ops/test_attention.py::test_lse_is_the_row_logsumexp",
               "tests/ops/test_dino_loss.py::test_hand_computed_tiny_case",
               "tests/ops/test_ema.py::test_views_of_flat_buffer_update"]
DRY_TESTS = ["tests/ops/test_ema.py::test_matches_reference[False-1000-reference]",
             "tests/ops/test_ema.py::test_matches_reference[True-1000-reference]"]


class Suite:
    """The run's state: where results go, the clock, and the jobs' records."""

    def __init__(self, args):
        self.out, self.dry = os.path.abspath(args.out), args.dry_run
        self.scale = args.budget / PLANNED_SECONDS
        self.deadline = time.monotonic() + args.budget
        self.carry = 0.0  # planned seconds that finished commands did not use
        self.recorder = Recorder(self.out)
        self.stages: dict[str, list[dict]] = {}  # stage -> rows
        self.jobs: list[dict] = []
        cache = os.path.join(self.out, "triton-cache")
        self.triton_env = {"TRITON_CACHE_DIR": cache, "TRITON_CACHE_AUTOTUNING": "1"}
        # inductor's cache too, so that a second run with the same --out compiles nothing
        self.compile_env = {**self.triton_env,
                            "TORCHINDUCTOR_CACHE_DIR": os.path.join(self.out, "inductor-cache")}
        self.plan_only = getattr(args, "plan", False)
        self.planned: list[tuple[str, Job, float]] = []  # --plan: (stage, job, seconds)

    def run(self, stage: str, job: Job, in_process: bool | None = None):
        """Run ``job`` within its share plus what earlier commands left, never past the budget
        (the dry run: within what is left of the budget, as it checks that the commands work,
        not that a CPU runs them in a GPU's time)."""
        planned = job.seconds * self.scale
        if self.plan_only:
            return self.plan(stage, job, planned)
        left = self.deadline - time.monotonic()
        limit = left if self.dry else min(planned + self.carry, left)
        log = os.path.join(self.out, stage, f"{job.name}.log")
        result = run_job(job, limit, log, self.dry if in_process is None else in_process)
        self.carry = max(0.0, planned + self.carry - result.seconds)
        self.jobs.append({"stage": stage, "job": job.name, "status": result.status,
                          "seconds": round(result.seconds, 1), "limit": round(limit),
                          "log": log})
        return result

    def plan(self, stage: str, job: Job, seconds: float) -> JobResult:
        """``--plan``: note ``job`` with its share, run nothing but a runner's ``--help`` (the
        plan depends on the flags it has: its parser only, in this process)."""
        log = self.path(stage, f"{job.name}.plan.log")
        if job.args == ["--help"]:
            return run_job(job, 60, log, in_process=True)
        self.planned.append((stage, job, seconds))
        with open(log, "w", encoding="utf-8"):
            pass
        return JobResult(job.name, "planned", 0.0, log)

    def add_rows(self, stage: str, result, rows: list[dict]):
        if self.plan_only:
            return
        rows = [{"job": result.name, **row} for row in rows]
        self.stages.setdefault(stage, []).extend(rows)
        self.recorder.record(stage, result, rows)

    def path(self, *parts) -> str:
        """A file under ``--out`` (its folder created)."""
        path = os.path.join(self.out, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def folder(self, *parts) -> str:
        """A folder under ``--out``, created."""
        path = os.path.join(self.out, *parts)
        os.makedirs(path, exist_ok=True)
        return path


# --- 1. environment --------------------------------------------------------------------------

def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # missing, or broken against this torch
        return None


def suite_environment() -> dict:
    """What the results depend on: the device, the driver, every package version, the commit."""
    info = environment()
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=False).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    for module in ("numpy", "onnxruntime", "xformers"):
        info[module] = _version(module)
    info["dali"] = _version("nvidia.dali")
    if info["onnxruntime"]:
        import onnxruntime
        info["onnxruntime providers"] = onnxruntime.get_available_providers()
    return info


# --- 2. smoke and 5. kernel tests ------------------------------------------------------------

def train_job(suite: Suite, name: str, folder: str, flags: list, seconds: float) -> Job:
    """``python -m dino_fast.train`` on the bundled photos for the parity check."""
    if suite.dry:
        shape = ["--arch", "vit_tiny", "--out_dim", "256", "--batch_size_per_gpu", "2",
                 "--local_crops_number", "1", "--global_crops_size", "32",
                 "--local_crops_size", "16", "--num_workers", "0", "--device", "cpu"]
    else:
        shape = ["--arch", "vit_small", "--out_dim", "65536", "--batch_size_per_gpu", "16",
                 "--local_crops_number", "10", "--num_workers", "8", "--device", "cuda"]
    return Job(name, "dino_fast.train", [*shape, "--loader", "torch", *run_flags(folder), *flags],
               seconds, env=suite.triton_env)


def xdist_args(suite: Suite) -> list[str]:
    """pytest-xdist's ``-n`` where it is installed (the GPU machine's image has it: the device
    entry's KINDS.md): a cold run of the kernel tests is mostly Triton compiling, one CPU core
    per process, and the tests are small enough to share the GPU; half the usable cores, at
    most 8 (2 in the dry run)."""
    if importlib.util.find_spec("xdist") is None:
        return []
    workers = 2 if suite.dry else max(1, min(8, len(os.sched_getaffinity(0)) // 2))
    return ["-n", str(workers)]


def kernel_tests_job(suite: Suite, name: str, selection: list[str], seconds: float) -> Job:
    """The CUDA kernel tests in ``selection`` with ``DINO_FAST_AUTOTUNE=off``, a JUnit report."""
    junit = suite.path("correctness", f"{name}.xml")
    return Job(name, "pytest", ["-q", "-p", "no:cacheprovider", "-rf", *xdist_args(suite),
                                f"--junitxml={junit}", *selection], seconds,
               env={**suite.triton_env, "DINO_FAST_AUTOTUNE": "off"})


def run_kernel_tests(suite: Suite, stage: str, job: Job):
    """Run ``job`` (a pytest subprocess: pytest cannot nest in-process) and add its counts."""
    junit = next(arg for arg in job.args if arg.startswith("--junitxml="))[len("--junitxml="):]
    suite.add_rows(stage, suite.run(stage, job, False), [junit_summary(junit)])


def parity_runs(suite: Suite):
    """Two steps of ``dino_fast.train``, the reference configuration against the fast default
    on the same crops, and the comparison of their updates."""
    runs = {"reference": (["--attn_backend", "eager", "--precision", "fp32"],
                          {"DINO_FAST_BACKEND": "reference"})}
    if suite.dry:
        runs["fast fp32"] = (["--attn_backend", "sdpa", "--precision", "fp32"], {})
    else:
        runs["fast bf16 (default)"] = (["--precision", "bf16"], {})
    folders = {name: suite.folder("smoke", re.sub(r"[^a-z0-9]+", "-", name).strip("-"))
               for name in runs}
    for name, (flags, env) in runs.items():
        job = train_job(suite, os.path.basename(folders[name]), folders[name], flags,
                        15 if name == "reference" else 20)
        job.env = {**job.env, **env}
        result = suite.run("smoke", job)
        rows = []
        if name != "reference" and result.ok:
            precision = flags[flags.index("--precision") + 1]
            try:
                rows = [{"check": f"2 training steps: {name} vs reference",
                         **compare_runs(folders["reference"], folders[name], precision)}]
            except (OSError, KeyError, ValueError) as error:
                rows = [{"check": f"2 training steps: {name} vs reference",
                         "verdict": f"no comparison ({type(error).__name__}: {error})"}]
        suite.add_rows("smoke", result, rows)


def stage_smoke(suite: Suite):
    """Under a minute: a handful of CUDA kernel tests and one two-step parity run."""
    selection = DRY_TESTS[:1] if suite.dry else SMOKE_TESTS
    tests = kernel_tests_job(suite, "smoke-tests", selection, 25)
    # in the dry run the pytest subprocess runs beside the in-process training runs (a second
    # core); on a GPU the commands run one at a time
    if suite.dry:
        with ThreadPoolExecutor(1) as background:
            pending = background.submit(run_kernel_tests, suite, "smoke", tests)
            parity_runs(suite)
            pending.result()
    else:
        run_kernel_tests(suite, "smoke", tests)
        parity_runs(suite)


def stage_kernel_tests(suite: Suite):
    """All the kernel tests, after the headline and the ops."""
    selection = DRY_TESTS if suite.dry else KERNEL_TESTS
    run_kernel_tests(suite, "kernel tests", kernel_tests_job(suite, "kernel-tests", selection, 90))


# --- 4. ops ----------------------------------------------------------------------------------

def stage_ops(suite: Suite):
    size = ["--tiny", "--no_compile"] if suite.dry else ["--quick"]
    for op, seconds in (("attention", 20), ("loss", 15), ("ema", 15), ("clip", 8)):
        json_path = suite.path("ops", f"{op}.json")
        job = Job(op, "benchmarks.ops", [*size, "--ops", op, "--json", json_path], seconds,
                  env=suite.triton_env)
        result = suite.run("ops", job)
        suite.add_rows("ops", result, read_rows(json_path, result.output()) if result.ok else [])


# --- 3. headline and 7. loaders --------------------------------------------------------------

# benchmarks/train_step.py's flags when this was written; newer ones are read from its --help
STEP_FLAGS = {"--arch", "--patch_size", "--batch", "--local_crops", "--out_dim", "--repeats",
              "--configs", "--output"}


def step_jobs(suite: Suite, flags: set[str]) -> list[tuple[Job, str]]:
    """The headline ``benchmarks.train_step`` commands at batch 64, one row each, in order:
    ``(job, its JSON path)``. The dry run skips the compiled rows."""
    if suite.dry:
        shape = ["--arch", "vit_tiny", "--local_crops", "1", "--out_dim", "256", "--repeats", "1",
                 "--batch", "1"]
    else:
        shape = ["--arch", "vit_small", "--local_crops", "10", "--out_dim", "65536",
                 "--precision", "bf16", "--batch", "64"]
    counts = ["--gpu_counts"] if "--gpu_counts" in flags and not suite.dry else []
    plans = [("official", ["--configs", "official", *counts], 35),
             ("fast", ["--configs", "fast", *counts], 30)]
    if not suite.dry:
        plans.append(("compile", ["--configs", "fast+compile", "--compile_mode", "default",
                                  *counts], 90))
        if "--compile_scope" in flags:  # regional: each block, a shorter cold compile
            plans.append(("compile-blocks", ["--configs", "fast+compile", "--compile_mode",
                                             "default", "--compile_scope", "blocks", *counts],
                          30))
        plans.append(("reduce-overhead", ["--configs", "fast+compile", "--compile_mode",
                                          "reduce-overhead", *counts], 60))
    if "--pack_crops" in flags:
        plans.append(("packed", ["--configs", "fast", "--pack_crops", *counts], 30))
    jobs = []
    for name, args, seconds in plans:
        json_path = suite.path("headline", f"{name}.json")
        args += ["--json", json_path] if "--json" in flags else []
        jobs.append((Job(name, "benchmarks.train_step", [*shape, *args], seconds,
                         env=suite.compile_env), json_path))
    return jobs


def stage_headline(suite: Suite):
    """The training-step rows at batch 64, right after the smoke test."""
    help_job = Job("train_step-help", "benchmarks.train_step", ["--help"], 5)
    result = suite.run("headline", help_job)
    flags = set(re.findall(r"--[a-z_-]+", result.output())) if result.ok else STEP_FLAGS
    for job, json_path in step_jobs(suite, flags):
        if os.path.exists(json_path):  # an earlier run's, with the same --out
            os.remove(json_path)
        result = suite.run("headline", job)
        # a failed sync check exits 1 after writing its rows: they are kept, with the failure
        suite.add_rows("headline", result, read_rows(json_path, result.output()))


def loader_runs(suite: Suite):
    """``dino_fast.train`` on a generated JPEG corpus with each loader installed here."""
    corpus = suite.folder("training", "corpus")
    count = 8 if suite.dry else 400  # 6 steps of 64 in an epoch
    made = suite.run("training", Job("corpus", "benchmarks.make_corpus",
                                     ["--count", count, "--out", corpus], 7))
    if not made.ok and made.status != "planned":
        suite.add_rows("training", made, [])
        return
    runs = [("torch", corpus)]
    if _version("nvidia.dali"):
        shards = suite.folder("training", "corpus-shards")
        written = suite.run("training", Job("shards", "dino_fast.shards",
                                            ["--data_path", corpus, "--output_dir", shards], 3))
        runs += [("dali", corpus)] + ([("dali", shards)] if written.ok
                                      or written.status == "planned" else [])
    for loader, data in runs:
        if suite.dry:
            shape = ["--arch", "vit_tiny", "--out_dim", "256", "--batch_size_per_gpu", "2",
                     "--local_crops_number", "1", "--global_crops_size", "32",
                     "--local_crops_size", "16", "--num_workers", "1", "--max_steps", "2",
                     "--device", "cpu"]
        else:
            shape = ["--arch", "vit_small", "--out_dim", "65536", "--batch_size_per_gpu", "64",
                     "--local_crops_number", "10", "--num_workers", "14", "--max_steps", "6"]
        source = "shards" if data != corpus else "JPEG corpus"
        name = f"loader-{loader}" + ("-shards" if data != corpus else "")
        job = Job(name, "dino_fast.train",
                  [*shape, "--data_path", data, "--loader", loader, "--epochs", "2",
                   "--warmup_epochs", "0", "--saveckp_freq", "0", "--output_dir",
                   suite.folder("training", name)],
                  15 if loader == "torch" else 0,  # DALI takes what the others left
                  env=suite.triton_env)
        result = suite.run("training", job)
        rows = [{"config": f"dino_fast.train, {loader} loader, {source}",
                 "images/s": images_per_second(result.output(), epoch=1)}] if result.ok else []
        suite.add_rows("training", result, rows)


# --- 6. inference ----------------------------------------------------------------------------

def stage_inference(suite: Suite, env: dict):
    json_path = suite.path("inference", "inference.json")
    if suite.dry:
        args = ["--arch", "vit_tiny", "--image_size", "32", "--batch_sizes", "1", "--repeats",
                "1", "--no_compile", "--onnx", "fp32"]
    else:  # fp16 only where ONNX Runtime runs on the GPU: its CPU fp16 path is mostly casts
        cuda_ort = "CUDAExecutionProvider" in env.get("onnxruntime providers", [])
        args = ["--arch", "vit_small", "--batch_sizes", "1", "32", "--repeats", "10",
                "--no_compile", "--onnx", "fp32", *(["fp16"] if cuda_ort else [])]
    result = suite.run("inference", Job("inference", "benchmarks.inference",
                                        [*args, "--json", json_path], 30))
    suite.add_rows("inference", result, read_rows(json_path, result.output())
                   if result.ok else [])


# --- the report ------------------------------------------------------------------------------

def columns(rows: list[dict]) -> list[str]:
    """Every key of ``rows``, in order of first appearance."""
    return list(dict.fromkeys(key for row in rows for key in row))


def report(suite: Suite, env: dict, budget: float, elapsed: float) -> str:
    """The markdown report: device and versions, each command's status, each stage's table."""
    title = f"GPU suite{' (dry run on the CPU)' if suite.dry else ''}: {env.get('device')}"
    parts = [f"# {title}, {datetime.date.today()}",
             "environment: " + json.dumps(env),
             f"budget {budget:.0f} s, used {elapsed:.0f} s; logs and JSON in {suite.out}",
             format_table(suite.jobs, ["stage", "job", "status", "seconds", "limit"],
                          "Commands")]
    for stage, rows in suite.stages.items():
        if rows:
            parts.append(format_table(rows, columns(rows), stage))
    failed = [job for job in suite.jobs if job["status"] not in ("ok", None) and "log" in job]
    if failed:  # the report may be the only file that leaves the machine: carry the causes
        parts.append("## Failures (last lines of each log)")
        for job in failed:
            with open(job["log"], encoding="utf-8", errors="replace") as f:
                tail = f.read().splitlines()[-FAILURE_LINES:]
            parts.append(f"### {job['stage']} / {job['job']}: {job['status']}\n\n```\n"
                         + "\n".join(tail) + "\n```")
    return "\n\n".join(parts) + "\n"


def results_path(args, env: dict) -> str:
    """``<results>/<date>-<gpu>.md`` (the dry run writes into ``--out`` unless told)."""
    device = "cpu-dry-run" if args.dry_run else re.sub(
        r"[^a-z0-9]+", "-", env.get("device", "gpu").lower().replace("nvidia", "")).strip("-")
    folder = args.results or (args.out if args.dry_run else os.path.join(ROOT, "benchmarks",
                                                                          "results"))
    return os.path.join(folder, f"{datetime.date.today()}-{device}.md")


def run_stages(suite: Suite, env: dict):
    """Every stage after the environment, in the order of the plan: the headline first."""
    stage_smoke(suite)
    stage_headline(suite)
    stage_ops(suite)
    stage_kernel_tests(suite)
    stage_inference(suite, env)
    loader_runs(suite)


def print_plan(suite: Suite) -> dict:
    """Print the commands a run would get, in order, one a line with its share (seconds)."""
    for stage, job, seconds in suite.planned:
        env = " ".join(f"{key}={value}" for key, value in job.env.items())
        args = " ".join(str(arg) for arg in job.args)
        print(f"{seconds:6.1f} s  {stage}/{job.name}: {env} python -m {job.module} {args}")
    total = sum(seconds for _, _, seconds in suite.planned)
    print(f"{total:6.1f} s  in all, of a budget of {suite.scale * PLANNED_SECONDS:.0f} s")
    return {"planned": suite.planned}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=PLANNED_SECONDS,
                        help="seconds for the whole suite (every stage's share scales with it)")
    parser.add_argument("--out", required=True, help="folder for logs, JSON and Triton's cache")
    parser.add_argument("--dry-run", action="store_true",
                        help="every stage on the CPU with tiny shapes (CI)")
    parser.add_argument("--plan", action="store_true",
                        help="print the commands a GPU run would get, with their shares; run "
                             "nothing")
    parser.add_argument("--results", help="folder of the final report (default: "
                                          "benchmarks/results, or --out with --dry-run)")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    start = time.monotonic()
    suite = Suite(args)
    env = {} if args.plan else suite_environment()
    if args.plan:
        run_stages(suite, env)
        return print_plan(suite)
    with open(suite.path("environment.json"), "w", encoding="utf-8") as f:
        json.dump(env, f, indent=1)
    suite.jobs.append({"stage": "environment", "job": "versions", "status": "ok",
                       "seconds": round(time.monotonic() - start, 1)})
    run_stages(suite, env)
    text = report(suite, env, args.budget, time.monotonic() - start)
    path = results_path(args, env)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    with open(path[:-3] + ".json", "w", encoding="utf-8") as f:
        json.dump({"environment": env, "commands": suite.jobs, "stages": suite.stages}, f,
                  indent=1, default=str)
    print(text, flush=True)
    print(f"wrote {path}")
    return {"path": path, "commands": suite.jobs, "stages": suite.stages}


if __name__ == "__main__":
    main()
