"""Triton kernels and their launchers (installed as ``dino_fast.kernels``).

No autograd and no nn here: the ops in ``dino_fast.ops`` register these launchers with
``torch.library`` and own dispatch. Importing this package needs ``triton``.
"""
