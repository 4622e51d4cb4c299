"""The fused teacher EMA (``dino_fast.ops.ema``) against ``ema_reference``, on every backend."""
import pytest
import torch

from dino_fast.ops import use_backend
from dino_fast.ops.ema import ema_, ema_reference
from tests.conftest import available_backends, device_for

BACKENDS = available_backends()


def buffers(numel, device):
    """A teacher and a student flat float32 buffer, and a copy of the teacher for the oracle."""
    teacher = torch.randn(numel, device=device)
    student = torch.randn(numel, device=device)
    return teacher, student, teacher.clone()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("numel", [1, 1000, 4097 * 3])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_matches_reference(backend, numel, as_tensor):
    """Sizes that are not a multiple of any block; the momentum as a float or a 0-d tensor.
    Float32 rounding of the same expression: rtol 1e-6 (an FMA may round once less)."""
    teacher, student, expected = buffers(numel, device_for(backend))
    for momentum in (0.996, 0.9, 0.5):  # several steps, the momentum changing
        m = torch.tensor(momentum, device=teacher.device) if as_tensor else momentum
        with use_backend(backend):
            ema_(teacher, student, m)
        ema_reference(expected, student, torch.tensor(momentum, device=teacher.device))
        torch.testing.assert_close(teacher, expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(teacher, student)  # an EMA, not a copy


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_of_flat_buffer_update(backend):
    """Parameters that are views of the flat buffer see the update (``dino_fast.training.ema``'s
    use)."""
    teacher, student, _ = buffers(60, device_for(backend))
    weight = teacher[10:40].view(5, 6)
    before = weight.clone()
    with use_backend(backend):
        ema_(teacher, student, 0.5)
    torch.testing.assert_close(weight, 0.5 * before + 0.5 * student[10:40].view(5, 6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_buffers_raise(backend):
    device = device_for(backend)
    teacher = torch.randn(100, device=device)
    cases = [
        ((teacher.double(), torch.randn(100, device=device, dtype=torch.float64)), "float32"),
        ((teacher.half(), torch.randn(100, device=device).half()), "float32"),
        ((torch.randn(200, device=device)[::2], torch.randn(100, device=device)), "contiguous"),
        ((teacher, torch.randn(101, device=device)), "must match"),
    ]
    with use_backend(backend):
        for (t, s), message in cases:
            with pytest.raises(ValueError, match=message):
                ema_(t, s, 0.9)
            with pytest.raises(ValueError, match=message):  # the raw op checks too
                torch.ops.dino_fast.ema_(t, s, torch.tensor(0.9, device=device))
        with pytest.raises(ValueError, match="scalar"):
            ema_(teacher, teacher.clone(), torch.tensor([0.9, 0.8], device=device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    teacher, student, _ = buffers(1000, device_for(backend))
    with use_backend(backend):
        torch.library.opcheck(torch.ops.dino_fast.ema_,
                              (teacher, student, torch.tensor(0.99, device=teacher.device)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    """The op traces without graph breaks, and a tensor momentum changing every step neither
    recompiles nor is baked in. ``aot_eager``: the op is opaque to inductor, so this is the
    same tracing at a fraction of the CPU compile time."""
    teacher, student, expected = buffers(4097, device_for(backend))
    torch._dynamo.reset()  # the backend choice is folded at trace time
    compiled = torch.compile(ema_, backend="aot_eager", fullgraph=True)
    with use_backend(backend), torch._dynamo.config.patch(error_on_recompile=True):
        for momentum in (0.996, 0.9):
            m = torch.tensor(momentum, device=teacher.device)
            compiled(teacher, student, m)
            ema_reference(expected, student, m)
            torch.testing.assert_close(teacher, expected, rtol=1e-6, atol=1e-7)
