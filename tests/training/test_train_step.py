"""The fast training step (``dino_fast.training.step``): packed crops equal to unpacked, no host
sync per steady-state step, a non-finite step that changes no weight and is reported by the check,
the fused-optimizer choice, and the compiled forward traced with ``fullgraph=True``."""
import pytest
import torch

from dino_fast.models import DINOHead, MultiCropWrapper, VisionTransformer
from dino_fast.models.packed import PackedMultiCropWrapper
from dino_fast.profiling.dispatch_count import DispatchCounter
from dino_fast.training.ema import TeacherEMA
from dino_fast.training.loss import DINOLoss
from dino_fast.training.optim import build_optimizer, fused_supported, get_params_groups
from dino_fast.training.step import NonFiniteLossError, TrainStep

K, NCROPS = 24, 4


def backbone_and_head(drop_path_rate=0.0):
    torch.manual_seed(0)
    backbone = VisionTransformer(img_size=[32], patch_size=8, embed_dim=48, depth=2,
                                 num_heads=3, qkv_bias=True, drop_path_rate=drop_path_rate,
                                 attn_backend="sdpa")
    return backbone, DINOHead(48, K, hidden_dim=32, bottleneck_dim=16)


def make_step(pack=None, optimizer="adamw", drop_path_rate=0.0, compile=False):
    """A TrainStep on a tiny ViT; ``pack`` None (unpacked) or a packed attention mode."""
    backbone, head = backbone_and_head(drop_path_rate)
    student = (MultiCropWrapper(backbone, head) if pack is None
               else PackedMultiCropWrapper(backbone, head, pack))
    teacher = MultiCropWrapper(*backbone_and_head())
    teacher.load_state_dict(student.state_dict())
    ema = TeacherEMA(student, teacher)
    loss = DINOLoss(K, NCROPS, 0.04, 0.04, 0, 2)
    opt = build_optimizer(optimizer, get_params_groups(student))
    return TrainStep(student, teacher, loss, opt, ema, clip_grad=0.5, freeze_last_layer=0,
                     compile=compile)


def make_crops(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return ([torch.randn(2, 3, 32, 32, generator=gen) for _ in range(2)]
            + [torch.randn(2, 3, 16, 16, generator=gen) for _ in range(NCROPS - 2)])


def state(step):
    return {**{f"student.{k}": v.clone() for k, v in step.student.state_dict().items()},
            **{f"teacher.{k}": v.clone() for k, v in step.teacher.state_dict().items()},
            "center": step.dino_loss.center.clone()}


def assert_states_close(got, want, **tolerances):
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, n=name: f"{n}: {m}",
                                   **tolerances)


@pytest.mark.parametrize("mode", ["sdpa_split", "varlen"])
def test_packed_step_equals_unpacked(mode):
    """Drop path off: the same loss and the same student, teacher and center after two steps
    (SGD: linear in the gradients, so fp32 rounding differences stay at rounding size)."""
    unpacked, packed = make_step(None, "sgd"), make_step(mode, "sgd")
    for it in range(2):
        want = unpacked(make_crops(it), 0, 0.1, 0.04, 0.9, it)["loss"]
        got = packed(make_crops(it), 0, 0.1, 0.04, 0.9, it)["loss"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert_states_close(state(packed), state(unpacked), rtol=1e-5, atol=1e-6)
    untrained = state(make_step(mode, "sgd"))["student.backbone.pos_embed"]
    assert not torch.equal(state(packed)["student.backbone.pos_embed"], untrained)


@pytest.mark.parametrize("pack", [None, "sdpa_split"])
def test_no_host_sync_in_the_steady_state_step(pack):
    """The fast configuration (fused AdamW, fused loss and EMA, drop path on) reads nothing
    back to the host once warm; the official per-step check would (the counter sees it)."""
    step, crops = make_step(pack, drop_path_rate=0.1), make_crops()
    for it in range(2):  # warm-up: optimizer state, first-call caches
        step(crops, 0, 1e-3, 0.04, 0.99, it)
    with DispatchCounter() as counter:
        for it in range(2, 5):
            out = step(crops, 0, 1e-3, 0.04, 0.99, it)
    assert counter.total_ops > 0 and counter.total_syncs == 0, dict(counter.syncs)
    assert sorted(out) == ["loss"] and out["loss"].dim() == 0
    with DispatchCounter() as counter:
        step.check_finite()
    assert counter.total_syncs >= 1


def test_non_finite_step_changes_nothing_and_is_reported_at_the_check():
    step = make_step("sdpa_split")
    step(make_crops(0), 0, 1e-3, 0.04, 0.99, 0)
    step.check_finite()  # a finite step: nothing to report
    before = state(step)
    bad = make_crops(1)
    bad[3][0, 0, 0, 0] = float("nan")  # one local crop pixel
    step(bad, 1, 1e-3, 0.04, 0.99, 7)
    step(make_crops(2), 1, 1e-3, 0.04, 0.99, 8)  # after a bad one, skipped too
    assert_states_close(state(step), before, rtol=0, atol=0)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 7 \(epoch 1\)") as info:
        step.check_finite()
    assert "at step 8, the latest" in str(info.value) and "(t0,s1)=" in str(info.value)


def test_fused_optimizer_where_pytorch_has_it():
    """Fused on the CPU (and CUDA), foreach elsewhere; the official groups either way."""
    model = MultiCropWrapper(*backbone_and_head())
    groups = get_params_groups(model)
    assert fused_supported(groups)
    for name in ("adamw", "sgd"):
        opt = build_optimizer(name, groups)
        assert opt.defaults["fused"] and not opt.defaults["foreach"], name
        assert [g["weight_decay"] for g in opt.param_groups][1] == 0.0
    meta = [{"params": [torch.nn.Parameter(torch.zeros(2, device="meta"))]}]
    assert not fused_supported(meta)
    opt = build_optimizer("adamw", meta)
    assert opt.defaults["foreach"] and not opt.defaults["fused"]
    mixed = [{"params": [torch.nn.Parameter(torch.zeros(2)),
                         torch.nn.Parameter(torch.zeros(2, device="meta"))]}]
    assert not fused_supported(mixed) and not fused_supported([{"params": []}])


def test_fused_adamw_equals_the_foreach_one():
    """The fused kernel gives the official AdamW update with the official groups (same
    gradients in, three steps, lr and weight decay changed per step as the schedules do)."""
    models = [MultiCropWrapper(*backbone_and_head()) for _ in range(2)]
    fused = build_optimizer("adamw", get_params_groups(models[0]))
    foreach = torch.optim.AdamW(get_params_groups(models[1]), foreach=True)
    gen = torch.Generator().manual_seed(0)
    for it in range(3):
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        for opt in (fused, foreach):
            opt.param_groups[0].update(lr=1e-3 * (it + 1), weight_decay=0.04 * (it + 1))
            opt.param_groups[1]["lr"] = 1e-3 * (it + 1)
            opt.step()
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("pack", [pytest.param(None, marks=pytest.mark.slow), "sdpa_split",
                                  pytest.param("varlen", marks=pytest.mark.slow)])
def test_compiled_forward_is_one_graph(pack):
    """``--compile`` traces the teacher and (packed) student forward with fullgraph=True
    (aot_eager: Dynamo and AOTAutograd as inductor, without C++ code generation), and the
    step does not recompile as the epoch, lr, weight decay and momentum change. About 30 s
    each on a CI core: the unpacked forward is covered by test_compile.py and the varlen
    forward's trace by test_packed.py, so those two run with the slow tests."""
    torch._dynamo.reset()
    try:
        step = make_step(pack)
        want = [out.detach() for out in step._forward(make_crops())]
        step.forward = torch.compile(step._forward, fullgraph=True, backend="aot_eager")
        got = step.forward(make_crops())
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        with torch._dynamo.config.patch(error_on_recompile=True):
            step(make_crops(), 0, 1e-3, 0.04, 0.99, 0)
            step(make_crops(2), 1, 2e-3, 0.05, 0.995, 1)
    finally:
        torch._dynamo.reset()


def test_compile_mode_and_scope_are_checked():
    step = make_step()
    parts = (step.student, step.teacher, step.dino_loss, step.optimizer, step.ema)
    with pytest.raises(ValueError, match="compile mode 'fast' is not one of"):
        TrainStep(*parts, compile=True, compile_mode="fast")
    with pytest.raises(ValueError, match="compile scope 'model' is not one of"):
        TrainStep(*parts, compile=True, compile_scope="model")
    with pytest.raises(ValueError, match="FSDP2's hooks cannot be traced"):
        TrainStep(*parts, compile=True, compile_scope="forward", sharded=True)


def test_training_stops_at_the_check_naming_the_first_non_finite_step(tmp_path, capsys):
    """Through ``python -m dino_fast.train``: lr 1e38 makes step 1 non-finite; with
    ``--check_every 3`` the loop notices after step 2, names step 1, and writes nothing."""
    from tests._training import make_images, run_in_process
    data, out = make_images(tmp_path / "images", 8), tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_in_process("--data_path", data, "--batch_size_per_gpu", 2, "--epochs", 1,
                       "--lr", "1e38", "--check_every", 3, "--output_dir", out)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 1 (epoch 0)" in err and "at step 2, the latest" in err
    assert not (out / "checkpoint.pth").exists()


def test_plain_progress_lines_show_the_loss_from_the_first_line(tmp_path, capsys):
    """In a log (stderr not a terminal) the first progress line of an epoch comes before the
    first ``--check_every`` step: the epoch's first step is read too, so no line lacks the loss."""
    from tests._training import make_images, run_in_process
    data = make_images(tmp_path / "images", 8)
    run_in_process("--data_path", data, "--batch_size_per_gpu", 2, "--epochs", 1,
                   "--check_every", 10, "--output_dir", tmp_path / "out")
    lines = [line for line in capsys.readouterr().err.splitlines() if ": step " in line]
    assert len(lines) == 4, lines  # 4 steps, a tenth of the epoch is one step
    assert all(", loss " in line and ", img_s " in line for line in lines), lines
