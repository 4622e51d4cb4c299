"""Draw the README's pictures of the two collapse modes from synthetic logs.

Each synthetic "epoch" is one step of the fused DINO loss on made-up logits (K = 1024, batch 32,
2 + 4 crops): a healthy run whose teacher sharpens while its images spread over the prototypes
and whose student keeps a distance to it, against a run whose teacher drifts to the uniform
distribution, or to one prototype for every image, while the student copies it. The log lines
are what ``dino_fast.train`` writes (less lr, weight decay and center); the collapse rule of
``dino_fast.monitoring.health`` runs over them and the warnings it gives are printed.

    python docs/collapse_modes.py   # docs/collapse-uniform.png, docs/collapse-one-dimension.png
"""
import os

import torch

from dino_fast.monitoring.curves import draw
from dino_fast.monitoring.health import epoch_health, first_warning_in_log
from dino_fast.ops.dino_loss import dino_loss_with_health

K, BATCH, NCROPS, EPOCHS = 1024, 32, 6, 30
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


def synthetic_log(mode: str, seed: int = 0) -> list[dict]:
    """Per-epoch log entries of a synthetic run: ``healthy``, ``uniform`` or ``one-dimension``."""
    gen = torch.Generator().manual_seed(seed)
    entries = []
    for epoch in range(EPOCHS):
        progress = epoch / (EPOCHS - 1)
        own = torch.randn(2 * BATCH, K, generator=gen)  # each image's own preference
        if mode == "healthy":
            teacher = own * (0.05 + 0.1 * progress)  # sharpens, images spread out
            copy = 0.5
        elif mode == "uniform":
            teacher = own * 0.05 * max(0.0, 1 - 2 * progress)  # flattens out
            copy = min(1.0, 0.5 + progress)
        else:
            teacher = own * 0.05
            teacher[:, 3] += 0.8 * min(1.0, 2 * progress)  # one prototype takes over
            copy = min(1.0, 0.5 + progress)
        noise = torch.randn(NCROPS * BATCH, K, generator=gen) * 0.2
        student = (copy * teacher[:BATCH].repeat(NCROPS, 1) * STUDENT_TEMP / TEACHER_TEMP
                   + (1 - copy) * noise)
        loss, _, health = dino_loss_with_health(student, teacher, torch.zeros(K), NCROPS,
                                                STUDENT_TEMP, TEACHER_TEMP)
        means = {name: value.item() for name, value in health.items()}
        record = epoch_health({**means, "center_norm": 0.0}, K)
        record.pop("center_norm")  # not simulated
        entries.append({"train_loss": loss.item(),  # no lr / wd: not simulated
                        **{f"train_{k}": v for k, v in record.items()}, "epoch": epoch})
    return entries


def main():
    """Write both pictures next to this file and print the warnings."""
    folder = os.path.dirname(os.path.abspath(__file__))
    healthy = synthetic_log("healthy")
    assert first_warning_in_log(healthy, K) is None
    for mode in ("uniform", "one-dimension"):
        collapsed = synthetic_log(mode, seed=1)
        print(first_warning_in_log(collapsed, K))
        draw({"healthy": healthy, f"{mode} collapse": collapsed},
             os.path.join(folder, f"collapse-{mode}.png"),
             title=f"{mode} collapse (synthetic logits, K = {K})")


if __name__ == "__main__":
    main()
