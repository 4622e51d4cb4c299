"""One DINO training iteration (official ``main_dino.py`` ``train_one_epoch`` body), in order:
set lr / weight decay, teacher forward on the 2 global crops, student forward on all crops, loss,
zero_grad, backward, per-parameter clipping, last-layer freezing, optimizer step, teacher EMA.

The step never waits on the host: it returns ``{"loss": 0-d device tensor}`` (a dict that can
gain keys) and the official "stop if the loss is not finite" becomes a device-side record
(``dino_fast.training.nonfinite``) that the loop reads every few steps with
:meth:`TrainStep.check_finite`. A non-finite step must not change the weights before that check sees
it: its backward runs with a NaN output gradient, so every gradient is NaN on every process (DDP
averages them), and the gradient norms (computed for the clipping anyway) give a flag that is the
same on all processes; the fused optimizer skips its update on that flag (``found_inf``), the center
and the teacher are kept. Steps after a non-finite one are skipped alike until the check stops
training. With fp16 the loss scaler skips the NaN gradients itself. (An optimizer without a fused
kernel cannot skip on a device flag: its weights then turn NaN, but the loop checks before every
checkpoint, so no checkpoint holds them.)

With ``--compile``, ``compile_scope`` says what is compiled. ``forward``: the teacher and student
forward passes (whose backward AOTAutograd compiles too), handed whole to
``torch.compile(fullgraph=True)``: one large graph, compiled once. ``blocks``: each transformer
block, in place (:func:`compile_blocks`, regional compilation as DINOv3 does): the blocks of one
shape share a few small graphs, so the cold compile is shorter, while the patch embedding, the
head and the module hooks between the blocks run eagerly. FSDP2's hooks cannot be traced into
one graph, so a sharded step compiles ``blocks``. The loss, the optimizer and
the EMA stay eager: the loss and the EMA are one fused op each already, and the epoch (the
teacher temperature), lr and weight decay change during training, which would make a compiled
graph recompile.
"""
import contextlib
import math

import torch

from dino_fast.ops.dino_loss import dino_loss_terms_reference
from dino_fast.training.nonfinite import NonFiniteLossError, NonFiniteWatch
from dino_fast.training.optim import cancel_gradients_last_layer, gradient_norms
from dino_fast.training.sharding import sharded_gradient_norms

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
COMPILE_SCOPES = ("forward", "blocks")

__all__ = ["COMPILE_MODES", "COMPILE_SCOPES", "PRECISIONS", "NonFiniteLossError", "TrainStep",
           "compile_blocks", "loss_terms"]


class TrainStep:
    """Callable running one iteration; holds the models, loss, optimizer, EMA and precision.
    ``sharded``: the models are FSDP2-sharded (``dino_fast.training.sharding``), and ``ema`` is
    then a :class:`~dino_fast.training.sharding.ShardedTeacherEMA`. ``compile_scope`` (with
    ``compile``): ``forward`` or ``blocks`` (the module docstring); None picks ``blocks`` when
    ``sharded``, else ``forward``."""

    def __init__(self, student, teacher, dino_loss, optimizer, ema, precision="fp32",
                 clip_grad=3.0, freeze_last_layer=1, compile=False, compile_mode="default",
                 compile_scope=None, sharded=False):
        self.student, self.teacher, self.dino_loss = student, teacher, dino_loss
        # FSDP2 (``sharded``): each gradient is a shard, its norm needs the other processes'
        self.gradient_norms = sharded_gradient_norms if sharded else gradient_norms
        self.optimizer, self.ema = optimizer, ema
        device = next(student.parameters()).device
        self.device_type = device.type
        self.amp_dtype = PRECISIONS[precision]
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None
        self.clip_grad, self.freeze_last_layer = clip_grad, freeze_last_layer
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {compile_mode!r} is not one of {COMPILE_MODES}")
        compile_scope = compile_scope or ("blocks" if sharded else "forward")
        if compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile scope {compile_scope!r} is not one of {COMPILE_SCOPES}")
        if compile and sharded and compile_scope == "forward":
            raise ValueError("FSDP2's hooks cannot be traced into one graph: compile the "
                             "blocks (compile_scope='blocks')")
        self.forward = self._forward
        if compile and compile_scope == "blocks":  # module hooks run eagerly, between blocks
            compile_blocks(student, compile_mode)
            compile_blocks(teacher, compile_mode)
        elif compile:
            self.forward = torch.compile(self._forward, mode=compile_mode, fullgraph=True)
        self.cuda_graphs = compile and compile_mode == "reduce-overhead"
        self.watch = NonFiniteWatch(device)
        self._last = None  # the latest step's outputs, for the report of a non-finite step

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def _forward(self, crops):
        """Teacher logits of the 2 global crops and student logits of all crops."""
        with self._autocast():
            return self.teacher(crops[:2]), self.student(crops)

    def __call__(self, crops, epoch, lr, weight_decay, momentum, step=None) -> dict:
        """Run one iteration; return ``{"loss": the loss as a 0-d device tensor}`` without
        waiting for the device. A non-finite step is recorded, not raised: call
        :meth:`check_finite` every few steps and before saving."""
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr
            if i == 0:  # only the first group is regularised
                group["weight_decay"] = weight_decay
        self._last = None
        if self.cuda_graphs:  # a new iteration: the graphs may reuse the last outputs' memory
            torch.compiler.cudagraph_mark_step_begin()
        center = self.dino_loss.center.clone()  # the one this step's loss uses
        teacher_output, student_output = self.forward(crops)
        loss = self.dino_loss(student_output, teacher_output, epoch)
        loss_bad = ~torch.isfinite(loss.detach())
        # NaN gradients everywhere (every process, through DDP's average) once a step went bad
        grad_output = torch.where(loss_bad | self.watch.any_bad(), float("nan"), 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        student = getattr(self.student, "module", self.student)  # unwrap DDP
        if self.scaler is None:
            loss.backward(grad_output)
            skip = ~torch.isfinite(self._clip_and_freeze(student, epoch).sum())
            self.watch.record(skip | loss_bad, loss.detach(), step, epoch)
            self._optimizer_step(skip)
        else:  # gradient overflow is routine with fp16: only a non-finite loss stops
            self.scaler.scale(loss).backward(grad_output)
            if self.clip_grad:
                self.scaler.unscale_(self.optimizer)
            self._clip_and_freeze(student, epoch)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.watch.record(loss_bad, loss.detach(), step, epoch)
            skip = self.watch.any_bad()
        with torch.no_grad():
            self.dino_loss.center.copy_(torch.where(skip, center, self.dino_loss.center))
        # the EMA runs even when the scaler skipped the step, as official; a bad step keeps it
        self.ema.update(torch.where(skip, 1.0, momentum))
        self._last = (student_output.detach(), teacher_output.detach(), center, step, epoch)
        return {"loss": loss.detach()}

    def _optimizer_step(self, skip: torch.Tensor):
        """The optimizer step, skipped on the device when ``skip`` is set (fused optimizers;
        the others cannot read a device flag and step anyway, see the module docstring)."""
        if not self.optimizer.defaults.get("fused"):
            self.optimizer.step()
            return
        self.optimizer.found_inf = skip.float()  # PyTorch's protocol for the loss scaler
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf

    def check_finite(self):
        """Raise :class:`NonFiniteLossError` with a report when a step so far went non-finite
        on any process. One host read (a collective under torch.distributed): call it on every
        process at the same steps."""
        first = self.watch.first_bad_step()
        if first is not None:
            raise NonFiniteLossError(self._non_finite_report(*first))

    def _non_finite_report(self, step, epoch, loss_value) -> str:
        """The stop message: the first non-finite step, then the per-pair cross-entropies and
        non-finite counts of the latest step, which ran from the weights that step had (a
        non-finite step changes none)."""
        student_output, teacher_output, center, last_step, last_epoch = self._last
        loss = self.dino_loss
        terms = loss_terms(student_output, teacher_output, center, loss.ncrops,
                           loss.student_temp, float(loss.teacher_temp_schedule[last_epoch]))
        listed = ", ".join(f"(t{iq},s{v})={value:.4g}" for (iq, v), value in terms.items())
        bad = {name: int((~out.isfinite()).sum()) for name, out in
               (("student", student_output), ("teacher", teacher_output), ("center", center))}
        what = (f"loss is {loss_value}" if not math.isfinite(loss_value)
                else f"the gradients are not finite (loss {loss_value:.4g} on this process)")
        later = "" if last_step == step else f" at step {last_step}, the latest"
        return (f"{what} at step {step} (epoch {epoch}); stopping. Per-pair cross-entropies "
                f"(teacher view, student view) on this process{later}: {listed}. Non-finite "
                f"values in the student logits / teacher logits / center: {bad['student']} / "
                f"{bad['teacher']} / {bad['center']}. The last complete checkpoint is left as it "
                "was. Try a lower --lr, --precision fp32, a smaller --out_dim, or a smaller "
                "--clip_grad.")

    def _clip_and_freeze(self, student, epoch) -> torch.Tensor:
        """Clip per parameter (when ``clip_grad``), freeze the last layer; return the norms."""
        norms = self.gradient_norms(student, self.clip_grad)
        cancel_gradients_last_layer(epoch, student, self.freeze_last_layer)
        return norms


def compile_blocks(model, mode: str = "default"):
    """Compile each transformer block of ``model`` (a multi-crop wrapper, or DDP over one) in
    place, with ``nn.Module.compile``: regional compilation, which keeps the parameters' names.
    Blocks of one shape share their compiled graphs; the modules' hooks (FSDP2's gathers) are
    graph breaks around each block's graph, so they run eagerly."""
    model = getattr(model, "module", model)  # unwrap DDP
    for block in model.backbone.blocks:
        block.compile(mode=mode)


@torch.no_grad()
def loss_terms(student_output, teacher_output, center, ncrops, student_temp, teacher_temp) -> dict:
    """``{(teacher view, student view): cross-entropy}`` as floats (the diagnostic for a
    non-finite loss)."""
    terms = dino_loss_terms_reference(student_output.float(), teacher_output.float(),
                                      center.reshape(-1), ncrops, student_temp, teacher_temp)
    return {pair: value.item() for pair, value in terms.items()}
