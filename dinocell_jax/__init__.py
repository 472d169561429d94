"""dinocell_jax: DINO/iBOT/KoLeo pretraining of ViTs on Cell Painting images."""

__version__ = "0.1.0"
