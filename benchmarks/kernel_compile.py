"""Compile every Triton kernel of ``kernels/`` for a named NVIDIA GPU on a machine without one,
and read its resources: registers per thread, spill bytes (``ptxas -v``), shared memory.

Triton compiles for any ``GPUTarget`` without a driver; the ``ptxas`` inside its wheel then
reports what the interpreter cannot show: kernels the real compiler rejects, register spills and
shared memory beyond the chip. Used by ``tests/kernels/test_kernel_compile.py`` (the CI check) and
``benchmarks/kernel_resources.py`` (the resource table). Both run it without
``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit`` functions).

A :class:`Case` names one compilation: kernel, input variant, candidate tile and architecture.
The attention cases come from the launchers themselves (``forward_launch`` /
``backward_launches`` called on ``meta`` tensors, candidates from the autotuner's own pruning),
so they cannot drift; the DINO-loss, EMA and gradient-clipping cases are built in
:func:`loss_cases`, :func:`ema_cases` and :func:`clip_cases` from their launchers' block-size
rules.
"""
import contextlib
import dataclasses
import io
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

ARCHS = {90: "sm_90a", 80: "sm_80"}
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # bytes per block (opt-in maximum)
DINO_HEAD_DIM = 64  # ViT-S and ViT-B
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Case:
    """One compilation. ``variant`` holds the input's parameters as ``(name, value)`` pairs;
    ``tile`` is ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for autotuned kernels, else
    ``num_warps`` alone; ``dino`` marks a candidate the launcher may run at DINO's shapes."""
    kernel: str
    variant: tuple
    tile: tuple
    arch: int
    dino: bool

    @property
    def params(self) -> dict:
        return dict(self.variant)

    def label(self) -> str:
        return " ".join(f"{v}" if k in ("dtype", "layout", "class") else f"{k}={v}"
                        for k, v in self.variant)


# ---------------------------------------------------------------------------------------------
# attention: cases from the launchers
# ---------------------------------------------------------------------------------------------
ATTENTION_KERNELS = ("fwd", "delta", "dkdv", "dq")


def compile_key(case: Case) -> tuple:
    """What Triton compiles for a case: function, signature with its specialisation, constants,
    options and target (two cases with one key make one kernel)."""
    from triton.backends.compiler import GPUTarget
    fn, args, constexprs, options = _launch(case)
    signature, constants, attrs = _signature(fn, args, constexprs, GPUTarget("cuda", case.arch, 32))
    return (fn.__name__, tuple(signature.items()), repr(sorted(constants.items())),
            repr(sorted(attrs.items())), tuple(sorted(options.items())), case.arch)


def unique(cases: list[Case]) -> list[Case]:
    """The first case of each :func:`compile_key`."""
    seen = {}
    for case in cases:
        seen.setdefault(compile_key(case), case)
    return list(seen.values())


def _attention_inputs(dtype, p: dict):
    """``q, k, v, grad_out, cu_seqlens, max_seqlen`` on ``meta``. By default as the ViT passes
    them (views of one qkv projection) at ViT-S/16's DINO shapes: 64 x 197 tokens batched, or
    2 x 197 + 10 x 37 tokens packed; ``p`` may set ``batch, heads, seqlen, lengths`` and ``qkv``
    (``vit``, ``transposed``: head dim not innermost, ``contiguous``) as the tests do."""
    heads, head_dim = p.get("heads", 6), p["head_dim"]
    if p["layout"] == "packed":
        lengths = p.get("lengths", (197,) * 2 + (37,) * 10)
        qkv = torch.empty(sum(lengths), 3, heads, head_dim, dtype=dtype, device="meta")
        q, k, v = qkv.unbind(1)  # each (total, heads, head_dim)
        cu_seqlens = torch.empty(len(lengths) + 1, dtype=torch.int32, device="meta")
        return q, k, v, torch.empty_like(q), cu_seqlens, max(lengths)
    shape = (p.get("batch", 64), p.get("seqlen", 197), 3, heads, head_dim)
    qkv = torch.empty(shape, dtype=dtype, device="meta")
    layout = p.get("qkv", "vit")
    if layout == "transposed":
        base = qkv.permute(2, 0, 3, 4, 1).contiguous()  # (3, B, heads, head_dim, N)
        q, k, v = base.transpose(-1, -2).unbind(0)
        grad_out = torch.empty(shape[0], shape[1], heads, head_dim, dtype=dtype,
                               device="meta").transpose(1, 2)
        return q, k, v, grad_out, None, 0
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
    if layout == "contiguous":
        q, k, v = (x.contiguous() for x in (q, k, v))
    return q, k, v, torch.empty(q.shape, dtype=dtype, device="meta"), None, 0


def attention_launches(dtype, p: dict) -> dict:
    """The four attention launches (``fwd``, ``delta``, ``dkdv``, ``dq``) for the input ``p``
    (see :func:`_attention_inputs`; ``class`` ``ieee`` or ``tf32`` sets float32's products), as
    the launchers build them."""
    from dino_fast.kernels import attention
    q, k, v, grad_out, cu_seqlens, max_seqlen = _attention_inputs(dtype, p)
    varlen = cu_seqlens is not None
    out, lse = attention.empty_like_input(q, varlen), attention.empty_lse(q, varlen)
    grads = tuple(attention.empty_like_input(q, varlen) for _ in range(3))
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest" if p["class"] == "ieee" else "high")
    try:
        fwd = attention.forward_launch(q, k, v, out, lse, 0.125, cu_seqlens, max_seqlen)
        bwd = attention.backward_launches(grad_out, q, k, v, out, lse, 0.125, grads,
                                          torch.empty_like(lse), cu_seqlens, max_seqlen)
    finally:
        torch.set_float32_matmul_precision(saved)
    return dict(zip(ATTENTION_KERNELS, (fwd, *bwd)))


def _tiles(launch) -> list[tuple]:
    """The candidates the autotuner keeps for this launch (its own pruning), or ``[(4,)]``
    (Triton's default warps) for a kernel that is not autotuned."""
    if not hasattr(launch.kernel, "configs"):
        return [(4,)]
    tuner = launch.kernel
    named = dict(zip(tuner.arg_names, launch.args))
    configs = tuner.early_config_prune(tuner.configs, named, **launch.constexprs)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            for c in configs]


def attention_inputs(dtypes=("fp16", "bf16", "fp32"), head_dims=(DINO_HEAD_DIM,),
                     layouts=("batched", "packed")) -> list[tuple]:
    """Input variants at DINO's shapes; float32 in both its TF32 and exact-product class."""
    from dino_fast.kernels import attention
    return [(("dtype", dtype), ("class", attention.operand_class(DTYPES[dtype], precision)),
             ("head_dim", head_dim), ("layout", layout))
            for dtype in dtypes for precision in (("tf32", "ieee") if dtype == "fp32" else
                                                  ("tf32",))
            for head_dim in head_dims for layout in layouts]


def attention_cases(inputs: list[tuple], archs=(90,), kernels=ATTENTION_KERNELS,
                    pinned: bool = False) -> list[Case]:
    """Every candidate of every attention kernel for these inputs; ``pinned``: only the one
    ``DINO_FAST_AUTOTUNE=off`` runs."""
    from dino_fast.kernels import attention
    saved = os.environ.get(attention.AUTOTUNE_ENV)
    os.environ[attention.AUTOTUNE_ENV] = "off" if pinned else "on"
    try:
        cases = []
        for variant in inputs:
            p = dict(variant)
            launches = attention_launches(DTYPES[p["dtype"]], p)
            cases += [Case(f"attention.{name}", variant, tile, arch,
                           p["head_dim"] == DINO_HEAD_DIM)
                      for name in kernels for tile in _tiles(launches[name]) for arch in archs]
    finally:
        if saved is None:
            os.environ.pop(attention.AUTOTUNE_ENV)
        else:
            os.environ[attention.AUTOTUNE_ENV] = saved
    return unique(cases)


# ---------------------------------------------------------------------------------------------
# DINO loss and EMA: the case table (update it with the kernels' signatures)
# ---------------------------------------------------------------------------------------------
LOSS_K = (4096, 65536)
LOSS_BATCH, LOSS_NCROPS = 64, 12  # per GPU, 2 global + 10 local crops


COLUMNS_WARPS = 4  # Triton's default: teacher_columns launches without num_warps


def loss_cases(archs=(90,), dtypes=("fp32", "bf16")) -> list[Case]:
    """``_row_lse_kernel`` (teacher with center, with and without the entropy; student without
    center), ``_dino_rows_kernel`` (with and without the gradient) at the block sizes
    ``_launch_config`` picks, and ``_teacher_columns_kernel`` (teacher mean, with and without
    the mean probabilities) at ``_columns_config``'s. K = 4096 and 65536 get the same blocks,
    and K is a runtime argument: one kernel each, labelled K=4096."""
    from dino_fast.kernels import dino_loss
    cases = []
    for K in LOSS_K:
        _, warps = dino_loss._launch_config(K)
        for dtype in dtypes:
            variants = [("row_lse", (("has_center", True), ("need_entropy", False))),
                        ("row_lse", (("has_center", True), ("need_entropy", True))),
                        ("row_lse", (("has_center", False), ("need_entropy", False))),
                        ("rows", (("need_grad", True),)), ("rows", (("need_grad", False),))]
            cases += [Case(f"dino_loss.{name}", (("dtype", dtype), ("K", K), *extra), (warps,),
                           arch, True) for name, extra in variants for arch in archs]
            cases += [Case("dino_loss.teacher_columns",
                           (("dtype", dtype), ("K", K), ("need_health", health)),
                           (COLUMNS_WARPS,), arch, True)
                      for health in (False, True) for arch in archs]
    return unique(cases)


def _loss_launch(case: Case):
    """``(jit function, args, constexprs)`` of a DINO-loss case, as ``dino_loss_fwd`` passes
    them (student ``[ncrops * B, K]``, teacher ``[2B, K]``, float32 center and row buffers)."""
    from dino_fast.kernels import dino_loss
    p = case.params
    K, dtype, B = p["K"], DTYPES[p["dtype"]], LOSS_BATCH
    block, _ = dino_loss._launch_config(K)
    student = torch.empty(LOSS_NCROPS * B, K, dtype=dtype, device="meta")
    teacher = torch.empty(2 * B, K, dtype=dtype, device="meta")
    center = torch.empty(K, dtype=torch.float32, device="meta")
    rows = torch.empty(LOSS_NCROPS * B, dtype=torch.float32, device="meta")
    if case.kernel == "dino_loss.row_lse":
        x = teacher if p["has_center"] else student
        return (dino_loss._row_lse_kernel, (x, center, rows, rows, K, x.stride(0), 10.0),
                {"HAS_CENTER": p["has_center"], "NEED_ENTROPY": p["need_entropy"],
                 "BLOCK_K": block})
    if case.kernel == "dino_loss.teacher_columns":
        block_rows, block_k = dino_loss._columns_config(2 * B, K)
        return (dino_loss._teacher_columns_kernel,
                (teacher, center, rows, center, center, 2 * B, K, teacher.stride(0), 25.0),
                {"NEED_HEALTH": p["need_health"], "BLOCK_ROWS": block_rows, "BLOCK_K": block_k})
    args = (student, teacher, center, rows, rows, rows, student, B, K, student.stride(0),
            teacher.stride(0), student.stride(0) if p["need_grad"] else 0, 10.0, 25.0, 1e-3)
    return (dino_loss._dino_rows_kernel, args,
            {"NCROPS": LOSS_NCROPS, "NEED_GRAD": p["need_grad"], "BLOCK_K": block})


EMA_NUMEL = 44_000_000  # ViT-S/16 and its DINO head


def ema_cases(archs=(90,)) -> list[Case]:
    """The EMA kernel over a ViT-S/16 + head flat buffer."""
    from dino_fast.kernels import ema
    return [Case("ema", (("numel", EMA_NUMEL),), (ema._NUM_WARPS,), arch, True) for arch in archs]


def _ema_launch(case: Case):
    from dino_fast.kernels import ema
    teacher = torch.empty(EMA_NUMEL, dtype=torch.float32, device="meta")
    momentum = torch.empty((), dtype=torch.float32, device="meta")
    return ema._ema_kernel, (teacher, teacher, momentum, EMA_NUMEL), {"BLOCK": ema._BLOCK}


CLIP_TENSORS, CLIP_NUMEL = 158, 41_000_000  # ViT-S/16 + DINOHead's gradients, ~10k chunks


def clip_cases(archs=(90,), dtypes=("fp32", "bf16")) -> list[Case]:
    """The gradient-clipping kernel over ViT-S/16 + head's gradients, 16-byte aligned (as the
    caching allocator places them: the 128-bit branch), with norms in the gradients' dtype."""
    from dino_fast.kernels import clip
    return [Case("clip_gradients", (("dtype", dtype),), (clip._NUM_WARPS,), arch, True)
            for dtype in dtypes for arch in archs]


def _clip_launch(case: Case):
    from dino_fast.kernels import clip
    dtype = DTYPES[case.params["dtype"]]
    chunks = CLIP_NUMEL // clip._BLOCK
    table = torch.empty(2 * CLIP_TENSORS + 2 * chunks, dtype=torch.int64, device="meta")
    norms = torch.empty(CLIP_TENSORS, dtype=dtype, device="meta")
    return (clip._clip_gradients_kernel, (table, norms, 3.0, CLIP_TENSORS, chunks),
            {"DTYPE": clip.DTYPES[dtype], "ALIGNED": True, "BLOCK": clip._BLOCK})


# ---------------------------------------------------------------------------------------------
# compiling one case
# ---------------------------------------------------------------------------------------------
def _launch(case: Case):
    """``(jit function, args, constexprs, options)`` of a case."""
    if case.kernel.startswith("attention."):
        p = case.params
        launch = attention_launches(DTYPES[p["dtype"]], p)[case.kernel.split(".")[1]]
        fn, constexprs = launch.kernel, dict(launch.constexprs)
        if hasattr(fn, "configs"):  # autotuned: the candidate's tile
            fn = fn.fn
            m, n, warps, stages = case.tile
            constexprs.update(BLOCK_M=m, BLOCK_N=n)
            return fn, launch.args, constexprs, {"num_warps": warps, "num_stages": stages}
        return fn, launch.args, constexprs, {"num_warps": case.tile[0]}
    launchers = {"dino_loss": _loss_launch, "ema": _ema_launch, "clip_gradients": _clip_launch}
    fn, args, constexprs = launchers[case.kernel.split(".")[0]](case)
    return fn, args, constexprs, {"num_warps": case.tile[0]}


def _signature(fn, args, constexprs, target):
    """Triton's signature, constants and alignment attributes for these arguments, as its JIT
    specialises them at launch (``meta`` tensors have address 0: 16-byte aligned, as torch's
    allocations and the ViT's qkv views are)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.compiler import make_backend
    backend = make_backend(target)
    signature, constants, attrs = {}, dict(constexprs), {}
    for index, (name, arg) in enumerate(zip(fn.arg_names, args)):
        kind, spec = native_specialize_impl(BaseBackend, arg, False, True, True)[:2]
        if kind == "constexpr":  # an integer 1 becomes a constant
            constants[name] = spec
        elif spec:
            attrs[(index,)] = backend.parse_attr(spec)
        signature[name] = kind
    signature.update({name: "constexpr" for name in constexprs})
    return signature, constants, attrs


def ptxas_path() -> str:
    """The ``ptxas`` shipped in Triton's wheel."""
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads")


def parse_ptxas(log: str) -> dict:
    """Registers per thread, stack frame and spill bytes of the entry function (the kernel)
    from ``ptxas -v`` output."""
    log = log[log.find("Compiling entry function"):]
    used, spill = _PTXAS_USED.search(log), _PTXAS_SPILL.search(log)
    if used is None or spill is None:
        raise ValueError(f"unexpected ptxas output: {log[-300:]}")
    stack, stores, loads = (int(x) for x in spill.groups())
    return {"registers": int(used.group(1)), "stack": stack, "spill_stores": stores,
            "spill_loads": loads}


def _ptxas_log(kernel, arch: int, fresh_log: str) -> str:
    """``ptxas -v`` output for a compiled kernel: the log Triton printed when it ran ptxas for
    this call, else (a cache hit) a rerun of ptxas on the PTX with Triton's flags."""
    if _PTXAS_USED.search(fresh_log):
        return fresh_log
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        return subprocess.run([ptxas_path(), "-lineinfo", "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={ARCHS[arch]}", ptx, "-o",
                               os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True, check=True).stderr


def compile_case(case: Case) -> dict:
    """Compile one case (ptxas included) and read its resources: a dict of the case's fields
    and ``registers, stack, spill_stores, spill_loads, shared, compile_s`` (or ``error``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    row = {"kernel": case.kernel, "variant": case.label(), "tile": case.tile,
           "arch": case.arch, "dino": case.dino}
    start = time.perf_counter()
    saved = os.environ.get("TRITON_DUMP_PTXAS_LOG")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints its ptxas -v log: no second run
    try:
        fn, args, constexprs, options = _launch(case)
        target = GPUTarget("cuda", case.arch, 32)
        signature, constants, attrs = _signature(fn, args, constexprs, target)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            kernel = triton.compile(ASTSource(fn, signature, constants, attrs), target=target,
                                    options=options)
        row.update(parse_ptxas(_ptxas_log(kernel, case.arch, printed.getvalue())),
                   shared=kernel.metadata.shared)
    except Exception as error:  # noqa: BLE001 (any compiler failure is reported per case)
        message = getattr(error, "stderr", None) or str(error)
        row["error"] = f"{type(error).__name__}: {message.strip().splitlines()[-1][:300]}"
    finally:
        if saved is None:
            os.environ.pop("TRITON_DUMP_PTXAS_LOG")
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = saved
    row["compile_s"] = round(time.perf_counter() - start, 2)
    return row


def _cost(case: Case) -> int:
    """Rough relative compile cost, to start the slow ones first."""
    p = case.params
    return (4 if p.get("class") == "ieee" else 2 if p.get("dtype") == "fp32" else 1) * \
        (2 if case.arch == 90 else 1) * (p.get("head_dim", 16) // 16)


def compile_all(cases: list[Case], jobs: int | None = None) -> list[dict]:
    """:func:`compile_case` for every case, ``jobs`` processes at a time, results in order."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile checks need real @triton.jit functions: unset TRITON_INTERPRET")
    jobs = jobs or min(4, os.cpu_count() or 1)
    order = sorted(range(len(cases)), key=lambda i: -_cost(cases[i]))
    if jobs == 1:
        rows = {i: compile_case(cases[i]) for i in order}
    else:
        context = multiprocessing.get_context("spawn")  # fresh interpreters, nothing forked
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = {i: pool.submit(compile_case, cases[i]) for i in order}
            rows = {i: future.result() for i, future in futures.items()}
    return [rows[i] for i in range(len(cases))]
