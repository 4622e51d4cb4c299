"""Training health: the per-epoch collapse diagnostics of DINO and the rule that warns of a
collapse (Caron et al. 2021, section 5.3 and figure 7).

DINO avoids collapse by balancing two opposite forces on the teacher output: centering pushes it
towards the uniform distribution, sharpening (the low teacher temperature) towards one dimension.
With the balance lost, the teacher collapses to one of the two, and the student then copies it,
so the KL divergence between teacher and student outputs falls to 0 in both modes:

* **uniform collapse**: every teacher output is close to uniform: its entropy ``H(P_t)`` rises
  to (or never leaves) ``ln K``; the loss sits near ``ln K``.
* **one-dimension collapse**: every image gets the same one-hot output: ``H(P_t)`` falls to 0 and
  so does the entropy of the batch-mean teacher output (one prototype in use). A healthy sharp
  teacher also has a low ``H(P_t)``, but spreads its images over many prototypes.

The metrics come from the fused loss (``dino_fast.ops.dino_loss.health_metrics``), averaged over
an epoch's steps (and processes) by ``dino_fast.monitoring.monitor.HealthMeter``.
"""
import math
from dataclasses import dataclass

# Per-epoch metric names as written to log.txt (with the ``train_`` prefix) and their meaning.
METRICS = {
    "teacher_entropy": "mean entropy H(P_t) of the teacher outputs, nats",
    "teacher_entropy_ratio": "H(P_t) / ln K: 1 is uniform, 0 is one-hot",
    "kl": "mean KL(P_t || P_s) over the loss's (teacher view, student view) pairs, nats",
    "batch_entropy": "entropy of the batch-mean teacher output, nats",
    "prototypes_used": "exp(batch_entropy): how many of the K prototypes the batch uses",
    "center_norm": "L2 norm of the center",
}

HINTS = {
    "uniform": "Centering dominates sharpening. What usually helps: a lower --teacher_temp "
               "(or a shorter --warmup_teacher_temp_epochs), --norm_last_layer true, a lower "
               "--lr or a longer --warmup_epochs, a larger batch, and --freeze_last_layer 1 or "
               "more",
    "one-dimension": "Sharpening dominates centering. What usually helps: a higher "
                     "--teacher_temp (or its warm-up from --warmup_teacher_temp 0.04), a larger "
                     "batch (the center is a batch statistic), a lower --lr or a longer "
                     "--warmup_epochs, and --freeze_last_layer 1 or more",
}


def epoch_health(means: dict, out_dim: int) -> dict:
    """Per-epoch metrics (see ``METRICS``) from the epoch means of the step metrics
    (``teacher_entropy``, ``kl``, ``batch_entropy``, ``center_norm``)."""
    ln_k = math.log(out_dim) if out_dim > 1 else 1.0  # K = 1: one prototype, entropy always 0
    return {"teacher_entropy": means["teacher_entropy"],
            "teacher_entropy_ratio": means["teacher_entropy"] / ln_k,
            "kl": means["kl"],
            "batch_entropy": means["batch_entropy"],
            "prototypes_used": math.exp(means["batch_entropy"]),
            "center_norm": means["center_norm"]}


@dataclass(frozen=True)
class CollapseRule:
    """When the per-epoch metrics say the run has collapsed (thresholds relative to ``ln K``).

    An epoch shows the **uniform** signature when ``H(P_t) > uniform_ratio * ln K`` and the
    **one-dimension** signature when ``H(P_t) < floor_ratio * ln K`` and the batch-mean entropy
    ``< batch_floor_ratio * ln K``; in both, KL must be near 0: ``KL < kl_ratio * ln K``. A
    collapse is reported when one signature holds for ``patience`` consecutive epochs *and* the
    trend over them does not head back to health: for uniform, ``H(P_t) / ln K`` has not fallen
    by more than ``trend_tolerance`` over those epochs (a healthy run starts near ``ln K`` and its
    teacher sharpens); for one-dimension, the batch-mean entropy ratio has not risen by more.
    :class:`CollapseDetector` also ignores the learning-rate warm-up epochs, in which the teacher
    has not yet had the chance to sharpen and the center is still settling.

    Calibration (K = 1024, vit_tiny on the bundled photos): in the first epochs the teacher
    entropy is 0.85-0.88 ln K with KL 0.6-0.75 nats (0.09-0.11 ln K); a run drifting to uniform
    went to 0.94 ln K and KL 0.21 nats (0.03 ln K) with its loss back at 6.76 of ln K = 6.93,
    passing 0.9 ln K with KL 0.30-0.31 nats (0.043-0.045 ln K). The healthy learning check
    (vit_tiny, K = 1024, 256 photo stamps; 20-NN top-1 rising 36 -> 47) sits at 0.90-0.91 ln K
    with KL 0.34-0.35 nats (0.049-0.050 ln K) around its epochs 12-16: ``kl_ratio`` lies between
    the two (0.05 flagged the healthy run at epoch 16).
    """

    patience: int = 3
    uniform_ratio: float = 0.9
    floor_ratio: float = 0.1
    batch_floor_ratio: float = 0.1
    kl_ratio: float = 0.046
    trend_tolerance: float = 0.01

    def signature(self, record: dict, out_dim: int) -> str | None:
        """``'uniform'``, ``'one-dimension'`` or None for one epoch's metrics."""
        ln_k = math.log(out_dim) if out_dim > 1 else 1.0
        if record["kl"] >= self.kl_ratio * ln_k:
            return None
        if record["teacher_entropy_ratio"] > self.uniform_ratio:
            return "uniform"
        if (record["teacher_entropy_ratio"] < self.floor_ratio
                and record["batch_entropy"] < self.batch_floor_ratio * ln_k):
            return "one-dimension"
        return None

    def check(self, history: list[dict], out_dim: int) -> str | None:
        """The collapse that ``history`` (per-epoch metrics, oldest first) ends in, or None."""
        if len(history) < self.patience:
            return None
        window = history[-self.patience:]
        kinds = {self.signature(record, out_dim) for record in window}
        if len(kinds) != 1 or None in kinds:
            return None
        kind = kinds.pop()
        first, last = window[0], window[-1]
        if kind == "uniform":
            recovering = (first["teacher_entropy_ratio"] - last["teacher_entropy_ratio"]
                          > self.trend_tolerance)
        else:
            ln_k = math.log(out_dim) if out_dim > 1 else 1.0
            recovering = (last["batch_entropy"] - first["batch_entropy"]
                          > self.trend_tolerance * ln_k)
        return None if recovering else kind


class CollapseDetector:
    """Feeds the per-epoch metrics to a :class:`CollapseRule` and words the warning, once."""

    def __init__(self, out_dim: int, rule: CollapseRule | None = None, start_epoch: int = 0):
        self.out_dim, self.rule, self.start_epoch = out_dim, rule or CollapseRule(), start_epoch
        self.history: list[dict] = []
        self.collapse: str | None = None  # the first collapse found
        self.first_epoch: int | None = None

    def update(self, epoch: int, record: dict) -> str | None:
        """Add epoch ``epoch``'s metrics; return the warning the first time a collapse is
        found (None otherwise, and None ever after). Epochs before ``start_epoch`` (the
        learning-rate warm-up) are not judged."""
        if epoch < self.start_epoch:
            return None
        self.history.append(record)
        if self.collapse is not None:
            return None
        kind = self.rule.check(self.history, self.out_dim)
        if kind is None:
            return None
        self.collapse, self.first_epoch = kind, epoch
        return warning(kind, epoch, record, self.out_dim, self.rule.patience)


def log_record(entry: dict) -> dict:
    """The per-epoch metrics of a ``log.txt`` entry (its ``train_`` prefixes dropped)."""
    return {key.removeprefix("train_"): value for key, value in entry.items()}


def first_warning_in_log(entries: list[dict], out_dim: int, start_epoch: int = 0) -> str | None:
    """The collapse warning that ``log.txt`` entries (with ``train_``-prefixed metrics) would
    have raised during training, or None."""
    detector = CollapseDetector(out_dim, start_epoch=start_epoch)
    for entry in entries:
        message = detector.update(entry["epoch"], log_record(entry))
        if message:
            return message
    return None


def warning(kind: str, epoch: int, record: dict, out_dim: int, patience: int) -> str:
    """The one warning for a collapse of ``kind`` found at ``epoch``."""
    ln_k = math.log(out_dim) if out_dim > 1 else 1.0
    return (f"WARNING: {kind} collapse at epoch {epoch}: for {patience} epochs the teacher "
            f"entropy has been {record['teacher_entropy']:.3f} nats "
            f"({record['teacher_entropy_ratio']:.1%} of ln K = {ln_k:.2f}), the batch uses "
            f"{record['prototypes_used']:.1f} of {out_dim} prototypes and KL(teacher || "
            f"student) is {record['kl']:.4f}: the features are no longer learning. "
            f"{HINTS[kind]}.")
