"""Triton multi-tensor kernel for DINO's per-parameter gradient clipping (official ``utils.py``
``clip_gradients``): every gradient scaled by ``min(clip / (norm + 1e-6), 1)`` in one launch.

Contract (shared with the C++ kernel; see ``dino_fast/ops/clip.py``)::

    clip_gradients_(grads: list of T contiguous tensors of one dtype (float32, bfloat16 or
                    float16) on one device, scaled in place; norms [T] on that device;
                    clip: float) -> None

The tensors are cut into chunks of ``_BLOCK`` elements, one program each. A table on the device
says where each chunk lives (in the spirit of apex's ``multi_tensor_apply``)::

    table int64 = [pointer of each tensor  (T) | numel of each tensor       (T)
                   tensor of each chunk    (C) | first element of each chunk (C)]

Each program reads its tensor's address from the table and its norm from ``norms`` (device
memory: the coefficients never reach the host, so nothing syncs). The table depends only on the
tensors' addresses and sizes, which PyTorch's caching allocator repeats from step to step, so it
is built on the host and copied (pinned, non-blocking) once per layout and kept in a small LRU
cache; ViT-S/16 + DINOHead(65536), ~41M gradient elements, is ~10k chunks. (To capture the op
in a CUDA graph, run it once before capturing, so that the capture finds its table cached.)

Full chunks take a branch without a mask, with the alignment of a 16-byte-aligned tensor
declared, so Triton emits 128-bit loads and stores (a mask built from a numel read from memory
would defeat its vectorisation); each tensor's last, partial chunk takes the masked branch.
"""
import functools

import torch
import triton
import triton.language as tl

_BLOCK = 4096
_NUM_WARPS = 8
_ALIGNMENT = 16  # bytes: 128-bit accesses
DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _clip_gradients_kernel(table_ptr, norms_ptr, clip, num_tensors, num_chunks,
                           DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Scale one chunk of one gradient by its tensor's clipping coefficient."""
    chunk = tl.program_id(0)
    tensor = tl.load(table_ptr + 2 * num_tensors + chunk)
    start = tl.multiple_of(tl.load(table_ptr + 2 * num_tensors + num_chunks + chunk), BLOCK)
    numel = tl.load(table_ptr + num_tensors + tensor)
    base = tl.load(table_ptr + tensor).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        base = tl.multiple_of(base, 16)  # bytes, _ALIGNMENT
    # The reference's rounding, step by step in the norms' dtype: clip / x is
    # x.reciprocal() * clip in PyTorch, clamp(max=1) keeps a NaN.
    norm_dtype = norms_ptr.dtype.element_ty
    norm = tl.load(norms_ptr + tensor).to(tl.float32)
    shifted = (norm + 1e-6).to(norm_dtype).to(tl.float32)
    coef = (tl.div_rn(1.0, shifted).to(norm_dtype).to(tl.float32) * clip).to(norm_dtype)
    coef = tl.minimum(coef.to(tl.float32), 1.0, propagate_nan=tl.PropagateNan.ALL)
    coef = coef.to(norm_dtype).to(tl.float32)
    offsets = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        grad = tl.load(base + offsets)
        tl.store(base + offsets, (grad.to(tl.float32) * coef).to(DTYPE))
    else:
        mask = offsets < numel
        grad = tl.load(base + offsets, mask=mask)
        tl.store(base + offsets, (grad.to(tl.float32) * coef).to(DTYPE), mask=mask)


@functools.lru_cache(maxsize=8)
def _chunk_table(device: torch.device, spans: tuple) -> tuple[torch.Tensor, int, bool]:
    """The device table of ``spans`` (``(data_ptr, numel)`` of each tensor), its number of
    chunks and whether every tensor is 16-byte aligned; cached, since the same gradients come
    back at the same addresses every step."""
    pointers = torch.tensor([pointer for pointer, _ in spans], dtype=torch.int64)
    numels = torch.tensor([numel for _, numel in spans], dtype=torch.int64)
    chunks = triton.cdiv(numels, _BLOCK)  # per tensor
    tensor_of_chunk = torch.repeat_interleave(torch.arange(len(spans)), chunks)
    first_chunk = torch.cumsum(chunks, 0) - chunks
    start = (torch.arange(tensor_of_chunk.numel()) - first_chunk[tensor_of_chunk]) * _BLOCK
    table = torch.cat([pointers, numels, tensor_of_chunk, start])
    if device.type == "cuda":
        table = table.pin_memory()  # an asynchronous copy: no sync, even on a cache miss
    aligned = all(pointer % _ALIGNMENT == 0 for pointer, _ in spans)
    return table.to(device, non_blocking=True), tensor_of_chunk.numel(), aligned


def clip_gradients_(grads: list[torch.Tensor], norms: torch.Tensor, clip: float) -> None:
    """Scale each gradient in place by ``min(clip / (norm + 1e-6), 1)`` in one launch (the
    op checks the contract)."""
    spans = tuple((g.data_ptr(), g.numel()) for g in grads)  # empty ones too: T = len(norms)
    if not any(numel for _, numel in spans):
        return
    table, num_chunks, aligned = _chunk_table(norms.device, spans)
    _clip_gradients_kernel[(num_chunks,)](table, norms, float(clip), len(spans), num_chunks,
                                          DTYPE=DTYPES[grads[0].dtype], ALIGNED=aligned,
                                          BLOCK=_BLOCK, num_warps=_NUM_WARPS)
