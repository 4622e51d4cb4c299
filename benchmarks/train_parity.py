"""Reading two short runs of ``python -m dino_fast.train``: the fast configuration against the
reference one on the same crops (the GPU suite's stage 2), and a run's images/s.

Each run is 2 epochs of 1 step with ``--saveckp_freq 1``, so ``checkpoint0000.pth`` holds the
state after step 1 and ``checkpoint.pth`` after step 2, and ``log.txt`` has each step's loss (the
first computed before any update). The same seed and loader give both configurations the same
initial weights and crops. Compared: the two losses, the DINO center after step 2 (it averages
the teacher's outputs, so it checks the forward passes), and the student's step-2 update
``s2 - s1`` (AdamW's update follows the gradients' signs, so a wrong backward moves it by O(1),
while rounding flips only the near-zero components).
"""
import json
import os
import re

import torch

# Largest relative differences accepted, per precision of the fast run: (loss, center, update).
TOLERANCES = {"fp32": (1e-3, 1e-2, 0.1), "bf16": (2e-2, 0.1, 0.6), "fp16": (2e-2, 0.1, 0.6)}


def run_flags(folder: str) -> list[str]:
    """The flags that make a run comparable: 2 epochs of 1 step, a checkpoint each."""
    return ["--epochs", "2", "--max_steps", "1", "--saveckp_freq", "1", "--warmup_epochs", "0",
            "--drop_path_rate", "0", "--seed", "0", "--output_dir", folder]


def _student_vector(path: str) -> torch.Tensor:
    state = torch.load(path, map_location="cpu", weights_only=False)["student"]
    return torch.cat([value.double().flatten() for value in state.values()
                      if value.is_floating_point()])


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def compare_runs(reference: str, fast: str, precision: str) -> dict:
    """One row: the relative differences of the fast run from the reference run, and a verdict
    against ``TOLERANCES[precision]``."""
    losses = {}
    for name, folder in (("reference", reference), ("fast", fast)):
        with open(os.path.join(folder, "log.txt"), encoding="utf-8") as f:
            losses[name] = [json.loads(line)["train_loss"] for line in f]
    loss_rel = max(abs(f - r) / abs(r) for f, r in zip(losses["fast"], losses["reference"]))
    centers = [torch.load(os.path.join(folder, "checkpoint.pth"), map_location="cpu",
                          weights_only=False)["dino_loss"]["center"].double()
               for folder in (reference, fast)]
    updates = [_student_vector(os.path.join(folder, "checkpoint.pth"))
               - _student_vector(os.path.join(folder, "checkpoint0000.pth"))
               for folder in (reference, fast)]
    row = {"loss step 1": losses["fast"][0], "loss step 2": losses["fast"][1],
           "loss rel diff": loss_rel, "center rel diff": _relative(centers[1], centers[0]),
           "update rel diff": _relative(updates[1], updates[0])}
    limits = TOLERANCES[precision]
    measured = (row["loss rel diff"], row["center rel diff"], row["update rel diff"])
    row["verdict"] = "pass" if all(m <= t for m, t in zip(measured, limits)) else \
        f"FAIL (limits {limits})"
    return row


def images_per_second(output: str, epoch: int) -> float | None:
    """The last images/s that ``dino_fast.train``'s progress showed during ``epoch`` (``img_s=``
    in a terminal's bar, ``img_s N,`` in the plain lines written to a log)."""
    marker = output.rfind(f"epoch {epoch}/")
    end = output.find(f"epoch {epoch + 1}/", max(marker, 0))
    shown = output[marker:end if end >= 0 else len(output)]
    found = re.findall(r"img_s[= ]([0-9.]+)", shown) if marker >= 0 else []
    return float(found[-1]) if found else None
