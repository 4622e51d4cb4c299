"""The fused ops of a DINO step, each with one dispatch point (see ``_backend``)."""
from dino_fast.ops._backend import BACKENDS, requested_backend, resolve, use_backend

__all__ = ["BACKENDS", "requested_backend", "resolve", "use_backend"]
