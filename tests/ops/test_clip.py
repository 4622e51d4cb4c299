"""The fused per-parameter gradient clipping (``dino_fast.ops.clip``) against
``clip_gradients_reference``, on every backend: bitwise in float32 (the kernels round the
coefficient as the reference does), the fallbacks, the wiring into ``gradient_norms``, and one
kernel for all the gradients instead of one per gradient."""
import collections

import pytest
import torch

from dino_fast.models import DINOHead, MultiCropWrapper, VisionTransformer
from dino_fast.ops import use_backend
from dino_fast.ops.clip import clip_gradients_, clip_gradients_reference
from dino_fast.training.optim import gradient_norms
from tests.conftest import available_backends, device_for

BACKENDS = available_backends()
CLIP = 3.0
# Sizes that are no multiple of any block, a 0-d gradient, an empty one, and gradients larger
# than one Triton chunk (4096) and one C++ chunk (65536); scales that put the norm below the clip
# (coefficient clamped to 1), near it and far above it.
SHAPES = [(1,), (37,), (), (0,), (4097,), (3, 5, 7), (70001,), (64, 1031)]
SCALES = [0.01, 1.0, 0.5, 1.0, 10.0, 0.2, 0.1, 0.05]
EXACT = {torch.float32: True, torch.float16: True, torch.bfloat16: False}


def gradients(device, dtype=torch.float32, shapes=SHAPES, scales=SCALES):
    """Gradients, their norms (as ``gradient_norms`` computes them) and a copy for the oracle."""
    generator = torch.Generator().manual_seed(0)
    grads = [(torch.randn(shape, generator=generator) * scale).to(device, dtype)
             for shape, scale in zip(shapes, scales)]
    norms = torch.stack(torch._foreach_norm(grads, 2))
    return grads, norms, [g.clone() for g in grads]


def assert_matches(grads, expected, exact=True):
    """Bitwise (or within two roundings when ``exact`` is False), naming the gradient that
    differs; ``assert_close`` names the element."""
    for index, (got, want) in enumerate(zip(grads, expected)):
        tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1.6e-2, "atol": 1e-5}
        torch.testing.assert_close(got, want, **tolerance,
                                   msg=lambda m, i=index: f"gradient {i}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [CLIP, 0.5, 1e3])
def test_matches_reference(backend, clip):
    """Every gradient scaled by its own coefficient; with ``clip`` 1e3 none is scaled."""
    grads, norms, expected = gradients(device_for(backend))
    with use_backend(backend):
        clip_gradients_(grads, norms, clip)
    clip_gradients_reference(expected, norms, clip)
    assert_matches(grads, expected)
    coefs = torch.clamp(clip / (norms + 1e-6), max=1.0)
    assert (coefs < 1).any() or clip == 1e3  # the cases clip some gradients...
    assert (coefs == 1).any()  # ...and leave others as they are


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    """Half-precision gradients and norms: the Triton kernel rounds the coefficient to the
    norms' dtype at each step as the reference does (its interpreter truncates to bfloat16 where
    a GPU rounds to nearest, hence the tolerance there); the C++ kernel runs the reference."""
    device = device_for(backend)
    grads, norms, expected = gradients(device, dtype)
    with use_backend(backend):
        clip_gradients_(grads, norms, CLIP)
    clip_gradients_reference(expected, norms, CLIP)
    assert_matches(grads, expected, exact=EXACT[dtype] or device.type == "cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fallbacks_are_correct(backend):
    """What the kernels do not take runs the reference: a non-contiguous gradient, mixed dtypes,
    float64. An empty list is a no-op."""
    device = device_for(backend)
    base = torch.randn(40, 30, device=device)
    cases = [
        [base.t(), torch.randn(37, device=device) * 5],  # a transposed view
        [base[:, ::2], torch.randn(4097, device=device)],  # a strided slice
        [torch.randn(37, device=device), torch.randn(37, device=device, dtype=torch.float64)],
        [torch.randn(4097, device=device, dtype=torch.float64) * 9],
    ]
    with use_backend(backend):
        clip_gradients_([], torch.zeros(0, device=device), CLIP)
        for grads in cases:
            norms = torch.stack([g.norm().float() for g in grads])
            expected = [g.clone() for g in grads]
            clip_gradients_(grads, norms, CLIP)
            clip_gradients_reference(expected, norms, CLIP)
            assert_matches(grads, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_norms_must_match_gradients(backend):
    grads, norms, _ = gradients(device_for(backend))
    with use_backend(backend):
        with pytest.raises(ValueError, match="one per gradient"):
            clip_gradients_(grads, norms[:-1], CLIP)
        with pytest.raises(ValueError, match="one per gradient"):  # the raw op checks too
            torch.ops.dino_fast.clip_gradients_(grads, norms[None], CLIP)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    grads, norms, _ = gradients(device_for(backend), shapes=[(37,), (5, 7), ()],
                                scales=[1.0, 0.01, 5.0])
    with use_backend(backend):
        torch.library.opcheck(torch.ops.dino_fast.clip_gradients_, (grads, norms, CLIP))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    """The op traces without graph breaks; the norms change every step without a recompile.
    ``aot_eager``: the op is opaque to inductor, so this is the same tracing, cheaper."""
    torch._dynamo.reset()  # the backend choice is folded at trace time
    compiled = torch.compile(clip_gradients_, backend="aot_eager", fullgraph=True)
    with use_backend(backend), torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(2):
            grads, norms, expected = gradients(device_for(backend))
            norms = norms * (step + 1)
            compiled(grads, norms, CLIP)
            clip_gradients_reference(expected, norms, CLIP)
            assert_matches(grads, expected)


def small_model(device):
    """A one-block ViT with a DINO head whose gradients have a spread of norms."""
    model = MultiCropWrapper(VisionTransformer(patch_size=16, embed_dim=24, depth=1, num_heads=2,
                                               qkv_bias=True),
                             DINOHead(24, 4099, hidden_dim=16, bottleneck_dim=8)).to(device)
    generator = torch.Generator().manual_seed(0)
    for index, p in enumerate(model.parameters()):
        p.grad = (torch.randn(p.shape, generator=generator) * 10.0 ** (index % 3 - 1)).to(device)
    return model


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_norms_unchanged(backend):
    """``gradient_norms`` with the fused op gives the reference's norms and clipped gradients."""
    device = device_for(backend)
    model, expected_model = small_model(device), small_model(device)
    with use_backend(backend):
        norms = gradient_norms(model, CLIP)
    with use_backend("reference"):
        expected_norms = gradient_norms(expected_model, CLIP)
    torch.testing.assert_close(norms, expected_norms, rtol=0, atol=0)
    assert (norms > CLIP).any() and (norms < CLIP).any()
    assert_matches([p.grad for p in model.parameters()],
                   [p.grad for p in expected_model.parameters()])


# What ``Tensor.numpy()`` records for each gradient the C++ adapter views: no kernel, no copy.
NUMPY_VIEW_OPS = {"aten::detach", "aten::to", "aten::resolve_neg", "aten::resolve_conj"}


def profiled_ops(backend, count):
    """``{name: calls}`` of the operators ``torch.profiler`` records (nested ones included) while
    clipping ``count`` gradients, but those of :data:`NUMPY_VIEW_OPS`."""
    grads, norms, _ = gradients("cpu", shapes=[(37, 5)] * count, scales=[1.0] * count)
    with use_backend(backend), torch.profiler.profile() as profile:
        clip_gradients_(grads, norms, 0.5)
    return collections.Counter(event.name for event in profile.events()
                               if event.name not in NUMPY_VIEW_OPS)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ kernels were not built")
def test_one_kernel_for_all_gradients():
    """The reference runs one multiply per gradient inside ``_foreach_mul_`` (its fast path
    needs one shape); the fused op runs one kernel, whatever the number of gradients."""
    reference = [profiled_ops("reference", count) for count in (4, 40)]
    assert [ops["aten::mul_"] for ops in reference] == [4, 40]
    fused = [profiled_ops("cpp", count) for count in (4, 40)]
    assert fused[0]["dino_fast::cpp_clip_gradients_"] == 1
    assert fused[0]["aten::mul_"] == 0
    assert fused[0] == fused[1]


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton cannot run here")
def test_triton_table_is_cached():
    """The same gradients at the same addresses reuse the device chunk table (no copy)."""
    from dino_fast.kernels.clip import _chunk_table
    grads, norms, expected = gradients(device_for("triton"))
    with use_backend("triton"):
        clip_gradients_(grads, norms, CLIP)
        before = _chunk_table.cache_info()
        clip_gradients_(grads, norms, CLIP)
    after = _chunk_table.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)
    clip_gradients_reference(expected, norms, CLIP)
    clip_gradients_reference(expected, norms, CLIP)
    assert_matches(grads, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_cuda_kernel_without_sync():
    """On CUDA, once the table is cached: one kernel launch and no host sync."""
    from dino_fast.profiling.dispatch_count import DispatchCounter
    from dino_fast.profiling.gpu_time import gpu_kernels
    grads, norms, _ = gradients("cuda")
    with use_backend("triton"):
        clip_gradients_(grads, norms, CLIP)  # fills the table cache
        torch.cuda.synchronize()
        with torch.profiler.profile() as profile, DispatchCounter() as counter:
            clip_gradients_(grads, norms, CLIP)
            torch.cuda.synchronize()
    kernels = [event.name for event in gpu_kernels(profile.events())]
    assert kernels == ["_clip_gradients_kernel"], kernels
    assert counter.total_syncs == 0
