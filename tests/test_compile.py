"""``torch.compile(fullgraph=True)`` traces the model, the DINO loss and the training step's
forward without graph breaks. The ``aot_eager`` backend traces exactly as inductor does (Dynamo
plus AOTAutograd) without paying for C++ code generation on a CI CPU."""
import pytest
import torch

from dino_fast.engine import TrainStep
from dino_fast.ema import TeacherEMA
from dino_fast.loss import DINOLoss
from dino_fast.models import DINOHead, MultiCropWrapper, VisionTransformer
from dino_fast.optim import build_optimizer, get_params_groups


def wrapper(attn_backend):
    backbone = VisionTransformer(patch_size=16, embed_dim=48, depth=2, num_heads=3,
                                 qkv_bias=True, attn_backend=attn_backend)
    return MultiCropWrapper(backbone, DINOHead(48, 64, hidden_dim=32, bottleneck_dim=16))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("attn_backend", ["eager", "sdpa", "triton"])
def test_multicrop_forward_backward_fullgraph(attn_backend):
    model = wrapper(attn_backend)
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(crops)
    torch.testing.assert_close(out, model(crops), atol=1e-5, rtol=1e-4)
    out.sum().backward()
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_train_step_compiles_once_across_epochs():
    torch.manual_seed(0)
    student, teacher = wrapper("sdpa"), wrapper("sdpa")
    teacher.load_state_dict(student.state_dict())
    loss_fn = DINOLoss(64, 3, 0.04, 0.07, 3, 3)  # a new teacher temperature every epoch
    step = TrainStep(student, teacher, loss_fn, build_optimizer("adamw",
                     get_params_groups(student)), TeacherEMA(student, teacher))
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    expected = step._forward(crops)
    step.forward = torch.compile(step._forward, fullgraph=True, backend="aot_eager")
    for got, want in zip(step.forward(crops), expected):
        torch.testing.assert_close(got, want)
    with torch._dynamo.config.patch(error_on_recompile=True):  # lr, temperature, momentum vary
        losses = [step(crops, epoch, 1e-3 * (epoch + 1), 0.04, 0.99)["loss"]
                  for epoch in range(3)]
    assert torch.stack(losses).isfinite().all()


def tiny_step() -> TrainStep:
    """A fresh step over two ``wrapper("sdpa")`` models (K = 64, 3 crops)."""
    torch.manual_seed(0)
    student, teacher = wrapper("sdpa"), wrapper("sdpa")
    teacher.load_state_dict(student.state_dict())
    return TrainStep(student, teacher, DINOLoss(64, 3, 0.04, 0.04, 0, 10),
                     build_optimizer("adamw", get_params_groups(student)),
                     TeacherEMA(student, teacher))


def test_benchmark_compiled_configuration_runs_and_counts_kernels(monkeypatch):
    """``benchmarks/train_step.py --configs fast+compile``: compiled frames refuse to run under
    the dispatch counter, so its row counts generated kernels, not dispatches (it crashed)."""
    from benchmarks import train_step
    args = train_step.parse_args(["--device", "cpu", "--repeats", "1", "--batch", "2",
                                  "--local_crops", "1", "--global_size", "32",
                                  "--local_size", "16", "--out_dim", "64"])

    def tiny_compiled_step(args, device, cfg):
        step = tiny_step()
        step.forward = torch.compile(step._forward, fullgraph=True, backend="aot_eager")
        return step

    monkeypatch.setattr(train_step, "build_step", tiny_compiled_step)
    cfg = train_step.configurations(args, cuda=False)["fast+compile"]
    row = train_step.run_config(args, torch.device("cpu"), "fast+compile", cfg,
                                train_step.random_crops(args, torch.device("cpu")))
    assert row["ops_per_step"] is None and row["syncs_per_step"] is None
    assert row["generated_kernels"] == 0 and row["images_s"] > 0  # aot_eager generates none


def test_benchmark_gpu_event_count_leaves_out_annotations():
    """The GPU columns of ``benchmarks/train_step.py`` (CUDA only) count the profiler's device
    activities, not the GPU-timeline copies of ``record_function`` ranges, and CUDA syncs."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks.train_step import count_gpu_events

    def event(name, device, annotation=False):
        return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation)
    events = [event("aten::mm", DeviceType.CPU), event("cudaLaunchKernel", DeviceType.CPU),
              event("sm90_xmma_gemm", DeviceType.CUDA), event("Memcpy DtoH", DeviceType.CUDA),
              event("dino_fast::ema_", DeviceType.CUDA, annotation=True),
              event("cudaStreamSynchronize", DeviceType.CPU),
              event("cudaDeviceSynchronize", DeviceType.CPU)]
    assert count_gpu_events(events) == (2, 2)


def test_benchmark_gpu_profiling_runs_and_reports_no_activity_as_unknown(monkeypatch, capsys):
    """The profiler pass itself, without a GPU: no GPU activity gives empty columns and a
    note, not zeros."""
    from benchmarks.train_step import profile_gpu_work
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    assert profile_gpu_work(tiny_step(), crops, False, 10) == (None, None)
    assert "recorded no GPU activity" in capsys.readouterr().err
