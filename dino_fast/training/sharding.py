"""FSDP2 sharding of the student and the teacher (``--sharding fsdp2``), with the DINO recipe kept.

Every transformer block and the head of both models, then each whole model, are ``fully_shard``ed
over the data-parallel mesh (PyTorch FSDP2, ``torch.distributed.fsdp``): each process keeps one
shard of every parameter, of its gradient and of its optimizer state, and all-gathers a block's
parameters just before using them. What the recipe does over whole parameters is done here over
the local shards (``DTensor.to_local()``):

* the per-parameter gradient clipping (:func:`sharded_gradient_norms`): the squared norms of the
  local shards, one all-reduce of them all stacked, so each norm is the full parameter's;
* the teacher EMA (:class:`ShardedTeacherEMA`): teacher and student are sharded alike, so the
  EMA of the local shards is the EMA of the whole parameters;
* the checkpoint (:func:`full_training_state`, :func:`load_training_state`): gathered on rank 0
  into the layout DDP and the official code write (one file, the optimizer state keyed by the
  parameter's index), and loaded back whatever the world size and the sharding.

With ``--precision bf16`` on CUDA, FSDP2's policy computes with bf16 parameters and keeps fp32
master weights and fp32 gradient reductions; everywhere else it runs in fp32.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from dino_fast.ops.clip import clip_gradients_

SHARDINGS = ("ddp", "fsdp2")
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_FULL = StateDictOptions(full_state_dict=True)


def mixed_precision(device_type: str, precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy: bf16 parameters for compute with fp32 reductions for bf16 on CUDA, fp32
    otherwise (the master weights are fp32 in both)."""
    if device_type == "cuda" and precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, mesh, policy: MixedPrecisionPolicy) -> nn.Module:
    """``fully_shard`` each block of ``model.backbone``, its ``head``, then ``model`` (a
    ``MultiCropWrapper`` or ``PackedMultiCropWrapper``) over ``mesh``; returns ``model``."""
    for block in model.backbone.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model.head, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the rest: patch embedding, tokens, norm
    return model


def shard_student_and_teacher(student, teacher, device, precision: str):
    """Shard both models alike over all processes (:func:`shard_model`)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision(device.type, precision)
    return shard_model(student, mesh, policy), shard_model(teacher, mesh, policy)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of ``tensor`` (``tensor`` itself when it is not a DTensor)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def sharded_gradient_norms(model: nn.Module, clip: float = 0.0) -> torch.Tensor:
    """:func:`dino_fast.training.optim.gradient_norms` for sharded gradients: the L2 norm of each
    full parameter's gradient (one all-reduce of the local squared norms, no host sync); with
    ``clip`` > 0 each gradient shard is scaled as its whole parameter's norm says."""
    grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    squares = torch.stack(torch._foreach_norm(grads, 2)).square()
    dist.all_reduce(squares)
    norms = squares.sqrt()
    if clip:
        clip_gradients_(grads, norms, clip)  # as gradient_norms, on the local shards
    return norms


class ShardedTeacherEMA:
    """``teacher = m * teacher + (1 - m) * student`` over the local shards of two models sharded
    alike (the flat-buffer :class:`~dino_fast.training.ema.TeacherEMA` would fight FSDP2 for
    the parameters' storage): a few foreach ops per step, whatever the number of parameters."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        pairs = list(zip(student.named_parameters(), teacher.named_parameters(), strict=True))
        if any(s_name != t_name or local(s).shape != local(t).shape
               for (s_name, s), (t_name, t) in pairs):
            raise ValueError("student and teacher must have the same parameters, sharded alike")
        self.student, self.teacher = student, teacher
        device = local(pairs[0][1][1]).device
        self.momentum = torch.zeros((), dtype=torch.float32, device=device)

    @torch.no_grad()
    def update(self, momentum):
        """One EMA step with ``momentum`` (a float or a 0-d tensor), as ``ema_reference``."""
        self.momentum.fill_(momentum)
        # FSDP2 keeps a root module's parameters gathered after its forward (for the backward,
        # which the teacher never runs): back to the shards first
        self.teacher.reshard()
        self.student.reshard()
        # the shards are looked up each step: loading a state dict may give them new storage
        teacher = [local(p.data) for p in self.teacher.parameters()]
        student = [local(p.data) for p in self.student.parameters()]
        torch._foreach_mul_(teacher, self.momentum)
        torch._foreach_add_(teacher, torch._foreach_mul(student, 1 - self.momentum))


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter of ``optimizer`` in the order of its index in a state dict."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _keyed_by_index(state: dict, names: list[str]) -> dict:
    """A name-keyed optimizer state dict (``get_optimizer_state_dict``) as PyTorch's own."""
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def _keyed_by_name(state: dict, names: list[str]) -> dict:
    """PyTorch's index-keyed optimizer state dict keyed by parameter name instead."""
    return {"state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                             for group in state["param_groups"]]}


def full_training_state(student, teacher, optimizer) -> dict:
    """``{"student", "teacher", "optimizer"}`` state dicts of sharded models, gathered on the CPU
    of rank 0 in the layout DDP writes (``module.``-prefixed student names, the optimizer state
    keyed by index); empty dicts on the other ranks. A collective: call it on every rank."""
    student_state = get_model_state_dict(student, options=_GATHER)
    teacher_state = get_model_state_dict(teacher, options=_GATHER)
    optimizer_state = get_optimizer_state_dict(student, optimizer, options=_GATHER)
    if dist.get_rank() != 0:
        return {"student": {}, "teacher": {}, "optimizer": {}}
    return {"student": {f"module.{k}": v for k, v in student_state.items()},
            "teacher": teacher_state,
            "optimizer": _keyed_by_index(optimizer_state, _parameter_names(student, optimizer))}


def load_training_state(student, teacher, optimizer, student_state: dict, teacher_state: dict,
                        optimizer_state: dict):
    """Load full (unsharded) state dicts, as :func:`full_training_state` or DDP write them, into
    the sharded models and their optimizer; every rank passes the same dicts."""
    set_model_state_dict(student, student_state, options=_FULL)
    set_model_state_dict(teacher, teacher_state, options=_FULL)
    set_optimizer_state_dict(student, optimizer,
                             _keyed_by_name(optimizer_state, _parameter_names(student, optimizer)),
                             options=_FULL)


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the parameters, gradients and optimizer state that this process holds for
    ``model``: the local shards under FSDP2, the whole tensors otherwise."""
    tensors = [local(p.data) for p in model.parameters()]
    tensors += [local(p.grad) for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [local(value) for state in optimizer.state.values()
                    for value in state.values() if isinstance(value, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)
