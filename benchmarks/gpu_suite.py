"""``python -m benchmarks.gpu_suite``: the whole GPU programme in one command, within a budget.

    python -m benchmarks.gpu_suite --budget 540 --out DIR        # on a GPU machine
    python -m benchmarks.gpu_suite --dry-run --out DIR           # on a CPU: tiny shapes, seconds

Where only a few files can leave the machine, add ``--results FOLDER``: the report (and its JSON)
go there, and the report carries the last lines of every failed command's log.

Stages, in order; every command runs as its own subprocess with a deadline, so a hang or crash
is reported and the next command runs (logs in ``DIR/<stage>/<job>.log``, results appended to
``DIR/results.jsonl`` as they come); then one markdown report (and JSON) is written to
``benchmarks/results/<date>-<gpu>.md`` and printed last.

1. environment: GPU, driver, CUDA, torch, triton, numpy, DALI, ONNX Runtime (and its
   providers), xformers, the commit.
2. correctness on CUDA: the kernel tests (attention forward and backward, batched and packed,
   at 197, 37 and odd lengths; the loss; the EMA; the packed pass) with
   ``DINO_FAST_AUTOTUNE=off`` (one candidate per shape class: compile, don't autotune), on
   several pytest-xdist workers where it is installed; then
   two steps of ``dino_fast.train``, the reference configuration (eager attention, reference
   ops, fp32) against the fast one in fp32 with Triton attention and in its bf16 default, on the
   same crops (:mod:`benchmarks.train_parity`).
3. ops (:mod:`benchmarks.ops` ``--quick``): attention at ``[128, 6, 197, 64]``,
   ``[640, 6, 37, 64]`` and packed ``64 x (2 x 197 + 10 x 37)`` against SDPA with each backend
   forced (and xformers when installed); the DINO loss at K = 65536, batch 64, 12 crops against
   eager and compiled eager; the EMA over ViT-S/16 + head (44M parameters) against the
   per-parameter loop, ``_foreach_lerp_`` and a plain copy. One command per op.
4. training step (:mod:`benchmarks.train_step`, synthetic crops on the GPU): official-style
   against fast, ViT-S/16, 2 x 224 + 10 x 96, batch 64 and 128, then each fast-path option the
   runner has (compile, packed crops, compile modes) as its own row at batch 128; GPU kernels
   and CUDA syncs per step (a profiler pass) for the batch-64 and packed rows; then
   ``dino_fast.train`` itself on a generated JPEG corpus with the torch loader, and with DALI
   when it is installed (images/s of the second epoch, from its progress bar).
5. attention-map inference (:mod:`benchmarks.inference`): PyTorch eager fp32 / bf16 and ONNX
   Runtime fp32 with whatever provider it has (and fp16 when that is CUDA), batch 1 and 32.

Plan for 9 minutes on an H100 (seconds; ``--budget`` scales every share; time a command leaves
unused passes to the next): environment a few, outside the plan; correctness 165 (kernel tests 105:
compiling one candidate per kernel and key, no autotuning, most of it, and near zero with a warm
Triton cache. Measured without a GPU (``python -m benchmarks.kernel_resources --set pinned-tests``):
the CUDA run of tests/ops/test_attention.py makes 143 sm_90 compilations with
``DINO_FAST_AUTOTUNE=off`` (433 with autotuning), median 6.9 s each on a loaded 2-core CPU, 29 s the
longest; on an idle fast core that is 2-5 minutes in all. pytest-xdist (in the GPU machine's image,
and in the ``dev`` extra) runs the tests on up to 8 workers, which compile in parallel, so a cold
run should take a fraction of that; without it a cold first run may spend its whole share here: the
job is then reported as timed out, the next commands run, and a second run with the same ``--out``
starts from the warm cache;
three 2-step training runs 20 each); ops 105 (attention 50, with the Triton autotuner's first
pass; loss 35, most of it one inductor compile; EMA 20); training step 195 (the runner's
``--help`` 10; batch 64 and 128, official and fast, 35 + 40; compile 45; packed crops 25 when
the runner has it; corpus 15; torch loader 25; DALI and the compile-mode row take what earlier
commands left); inference 75
(two ONNX exports of ViT-S/16 about 15 each). The kernel tests and benchmarks keep Triton's
cache and autotuning results in ``DIR/triton-cache`` (``TRITON_CACHE_DIR``,
``TRITON_CACHE_AUTOTUNING=1``), so a second run with the same ``--out`` compiles nothing.

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
    Recorder,
    junit_summary,
    read_rows,
    run_job,
)
from benchmarks.train_parity import compare_runs, images_per_second, run_flags

PLANNED_SECONDS = 540
FAILURE_LINES = 25  # of each failed command's log, in the report
KERNEL_TESTS = ["tests/ops/test_attention.py", "tests/ops/test_dino_loss.py",
                "tests/ops/test_ema.py", "tests/models/test_packed.py"]


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

    def run(self, stage: str, job: Job, in_process: bool | None = None):
        """Run ``job`` within its share plus what earlier commands left, never past the budget."""
        planned = job.seconds * self.scale
        limit = min(planned + self.carry, self.deadline - time.monotonic())
        log = os.path.join(self.out, stage, f"{job.name}.log")
        result = run_job(job, limit, log, self.dry if in_process is None else in_process)
        self.carry = max(0.0, planned + self.carry - result.seconds)
        self.jobs.append({"stage": stage, "job": job.name, "status": result.status,
                          "seconds": round(result.seconds, 1), "limit": round(limit),
                          "log": log})
        return result

    def add_rows(self, stage: str, result, rows: list[dict]):
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


# --- 2. correctness --------------------------------------------------------------------------

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


def stage_correctness(suite: Suite):
    junit = suite.path("correctness", "kernel-tests.xml")
    selection = KERNEL_TESTS if not suite.dry else [
        "tests/ops/test_ema.py::test_matches_reference[False-1000-reference]",
        "tests/ops/test_ema.py::test_matches_reference[True-1000-reference]"]
    tests = Job("kernel-tests", "pytest", ["-q", "-p", "no:cacheprovider", "-rf",
                                            *xdist_args(suite), f"--junitxml={junit}",
                                            *selection], 105,
                env={**suite.triton_env, "DINO_FAST_AUTOTUNE": "off"})
    # pytest cannot nest in-process: a subprocess, which in the dry run runs beside the in-process
    # training runs below (a second core); on a GPU the commands run one at a time
    background = ThreadPoolExecutor(1) if suite.dry else None
    pending = background.submit(suite.run, "correctness", tests, False) if background else None
    if pending is None:
        suite.add_rows("correctness", suite.run("correctness", tests, False),
                       [junit_summary(junit)])
    runs = {"reference": (["--attn_backend", "eager", "--precision", "fp32"],
                          {"DINO_FAST_BACKEND": "reference"})}
    if suite.dry:
        runs["fast fp32"] = (["--attn_backend", "sdpa", "--precision", "fp32"], {})
    else:
        runs["fast fp32 triton"] = (["--attn_backend", "triton", "--precision", "fp32"], {})
        runs["fast bf16 (default)"] = (["--precision", "bf16"], {})
    folders = {name: suite.folder("correctness", re.sub(r"[^a-z0-9]+", "-", name).strip("-"))
               for name in runs}
    for name, (flags, env) in runs.items():
        job = train_job(suite, os.path.basename(folders[name]), folders[name], flags, 20)
        job.env = {**job.env, **env}
        result = suite.run("correctness", job)
        rows = []
        if name != "reference" and result.ok:
            precision = flags[flags.index("--precision") + 1]
            try:
                rows = [{"check": f"2 training steps: {name} vs reference",
                         **compare_runs(folders["reference"], folders[name], precision)}]
            except (OSError, KeyError, ValueError) as error:
                rows = [{"check": f"2 training steps: {name} vs reference",
                         "verdict": f"no comparison ({type(error).__name__}: {error})"}]
        suite.add_rows("correctness", result, rows)
    if pending is not None:
        suite.add_rows("correctness", pending.result(), [junit_summary(junit)])
        background.shutdown()


# --- 3. ops ----------------------------------------------------------------------------------

def stage_ops(suite: Suite):
    size = ["--tiny", "--no_compile"] if suite.dry else ["--quick"]
    for op, seconds in (("attention", 50), ("loss", 35), ("ema", 20)):
        json_path = suite.path("ops", f"{op}.json")
        job = Job(op, "benchmarks.ops", [*size, "--ops", op, "--json", json_path], seconds,
                  env=suite.triton_env)
        result = suite.run("ops", job)
        suite.add_rows("ops", result, read_rows(json_path, result.output()) if result.ok else [])


# --- 4. training step ------------------------------------------------------------------------

# benchmarks/train_step.py's flags when this was written; newer ones are read from its --help
STEP_FLAGS = {"--arch", "--patch_size", "--batch", "--local_crops", "--out_dim", "--repeats",
              "--configs", "--output"}


def runner_flags(suite: Suite, module: str) -> set[str]:
    """The flags ``module``'s command line accepts (from its ``--help``)."""
    result = suite.run("training", Job(f"{module.split('.')[-1]}-help", module, ["--help"], 10))
    return set(re.findall(r"--[a-z_-]+", result.output())) if result.ok else STEP_FLAGS


def step_jobs(suite: Suite, flags: set[str]) -> list[tuple[Job, str]]:
    """The ``benchmarks.train_step`` commands: ``(job, its JSON path)``."""
    if suite.dry:
        shape = ["--arch", "vit_tiny", "--local_crops", "1", "--out_dim", "256", "--repeats", "1"]
        batches, extra_batch = [1], 1
    else:
        shape = ["--arch", "vit_small", "--local_crops", "10", "--out_dim", "65536"]
        batches, extra_batch = [64, 128], 128
    # the launch counts (a profiler pass of some seconds a row) where the goal is set
    counts = ["--gpu_counts"] if "--gpu_counts" in flags and not suite.dry else []
    plans = [(f"batch{b}", ["--batch", b, "--configs", "official,fast",
                            *(counts if b == 64 else [])], 35 if b == 64 else 40)
             for b in batches]
    if not suite.dry:
        plans.append(("compile", ["--batch", extra_batch, "--configs", "fast+compile"], 45))
    if "--pack_crops" in flags:
        plans.append(("packed", ["--batch", extra_batch, "--configs", "fast", "--pack_crops",
                                 *counts], 25))
    jobs = []
    for name, args, seconds in plans:
        args = [str(a) for a in args]
        if "--configs" not in flags:  # a runner without the flag measures its own set
            i = args.index("--configs")
            del args[i:i + 2]
        json_path = suite.path("training", f"{name}.json")
        args += ["--json", json_path] if "--json" in flags else []
        jobs.append((Job(name, "benchmarks.train_step", [*shape, *args], seconds,
                         env=suite.triton_env), json_path))
    return jobs


def loader_runs(suite: Suite):
    """``dino_fast.train`` on a generated JPEG corpus with each loader installed here."""
    corpus = suite.folder("training", "corpus")
    count = 8 if suite.dry else 400  # 6 steps of 64 in an epoch
    made = suite.run("training", Job("corpus", "benchmarks.make_corpus",
                                     ["--count", count, "--out", corpus], 15))
    if not made.ok:
        suite.add_rows("training", made, [])
        return
    loaders = ["torch"] + (["dali"] if _version("nvidia.dali") else [])
    for loader in loaders:
        if suite.dry:
            shape = ["--arch", "vit_tiny", "--out_dim", "256", "--batch_size_per_gpu", "2",
                     "--local_crops_number", "1", "--global_crops_size", "32",
                     "--local_crops_size", "16", "--num_workers", "1", "--max_steps", "2",
                     "--device", "cpu"]
        else:
            shape = ["--arch", "vit_small", "--out_dim", "65536", "--batch_size_per_gpu", "64",
                     "--local_crops_number", "10", "--num_workers", "14", "--max_steps", "6"]
        folder = suite.folder("training", f"loader-{loader}")
        job = Job(f"loader-{loader}", "dino_fast.train",
                  [*shape, "--data_path", corpus, "--loader", loader, "--epochs", "2",
                   "--warmup_epochs", "0", "--saveckp_freq", "0", "--output_dir", folder], 25,
                  env=suite.triton_env)
        result = suite.run("training", job)
        rows = [{"config": f"dino_fast.train, {loader} loader, JPEG corpus",
                 "images/s": images_per_second(result.output(), epoch=1)}] if result.ok else []
        suite.add_rows("training", result, rows)


def stage_training(suite: Suite):
    flags = runner_flags(suite, "benchmarks.train_step")
    for job, json_path in step_jobs(suite, flags):
        result = suite.run("training", job)
        suite.add_rows("training", result, read_rows(json_path, result.output())
                       if result.ok else [])
    loader_runs(suite)
    if not suite.dry and "--compile_mode" in flags:  # last: it takes what is left
        job = Job("compile-max-autotune", "benchmarks.train_step",
                  ["--arch", "vit_small", "--local_crops", "10", "--out_dim", "65536",
                   "--batch", "128", "--configs", "fast+compile", "--compile_mode",
                   "max-autotune-no-cudagraphs", "--json", suite.path("training", "mat.json")],
                  0, env=suite.triton_env)
        result = suite.run("training", job)
        suite.add_rows("training", result, read_rows(job.args[-1], result.output())
                       if result.ok else [])


# --- 5. inference ----------------------------------------------------------------------------

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
                                        [*args, "--json", json_path], 75))
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=PLANNED_SECONDS,
                        help="seconds for the whole suite (every stage's share scales with it)")
    parser.add_argument("--out", required=True, help="folder for logs, JSON and Triton's cache")
    parser.add_argument("--dry-run", action="store_true",
                        help="every stage on the CPU with tiny shapes (CI)")
    parser.add_argument("--results", help="folder of the final report (default: "
                                          "benchmarks/results, or --out with --dry-run)")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    start = time.monotonic()
    suite = Suite(args)
    env = suite_environment()
    with open(suite.path("environment.json"), "w", encoding="utf-8") as f:
        json.dump(env, f, indent=1)
    suite.jobs.append({"stage": "environment", "job": "versions", "status": "ok",
                       "seconds": round(time.monotonic() - start, 1)})
    for stage in (stage_correctness, stage_ops, stage_training):
        stage(suite)
    stage_inference(suite, env)
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
