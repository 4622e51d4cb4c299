"""The fused ops of a DINO step against their references and library baselines, in one table.

Ops (issue 3): the DINO loss (forward + backward), the teacher EMA (one update of every
parameter of ViT + DINOHead), attention (forward + backward) and (issue 23) the per-parameter
gradient clipping (every gradient of ViT + DINOHead scaled by its own coefficient). Providers:

* ``reference``: the eager pure-PyTorch reference (the speed-up column's baseline; for the
  clipping, the foreach code it replaces, one multiply kernel per gradient);
* ``compiled reference``: ``torch.compile`` of the same function, for the loss (on the CPU also
  for the EMA, the clipping and attention; on a GPU those would cost about a dozen inductor
  compiles for baselines nobody picks, so the GPU keeps the ones below);
* ours: ``triton`` (CUDA only; never the interpreter) and ``cpp`` (CPU, when ``dino_fast._C`` is
  built), through the public ops with the backend forced;
* library baselines, the ones a user would pick: torch SDPA with each backend forced (flash,
  cuDNN, efficient) and xformers when installed for attention, SDPA once per crop size for the
  packed crops; the official per-parameter loop, ``torch._foreach_lerp_``,
  ``_foreach_mul_`` + ``_foreach_add_`` and a plain copy (the bandwidth ceiling) for the EMA;
  for the clipping, ``_foreach_mul_`` by one float, one launch on CUDA (PyTorch's fast path;
  a ceiling: one coefficient for all, so not a clipping). "x best baseline" compares with the
  fastest of these (and the compiled reference), the ceilings excepted.

The packed-attention reference loops over the sequences in Python (1,536 at batch 128), so on a
GPU it is timed once, without repeats. Shapes are DINO's on a GPU (2x224 + 10x96 crops,
K = 65536, ViT-S/16 and ViT-B/16; ``--quick``: ViT-S/16 at batch 64, the GPU suite's stage 3);
smaller defaults on the CPU, plus the CPU training shape of the loss (batch 32, 2+10 crops,
K = 65536) and the 44M-parameter ViT-S/16 + DINOHead(65536) EMA; ``--tiny``: seconds on a CPU
(the GPU suite's dry run).

    python benchmarks/ops.py [--quick | --tiny] [--ops loss,ema,attention,clip] [--no_compile]
                             [--output FILE] [--json FILE]
"""
import argparse
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import measure, peak_memory_mb, report  # noqa: E402
from benchmarks.train_step import PerParameterEMA  # noqa: E402
from dino_fast.models import DINOHead, build_vit  # noqa: E402
from dino_fast.ops import _backend, use_backend  # noqa: E402
from dino_fast.ops.attention import (  # noqa: E402
    attention,
    attention_reference,
    attention_varlen,
    attention_varlen_reference,
)
from dino_fast.ops.clip import clip_gradients_, clip_gradients_reference  # noqa: E402
from dino_fast.ops.dino_loss import dino_loss, dino_loss_reference  # noqa: E402
from dino_fast.ops.ema import ema_, ema_reference  # noqa: E402
from dino_fast.training.ema import flatten_parameters  # noqa: E402

COLUMNS = ["op", "shape", "dtype", "provider", "ms", "rate", "peak MiB", "x eager",
           "x best baseline"]
OURS = ("triton", "cpp")
COPY = "plain copy (bandwidth)"  # a ceiling, not a baseline: no EMA can beat it
ONE_SCALE = "_foreach_mul_ one float"  # a ceiling (CUDA: one launch), not a clipping
OPS = ("loss", "ema", "attention", "clip")
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Case:
    """One op at one shape: providers (name -> zero-argument callable) and the work done."""
    op: str
    shape: str
    dtype: str
    work: float  # bytes moved (rate in GB/s) or floating-point operations (TFLOP/s)
    unit: str  # "GB/s" or "TFLOP/s"
    providers: dict = field(default_factory=dict)
    once: set = field(default_factory=set)  # slow providers timed once, without repeats


def our_backends(device: torch.device) -> list[str]:
    """The kernel backends worth timing here: never the Triton interpreter (it is a debugger)."""
    names = []
    if device.type == "cuda" and _backend.triton_available():
        names.append("triton")
    if device.type == "cpu" and _backend.cpp_module() is not None:
        names.append("cpp")
    return names


def forced(backend: str, fn):
    """``fn`` run with ``backend`` forced through ``use_backend``."""
    def run(*args):
        with use_backend(backend):
            return fn(*args)
    return run


# --- the DINO loss -------------------------------------------------------------------------

def loss_case(batch, ncrops, K, dtype, device, compile_=True) -> Case:
    """Loss forward + backward of ``[ncrops*B, K]`` student and ``[2B, K]`` teacher logits."""
    student = torch.randn(ncrops * batch, K, device=device, dtype=DTYPES[dtype])
    student.requires_grad_(True)
    teacher = torch.randn(2 * batch, K, device=device, dtype=DTYPES[dtype])
    center = torch.randn(1, K, device=device) * 0.1

    def step(loss_fn):
        def run():
            student.grad = None
            loss_fn(student, teacher, center, ncrops, STUDENT_TEMP, TEACHER_TEMP)[0].backward()
        return run

    rows = (ncrops + 2) * batch + ncrops * batch  # logits read, gradient written
    case = Case("dino_loss fwd+bwd", f"B={batch} crops={ncrops} K={K}", dtype,
                rows * K * student.element_size(), "GB/s")
    case.providers["reference"] = step(dino_loss_reference)
    if compile_:
        case.providers["compiled reference"] = step(torch.compile(dino_loss_reference))
    for name in our_backends(device):
        case.providers[name] = step(forced(name, dino_loss))
    return case


# --- the teacher EMA -----------------------------------------------------------------------

def dino_model(arch: str, out_dim: int) -> nn.Module:
    """The parameters a DINO EMA updates: a ViT/16 backbone and its DINOHead."""
    backbone = build_vit(arch)
    return nn.ModuleList([backbone, DINOHead(backbone.embed_dim, out_dim)])


def ema_case(arch, out_dim, device, compile_=True) -> Case:
    """One EMA update over every parameter of ``arch`` + DINOHead(``out_dim``)."""
    student, teacher = dino_model(arch, out_dim).to(device), dino_model(arch, out_dim).to(device)
    student_flat, teacher_flat = flatten_parameters(student), flatten_parameters(teacher)
    student_params, teacher_params = list(student.parameters()), list(teacher.parameters())
    momentum = 0.996
    momentum_t = torch.tensor(momentum, device=device)
    per_parameter = PerParameterEMA(student, teacher)

    @torch.no_grad()
    def lerp():
        torch._foreach_lerp_(teacher_params, student_params, 1 - momentum)

    @torch.no_grad()
    def mul_add():
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)

    numel = student_flat.numel()
    case = Case("ema_", f"{arch}/16+head({out_dim}) {numel / 1e6:.1f}M", "fp32",
                3 * 4 * numel, "GB/s")  # read teacher and student, write teacher
    case.providers = {
        "reference": lambda: ema_reference(teacher_flat, student_flat, momentum_t),
        "per-parameter loop (official)": lambda: per_parameter.update(momentum),
        "_foreach_lerp_": lerp,
        "_foreach_mul_+add_": mul_add,
        # not an EMA: reads one buffer and writes one (2/3 of the EMA's bytes), the copy ceiling
        COPY: lambda: teacher_flat.copy_(student_flat),
    }
    if compile_ and device.type != "cuda":
        compiled = torch.compile(ema_reference)
        case.providers["compiled reference"] = lambda: compiled(teacher_flat, student_flat,
                                                                momentum_t)
    for name in our_backends(device):
        case.providers[name] = lambda name=name: forced(name, ema_)(teacher_flat, student_flat,
                                                                     momentum_t)
    return case


# --- the per-parameter gradient clipping ---------------------------------------------------

def clip_case(arch, out_dim, device, compile_=True) -> Case:
    """Every gradient of ``arch`` + DINOHead(``out_dim``) scaled by its own coefficient. The
    norms put each coefficient just below 1, so the repeats scale every gradient (as a clipping
    step does) without driving them to denormals."""
    model = dino_model(arch, out_dim).to(device)
    grads = [torch.randn_like(p) for p in model.parameters()]
    clip = 3.0
    norms = torch.full((len(grads),), clip * 1.0001, device=device)
    numel = sum(g.numel() for g in grads)
    case = Case("clip_gradients_", f"{arch}/16+head({out_dim}) {len(grads)} grads "
                f"{numel / 1e6:.1f}M", "fp32", 2 * 4 * numel, "GB/s")  # read, write
    case.providers = {
        "reference": lambda: clip_gradients_reference(grads, norms, clip),
        ONE_SCALE: lambda: torch._foreach_mul_(grads, 0.9999),
    }
    if compile_ and device.type != "cuda":
        compiled = torch.compile(clip_gradients_reference)
        case.providers["compiled reference"] = lambda: compiled(grads, norms, clip)
    for name in our_backends(device):
        case.providers[name] = lambda name=name: forced(name, clip_gradients_)(grads, norms,
                                                                                clip)
    return case


# --- attention -----------------------------------------------------------------------------

def sdpa_forced(backend):
    """``attention(q, k, v, scale)`` through SDPA with only ``backend`` allowed."""
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, scale):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return run


def sdpa_providers(device) -> dict:
    """``name -> attention(q, k, v, scale)`` for each SDPA backend this torch has."""
    if device.type != "cuda":
        return {"sdpa": lambda q, k, v, scale: F.scaled_dot_product_attention(q, k, v,
                                                                              scale=scale)}
    from torch.nn.attention import SDPBackend
    providers = {}
    for label, name in (("sdpa flash", "FLASH_ATTENTION"), ("sdpa cudnn", "CUDNN_ATTENTION"),
                        ("sdpa efficient", "EFFICIENT_ATTENTION")):
        if hasattr(SDPBackend, name):
            providers[label] = sdpa_forced(getattr(SDPBackend, name))
    return providers


def xformers_provider() -> dict:
    """xformers' memory-efficient attention, when installed (it takes ``[B, N, heads, d]``)."""
    try:
        from xformers.ops import memory_efficient_attention
    except ImportError:
        return {}

    def run(q, k, v, scale):
        out = memory_efficient_attention(*(x.transpose(1, 2) for x in (q, k, v)), scale=scale)
        return out.transpose(1, 2)
    return {"xformers": run}


def attention_case(arch, sequences, heads, seqlen, dtype, device, compile_=True) -> Case:
    """Attention forward + backward on ``[sequences, heads, seqlen, 64]``."""
    head_dim = 64
    q, k, v = (torch.randn(sequences, heads, seqlen, head_dim, device=device,
                           dtype=DTYPES[dtype], requires_grad=True) for _ in range(3))
    grad_out = torch.randn_like(q)
    scale = head_dim ** -0.5

    def step(attn_fn):
        def run():
            q.grad = k.grad = v.grad = None
            attn_fn(q, k, v, scale).backward(grad_out)
        return run

    flops = 3.5 * 4 * sequences * heads * seqlen * seqlen * head_dim  # backward = 2.5x forward
    case = Case("attention fwd+bwd", f"{arch} {sequences}x{heads}x{seqlen}x{head_dim}", dtype,
                flops, "TFLOP/s")
    providers = {"reference": attention_reference}
    if compile_ and device.type != "cuda":
        providers["compiled reference"] = torch.compile(attention_reference)
    providers.update({**sdpa_providers(device), **xformers_provider()})
    if "triton" in our_backends(device):
        providers["triton"] = forced("triton", attention)
    case.providers = {name: step(fn) for name, fn in providers.items()}
    return case


def attention_varlen_case(arch, images, heads, dtype, device, compile_=True) -> Case:
    """All crops of ``images`` images (2 x 197 + 10 x 37 tokens each) packed in one call,
    against SDPA run once per crop size on padded-free dense batches."""
    head_dim, lengths = 64, [197] * (2 * images) + [37] * (10 * images)
    total, scale = sum(lengths), head_dim ** -0.5
    cu_seqlens = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    packed = [torch.randn(total, heads, head_dim, device=device, dtype=DTYPES[dtype],
                          requires_grad=True) for _ in range(3)]
    dense = {n: [torch.randn(count * images, heads, n, head_dim, device=device,
                             dtype=DTYPES[dtype], requires_grad=True) for _ in range(3)]
             for n, count in ((197, 2), (37, 10))}

    def packed_step(fn):
        def run():
            fn(*packed, cu_seqlens, scale).backward(torch.ones_like(packed[0]))
        return run

    def per_size_sdpa():
        for q, k, v in dense.values():
            F.scaled_dot_product_attention(q, k, v, scale=scale).backward(torch.ones_like(q))

    flops = 3.5 * 4 * heads * head_dim * sum(n * n for n in lengths)
    case = Case("attention_varlen fwd+bwd", f"{arch} {images}x(2x197+10x37) heads={heads}",
                dtype, flops, "TFLOP/s")
    case.providers = {"reference": packed_step(attention_varlen_reference),
                      "sdpa per crop size": per_size_sdpa}
    if device.type == "cuda":
        case.once.add("reference")  # a Python loop over every crop: seconds per call
    if "triton" in our_backends(device):
        varlen = forced("triton", attention_varlen)
        case.providers["triton"] = packed_step(
            lambda q, k, v, cu, scale: varlen(q, k, v, cu, max(lengths), scale, check=False))
    return case


# --- running -------------------------------------------------------------------------------

def tiny_cases(ops) -> list:
    """Seconds on a CPU: every provider of every op, at toy shapes (the GPU suite's dry run)."""
    cases = [(loss_case, (2, 4, 256, "fp32"))] if "loss" in ops else []
    cases += [(ema_case, ("vit_tiny", 256))] if "ema" in ops else []
    cases += [(clip_case, ("vit_tiny", 256))] if "clip" in ops else []
    if "attention" in ops:
        cases += [(attention_case, ("vit_tiny", 4, 3, 37, "fp32")),
                  (attention_varlen_case, ("vit_tiny", 1, 3, "fp32"))]
    return cases


def build_cases(ops, device, quick, tiny=False) -> list:
    """The ``(builder, args)`` of each case: DINO shapes on a GPU, small ones on the CPU."""
    if tiny:
        return tiny_cases(ops)
    cuda = device.type == "cuda"
    cases = []
    if "loss" in ops:
        if cuda:
            shapes = [(64, 12, 65536, "bf16")] if quick else [
                (64, 12, 65536, "bf16"), (128, 12, 65536, "bf16"), (256, 12, 65536, "bf16"),
                (128, 12, 65536, "fp32")]
        else:
            shapes = [(8, 4, 4096, "fp32")] + ([] if quick else [(32, 12, 65536, "fp32")])
        cases += [(loss_case, shape) for shape in shapes]
    models = [("vit_small", 65536)] if cuda or not quick else [("vit_tiny", 4096)]
    models += [("vit_base", 65536)] if cuda and not quick else []
    cases += [(ema_case, model) for model in models] if "ema" in ops else []
    cases += [(clip_case, model) for model in models] if "clip" in ops else []
    if "attention" in ops:
        batch = (64 if quick else 128) if cuda else (2 if quick else 8)  # images per step
        dtype = "bf16" if cuda else "fp32"
        archs = [("vit_small", 6)] + ([("vit_base", 12)] if cuda and not quick else [])
        for arch, heads in archs:  # the 2 global crops (N=197), then the 10 local ones (N=37)
            cases += [(attention_case, (arch, 2 * batch, heads, 197, dtype)),
                      (attention_case, (arch, 10 * batch, heads, 37, dtype)),
                      (attention_varlen_case, (arch, batch if cuda else 2, heads, dtype))]
    return cases


def rate(case: Case, ms: float) -> str:
    """The case's work per second, e.g. ``"812 GB/s"``."""
    per_second = case.work / (ms / 1e3) / (1e12 if case.unit == "TFLOP/s" else 1e9)
    return f"{per_second:.3g} {case.unit}"


def time_case(case: Case, device, warmup, repeats) -> list[dict]:
    """One row per provider, with speed-ups against the eager reference and the best baseline."""
    times, rows = {}, []
    for name, fn in case.providers.items():
        runs = (1, 1) if name in case.once else (warmup, repeats)
        try:
            times[name] = measure(fn, *runs, device=device)
        except Exception as error:  # e.g. an SDPA backend that does not take this shape
            print(f"skip {case.op} {case.shape} {name}: {type(error).__name__}: "
                  f"{str(error).splitlines()[0][:120]}", file=sys.stderr)
            continue
        rows.append({"op": case.op, "shape": case.shape, "dtype": case.dtype, "provider": name,
                     "ms": times[name], "peak MiB": peak_memory_mb(fn, device),
                     "rate": rate(case, times[name])})
    baselines = [t for name, t in times.items()
                 if name not in (*OURS, "reference", COPY, ONE_SCALE)]
    for row in rows:
        if "reference" in times:
            row["x eager"] = times["reference"] / row["ms"]
        if baselines:
            row["x best baseline"] = min(baselines) / row["ms"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    size.add_argument("--tiny", action="store_true", help="toy shapes, one repeat (dry runs)")
    parser.add_argument("--ops", default=",".join(OPS),
                        help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--no_compile", action="store_true",
                        help="skip the torch.compile baselines")
    parser.add_argument("--output", default=None, help="write the table to this markdown file")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    ops = set(args.ops.split(","))
    if not ops <= set(OPS):
        parser.error(f"unknown ops {sorted(ops - set(OPS))}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    warmup, repeats = (2, 3) if device.type == "cpu" else (5, 20)
    if args.quick:
        repeats = max(2, repeats // 2)
    if args.tiny:
        warmup, repeats = 1, 1
    torch.manual_seed(0)
    rows = []
    for builder, shape in build_cases(ops, device, args.quick, args.tiny):
        case = builder(*shape, device, compile_=not args.no_compile)
        rows += time_case(case, device, warmup, repeats)
        del case
        torch._dynamo.reset()  # keep compile caches from piling up across shapes
    title = f"Fused ops on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
    return report(rows, COLUMNS, title, args.output, args.json)


if __name__ == "__main__":
    main()
