"""LNFM: lymph-node foundation model (JAX/Flax)."""

__version__ = "0.1.0"
