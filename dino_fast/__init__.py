"""dino_fast: the DINO self-supervised ViT recipe (Caron et al. 2021), official-compatible and
fast. The commands users run sit here (``python -m dino_fast.<command>``); the library is in the
folders below them."""
__version__ = "0.1.0"
