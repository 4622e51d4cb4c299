"""One DINO training iteration (official ``main_dino.py`` ``train_one_epoch`` body), in order:
set lr / weight decay, teacher forward on the 2 global crops, student forward on all crops, loss,
stop if not finite, zero_grad, backward, per-parameter clipping, last-layer freezing, optimizer
step, teacher EMA.

``forward`` (the teacher and student forward passes, whose backward AOTAutograd compiles too)
is what ``--compile`` hands to ``torch.compile``. The loss, the optimizer and the EMA stay eager:
the loss and the EMA are one fused op each already, and the epoch (the teacher temperature), lr
and weight decay change during training, which would make a compiled graph recompile.
"""
import contextlib
import math

import torch

from dino_fast.distributed import all_reduce_mean
from dino_fast.ops.dino_loss import dino_loss_terms_reference
from dino_fast.optim import cancel_gradients_last_layer, clip_gradients

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training must stop."""


class TrainStep:
    """Callable running one iteration; holds the models, loss, optimizer, EMA and precision."""

    def __init__(self, student, teacher, dino_loss, optimizer, ema, precision="fp32",
                 clip_grad=3.0, freeze_last_layer=1, compile=False):
        self.student, self.teacher, self.dino_loss = student, teacher, dino_loss
        self.optimizer, self.ema = optimizer, ema
        self.device_type = next(student.parameters()).device.type
        self.amp_dtype = PRECISIONS[precision]
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None
        self.clip_grad, self.freeze_last_layer = clip_grad, freeze_last_layer
        self.forward = torch.compile(self._forward) if compile else self._forward

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def _forward(self, crops):
        """Teacher logits of the 2 global crops and student logits of all crops."""
        with self._autocast():
            return self.teacher(crops[:2]), self.student(crops)

    def __call__(self, crops, epoch, lr, weight_decay, momentum, step=None) -> float:
        """Run one iteration and return the loss; raise NonFiniteLossError on NaN/inf."""
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr
            if i == 0:  # only the first group is regularised
                group["weight_decay"] = weight_decay
        center = self.dino_loss.center.clone()  # the one this step's loss uses, for the report
        teacher_output, student_output = self.forward(crops)
        loss = self.dino_loss(student_output, teacher_output, epoch)
        # The mean over processes: a NaN on any rank stops every rank (no rank left hanging).
        loss_value = all_reduce_mean(loss.detach().float().clone()).item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(self._non_finite_report(
                loss_value, step, epoch, student_output.detach(), teacher_output.detach(), center))
        self.optimizer.zero_grad(set_to_none=True)
        student = getattr(self.student, "module", self.student)  # unwrap DDP
        if self.scaler is None:
            loss.backward()
            self._clip_and_freeze(student, epoch)
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            if self.clip_grad:
                self.scaler.unscale_(self.optimizer)
            self._clip_and_freeze(student, epoch)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.ema.update(momentum)  # runs even when the scaler skipped the step, as official
        return loss_value

    def _non_finite_report(self, loss_value, step, epoch, student_output, teacher_output,
                           center) -> str:
        loss = self.dino_loss
        terms = loss_terms(student_output, teacher_output, center, loss.ncrops,
                           loss.student_temp, float(loss.teacher_temp_schedule[epoch]))
        listed = ", ".join(f"(t{iq},s{v})={value:.4g}" for (iq, v), value in terms.items())
        bad = {name: int((~out.isfinite()).sum()) for name, out in
               (("student", student_output), ("teacher", teacher_output), ("center", center))}
        return (f"loss is {loss_value} at step {step} (epoch {epoch}); stopping. Per-pair "
                f"cross-entropies (teacher view, student view) on this process: {listed}. "
                f"Non-finite values in the student logits / teacher logits / center: "
                f"{bad['student']} / {bad['teacher']} / {bad['center']}. The last complete "
                "checkpoint is left as it was. Try a lower --lr, --precision fp32, a smaller "
                "--out_dim, or a smaller --clip_grad.")

    def _clip_and_freeze(self, student, epoch):
        if self.clip_grad:
            clip_gradients(student, self.clip_grad)
        cancel_gradients_last_layer(epoch, student, self.freeze_last_layer)


@torch.no_grad()
def loss_terms(student_output, teacher_output, center, ncrops, student_temp, teacher_temp) -> dict:
    """``{(teacher view, student view): cross-entropy}`` as floats (the diagnostic for a
    non-finite loss)."""
    terms = dino_loss_terms_reference(student_output.float(), teacher_output.float(),
                                      center.reshape(-1), ncrops, student_temp, teacher_temp)
    return {pair: value.item() for pair, value in terms.items()}
