"""Is this tree's training step faster or slower than another revision's, on this CPU?

One process, one thread: the step of revision ``--base`` and this tree's configurations take
turns step by step, in an order that rotates every round, so that the machine's load and the
process's state fall on all of them alike; separate processes differ from each other by more
than the changes worth measuring (+-20 % for the same code on the shared 2-core machine). The
report gives each configuration's host CPU time per step and its ratio to the base, paired by
round: the geometric mean with a 95 % interval, and the rounds in which it was faster.

    OMP_NUM_THREADS=1 python benchmarks/step_ab.py --base 2bbd936 --rounds 40

The base is a copy of the revision's package (``git archive``) in which ``dino_fast`` is renamed
``dino_fast_ab`` throughout (module paths and the ``torch.library`` namespace, so that both
trees register their ops in one process), with its C++ extension built there, or this tree's
copied when ``csrc/`` is the same; both must load their C++ kernels, or it stops. It works
for revisions whose ``dino_fast.train`` has ``build_parser`` and ``build_models`` and whose
``TrainStep(student, teacher, loss, optimizer, ema)`` steps as this tree's does.
"""
import argparse
import glob
import importlib
import importlib.machinery
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import environment  # noqa: E402
from benchmarks.train_step import random_crops  # noqa: E402

BASE_PACKAGE = "dino_fast_ab"
EXTENSION = f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"  # the C++ kernels, this Python's
CONFIGS = {"fast": [], "fast+pack": ["--pack_crops"]}  # this tree's, against the base


def _git(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", ROOT, *args], check=False, capture_output=True,
                          **kwargs)


def copy_base(revision: str, work: str) -> str:
    """Write revision's package, renamed :data:`BASE_PACKAGE` and built, under ``work``;
    return the folder to put on ``sys.path``."""
    tree = os.path.join(work, "tree")
    os.makedirs(tree)
    archive = _git("archive", revision)
    subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
    for sub in ("kernels", "export"):  # installed as dino_fast.kernels / dino_fast.export
        if os.path.isdir(os.path.join(tree, sub)):
            shutil.move(os.path.join(tree, sub), os.path.join(tree, "dino_fast", sub))
    built = os.path.join(ROOT, "dino_fast", EXTENSION)
    if os.path.exists(built) and _git("diff", "--quiet", revision, "--", "csrc").returncode == 0:
        shutil.copy(built, os.path.join(tree, "dino_fast"))
    else:
        print(f"building {revision}'s C++ extension ...", file=sys.stderr, flush=True)
        result = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"],
                                cwd=tree, capture_output=True, text=True, check=False)
        # setup.py treats a failed build as optional (the package falls back to PyTorch ops),
        # which would compare this tree's C++ kernels against the base's reference ops
        if not os.path.exists(os.path.join(tree, "dino_fast", EXTENSION)):
            raise SystemExit(f"error: building {revision}'s C++ extension failed:\n"
                             f"{(result.stdout + result.stderr)[-3000:]}")
    package = os.path.join(work, BASE_PACKAGE)
    shutil.move(os.path.join(tree, "dino_fast"), package)
    for path in glob.glob(os.path.join(package, "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        with open(path, "w", encoding="utf-8") as f:
            f.write(re.sub(r"\bdino_fast\b", BASE_PACKAGE, text))
    return work


def recipe(package: str):
    """The step, loss, EMA and optimiser builders of ``package``: its ``training`` folder, or
    the flat modules of revisions before that folder existed (such as 2bbd936)."""
    try:
        return importlib.import_module(f"{package}.training")
    except ModuleNotFoundError as err:
        if err.name != f"{package}.training":
            raise
    def flat(module, name):
        return getattr(importlib.import_module(f"{package}.{module}"), name)
    return SimpleNamespace(TrainStep=flat("engine", "TrainStep"),
                           DINOLoss=flat("loss", "DINOLoss"), TeacherEMA=flat("ema", "TeacherEMA"),
                           build_optimizer=flat("optim", "build_optimizer"),
                           get_params_groups=flat("optim", "get_params_groups"))


def make_step(package: str, args, flags: list):
    """A ``TrainStep`` over fresh models (seed 0) of ``package`` (this tree's or the base's)."""
    train = importlib.import_module(f"{package}.train")
    train_args = train.build_parser().parse_args(
        ["--arch", args.arch, "--out_dim", str(args.out_dim), "--local_crops_number",
         str(args.local_crops), *flags])
    torch.manual_seed(0)
    student, teacher = train.build_models(train_args, torch.device("cpu"))
    training = recipe(package)
    optimizer = training.build_optimizer("adamw", training.get_params_groups(student))
    loss = training.DINOLoss(args.out_dim, args.local_crops + 2, 0.04, 0.04, 0, 10)
    return training.TrainStep(student, teacher, loss, optimizer,
                              training.TeacherEMA(student, teacher))


def interleave(steps: dict, crops: list, rounds: int, check_every: int = 10) -> dict:
    """``{name: [host CPU ms of each measured step]}``: 2 warm-up rounds, then ``rounds``
    rounds of one step each, in an order that rotates every round."""
    names, times = list(steps), {name: [] for name in steps}
    for i in range(rounds + 2):
        for name in names[i % len(names):] + names[:i % len(names)]:
            step = steps[name]
            start = time.process_time()
            step(crops, 1, 1e-4, 0.04, 0.996, i)
            if (i + 1) % check_every == 0 and hasattr(step, "check_finite"):
                step.check_finite()  # this tree's periodic host read, as training does it
            if i >= 2:
                times[name].append(1e3 * (time.process_time() - start))
    return times


def paired_ratio(times: list, base: list) -> dict:
    """Geometric mean of the per-round ratios ``times / base``, its 95 % interval (normal
    approximation on the logs), and the share of rounds in which ``times`` was faster."""
    logs = [math.log(t / b) for t, b in zip(times, base)]
    mean = statistics.mean(logs)
    half = 1.96 * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else math.inf
    return {"ratio": math.exp(mean), "low": math.exp(mean - half), "high": math.exp(mean + half),
            "faster_rounds": sum(t < b for t, b in zip(times, base)), "rounds": len(logs)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--configs", default="fast,fast+pack",
                        help=f"this tree's configurations, of {sorted(CONFIGS)}")
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--local_crops", type=int, default=2)
    parser.add_argument("--global_size", type=int, default=224)
    parser.add_argument("--local_size", type=int, default=96)
    parser.add_argument("--out_dim", type=int, default=4096)
    parser.add_argument("--json", default=None, help="write the report and the times here")
    args = parser.parse_args(argv)
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; choose from {sorted(CONFIGS)}")
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the interval needs two)")
    return args


def check_cpp(package: str):
    """Stop unless ``package`` runs its C++ kernels (the A/B would otherwise be unfair)."""
    try:
        importlib.import_module(f"{package}._C")
    except ImportError as err:
        raise SystemExit(f"error: {package} has no working C++ extension ({err}); build it "
                         "(python setup.py build_ext --inplace) and run again") from err


def main(argv=None) -> dict:
    args = parse_args(argv)
    if _git("rev-parse", "--verify", "--quiet", f"{args.base}^{{commit}}").returncode != 0:
        raise SystemExit(f"error: --base {args.base} is not a commit of {ROOT}")
    if BASE_PACKAGE in sys.modules:  # its ops are registered once per process
        raise SystemExit(f"error: a base is already loaded in this process ({BASE_PACKAGE}); "
                         "run one comparison per process")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="step_ab-") as work:
            sys.path.insert(0, copy_base(args.base, work))
            try:
                check_cpp("dino_fast")
                check_cpp(BASE_PACKAGE)
                steps = {"base": make_step(BASE_PACKAGE, args, [])}
                steps.update({name: make_step("dino_fast", args, CONFIGS[name])
                              for name in args.configs.split(",")})
                torch.manual_seed(1)
                crops = random_crops(args, torch.device("cpu"))
                times = interleave(steps, crops, args.rounds)
            finally:
                sys.path.remove(work)
    finally:
        torch.set_num_threads(threads)
    rows = {name: {"median_ms": statistics.median(t), "min_ms": min(t),
                   **(paired_ratio(t, times["base"]) if name != "base" else {})}
            for name, t in times.items()}
    print(f"host CPU ms per step, one thread, {args.rounds} interleaved rounds; base = "
          f"{args.base}")
    for name, row in rows.items():
        ratio = ("" if name == "base" else
                 f"  x base {row['ratio']:.3f} (95% {row['low']:.3f}-{row['high']:.3f}), "
                 f"faster in {row['faster_rounds']}/{row['rounds']} rounds")
        print(f"{name:10s} median {row['median_ms']:8.1f}  min {row['min_ms']:8.1f}{ratio}")
    report = {"environment": environment(), "args": vars(args), "rows": rows, "times": times}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
