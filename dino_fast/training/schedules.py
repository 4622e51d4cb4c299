"""Per-iteration schedules of the official recipe (``utils.cosine_scheduler``)."""
import numpy as np


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                     start_warmup_value=0.0) -> np.ndarray:
    """``epochs * niter_per_ep`` values: a linear warm-up (endpoint included) from
    ``start_warmup_value`` to ``base_value``, then a half cosine from ``base_value`` towards
    ``final_value`` (which is approached, never reached exactly)."""
    if warmup_epochs > epochs:
        raise ValueError(f"warmup_epochs={warmup_epochs} exceeds epochs={epochs}")
    warmup_iters = int(warmup_epochs * niter_per_ep)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters else []
    iters = np.arange(int(epochs * niter_per_ep) - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule
