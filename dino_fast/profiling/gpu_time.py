"""Where a training step's GPU time goes, from the kernels ``torch.profiler`` recorded: matrix
products, attention, optimizer and teacher EMA, other kernels (elementwise, reductions, the
loss, copies), and the time the GPU sat idle between kernels, which is launch overhead and host
work the device waited for. Also which attention kernels ran, which names the SDPA backend
PyTorch chose (flash, memory-efficient, cuDNN) or our Triton kernel.

Kernels are told apart by name (cuBLAS, CUTLASS, cuDNN, PyTorch's and inductor's names as
they are on Hopper); ``benchmarks/train_step.py`` uses it on CUDA::

    with torch.profiler.profile(activities=[CPU, CUDA]) as prof:
        step(...)
    gpu_time_breakdown(prof.events())  # {"matmul_pct": 41.0, ..., "idle_pct": 12.5}
"""
from torch.autograd import DeviceType

CATEGORIES = ("matmul", "attention", "optimizer", "other")

# Lower-case name fragments, checked in this order (an attention kernel may also name a gemm).
_ATTENTION = ("flash", "fmha", "attention", "_attn_", "sdpa")
_OPTIMIZER = ("multi_tensor", "adam", "fused_sgd", "_ema_kernel", "foreach", "lars",
              "clip_gradients")
_MATMUL = ("gemm", "xmma", "nvjet", "cutlass", "cublas", "splitkreduce")

# Attention kernel name fragments -> the backend that launched them, first match wins.
_ATTENTION_BACKENDS = (("cudnn", "cudnn"), ("flash", "flash"), ("fmha", "efficient"),
                       ("efficient_attention", "efficient"), ("_attn_", "triton (dino_fast)"))


def kernel_category(name: str) -> str:
    """``matmul``, ``attention``, ``optimizer`` (optimizer, clipping and EMA) or ``other``."""
    low = name.lower()
    if low.startswith("triton_"):  # inductor's: named after the ATen ops fused into them
        return _inductor_category(low)
    for category, fragments in (("attention", _ATTENTION), ("optimizer", _OPTIMIZER),
                                ("matmul", _MATMUL)):
        if any(f in low for f in fragments):
            return category
    return "other"


def _inductor_category(low: str) -> str:
    """An inductor kernel's category: its matmul templates (``triton_tem_fused_mm_0``...), its
    optimizer kernels; the rest (pointwise and reductions, including the layout copies around
    an attention call, which carry the attention op's name) is ``other``."""
    if low.startswith("triton_tem_") and "mm" in low:
        return "matmul"
    if any(f in low for f in _OPTIMIZER):
        return "optimizer"
    return "other"


def attention_backends(names) -> str:
    """The attention backends whose kernels appear among ``names`` (``flash``, ``efficient``,
    ``cudnn``, ``triton (dino_fast)``), joined by ``+``; ``none`` when no attention kernel
    ran (eager attention, or SDPA's math fallback: matrix products and a softmax)."""
    found = []
    for name in names:
        low = name.lower()
        if kernel_category(name) != "attention":
            continue
        backend = next((b for fragment, b in _ATTENTION_BACKENDS if fragment in low), "other")
        if backend not in found:
            found.append(backend)
    return "+".join(sorted(found)) or "none"


def gpu_kernels(events) -> list:
    """The GPU activities among profiler ``events``: kernels, copies and memsets, without the
    GPU-timeline copies of ``record_function`` ranges."""
    return [e for e in events if e.device_type == DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)]


def busy_time(intervals) -> float:
    """Total length covered by ``(start, end)`` intervals (overlaps counted once)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def gpu_time_breakdown(events) -> dict:
    """Shares (percent) of the span from the first kernel's start to the last one's end:
    ``matmul_pct``, ``attention_pct``, ``optimizer_pct``, ``other_pct`` (kernel time by
    category) and ``idle_pct`` (no kernel running), plus ``attention_backend``
    (:func:`attention_backends`). Empty when no GPU activity was recorded."""
    kernels = gpu_kernels(events)
    if not kernels:
        return {}
    intervals = [(k.time_range.start, k.time_range.end) for k in kernels]
    span = max(end for _, end in intervals) - min(start for start, _ in intervals)
    if span <= 0:
        return {}
    shares = dict.fromkeys(CATEGORIES, 0.0)
    for kernel, (start, end) in zip(kernels, intervals):
        shares[kernel_category(kernel.name)] += end - start
    breakdown = {f"{c}_pct": 100 * t / span for c, t in shares.items()}
    breakdown["idle_pct"] = 100 * (1 - busy_time(intervals) / span)
    breakdown["attention_backend"] = attention_backends(k.name for k in kernels)
    return breakdown
