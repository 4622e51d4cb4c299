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


def test_train_step_forward_loss_fullgraph():
    torch.manual_seed(0)
    student, teacher = wrapper("sdpa"), wrapper("sdpa")
    teacher.load_state_dict(student.state_dict())
    loss_fn = DINOLoss(64, 3, 0.04, 0.04, 0, 2)
    step = TrainStep(student, teacher, loss_fn, build_optimizer("adamw",
                     get_params_groups(student)), TeacherEMA(student, teacher))
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    eager_loss = step._forward_loss(crops, 0)
    center = loss_fn.center.clone()
    loss_fn.center.zero_()
    compiled = torch.compile(step._forward_loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(crops, 0), eager_loss)
    torch.testing.assert_close(loss_fn.center, center)  # the buffer update happened in the graph
