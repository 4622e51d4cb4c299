"""Accounting for the training step: operators and host syncs dispatched by any code
(:mod:`.dispatch_count`) and the FLOPs behind every MFU figure (:mod:`.flops`)."""
from dino_fast.profiling.dispatch_count import DispatchCounter
from dino_fast.profiling.flops import dino_step_flops

__all__ = ["DispatchCounter", "dino_step_flops"]
