"""Bytes a forward pass leaves alive for its backward: what activation checkpointing
(``dino_fast/models/checkpointing.py``) trades for recomputation, measured on any device::

    with SavedMemory() as saved:
        loss = loss_fn(student(crops), targets)
    saved.bytes  # storages created by the forward and still held (by autograd or a checkpoint)

Every storage an operator creates inside the context is tracked by a weak reference; ``bytes``
sums those still alive, each storage once (views and in-place results share one). That counts
what autograd saves, the block inputs a checkpoint keeps for its recompute and the outputs a
selective checkpoint caches. ``torch.autograd.graph.saved_tensors_hooks`` alone would miss the
last two: a checkpoint region installs its own hooks, innermost, so an outer hook sees nothing
of it and ``blocks`` would look almost free. Parameters and the inputs, made before the
context, are not counted.
"""
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class SavedMemory(TorchDispatchMode):
    """Context manager: ``bytes`` is the memory of the storages created inside it and still
    alive (read it while the forward's outputs are held, before the backward)."""

    def __init__(self):
        super().__init__()
        self._storages = {}  # StorageImpl address -> (weak reference, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {ref.cdata for ref in _storage_refs((args, kwargs))}
        for ref in _storage_refs(out):  # views and in-place results of an input are not new
            if ref.cdata not in inputs:
                self._storages.setdefault(ref.cdata, (ref, ref.nbytes))
        return out

    @property
    def bytes(self) -> int:
        """Bytes of the tracked storages still alive now."""
        return sum(nbytes for ref, nbytes in self._storages.values() if not ref.expired())


class _Ref(StorageWeakRef):
    def __init__(self, storage):
        super().__init__(storage)
        self.nbytes = storage.nbytes()


def _storage_refs(tree) -> list:
    """Weak references to the storages of the strided tensors in ``tree``."""
    return [_Ref(leaf.untyped_storage()) for leaf in tree_leaves(tree)
            if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided]


def saved_bytes_per_image(model, batch: list[torch.Tensor]) -> float:
    """Bytes ``model``'s forward on the crops ``batch`` keeps for its backward, per image."""
    with SavedMemory() as saved:
        out = model(batch)
        kept = saved.bytes
    del out
    return kept / batch[0].shape[0]
