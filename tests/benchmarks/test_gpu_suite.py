"""``python -m benchmarks.gpu_suite``: its dry run on the CPU (every stage, tiny shapes), the
isolation of failing and hanging commands, and the pieces that read results."""
import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import gpu_suite
from benchmarks.common import format_table
from benchmarks.gpu_suite import main as suite_main
from benchmarks.gpu_suite import report
from benchmarks.suite_runner import Job, JobResult, parse_tables, read_rows, run_job
from benchmarks.train_parity import compare_runs, images_per_second


def test_dry_run_runs_every_stage_and_writes_the_report(tmp_path):
    result = suite_main(["--dry-run", "--out", str(tmp_path)])
    failed = [job for job in result["commands"] if job["status"] != "ok"]
    assert not failed, failed
    stages = result["stages"]
    assert list(stages) == ["smoke", "headline", "ops", "kernel tests", "inference", "training"]
    order = [job["job"] for job in result["commands"]]
    assert order.index("official") < order.index("attention") < order.index("kernel-tests")
    checks = stages["smoke"]
    smoke = next(row for row in checks if row["check"] == "kernel tests")
    assert smoke["passed"] == 1 and smoke["failed"] == 0
    tests = stages["kernel tests"][0]
    assert tests["passed"] == 2 and tests["failed"] == 0
    if importlib.util.find_spec("xdist"):  # the dev extra has it: the tests ran on 2 workers
        log = next(job["log"] for job in result["commands"] if job["job"] == "kernel-tests")
        assert " -n 2 " in Path(log).read_text(encoding="utf-8").splitlines()[0]
    assert [row["verdict"] for row in checks] == ["pass"] * len(checks) and len(checks) == 2
    ops = {(row["op"].split()[0], row["provider"]) for row in stages["ops"]}
    assert {("attention", "sdpa"), ("attention_varlen", "sdpa per crop size"),
            ("dino_loss", "reference"), ("ema_", "_foreach_lerp_")} <= ops
    configs = [row["config"] for row in stages["headline"]]
    assert {"official", "fast"} <= set(configs)
    loader_rows = [row for row in stages["training"] if "loader" in row["config"]]
    assert loader_rows and all(row["images/s"] > 0 for row in loader_rows)
    assert any(row["backend"].startswith("onnxruntime fp32") for row in stages["inference"])
    text = Path(result["path"]).read_text(encoding="utf-8")
    assert "## Commands" in text and "## inference" in text
    assert os.path.exists(tmp_path / "results.jsonl")
    saved = json.loads(Path(result["path"]).with_suffix(".json").read_text(encoding="utf-8"))
    assert saved["stages"].keys() == stages.keys()


def test_failing_and_hanging_commands_are_reported_not_raised(tmp_path, monkeypatch):
    sleeper = ["-n", "1", "-r", "1", "import time; time.sleep(60)"]
    hung = run_job(Job("hang", "timeit", sleeper, 1), 1.5, str(tmp_path / "a.log"), False)
    assert hung.status.startswith("timeout") and hung.seconds < 30
    (tmp_path / "suite_hang.py").write_text("import time\ntry:\n    time.sleep(60)\n"
                                            "except Exception:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    hung = run_job(Job("hang", "suite_hang", [], 1), 1.5, str(tmp_path / "b.log"), True)
    assert hung.status.startswith("timeout") and hung.seconds < 30
    bad = run_job(Job("bad", "benchmarks.ops", ["--ops", "nope"], 1), 60,
                  str(tmp_path / "c.log"), True)
    assert bad.status == "failed (exit 2)" and "unknown ops" in bad.output()
    crash = run_job(Job("crash", "json.tool", [str(tmp_path / "missing.json")], 1), 60,
                    str(tmp_path / "d.log"), False)
    assert crash.status.startswith("failed") and sys.argv[0] != "json.tool"
    jobs = [{"stage": "ops", "job": r.name, "status": r.status, "seconds": r.seconds,
             "log": r.log} for r in (bad, crash)]
    text = report(SimpleNamespace(dry=True, out=str(tmp_path), jobs=jobs, stages={}),
                  {"device": "cpu"}, 10, 5)
    assert "### ops / bad: failed (exit 2)" in text and "unknown ops" in text  # the log's tail
    assert "missing.json" in text


def test_printed_tables_and_json_read_back(tmp_path):
    rows = [{"config": "fast", "images/s": 12.5, "MFU %": None}, {"config": "official"}]
    text = "noise\n" + format_table(rows, ["config", "images/s", "MFU %"], "t") + "\nmore"
    parsed = [{"config": "fast", "images/s": 12.5, "MFU %": None},
              {"config": "official", "images/s": None, "MFU %": None}]
    assert parse_tables(text) == parsed
    path = tmp_path / "rows.json"
    assert read_rows(str(path), text) == parsed  # no JSON written: the printed table
    path.write_text(json.dumps({"rows": rows[:1]}))
    assert read_rows(str(path), text) == rows[:1]
    path.write_text(json.dumps(rows))
    assert read_rows(str(path), text) == rows
    path.write_text(json.dumps({"something": "else"}))
    assert read_rows(str(path), text) == parsed
    bar = "epoch 0/2: 1/1 [img_s=3.0]\repoch 1/2: 1/1 [loss=5, img_s=7.5]\n"
    assert images_per_second(bar, epoch=1) == 7.5 and images_per_second(bar, epoch=3) is None
    lines = ("epoch 0/2: step 1/1 (100%), img_s 3.0, 0m01s\n"  # plain lines, stderr not a tty
             "epoch 1/2: step 1/1 (100%), loss 5.0000, img_s 7.5, 0m01s\n")
    assert images_per_second(lines, epoch=1) == 7.5 and images_per_second(lines, epoch=0) == 3.0


def _fake_run(folder, losses, step1, step2, center):
    folder.mkdir()
    (folder / "log.txt").write_text("".join(json.dumps({"train_loss": x}) + "\n" for x in losses))
    for name, student in (("checkpoint0000.pth", step1), ("checkpoint.pth", step2)):
        torch.save({"student": {"w": student}, "dino_loss": {"center": center}}, folder / name)


def test_parity_check_fails_a_wrong_update(tmp_path):
    w = torch.randn(1000)
    update = torch.randn(1000) * 1e-4
    center = torch.randn(1, 8)
    _fake_run(tmp_path / "ref", [5.0, 4.9], w, w + update, center)
    _fake_run(tmp_path / "same", [5.0, 4.9], w, w + update * (1 + 1e-3), center)
    _fake_run(tmp_path / "wrong", [5.0, 4.9], w, w - update, center)
    assert compare_runs(tmp_path / "ref", tmp_path / "same", "fp32")["verdict"] == "pass"
    wrong = compare_runs(tmp_path / "ref", tmp_path / "wrong", "fp32")
    assert wrong["verdict"].startswith("FAIL") and wrong["update rel diff"] > 1.9


class Parsed(Exception):
    """Raised by the patched ``parse_args`` once a command line has parsed."""


def gpu_plan(tmp_path, monkeypatch) -> list[Job]:
    """The commands the suite would run on a GPU, none run: the runners' ``--help`` runs for
    real (the plan depends on the flags they have), the corpus "succeeds" (the loader runs
    follow it), every other command "fails" at once."""
    jobs = []

    def fake_run(self, stage, job, in_process=None):
        log = tmp_path / f"{len(jobs)}-{job.name}.log"
        if job.args == ["--help"]:
            return run_job(job, 120, str(log), in_process=False)
        jobs.append(job)
        log.write_text("")
        return JobResult(job.name, "ok" if job.name == "corpus" else "failed (not run)", 0.0,
                         str(log))
    monkeypatch.setattr(gpu_suite.Suite, "run", fake_run)
    suite = gpu_suite.Suite(SimpleNamespace(out=str(tmp_path), dry_run=False, budget=540))
    gpu_suite.run_stages(suite, {"onnxruntime providers": ["CUDAExecutionProvider"]})
    return jobs


def test_every_command_of_the_gpu_plan_parses(tmp_path, monkeypatch):
    """The dry run uses other shapes and skips some commands (compile rows, fp16 ONNX): the
    commands a GPU run would get are checked here for their flags, so that they cannot rot
    between the rare GPU windows either (the selected tests exist; every command line parses,
    and ``dino_fast.train``'s flags are in range)."""
    from dino_fast.cli.flags import check_train_args
    jobs = gpu_plan(tmp_path, monkeypatch)
    names = {job.name for job in jobs}
    assert {"smoke-tests", "kernel-tests", "official", "fast", "compile", "compile-blocks",
            "reduce-overhead", "packed", "loader-torch", "inference"} <= names, names
    fast = next(job for job in jobs if job.name == "fast")
    assert "--gpu_counts" in fast.args  # the launch counts where the goals are set
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    for job in jobs:
        argv = [str(arg) for arg in job.args]
        if job.module == "pytest":
            selected = [arg.split("::")[0] for arg in argv if ".py" in arg]
            assert selected and all(os.path.exists(path) for path in selected), argv
            continue
        with pytest.raises(Parsed) as parsed:
            importlib.import_module(job.module).main(argv)
        if job.module == "dino_fast.train":
            check_train_args(parsed.value.args[0])


def test_plan_prints_the_headline_first_within_the_budget(tmp_path, capsys):
    """``--plan`` runs nothing (no log but the runner's ``--help``) and lists the batch-64
    training-step rows, compiled and CUDA graphs among them, before the ops and the full kernel
    tests; the shares add up to no more than the budget."""
    planned = suite_main(["--plan", "--budget", "540", "--out", str(tmp_path)])["planned"]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(planned) + 1 and "in all" in lines[-1]
    names = [job.name for _, job, _ in planned]
    assert names[:3] == ["smoke-tests", "reference", "fast-bf16-default"]
    headline = ["official", "fast", "compile", "compile-blocks", "reduce-overhead", "packed"]
    assert names[3:9] == headline and names.index("packed") < names.index("attention")
    assert names.index("attention") < names.index("kernel-tests")
    for _, job, _ in planned[3:9]:
        assert job.module == "benchmarks.train_step"
        assert job.args[job.args.index("--batch") + 1] == "64"
        assert job.args[job.args.index("--precision") + 1] == "bf16"
    modes = [job.args[job.args.index("--compile_mode") + 1] for _, job, _ in planned
             if "--compile_mode" in job.args]
    assert modes == ["default", "default", "reduce-overhead"]
    blocks = planned[6][1].args
    assert blocks[blocks.index("--compile_scope") + 1] == "blocks"
    assert sum(seconds for _, _, seconds in planned) <= 540
    assert (tmp_path / "results.jsonl").read_text() == ""  # nothing ran
    assert not os.path.exists(tmp_path / "headline" / "official.json")
    half = suite_main(["--plan", "--budget", "270", "--out", str(tmp_path)])["planned"]
    assert sum(s for _, _, s in half) == pytest.approx(sum(s for _, _, s in planned) / 2)
