"""Watching a run: the collapse diagnostics and warning (:mod:`.health`), the per-epoch monitor
behind ``log.txt``, TensorBoard and the online k-NN (:mod:`.monitor`, :mod:`.online_knn`), and
the curves of ``log.txt`` (:mod:`.curves`). Only the standard-library pieces are exported, so
``python -m dino_fast.plot`` starts without importing torch."""
from dino_fast.monitoring.curves import draw, read_log
from dino_fast.monitoring.health import CollapseDetector, CollapseRule, epoch_health

__all__ = ["CollapseDetector", "CollapseRule", "draw", "epoch_health", "read_log"]
