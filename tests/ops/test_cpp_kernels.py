"""What is specific to the C++ CPU kernels (``dino_fast._C`` through ``dino_fast.ops._cpp``).

The backend-parametrised op tests (``test_dino_loss.py``, ``test_ema.py``) cover the contract on
every backend; here: odd and large shapes against a float64 oracle, bfloat16 and mixed-dtype
inputs, underflowing and NaN logits, thread-count independence and its wiring from
``torch.get_num_threads()``, and the buffer checks of the raw extension.
"""
import pytest
import torch

from dino_fast.ops import _backend, _cpp
from dino_fast.ops.dino_loss import _reference_fwd, dino_loss_reference
from dino_fast.ops.ema import ema_reference

_C = pytest.importorskip("dino_fast._C", reason="the C++ kernels were not built")

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


def make_logits(batch, ncrops, k, dtype=torch.float32, scale=2.0):
    """Student ``[ncrops*B, K]``, teacher ``[2B, K]`` and center ``[K]`` logits."""
    student = torch.randn(ncrops * batch, k, dtype=torch.float64) * scale
    teacher = torch.randn(2 * batch, k, dtype=torch.float64) * scale + 0.5
    center = torch.randn(k, dtype=torch.float64) * 0.5
    return student.to(dtype), teacher.to(dtype), center.float()


def cpp(student, teacher, center, ncrops, need_grad=True):
    """``(loss, teacher_mean, grad)`` of the C++ kernel (the health outputs are tested in
    ``test_loss_health.py``)."""
    return _cpp.dino_loss_fwd(student, teacher, center, ncrops, STUDENT_TEMP, TEACHER_TEMP,
                              need_grad)[:3]


def oracle(student, teacher, center, ncrops):
    """The reference contract in float64 on the same input values."""
    return _reference_fwd(student.double(), teacher.double(), center.double(), ncrops,
                          STUDENT_TEMP, TEACHER_TEMP, True)


def assert_close(name, actual, expected, rtol, atol):
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs() - rtol * expected.abs()
    worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape)) if err.dim() else ()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{name}: worst index {worst}\n{m}")


@pytest.mark.parametrize("k", [1, 3, 37, 4097])
@pytest.mark.parametrize("batch,ncrops", [(1, 2), (5, 3), (3, 7)])
def test_odd_shapes_match_float64_oracle(k, batch, ncrops):
    """Loss, teacher mean and gradient to float32 accuracy (rtol 1e-5, atol 1e-6); K = 1 is the
    degenerate softmax (loss and gradient exactly 0)."""
    student, teacher, center = make_logits(batch, ncrops, k)
    got, want = cpp(student, teacher, center, ncrops), oracle(student, teacher, center, ncrops)
    for name, a, b in zip(("loss", "teacher_mean", "grad"), got, want):
        assert_close(name, a, b, 1e-5, 1e-6)
    if k == 1:
        assert got[0].item() == 0 and not got[2].any()


def test_large_odd_k_error_within_twice_the_float32_reference():
    """K = 65537 (not a multiple of any vector width or block): against float64, the kernel's
    error is at most twice the float32 reference's, plus a float32 rounding floor."""
    student, teacher, center = make_logits(2, 4, 65537)
    got = cpp(student, teacher, center, 4)
    ref = _reference_fwd(student, teacher, center, 4, STUDENT_TEMP, TEACHER_TEMP, True)
    truth = oracle(student, teacher, center, 4)
    for name, g, r, t in zip(("loss", "teacher_mean", "grad"), got, ref, truth):
        g, r, t = g.double(), r.double(), t.double()
        floor = 1e-6 * t.abs().max().item()
        assert (g - t).abs().max() <= 2 * (r - t).abs().max() + floor, name


def test_extreme_logits_underflow_like_the_reference():
    """Logits spanning thousands of temperature units: most exponentials underflow to 0 (the
    kernel flushes below e^-87), the results still match float64."""
    student, teacher, center = make_logits(2, 4, 1000, scale=30.0)
    got, want = cpp(student, teacher, center, 4), oracle(student, teacher, center, 4)
    for name, a, b in zip(("loss", "teacher_mean", "grad"), got, want):
        assert_close(name, a, b, 1e-5, 1e-5)


def test_nan_logits_give_nan_loss():
    """A NaN propagates to the loss (as in the reference), never a silent finite number."""
    student, teacher, center = make_logits(2, 4, 100)
    student[5, 17] = float("nan")
    assert dino_loss_reference(student, teacher, center, 4, STUDENT_TEMP,
                               TEACHER_TEMP)[0].isnan()
    assert cpp(student, teacher, center, 4)[0].isnan()


@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float32])
def test_bfloat16_student_is_float32_math_rounded_once(teacher_dtype):
    """bf16 is read exactly and the math is float32, so the bf16 gradient is the float32 kernel's
    gradient (on the same values) rounded to nearest even, bit for bit; loss and mean equal."""
    student, teacher, center = make_logits(3, 4, 1001, torch.bfloat16)
    teacher = teacher.to(teacher_dtype)
    loss, mean, grad = cpp(student, teacher, center, 4)
    loss32, mean32, grad32 = cpp(student.float(), teacher.float(), center, 4)
    assert grad.dtype == torch.bfloat16 and mean.dtype == torch.float32
    assert torch.equal(loss, loss32) and torch.equal(mean, mean32)
    assert torch.equal(grad, grad32.to(torch.bfloat16))


def test_bfloat16_teacher_with_float32_student():
    student, teacher, center = make_logits(3, 4, 1001)
    teacher = teacher.bfloat16()
    got, want = cpp(student, teacher, center, 4), oracle(student, teacher, center, 4)
    assert got[2].dtype == torch.float32
    for name, a, b in zip(("loss", "teacher_mean", "grad"), got, want):
        assert_close(name, a, b, 1e-5, 1e-6)


def test_float16_input_is_converted_and_gradient_returned_in_float16():
    student, teacher, center = make_logits(2, 4, 333, torch.float16)
    loss, _, grad = cpp(student, teacher, center, 4)
    want = oracle(student, teacher, center, 4)
    assert grad.dtype == torch.float16
    assert_close("loss", loss, want[0], 1e-5, 1e-6)
    assert_close("grad", grad, want[2], 2**-10, 1e-4)


def test_no_grad_returns_empty_gradient_and_same_loss():
    student, teacher, center = make_logits(3, 4, 500)
    with_grad, without = cpp(student, teacher, center, 4), cpp(student, teacher, center, 4, False)
    assert without[2].shape == (0,)
    assert torch.equal(with_grad[0], without[0]) and torch.equal(with_grad[1], without[1])


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_results_do_not_depend_on_the_thread_count(restore_threads):
    """Rows are independent and summed in a fixed order: bitwise equal for 1, 2 and 3 threads."""
    student, teacher, center = make_logits(5, 3, 4099)
    teacher_buf, student_buf = torch.randn(300_001), torch.randn(300_001)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        ema_teacher = teacher_buf.clone()
        _cpp.ema_(ema_teacher, student_buf, torch.tensor(0.99))
        results.append((*cpp(student, teacher, center, 3), ema_teacher))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_thread_count_comes_from_torch(monkeypatch, restore_threads):
    """The adapters pass ``torch.get_num_threads()`` to the kernels at each call."""
    seen = []

    class Recorder:
        def dino_loss_fwd(self, *args):
            seen.append(args[-1])
            return _C.dino_loss_fwd(*args)

        def ema_(self, *args):
            seen.append(args[-1])
            return _C.ema_(*args)

    monkeypatch.setattr(_backend, "cpp_module", lambda: Recorder())
    student, teacher, center = make_logits(1, 2, 10)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        cpp(student, teacher, center, 2)
        _cpp.ema_(torch.zeros(10), torch.ones(10), 0.5)
    assert seen == [1, 1, 2, 2]


@pytest.mark.parametrize("numel", [1, 7, 3 * 65536 + 5])
def test_ema_is_bitwise_the_reference(numel):
    """Same products and sum, rounded in the reference's order (no FMA in the x86-64 build);
    3 * 65536 + 5 elements run on several threads with a ragged tail."""
    teacher, student = torch.randn(numel), torch.randn(numel)
    expected = teacher.clone()
    for momentum in (0.996, 0.7):
        _cpp.ema_(teacher, student, torch.tensor(momentum))
        ema_reference(expected, student, torch.tensor(momentum))
        assert torch.equal(teacher, expected)


def test_raw_extension_rejects_bad_buffers():
    """Wrong sizes, dtypes or strides reach C++ as a ValueError, never a wrong read."""
    s, t, c = (x.numpy() for x in make_logits(2, 4, 16))
    mean = torch.empty(16).numpy()
    args = {"student": s, "teacher": t, "center": c, "grad": None, "teacher_mean": mean,
            "batch": 2, "k": 16, "ncrops": 4, "student_temp": 0.1, "teacher_temp": 0.04,
            "threads": 1}
    bf16_grad = torch.empty(8, 16, dtype=torch.bfloat16).view(torch.uint16).numpy()
    cases = [
        ({"batch": 3}, "student: expected 192 elements"),
        ({"center": c[:8]}, "center: expected 16"),
        ({"teacher": t.astype("float64")}, "teacher: expected a float32"),
        ({"student": s[:, ::2], "k": 8}, "C-contiguous"),
        ({"grad": bf16_grad}, "grad must have the student's dtype"),
        ({"ncrops": 1}, "ncrops must be >= 2"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            _C.dino_loss_fwd(**{**args, **change})
    with pytest.raises(ValueError, match="student: expected 10"):
        _C.ema_(torch.zeros(10).numpy(), torch.zeros(11).numpy(), 0.5, 1)
    with pytest.raises(ValueError, match="float32"):
        _C.ema_(torch.zeros(10).numpy(), torch.zeros(10).bfloat16().view(torch.uint16).numpy(),
                0.5, 1)
