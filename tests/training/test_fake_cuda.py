"""The CUDA code paths of a training step on fake CUDA tensors (PyTorch's ``FakeTensorMode``),
without a GPU: the student and teacher forwards (unpacked, and packed with both pack attentions;
SDPA and our Triton attention, whose CUDA dispatch then runs its fake kernel), the fused DINO loss
with its center update, the flat-buffer teacher EMA, and the gradient norms with the fused
clipping. A CPU tensor meeting a CUDA one fails here, and so does any host read (``.item()`` and
friends raise on fake tensors), instead of in the first GPU window.

Limits found: ``torch.autocast("cuda")`` turns itself off without a GPU (so this runs fp32, and
the bf16 paths stay for a GPU), and the autograd engine needs a CUDA context for the backward
(``hasPrimaryContext``), so the backward and the optimizer are not covered here."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dino_fast.models import DINOHead, MultiCropWrapper, build_vit
from dino_fast.models.packed import PACK_ATTENTION, PackedMultiCropWrapper
from dino_fast.training.ema import TeacherEMA
from dino_fast.training.loss import DINOLoss
from dino_fast.training.optim import gradient_norms

K, LOCAL = 256, 2


def wrapper(attn_backend: str, pack: str | None) -> MultiCropWrapper:
    parts = (build_vit("vit_tiny", 16, attn_backend=attn_backend), DINOHead(192, K))
    return PackedMultiCropWrapper(*parts, pack) if pack else MultiCropWrapper(*parts)


@pytest.mark.parametrize("attn_backend", ["sdpa", "triton"])
@pytest.mark.parametrize("pack", [None, *PACK_ATTENTION])
def test_a_step_without_its_backward_runs_on_fake_cuda(attn_backend, pack):
    student, teacher = wrapper(attn_backend, pack), wrapper(attn_backend, None)
    loss = DINOLoss(K, 2 + LOCAL, 0.04, 0.04, 0, 2)
    with FakeTensorMode(allow_non_fake_inputs=True):  # the real modules become fake CUDA ones
        student, teacher = student.to_empty(device="cuda"), teacher.to_empty(device="cuda")
        loss = loss.to_empty(device="cuda")
        crops = ([torch.empty(2, 3, 32, 32, device="cuda")] * 2
                 + [torch.empty(2, 3, 16, 16, device="cuda")] * LOCAL)
        student_out, teacher_out = student(crops), teacher(crops[:2])
        value = loss(student_out, teacher_out, 0)
        TeacherEMA(student, teacher).update(0.996)
        assert student_out.shape == (2 * (2 + LOCAL), K) and student_out.device.type == "cuda"
        assert value.device.type == loss.center.device.type == "cuda"
        with pytest.raises(Exception, match="_local_scalar_dense|[Dd]ata.dependent"):
            value.item()  # the mode catches host reads


@pytest.mark.parametrize("clip", [0.0, 3.0])
def test_gradient_norms_and_clipping_run_on_fake_cuda(clip):
    """The per-parameter norms and the fused clipping on CUDA gradients: the norms stay on the
    device (one per gradient) and nothing is read on the host."""
    model = wrapper("sdpa", None)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cuda")
        for p in model.parameters():
            p.grad = torch.empty_like(p)
        norms = gradient_norms(model, clip)
        assert norms.device.type == "cuda"
        assert norms.shape == (sum(1 for _ in model.parameters()),)
