"""Backbones (ViT-3D, Swin), self-supervised heads (MAE, SimMIM) and their builders.

The builders are resolved on first use (PEP 562), so code that only needs the configs
(`ModelConfig`, model.json) does not import JAX and Flax: an ONNX Runtime prediction
starts 2-3 s sooner.
"""

from __future__ import annotations

import importlib

from lnfm.models.config import ModelConfig

_BUILDERS = ("build_encoder", "build_ssl_model", "param_count")


def __getattr__(name: str):
    if name in _BUILDERS:
        return getattr(importlib.import_module("lnfm.models.build"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ModelConfig", *_BUILDERS]
