"""``benchmarks/train_step.py``: the compiled row (dispatches cannot be counted there, kernels
are), and its CUDA-only profiler pass, run as far as a CPU can."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch._inductor import metrics
from torch.autograd import DeviceType

from benchmarks import train_step
from dino_fast.ops import use_backend
from dino_fast.profiling import DispatchCounter
from dino_fast.training.ema import TeacherEMA
from dino_fast.training.loss import DINOLoss
from dino_fast.training.optim import build_optimizer, get_params_groups
from dino_fast.training.step import TrainStep
from tests.training.test_compile import wrapper


def tiny_step() -> TrainStep:
    """A fresh step over two ``wrapper("sdpa")`` models (K = 64, 3 crops)."""
    torch.manual_seed(0)
    student, teacher = wrapper("sdpa"), wrapper("sdpa")
    teacher.load_state_dict(student.state_dict())
    return TrainStep(student, teacher, DINOLoss(64, 3, 0.04, 0.04, 0, 10),
                     build_optimizer("adamw", get_params_groups(student)),
                     TeacherEMA(student, teacher))


def test_compiled_configuration_runs_and_counts_kernels(monkeypatch):
    """``benchmarks/train_step.py --configs fast+compile``: compiled frames refuse to run under
    the dispatch counter, so its row counts generated kernels, not dispatches (it crashed)."""
    args = train_step.parse_args(["--device", "cpu", "--repeats", "1", "--batch", "2",
                                  "--local_crops", "1", "--global_size", "32",
                                  "--local_size", "16", "--out_dim", "64"])

    def tiny_compiled_step(args, device, cfg):
        step, calls = tiny_step(), []
        compiled = torch.compile(step._forward, fullgraph=True, backend="aot_eager")

        def forward(crops):  # stands in for inductor: 7 kernels generated at the first call
            if not calls:
                metrics.generated_kernel_count += 7
            calls.append(crops)
            return compiled(crops)
        step.forward = forward
        return step

    monkeypatch.setattr(train_step, "build_step", tiny_compiled_step)
    cfg = train_step.configurations(args, cuda=False)["fast+compile"]
    row = train_step.run_config(args, torch.device("cpu"), "fast+compile", cfg,
                                train_step.random_crops(args, torch.device("cpu")))
    assert row["ops_per_step"] is None and row["syncs_per_step"] is None
    assert row["generated_kernels"] == 7 and row["images_s"] > 0


def test_gpu_event_count_leaves_out_annotations():
    """The GPU columns of ``benchmarks/train_step.py`` (CUDA only) count the profiler's device
    activities, not the GPU-timeline copies of ``record_function`` ranges, and CUDA syncs."""
    def event(name, device, annotation=False):
        return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation)
    events = [event("aten::mm", DeviceType.CPU), event("cudaLaunchKernel", DeviceType.CPU),
              event("sm90_xmma_gemm", DeviceType.CUDA), event("Memcpy DtoH", DeviceType.CUDA),
              event("dino_fast::ema_", DeviceType.CUDA, annotation=True),
              event("cudaStreamSynchronize", DeviceType.CPU),
              event("cudaDeviceSynchronize", DeviceType.CPU)]
    assert train_step.count_gpu_events(events) == (2, 2)


def test_gpu_profiling_runs_and_reports_no_activity_as_unknown(monkeypatch, capsys):
    """The profiler pass itself, without a GPU: no GPU activity gives empty columns and a
    note, not zeros."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    assert train_step.profile_gpu_work(tiny_step(), crops, False, 10) == {}
    assert "recorded no GPU activity" in capsys.readouterr().err


class FakeSyncDebug:
    """``torch.cuda``'s sync debug mode without a GPU: ``sync()`` raises as PyTorch does
    under ``"error"`` (a device-to-host copy, an ``.item()``)."""

    def __init__(self, monkeypatch):
        self.mode = 0
        monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: self.mode)
        monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", self.set)

    def set(self, mode):
        self.mode = {"default": 0, "warn": 1, "error": 2}.get(mode, mode)

    def sync(self):
        if self.mode == 2:
            raise RuntimeError("called a synchronizing CUDA operation")


def hidden_sync_in_the_step(debug: FakeSyncDebug, calls: list):
    """A step whose operation syncs (raised from C++ on CUDA: this is the innermost frame)."""
    if debug.mode == 2:
        raise RuntimeError("called a synchronizing CUDA operation")
    calls.append(debug.mode)


def test_timed_steps_run_with_host_syncs_forbidden(monkeypatch, capsys):
    """CUDA, fast rows: the step runs under ``set_sync_debug_mode("error")``, the periodic
    check outside it; a sync inside fails the row's ``sync_check`` with the place and the
    message, and the row is timed again without the check; the mode is restored."""
    debug, calls = FakeSyncDebug(monkeypatch), []

    def clean_step():
        with train_step.forbid_host_syncs(state["guard"]):
            calls.append(debug.mode)
        debug.sync()  # the check: outside the guard

    state = {"guard": True}
    _, check = train_step.time_guarded(clean_step, state, 2, torch.device("cpu"))
    assert check == "ok" and set(calls) == {2} and debug.mode == 0

    def syncing_step():
        with train_step.forbid_host_syncs(state["guard"]):
            hidden_sync_in_the_step(debug, calls)

    calls.clear()
    ms, check = train_step.time_guarded(syncing_step, state, 2, torch.device("cpu"))
    assert check.startswith("FAILED: ") and "(hidden_sync_in_the_step)" in check, check
    assert "called a synchronizing CUDA operation" in check and "test_train_step" in check
    assert ms > 0 and calls == [0, 0, 0] and not state["guard"] and debug.mode == 0
    assert "a host sync inside the timed step" in capsys.readouterr().err


def test_a_failed_sync_check_keeps_the_results_and_exits_1(monkeypatch, tmp_path):
    """The JSON and the table are written, then the command fails, naming the row."""
    def row(args, device, name, cfg, crops):
        return {"config": name, "images_s": 10.0,
                "sync_check": "FAILED: x.py:1 (f): called a synchronizing CUDA operation"
                if name == "fast" else None}
    monkeypatch.setattr(train_step, "run_config", row)
    out = tmp_path / "rows.json"
    with pytest.raises(SystemExit, match="host sync in the timed step of fast"):
        train_step.main(["--device", "cpu", "--configs", "official,fast", "--json", str(out),
                         "--batch", "1", "--local_crops", "1", "--out_dim", "16",
                         "--global_size", "16", "--local_size", "16"])
    rows = json.loads(out.read_text())["rows"]
    assert [r["sync_check"] for r in rows] == [None, row(0, 0, "fast", 0, 0)["sync_check"]]


def test_cpu_rows_are_not_sync_checked():
    """Without CUDA nothing sets the sync debug mode (it would need a GPU)."""
    args = train_step.parse_args(["--device", "cpu", "--arch", "vit_tiny", "--batch", "1",
                                  "--local_crops", "1", "--global_size", "32",
                                  "--local_size", "16", "--out_dim", "64", "--repeats", "1"])
    cfg = train_step.configurations(args, cuda=False)["fast"]
    row = train_step.run_config(args, torch.device("cpu"), "fast", cfg,
                                train_step.random_crops(args, torch.device("cpu")))
    assert row["sync_check"] is None and row["images_s"] > 0


def official_and_fast_steps():
    """The ``official`` and ``fast`` steps of a tiny run (fp32 on the CPU), same initialisation."""
    args = train_step.parse_args(["--device", "cpu", "--arch", "vit_tiny", "--batch", "2",
                                  "--local_crops", "1", "--global_size", "32",
                                  "--local_size", "16", "--out_dim", "64"])
    configs = train_step.configurations(args, cuda=False)
    cpu = torch.device("cpu")
    return args, {name: train_step.build_step(args, cpu, configs[name])
                  for name in ("official", "fast")}


def test_official_row_clips_per_parameter_with_a_host_read_each():
    """``main_dino.py``'s ``clip_gradients``: ``if clip_coef < 1`` reads every parameter's
    coefficient on the host, so the official row's clipping syncs at least once per clipped
    parameter (it used our clipping, which reads nothing); the whole step then too."""
    args, steps = official_and_fast_steps()
    crops = train_step.random_crops(args, torch.device("cpu"))
    official = steps["official"]
    official(crops, 1, 1e-3, 0.04, 0.996, 0)  # gradients to clip
    clipped = sum(1 for p in official.student.parameters() if p.grad is not None)
    with DispatchCounter() as counter:
        official.gradient_norms(official.student, official.clip_grad)
    assert counter.total_syncs >= clipped > 0, (counter.total_syncs, clipped)
    _, syncs = train_step.count_dispatches(official, crops, True, 10)
    assert syncs >= clipped


def test_official_gradients_equal_the_fast_gradients():
    """From the same initialisation and crops, one step of each gives the same clipped
    gradients within fp32 tolerance: the official row computes what the fast one does,
    executed as ``main_dino.py`` executes it. (Gradients, not updates: Adam's first update is
    about lr x sign(gradient), which flips on gradients near zero.)"""
    args, steps = official_and_fast_steps()
    configs = train_step.configurations(args, cuda=False)
    crops = train_step.random_crops(args, torch.device("cpu"))
    for name, step in steps.items():
        torch.manual_seed(1)  # the same stochastic depth
        with use_backend(configs[name]["backend"]):
            step(crops, 1, 1e-3, 0.04, 0.996, 0)  # epoch 1: the last layer trains too
    pairs = zip(steps["official"].student.named_parameters(), steps["fast"].student.parameters())
    for (name, official), fast in pairs:
        torch.testing.assert_close(official.grad, fast.grad, rtol=1e-3, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
