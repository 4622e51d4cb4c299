"""``torch.compile(fullgraph=True)`` traces the model, the DINO loss and the training step's
forward without graph breaks. The ``aot_eager`` backend traces exactly as inductor does (Dynamo
plus AOTAutograd) without paying for C++ code generation on a CI CPU."""
import pytest
import torch

from dino_fast.models import DINOHead, MultiCropWrapper, VisionTransformer
from dino_fast.training.ema import TeacherEMA
from dino_fast.training.loss import DINOLoss
from dino_fast.training.optim import build_optimizer, get_params_groups
from dino_fast.training.step import TrainStep


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



@pytest.mark.parametrize("pack", [None, "varlen"])
def test_inductor_step_equals_eager_and_compiles_once(pack):
    """``--compile`` as training runs it: inductor (C++ code on the CPU), not ``aot_eager``,
    unpacked and packed varlen. After the first step nothing recompiles as the epoch, lr, weight
    decay and momentum change (``error_on_recompile``), and three steps give the eager step's
    losses and weights: SGD, linear in the gradients, keeps inductor's reordered fp32 sums at
    rounding size (1e-5)."""
    from tests.training.test_train_step import make_crops, make_step, state
    eager, compiled = make_step(pack, "sgd"), make_step(pack, "sgd", compile=True)
    schedule = [(0, 0.1, 0.04, 0.9), (1, 0.05, 0.05, 0.95), (1, 0.02, 0.06, 0.99)]
    for it, (epoch, lr, wd, momentum) in enumerate(schedule):
        with torch._dynamo.config.patch(error_on_recompile=it > 0):
            got = compiled(make_crops(it), epoch, lr, wd, momentum, it)["loss"]
        want = eager(make_crops(it), epoch, lr, wd, momentum, it)["loss"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got, want = state(compiled), state(eager)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
