"""Count what a piece of PyTorch code asks of the device: the ATen operators it dispatches and
the host syncs among them (a value read back to the host makes the CPU wait for the device).

Proxies a CPU can measure for GPU step time: every dispatched operator is at least one kernel
launch on a GPU, and every sync stalls the launch queue. Used by ``benchmarks/train_step.py``
and by the tests that keep the training step free of syncs::

    with DispatchCounter() as counter:
        step(crops, ...)
    counter.total_ops, counter.syncs  # {"aten._local_scalar_dense": 1, ...}
"""
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Operators whose result the host must read before it can go on (.item(), bool(t), nonzero's
# output size, ...).
SYNC_OPS = frozenset({"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select",
                      "aten._unique2", "aten.unique_consecutive", "aten.unique_dim",
                      "aten.repeat_interleave", "aten.is_nonzero", "aten.equal"})
# Tensor methods that read values on the host without dispatching an operator on the CPU.
SYNC_METHODS = frozenset({"tolist"})


class _Functions(TorchFunctionMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS:
            self.counter.syncs[f"Tensor.{name}"] += 1
        return func(*args, **(kwargs or {}))


class DispatchCounter(TorchDispatchMode):
    """Context manager counting dispatched ATen operators (``ops``) and host syncs (``syncs``).

    ``repeat_interleave`` counts as a sync only without ``output_size``; a copy from a CUDA
    tensor to the CPU counts as one.
    """

    def __init__(self):
        super().__init__()
        self.ops, self.syncs = Counter(), Counter()
        self._functions = _Functions(self)

    @property
    def total_ops(self) -> int:
        """Operators dispatched."""
        return sum(self.ops.values())

    @property
    def total_syncs(self) -> int:
        """Host syncs seen."""
        return sum(self.syncs.values())

    def __enter__(self):
        self._functions.__enter__()
        return super().__enter__()

    def __exit__(self, *exc_info):
        result = super().__exit__(*exc_info)
        self._functions.__exit__(*exc_info)
        return result

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        self.ops[name] += 1
        if _is_sync(name, args, kwargs):
            self.syncs[name] += 1
        return func(*args, **kwargs)


def _is_sync(name: str, args, kwargs) -> bool:
    if name == "aten.repeat_interleave":
        return kwargs.get("output_size") is None
    if name in SYNC_OPS:
        return True
    if name in ("aten._to_copy", "aten.copy_"):  # device -> host copies wait for the device
        src = args[1] if name == "aten.copy_" else args[0]
        dst = args[0].device if name == "aten.copy_" else kwargs.get("device")
        return (isinstance(src, torch.Tensor) and src.device.type == "cuda"
                and dst is not None and torch.device(dst).type == "cpu")
    return False
