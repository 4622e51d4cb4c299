"""The fused attention op (``dino_fast.ops.attention``) against ``attention_reference``.

The Triton kernels run in their interpreter on CPU tensors here (float32 inputs; the kernels
take no float64), compared with the reference in float64 on the same values, outputs and the
three gradients. On a CUDA machine the same tests run on the GPU, plus the half-precision rule
"kernel error at most 2x the reference's own error in that precision" (FlashAttention's).
"""
import copy

import pytest
import torch

from dino_fast.models import VisionTransformer
from dino_fast.ops import attention as attention_op
from dino_fast.ops import use_backend
from dino_fast.ops.attention import (
    attention,
    attention_reference,
    attention_varlen,
    attention_varlen_reference,
)
from tests.conftest import device_for, triton_skip_reason

pytestmark = pytest.mark.skipif(triton_skip_reason() is not None, reason=str(triton_skip_reason()))
DEVICE = device_for("triton")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# float32 kernel vs float64 reference, unit-normal inputs: a few fp32 roundings of O(1) sums.
FP32_TOL = {"rtol": 1e-4, "atol": 2e-5}


def make_qkv(batch, heads, seqlen, head_dim, layout="vit", dtype=torch.float32):
    """``q, k, v`` ``[B, heads, N, head_dim]`` on DEVICE, as non-contiguous views.

    ``vit``: permuted slices of one qkv projection (what the ViT passes); ``transposed``: head
    dim not the innermost stride; ``contiguous``: plain tensors.
    """
    shape = (batch, seqlen, 3, heads, head_dim)
    qkv = torch.randn(shape, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    if layout == "vit":
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if layout == "transposed":
        base = qkv.permute(2, 0, 3, 4, 1).contiguous()  # (3, B, heads, head_dim, N)
        return base.transpose(-1, -2).unbind(0)
    return tuple(x.contiguous() for x in qkv.permute(2, 0, 3, 1, 4).unbind(0))


def forward_backward(fn, inputs, grad_out):
    """``fn(*inputs)`` and the gradients of ``(out * grad_out).sum()`` for every input."""
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return (out.detach(), *grads)


def check(got, want, names=("out", "grad_q", "grad_k", "grad_v"), **tol):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        torch.testing.assert_close(a.detach().double().cpu(), b.detach().double().cpu(),
                                   msg=lambda m, name=name: f"{name}: {m}", **(tol or FP32_TOL))


def run_triton(q, k, v, scale, grad_out):
    with use_backend("triton"):
        return forward_backward(lambda *x: attention(*x, scale), (q, k, v), grad_out)


def run_oracle(q, k, v, scale, grad_out):
    """The reference in float64 on CPU, on the same input values."""
    inputs = [x.detach().double().cpu() for x in (q, k, v)]
    return forward_backward(lambda *x: attention_reference(*x, scale), inputs,
                            grad_out.double().cpu())


@pytest.mark.parametrize("batch,heads,seqlen,head_dim", [
    (2, 2, 1, 32), (2, 3, 37, 48), (1, 2, 37, 64), (1, 1, 37, 80), (1, 1, 197, 64),
    (1, 1, 197, 32)])
def test_matches_reference(batch, heads, seqlen, head_dim):
    q, k, v = make_qkv(batch, heads, seqlen, head_dim)
    grad_out = torch.randn(q.shape, device=DEVICE)
    scale = head_dim ** -0.5
    got = run_triton(q, k, v, scale, grad_out)
    assert got[0].dtype == q.dtype and got[1].dtype == q.dtype
    check(got, run_oracle(q, k, v, scale, grad_out))


@pytest.mark.parametrize("layout", ["transposed", "contiguous"])
def test_strided_inputs(layout):
    q, k, v = make_qkv(2, 2, 37, 32, layout)
    grad_out = torch.randn(2, 37, 2, 32, device=DEVICE).transpose(1, 2)  # non-contiguous too
    check(run_triton(q, k, v, 0.3, grad_out), run_oracle(q, k, v, 0.3, grad_out))


def test_large_logits_are_stable():
    """A scale that makes the logits ~+-100: the online softmax must not overflow. The backward
    recomputes ``exp2(s * log2(e) - lse)`` with arguments of ~300, whose float32 rounding (~3e-5)
    the gradients carry, amplified by the tile grouping of the products: 3e-4 to 1.5e-3 on dQ
    over seeds and tiles, hence the looser tolerance."""
    q, k, v = make_qkv(1, 2, 37, 32)
    grad_out = torch.randn(q.shape, device=DEVICE)
    check(run_triton(q * 3, k * 3, v, 2.0, grad_out), run_oracle(q * 3, k * 3, v, 2.0, grad_out),
          rtol=2e-3, atol=2e-3)


def test_bad_inputs_raise():
    q, k, v = make_qkv(1, 2, 5, 32)
    with use_backend("triton"):
        with pytest.raises(ValueError, match="float16/bfloat16/float32"):
            attention(q.double(), k.double(), v.double(), 0.1)
        with pytest.raises(ValueError, match="shapes differ"):
            attention(q, k[:, :, :4], v, 0.1)
        with pytest.raises(ValueError, match="head_dim"):
            big = torch.zeros(1, 1, 2, 512, device=DEVICE)
            attention(big, big, big, 0.1)


# --- variable-length packing ------------------------------------------------------------------
def make_packed(lengths, heads, head_dim):
    """Packed ``q, k, v`` ``[total, heads, head_dim]`` (views of one qkv) and ``cu_seqlens``."""
    total = sum(lengths)
    qkv = torch.randn(total, 3, heads, head_dim, dtype=torch.float64).float().to(DEVICE)
    offsets = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return (*qkv.unbind(1), offsets.to(DEVICE))


@pytest.mark.parametrize("lengths,head_dim", [([37, 1, 0, 20, 5], 32), ([17, 10, 10], 48)])
def test_varlen_matches_per_sequence_reference(lengths, head_dim):
    q, k, v, cu_seqlens = make_packed(lengths, 2, head_dim)
    grad_out = torch.randn(q.shape, device=DEVICE)
    scale = head_dim ** -0.5
    with use_backend("triton"):
        got = forward_backward(
            lambda *x: attention_varlen(*x, cu_seqlens, max(lengths), scale), (q, k, v), grad_out)
    cu_cpu = cu_seqlens.cpu()
    want = forward_backward(lambda *x: attention_varlen_reference(*x, cu_cpu, scale),
                            [x.detach().double().cpu() for x in (q, k, v)], grad_out.double().cpu())
    check(got, want)
    # The per-sequence oracle itself equals batched attention of its last sequence.
    start = sum(lengths[:-1])
    last = [x[start:].transpose(0, 1)[None].double().cpu() for x in (q, k, v)]
    check([want[0][start:]], [attention_reference(*last, scale)[0].transpose(0, 1)],
          names=("last sequence",))


def test_varlen_bad_offsets_raise():
    q, k, v, cu_seqlens = make_packed([4, 3], 1, 32)
    with pytest.raises(ValueError, match="int32"):
        attention_varlen(q, k, v, cu_seqlens.long(), 4, 0.1)
    with pytest.raises(ValueError, match="from 0 to the 7"):
        attention_varlen(q, k, v, cu_seqlens[:-1], 4, 0.1)
    with pytest.raises(ValueError, match="max_seqlen 3"):
        attention_varlen(q, k, v, cu_seqlens, 3, 0.1)
    with use_backend("triton"), pytest.raises(ValueError, match="1-D int32"):  # check=False too
        attention_varlen(q, k, v, cu_seqlens.float(), 4, 0.1, check=False)


# --- registration: opcheck and torch.compile --------------------------------------------------
def test_opcheck_forward_and_backward_ops():
    q, k, v = (x.detach().requires_grad_(True) for x in make_qkv(1, 2, 19, 32))
    torch.library.opcheck(attention_op.attention_fwd, (q, k, v, 0.2, None, 0))
    pq, pk, pv, cu_seqlens = make_packed([7, 12], 2, 32)
    torch.library.opcheck(attention_op.attention_fwd, (pq, pk, pv, 0.2, cu_seqlens, 12))
    out, lse = attention_op.attention_fwd(q, k, v, 0.2, None, 0)
    grad_out = torch.randn(q.shape, device=DEVICE)
    torch.library.opcheck(attention_op.attention_bwd,
                          (grad_out, q.detach(), k.detach(), v.detach(), out.detach(), lse, 0.2,
                           None, 0))


def test_lse_is_the_row_logsumexp():
    q, k, v = make_qkv(1, 2, 37, 48)
    _, lse = attention_op.attention_fwd(q, k, v, 0.2, None, 0)
    want = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) * 0.2, dim=-1)
    check([lse], [want], names=("lse",))


@pytest.mark.parametrize("packed", [False, True])
def test_compile_fullgraph(packed):
    """Dynamo and AOT autograd trace through the custom ops (fake and autograd formulas) with no
    graph break. ``aot_eager`` keeps it cheap: the op bodies still run the real kernels."""
    q, k, v = make_qkv(2, 2, 37, 32)
    grad_out = torch.randn(q.shape, device=DEVICE)
    want = run_oracle(q, k, v, 0.25, grad_out)
    if packed:  # the same 2 sequences as one packed batch
        q, k, v, grad_out = (x.transpose(1, 2).reshape(74, 2, 32) for x in (q, k, v, grad_out))
        cu_seqlens = torch.tensor([0, 37, 74], dtype=torch.int32, device=DEVICE)
        def fn(*x):
            return attention_varlen(*x, cu_seqlens, 37, 0.25)
        want = [x.transpose(1, 2).reshape(74, 2, 32) for x in want]
    else:
        def fn(*x):
            return attention(*x, 0.25)
    torch._dynamo.reset()
    try:
        with use_backend("triton"):
            got = forward_backward(torch.compile(fn, backend="aot_eager", fullgraph=True),
                                   (q, k, v), grad_out)
    finally:
        torch._dynamo.reset()
    check(got, want)


# --- the ViT ----------------------------------------------------------------------------------
def tiny_vit(attn_backend):
    torch.manual_seed(0)
    return VisionTransformer(img_size=[32], patch_size=8, embed_dim=96, depth=2, num_heads=2,
                             qkv_bias=True, attn_backend=attn_backend).to(DEVICE)


def vit_forward_backward(model, images):
    out = model(images)
    out.pow(2).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["triton", "xformers"])
@pytest.mark.parametrize("size", [32, 24])
def test_vit_backend_matches_eager(backend, size):
    """CLS output and every parameter gradient of a 2-block ViT (head dim 48, 17 or 10 tokens)
    against the eager attention model run in float64."""
    if backend == "xformers":
        pytest.importorskip("xformers.ops")
        if not torch.cuda.is_available():
            pytest.skip("xformers memory_efficient_attention needs a CUDA device")
    model = tiny_vit(backend)
    oracle = copy.deepcopy(model).double().cpu()
    oracle.set_attn_backend("eager")
    images = torch.randn(2, 3, size, size, device=DEVICE)
    want_out, want_grads = vit_forward_backward(oracle, images.double().cpu())
    with use_backend("triton"):
        got_out, got_grads = vit_forward_backward(model, images)
    tol = {"rtol": 1e-4, "atol": 5e-5} if backend == "triton" else {"rtol": 1e-2, "atol": 1e-3}
    check([got_out], [want_out], names=("cls",), **tol)
    names = sorted(want_grads)
    check([got_grads[n] for n in names], [want_grads[n] for n in names], names=names, **tol)


# --- half precision on a GPU ------------------------------------------------------------------
def max_error(got, want):
    return [(a.double() - b.double()).abs().max().item() for a, b in zip(got, want)]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seqlen", [1, 37, 197, 785])
@pytest.mark.parametrize("head_dim", [32, 48, 64, 80, 96, 128])
def test_half_precision_error_at_most_twice_reference(dtype, seqlen, head_dim):
    q, k, v = make_qkv(4, 3, seqlen, head_dim, dtype=dtype)
    grad_out = torch.randn(q.shape, device=DEVICE, dtype=dtype)
    scale = head_dim ** -0.5
    got = run_triton(q, k, v, scale, grad_out)
    low = forward_backward(lambda *x: attention_reference(*x, scale), (q, k, v), grad_out)
    exact = run_oracle(q, k, v, scale, grad_out)
    exact = [x.to(DEVICE) for x in exact]
    for name, kernel_err, ref_err in zip(("out", "grad_q", "grad_k", "grad_v"),
                                         max_error(got, exact), max_error(low, exact)):
        assert kernel_err <= 2 * ref_err + 1e-5, f"{name}: {kernel_err} > 2 x {ref_err}"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_varlen_half_precision_error_at_most_twice_reference(dtype):
    lengths = [197, 197, 37, 37, 37, 1]
    q, k, v, cu_seqlens = make_packed(lengths, 6, 64)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    grad_out = torch.randn(q.shape, device=DEVICE, dtype=dtype)
    with use_backend("triton"):
        got = forward_backward(lambda *x: attention_varlen(*x, cu_seqlens, 197, 0.125),
                               (q, k, v), grad_out)
    low = forward_backward(lambda *x: attention_varlen_reference(*x, cu_seqlens, 0.125),
                           (q, k, v), grad_out)
    exact = forward_backward(lambda *x: attention_varlen_reference(*x, cu_seqlens, 0.125),
                             [x.double() for x in (q, k, v)], grad_out.double())
    for name, kernel_err, ref_err in zip(("out", "grad_q", "grad_k", "grad_v"),
                                         max_error(got, exact), max_error(low, exact)):
        assert kernel_err <= 2 * ref_err + 1e-5, f"{name}: {kernel_err} > 2 x {ref_err}"


# --- DINO_FAST_AUTOTUNE: one pinned candidate per input class -----------------------------------
def test_autotune_switch_reads_the_environment(monkeypatch):
    from dino_fast.kernels import attention as kernels
    monkeypatch.delenv("DINO_FAST_AUTOTUNE", raising=False)
    assert kernels.autotuning()
    monkeypatch.setenv("DINO_FAST_AUTOTUNE", "off")
    assert not kernels.autotuning()
    monkeypatch.setenv("DINO_FAST_AUTOTUNE", "sometimes")
    with pytest.raises(ValueError, match="DINO_FAST_AUTOTUNE='sometimes' must be on or off"):
        kernels.autotuning()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_autotune_off_runs_one_pinned_candidate(monkeypatch, dtype):
    """With the switch off each kernel has one candidate, the first of its class, and the
    kernels run with it (checked on what the autotuner picked) and give the right answer."""
    from dino_fast.kernels import attention as kernels
    monkeypatch.setenv("DINO_FAST_AUTOTUNE", "off")
    q, k, v = make_qkv(1, 2, 37, 64, dtype=dtype)
    precision = kernels._dot_precision(q)
    pinned = {}
    for name in ("fwd", "dkdv", "dq"):
        every = kernels.candidates(name, dtype, 64, precision, autotune=True)
        (pinned[name],) = kernels.candidates(name, dtype, 64, precision)
        assert pinned[name].all_kwargs() == every[0].all_kwargs()
    grad_out = torch.randn(q.shape, device=DEVICE).to(dtype)
    got = run_triton(q, k, v, 0.125, grad_out)
    for name, tuner in (("fwd", kernels._fwd), ("dkdv", kernels._bwd_dkdv),
                        ("dq", kernels._bwd_dq)):
        assert tuner.best_config.all_kwargs() == pinned[name].all_kwargs(), name
    # float16: the output and the probabilities fed to the products are rounded to 11 bits.
    tol = {} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    check(got, run_oracle(q, k, v, 0.125, grad_out), **tol)
