"""The fused DINO loss (``dino_fast.ops.dino_loss``) against its reference, on every backend.

Loss, teacher mean and student gradient are compared with ``dino_loss_reference`` run in float64
on the same input values; the Triton kernel runs in its interpreter on CPU tensors here.
"""
import math

import pytest
import torch

from dino_fast.ops import use_backend
from dino_fast.ops.dino_loss import dino_loss
from dino_fast.training.loss import DINOLoss
from tests.conftest import available_backends, device_for

BACKENDS = available_backends()
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_logits(batch, ncrops, K, dtype=torch.float32, device="cpu"):
    """Student ``[ncrops*B, K]``, teacher ``[2B, K]`` and center ``[K]`` logits of DINO scale."""
    student = torch.randn(ncrops * batch, K, dtype=torch.float64) * 2
    teacher = torch.randn(2 * batch, K, dtype=torch.float64) * 2 + 0.5
    center = torch.randn(K, dtype=torch.float64) * 0.5
    return [x.to(device=device, dtype=dtype) for x in (student, teacher, center)]


def run_loss(backend, student, teacher, center, ncrops, student_temp=STUDENT_TEMP,
             teacher_temp=TEACHER_TEMP):
    """``(loss, teacher_mean, d loss / d student)`` through the public op on ``backend``."""
    student = student.detach().requires_grad_(True)
    with use_backend(backend):
        loss, teacher_mean = dino_loss(student, teacher, center, ncrops, student_temp,
                                       teacher_temp)
    loss.backward()
    return loss.detach(), teacher_mean, student.grad


def run_oracle(student, teacher, center, ncrops, student_temp=STUDENT_TEMP,
               teacher_temp=TEACHER_TEMP):
    """The same triple from the reference in float64 on the same input values."""
    return run_loss("reference", student.double().cpu(), teacher.double().cpu(),
                    center.double().cpu(), ncrops, student_temp, teacher_temp)


def assert_close(name, actual, expected, rtol, atol):
    """``torch.testing.assert_close`` in float64 that names the worst mismatching index."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (actual - expected).abs() - rtol * expected.abs()
    worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape)) if err.dim() else ()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{name}: worst index {worst}\n{m}")


def check_against_oracle(got, want, rtol=1e-5):
    """Float32 accuracy against the float64 oracle: ``rtol`` of each entry, and of the largest
    entry as the absolute floor (exp of logits ~100 carries absolute errors ~1e-5 of the max)."""
    for name, a, b in zip(("loss", "teacher_mean", "grad_student"), got, want):
        assert_close(name, a, b, rtol, rtol * b.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1000, 4097])
@pytest.mark.parametrize("batch,ncrops", [(3, 2), (2, 4), (1, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(backend, K, batch, ncrops, dtype):
    student, teacher, center = make_logits(batch, ncrops, K, dtype, device_for(backend))
    got = run_loss(backend, student, teacher, center, ncrops)
    # The kernels return float32; the reference keeps float64 inputs in float64.
    out_dtype = dtype if backend == "reference" else torch.float32
    assert got[0].dtype == out_dtype and got[1].dtype == out_dtype
    assert got[2].dtype == dtype and got[1].shape == (K,)
    # Kernels do float32 math whatever the input: float32-level tolerances against float64.
    check_against_oracle(got, run_oracle(student, teacher, center, ncrops))


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_op_matches_reference(backend):
    """``dino_fast::dino_loss_fwd`` itself (the kernel contract), reference path included."""
    student, teacher, center = make_logits(3, 4, 1000, device=device_for(backend))
    with use_backend(backend):
        got = torch.ops.dino_fast.dino_loss_fwd(student, teacher, center, 4, STUDENT_TEMP,
                                                TEACHER_TEMP, True)
    check_against_oracle(got, run_oracle(student, teacher, center, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_inputs(backend):
    """bf16 logits, float32 math: loss and mean to float32 accuracy, the gradient to one bf16
    rounding (relative 2**-8 of its largest entry)."""
    student, teacher, center = make_logits(3, 4, 1000, torch.bfloat16, device_for(backend))
    got = run_loss(backend, student, teacher, center, 4)
    want = run_oracle(student, teacher, center, 4)
    assert got[2].dtype == torch.bfloat16
    check_against_oracle(got[:2], want)
    assert_close("grad_student", got[2], want[2], 2**-8, 2**-8 * want[2].abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """A transposed student, row-strided teacher slice and strided ``[1, K]`` center."""
    batch, ncrops, K = 3, 4, 1000
    device = device_for(backend)
    student = torch.randn(K, ncrops * batch, device=device).t()  # (S, K), column stride S
    teacher = (torch.randn(2 * batch, K + 7, device=device) + 0.5)[:, 3:K + 3]  # (2B, K)
    center = torch.randn(1, 2 * K, device=device)[:, ::2]  # (1, K)
    assert not (student.is_contiguous() or teacher.is_contiguous() or center.is_contiguous())
    got = run_loss(backend, student, teacher, center, ncrops)
    check_against_oracle(got, run_oracle(student, teacher, center.reshape(-1), ncrops))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_path(backend):
    """Without grad the op skips the gradient but returns the same loss and mean."""
    student, teacher, center = make_logits(3, 4, 1000, device=device_for(backend))
    with torch.no_grad(), use_backend(backend):
        loss, teacher_mean = dino_loss(student, teacher, center, 4, STUDENT_TEMP, TEACHER_TEMP)
    want = run_oracle(student, teacher, center, 4)
    check_against_oracle((loss, teacher_mean), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_tiny_case(backend):
    """K=3, B=1, two crops, with softmaxes chosen to be simple fractions.

    Teacher probabilities q0 = (1/3, 1/3, 1/3), q1 = (1/4, 1/2, 1/4); student probabilities
    p0 = (1/4, 1/4, 1/2), p1 = (1/2, 1/4, 1/4). The two pairs:
    -q0 . log p1 = (1/3)(ln 2 + 2 ln 4) = (5/3) ln 2 and -q1 . log p0 = (7/4) ln 2,
    so the loss is their mean, (41/24) ln 2. Gradients (one pair each, times 1/(Ts*npairs*B)
    = 1/(0.5*2*1) = 1): p1 - q0 = (1/6, -1/12, -1/12), p0 - q1 = (0, -1/4, 1/4).
    Temperatures 0.5 with logits 0.5*log(prob) (plus a center the teacher is shifted by).
    """
    def logits(*probs):
        return 0.5 * torch.tensor(probs, dtype=torch.float64).log()

    device = device_for(backend)
    center = torch.full((3,), 0.3, dtype=torch.float64)
    teacher = torch.stack([logits(1, 1, 1), logits(1, 2, 1)]) + center  # (2, 3)
    student = torch.stack([logits(1, 1, 2), logits(2, 1, 1)])  # (2, 3)
    args = [x.float().to(device) for x in (student, teacher, center)]
    loss, teacher_mean, grad = run_loss(backend, *args, ncrops=2, student_temp=0.5,
                                        teacher_temp=0.5)
    assert_close("loss", loss, torch.tensor(41 / 24 * math.log(2)), 1e-6, 1e-6)
    assert_close("teacher_mean", teacher_mean,
                 torch.tensor([0.3, 0.3 + math.log(2) / 4, 0.3]), 1e-6, 1e-6)
    assert_close("grad_student", grad,
                 torch.tensor([[0, -1 / 4, 1 / 4], [1 / 6, -1 / 12, -1 / 12]]), 1e-6, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dino_loss_module_over_steps(backend):
    """``DINOLoss`` for 4 steps through the teacher-temperature warm-up, the center evolving
    from the teacher means: losses, gradients and centers follow the float64 reference."""
    batch, ncrops, K = 2, 4, 1000
    device = device_for(backend)
    modules = {name: DINOLoss(K, ncrops, 0.04, 0.07, warmup_teacher_temp_epochs=2, nepochs=4)
               for name in (backend, "oracle")}
    modules["oracle"].double()
    modules[backend].to(device)
    for epoch in range(4):
        student, teacher, _ = make_logits(batch, ncrops, K, device=device)
        results = {}
        for name, module in modules.items():
            s = (student.double().cpu() if name == "oracle" else student.clone()).requires_grad_()
            t = teacher.double().cpu() if name == "oracle" else teacher
            with use_backend("reference" if name == "oracle" else backend):
                loss = module(s, t, epoch)
            loss.backward()
            results[name] = (loss.detach(), s.grad, module.center)
        for field, got, want in zip(("loss", "grad", "center"), results[backend],
                                    results["oracle"]):
            assert_close(f"step {epoch} {field}", got, want, 1e-5, 1e-5 * want.abs().max().item())
    assert modules["oracle"].center.abs().max() > 0.1  # the center really moved


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_shapes_raise(backend):
    student, teacher, center = make_logits(2, 4, 100, device=device_for(backend))
    cases = [
        ((student, teacher, center, 1), "ncrops >= 2"),
        ((student, teacher[:, :99], center, 4), "K differs"),
        ((student, teacher, center[:99], 4), "K differs"),
        ((student[:-1], teacher, center, 4), "student rows"),
        ((student, teacher[:3], center, 4), "teacher rows"),
        ((student[0], teacher, center, 4), "2-D"),
    ]
    with use_backend(backend):
        for args, message in cases:
            with pytest.raises(ValueError, match=message):
                dino_loss(*args, STUDENT_TEMP, TEACHER_TEMP)
            with pytest.raises(ValueError, match=message):  # the raw op checks too
                torch.ops.dino_fast.dino_loss_fwd(*args, STUDENT_TEMP, TEACHER_TEMP, False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need_grad", [True, False])
def test_opcheck(backend, need_grad):
    student, teacher, center = make_logits(3, 4, 37, device=device_for(backend))
    with use_backend(backend):
        torch.library.opcheck(torch.ops.dino_fast.dino_loss_fwd,
                              (student.requires_grad_(need_grad), teacher, center, 4,
                               STUDENT_TEMP, TEACHER_TEMP, need_grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    """The op traces without graph breaks (fake kernel and autograd); the compiled graph calls
    the real kernel at run time. ``aot_eager`` keeps this fast on CPU: it exercises the same
    tracing as inductor, and the op is opaque to inductor anyway."""
    student, teacher, center = make_logits(2, 4, 333, device=device_for(backend))

    def step(s, t, c):
        loss, teacher_mean = dino_loss(s, t, c, 4, STUDENT_TEMP, TEACHER_TEMP)
        return loss * 2, teacher_mean

    torch._dynamo.reset()  # the backend choice is folded at trace time
    with use_backend(backend):
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        s = student.clone().requires_grad_(True)
        loss, teacher_mean = compiled(s, teacher, center)
        loss.backward()
    want = run_oracle(student, teacher, center, 4)
    check_against_oracle((loss / 2, teacher_mean, s.grad / 2), want)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [4097, 65536])
def test_low_precision_cuda(dtype, K):
    """On a GPU: the kernel's error against float64 is at most twice the error of the reference
    run on the same half-precision inputs (plus a float32 rounding floor)."""
    student, teacher, center = make_logits(8, 12, K, dtype, "cuda")
    got = run_loss("triton", student, teacher, center, 12)
    ref = run_loss("reference", student, teacher, center, 12)
    truth = run_oracle(student, teacher, center, 12)
    for name, g, r, t in zip(("loss", "teacher_mean", "grad_student"), got, ref, truth):
        g, r, t = g.double().cpu(), r.double().cpu(), t.double().cpu()
        floor = 1e-5 * t.abs().max().item()
        assert (g - t).abs().max() <= 2 * (r - t).abs().max() + floor, name
