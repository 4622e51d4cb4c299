"""dino_fast: the DINO self-supervised ViT recipe (Caron et al. 2021), official-compatible and fast."""
__version__ = "0.1.0"
